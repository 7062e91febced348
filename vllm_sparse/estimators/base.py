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
