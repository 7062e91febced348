"""Shared scaffolding for estimators: one prefill chunk of one request, seen block by block.

Selection blocks are aligned to absolute token positions: block b holds positions
[b * block_size, (b + 1) * block_size). Query block row j of a chunk is absolute block
`first_query_block + j`; KV blocks run from 0 to the chunk's last block, and KV block kb is
causal for that row iff kb <= first_query_block + j.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from vllm_sparse.kernels.paged import PagedKV


@dataclass(frozen=True)
class ChunkContext:
    q: torch.Tensor  # [q_len, num_heads, head_dim] this chunk's queries, for the heads being scored
    kv_head_of: torch.Tensor  # [num_heads] KV head each of those q heads reads
    kv: PagedKV
    block_table: torch.Tensor  # [max_pages] this request's physical page ids
    context_len: int  # tokens before this chunk
    block_size: int  # selection block, a multiple of kv.page_size
    scale: float

    @property
    def q_len(self) -> int:
        return self.q.shape[0]

    @property
    def seq_len(self) -> int:
        return self.context_len + self.q_len

    @property
    def first_query_block(self) -> int:
        return self.context_len // self.block_size

    @property
    def num_kv_blocks(self) -> int:
        return (self.seq_len - 1) // self.block_size + 1

    @property
    def num_query_blocks(self) -> int:
        return self.num_kv_blocks - self.first_query_block

    def query_block_ids(self) -> torch.Tensor:
        """Absolute block id of each query block row, [num_query_blocks]."""
        return torch.arange(self.first_query_block, self.num_kv_blocks, device=self.q.device)

    def causal_block_mask(self) -> torch.Tensor:
        """[num_query_blocks, num_kv_blocks] True where the KV block is visible to the row."""
        kb = torch.arange(self.num_kv_blocks, device=self.q.device)
        return kb[None, :] <= self.query_block_ids()[:, None]

    def mask_noncausal(self, scores: torch.Tensor) -> torch.Tensor:
        """Set scores of blocks a row may not see to -inf; scores is [heads, rows, kv_blocks]."""
        return scores.masked_fill(~self.causal_block_mask()[None], float("-inf"))

    @cached_property
    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All keys/values of the request up to the chunk's end, [seq_len, num_kv_heads, D] each."""
        pages = self.block_table[: (self.seq_len - 1) // self.kv.page_size + 1].long()
        return self.kv.gather(pages, self.seq_len)

    @property
    def keys(self) -> torch.Tensor:
        """Keys read by each scored q head, [num_heads, seq_len, D] (fp32)."""
        return self.keys_values[0].float().permute(1, 0, 2)[self.kv_head_of]

    def query_positions(self) -> torch.Tensor:
        return torch.arange(self.context_len, self.seq_len, device=self.q.device)

    def pooled_queries(self) -> torch.Tensor:
        """Mean query of each query block row (over the rows present in this chunk), [heads, rows, D]."""
        rows = self.query_positions() // self.block_size - self.first_query_block
        return _block_mean(self.q.float().permute(1, 0, 2), rows, self.num_query_blocks)

    def pooled_keys(self) -> torch.Tensor:
        """Mean key of each KV block, per scored q head, [heads, kv_blocks, D]."""
        blocks = torch.arange(self.seq_len, device=self.q.device) // self.block_size
        return _block_mean(self.keys, blocks, self.num_kv_blocks)

    def token_logits_to_block_scores(
        self, logits: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits of some query rows against some key columns -> block scores.

        logits [heads, n, m] for query rows at absolute positions q_pos [n] and key columns at
        k_pos [m] (default: every key, 0..seq_len-1). Each row's causal softmax is summed into KV
        blocks, averaged over the rows of each query block, and returned as log-mass
        [heads, query_blocks, kv_blocks]; a query block with no rows given gets zero mass.
        """
        if k_pos is None:
            k_pos = torch.arange(self.seq_len, device=logits.device)
        logits = logits.float().masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        heads, n, _ = probs.shape
        per_block = torch.zeros(heads, n, self.num_kv_blocks, device=probs.device)
        per_block.index_add_(2, k_pos // self.block_size, probs)
        rows = q_pos // self.block_size - self.first_query_block
        mass = _block_mean(per_block, rows, self.num_query_blocks)
        return self.mask_noncausal(torch.log(mass.clamp_min(1e-30)))


def _block_mean(x: torch.Tensor, block_of: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """x [heads, n, F] rows grouped by block_of [n] -> per-block means [heads, n_blocks, F] (0 where empty)."""
    sums = torch.zeros(x.shape[0], n_blocks, x.shape[2], device=x.device, dtype=x.dtype)
    sums.index_add_(1, block_of, x)
    counts = torch.bincount(block_of, minlength=n_blocks).clamp_min(1).to(x.dtype)
    return sums / counts[None, :, None]
