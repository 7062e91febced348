"""Shared scaffolding for estimators: one prefill chunk of one request, seen block by block.

Selection blocks are aligned to absolute token positions: block b holds positions
[b * block_size, (b + 1) * block_size). Query block row j of a chunk is absolute block
`first_query_block + j`; KV blocks run from 0 to the chunk's last block, and KV block kb is
causal for that row iff kb <= first_query_block + j.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from vllm_sparse.estimators.block_means import block_key_means_ref, block_key_means_triton
from vllm_sparse.kernels.paged import PagedKV

COLUMN_PAD = 2**31 - 1  # pads a head's kept-column list: past every sequence, so never read


@dataclass(frozen=True)
class ChunkContext:
    q: torch.Tensor  # [q_len, num_heads, head_dim] this chunk's queries, for the heads being scored
    kv_head_of: torch.Tensor  # [num_heads] KV head each of those q heads reads
    kv: PagedKV
    block_table: torch.Tensor  # [max_pages] this request's physical page ids
    context_len: int  # tokens before this chunk
    block_size: int  # selection block, a multiple of kv.page_size
    scale: float
    kv_head_ids: tuple[int, ...] | None = None  # kv_head_of on the host (saves a device sync)
    kernels: bool | None = None  # fused Triton estimators; None: on CUDA tensors (True on CPU: interpreter)
    # What an estimator finds besides block scores, for the attention: "columns", the key columns a
    # `vertical_slash` plan with `blocks: columns` keeps token by token ([scored heads, K] int32, sorted,
    # padded with COLUMN_PAD).
    extras: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def use_kernels(self) -> bool:
        return self.q.is_cuda if self.kernels is None else self.kernels

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

    @cached_property
    def kv_keys(self) -> torch.Tensor:
        """Keys of every KV head of the layer, [num_kv_heads, seq_len, D] (fp32), one copy per KV head."""
        return self.keys_values[0].float().permute(1, 0, 2)

    @property
    def keys(self) -> torch.Tensor:
        """Keys read by each scored q head, [num_heads, seq_len, D] (fp32); a copy per q head: prefer `qk`."""
        return self.kv_keys[self.kv_head_of]

    @cached_property
    def _groups(self) -> tuple[list[int], int] | None:
        """(KV heads, q heads per KV head) when the scored heads come sorted in equal groups, else None."""
        ids = self.host_kv_head_ids()
        kv = list(dict.fromkeys(ids))
        group = len(ids) // len(kv)
        return (kv, group) if ids == [k for k in kv for _ in range(group)] else None

    @property
    def kv_group_size(self) -> int | None:
        """q heads per KV head when the scored heads are every KV head's, in order, in equal consecutive
        groups (the backend's layout of a layer's heads), else None."""
        if self._groups is None or self._groups[0] != list(range(self.kv.num_kv_heads)):
            return None
        return self._groups[1]

    def by_kv_head(self, q: torch.Tensor, k_kv: torch.Tensor) -> torch.Tensor:
        """q [heads, n, F] @ k_kv[kv_head_of(head)]^T -> [heads, n, m], for k_kv [num_kv_heads, m, F].

        The q heads of a GQA group share one product with their KV head's keys (no per-head key copy).
        """
        if self._groups is None:
            return q @ k_kv[self.kv_head_of].transpose(1, 2)
        kv, group = self._groups
        k = k_kv if kv == list(range(k_kv.shape[0])) else k_kv[kv]
        h, n, f = q.shape
        return (q.reshape(len(kv), group * n, f) @ k.transpose(1, 2)).view(h, n, -1)

    def group_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Average x [heads, ...] over the scored heads of each KV group; every head gets its group's mean."""
        if self._groups is not None:
            kv, group = self._groups
            return x.view(len(kv), group, *x.shape[1:]).mean(1, keepdim=True).expand(
                len(kv), group, *x.shape[1:]).reshape(x.shape)
        n_kv = self.kv.num_kv_heads
        sums = torch.zeros((n_kv, *x.shape[1:]), device=x.device, dtype=x.dtype).index_add_(0, self.kv_head_of, x)
        counts = torch.zeros(n_kv, device=x.device, dtype=x.dtype).index_add_(
            0, self.kv_head_of, torch.ones_like(self.kv_head_of, dtype=x.dtype))
        return (sums / counts.clamp_min(1).view(-1, *([1] * (x.dim() - 1))))[self.kv_head_of]

    def host_kv_head_ids(self) -> list[int]:
        return list(self.kv_head_ids) if self.kv_head_ids is not None else self.kv_head_of.tolist()

    def qk(self, q: torch.Tensor) -> torch.Tensor:
        """q [heads, n, D] (fp32) rows of the scored heads against every key, [heads, n, seq_len]."""
        return self.by_kv_head(q, self.kv_keys)

    def query_positions(self) -> torch.Tensor:
        return torch.arange(self.context_len, self.seq_len, device=self.q.device)

    def pooled_queries(self) -> torch.Tensor:
        """Mean query of each query block row (over the rows present in this chunk), [heads, rows, D] fp32."""
        return _pool_rows(self.q, self.context_len, self.block_size, self.first_query_block,
                          self.num_query_blocks).permute(1, 0, 2)

    def pooled_keys(self) -> torch.Tensor:
        """Mean key of each KV block, per scored q head, [heads, kv_blocks, D] fp32.

        Read page by page from the cache (one Triton launch on GPUs), once per KV head: no fp32
        copy of the keys, which at 128K would be 0.5 GB per layer.
        """
        means = block_key_means_triton if self.q.is_cuda else block_key_means_ref
        return means(self.kv, self.block_table, self.seq_len, self.block_size)[self.kv_head_of]

    def token_logits_to_block_scores(self, logits: torch.Tensor, q_pos: torch.Tensor, key_stride: int = 1
                                     ) -> torch.Tensor:
        """Logits of some query rows against evenly spaced key columns -> block scores.

        logits [heads, n, m] for query rows at absolute positions q_pos [n] and key columns at
        positions 0, key_stride, 2 * key_stride, ... (key_stride divides the block size). Each row's
        causal softmax is summed into KV blocks, averaged over the rows of each query block, and
        returned as log-mass [heads, query_blocks, kv_blocks]; a query block with no rows gets zero mass.
        """
        k_pos = torch.arange(logits.shape[-1], device=logits.device) * key_stride
        logits = logits.float().masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        per_block = _sum_last_dim_in_blocks(probs, self.block_size // key_stride, self.num_kv_blocks)
        rows = q_pos // self.block_size - self.first_query_block
        mass = _block_mean(per_block, rows, self.num_query_blocks)
        return self.mask_noncausal(torch.log(mass.clamp_min(1e-30)))


def _sum_last_dim_in_blocks(x: torch.Tensor, per_block: int, n_blocks: int) -> torch.Tensor:
    """x [..., m] columns 0..m-1 -> sums of each run of `per_block` columns, [..., n_blocks] (no atomics)."""
    pad = n_blocks * per_block - x.shape[-1]
    x = torch.nn.functional.pad(x, (0, pad)) if pad > 0 else x[..., : n_blocks * per_block]
    return x.view(*x.shape[:-1], n_blocks, per_block).sum(-1)


def _pool_rows(x: torch.Tensor, first_pos: int, block_size: int, first_block: int, n_blocks: int
               ) -> torch.Tensor:
    """x [n, ...] rows at positions first_pos.. -> per-block means [n_blocks, ...] in fp32 for blocks
    first_block..first_block + n_blocks - 1 (0 where a block has no rows); a reshape, no scatter."""
    n = x.shape[0]
    front = first_pos - first_block * block_size
    back = n_blocks * block_size - front - n
    # Block-aligned chunks (the usual case) need no padded copy of the queries.
    padded = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (front, back)) if front or back else x
    sums = padded.view(n_blocks, block_size, *x.shape[1:]).sum(1, dtype=torch.float32)
    starts = (torch.arange(n_blocks, device=x.device) + first_block) * block_size
    counts = (torch.clamp(starts + block_size, max=first_pos + n) - torch.clamp(starts, min=first_pos)).clamp(min=1)
    return sums / counts.to(torch.float32).view(-1, *([1] * (x.dim() - 1)))


def _block_mean(x: torch.Tensor, block_of: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """x [heads, n, F] rows grouped by block_of [n] -> per-block means [heads, n_blocks, F] (0 where empty)."""
    sums = torch.zeros(x.shape[0], n_blocks, x.shape[2], device=x.device, dtype=x.dtype)
    sums.index_add_(1, block_of, x)
    counts = torch.zeros(n_blocks, device=x.device, dtype=x.dtype)
    counts.index_add_(0, block_of, torch.ones_like(block_of, dtype=x.dtype))  # bincount would sync
    return sums / counts.clamp_min(1)[None, :, None]
