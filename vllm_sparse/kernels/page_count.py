"""A chunk-layer's KV pages read, summed into one slot of a device counter in one launch (the `dense_above`
rule's count, `backend/density_guard.py`): the torch way, a sum and an add, is two launches a sparse chunk-layer."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_sparse.kernels.launch import storage_base


@triton.jit
def page_sum(KEPT, n_kept, BLOCK: tl.constexpr):
    """The sum of `n_kept` int32 page counts at KEPT, in int64 (also the metrics' density kernel's)."""
    i = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int64)
    for i0 in range(0, n_kept, BLOCK):
        acc += tl.load(KEPT + i0 + i, mask=i0 + i < n_kept, other=0).to(tl.int64)
    return tl.sum(acc, axis=0)


@triton.jit(do_not_specialize=["kept_offset", "n_kept", "slot"])
def _add_page_count_kernel(KEPT, kept_offset, n_kept, ACC, slot, BLOCK: tl.constexpr):
    tl.store(ACC + slot, tl.load(ACC + slot) + page_sum(KEPT + kept_offset, n_kept, BLOCK))


def add_page_count(kept: torch.Tensor, acc: torch.Tensor, slot: int) -> None:
    """acc[slot] += kept.sum() (kept: int32 page counts, any shape, e.g. a slice of a CSR index array; acc int64)."""
    kept = kept.contiguous().to(torch.int32)
    base, offset = storage_base(kept)  # (a slice at any offset: one compiled variant, `kernels/launch.py`)
    _add_page_count_kernel[(1,)](base, offset, kept.numel(), acc, slot, BLOCK=256, num_warps=1)
