"""One chunk-layer's kept density into the device histogram, in one launch.

The torch way (sum the page counts, divide, bucketize, two accumulating adds) is six launches per
sparse chunk-layer: at 32 layers a fifth of a step's glue launches, each a queue entry that keeps the
host behind the GPU. This kernel does the same arithmetic in one program: the share is the correctly
rounded fp32 quotient of the kept and causal pages (the torch path divides by a tensor for the same
quotient: CUDA's division by a number multiplies by its reciprocal, one ulp off at 9/10), its bucket
the count of bounds below it (`torch.bucketize`, right=False).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_sparse.kernels.launch import storage_base
from vllm_sparse.kernels.page_count import page_sum


@triton.jit(do_not_specialize=["kept_offset", "n_kept", "total", "bucket0", "sum_slot"])
def _record_density_kernel(KEPT, kept_offset, n_kept, total, BOUNDS, ACC, bucket0, sum_slot,
                           N_BOUNDS: tl.constexpr, BLOCK: tl.constexpr, BOUNDS_PAD: tl.constexpr):
    share = tl.math.div_rn(page_sum(KEPT + kept_offset, n_kept, BLOCK).to(tl.float32), total)
    b = tl.arange(0, BOUNDS_PAD)
    bounds = tl.load(BOUNDS + b, mask=b < N_BOUNDS, other=float("inf"))
    slot = bucket0 + tl.sum((bounds < share).to(tl.int32), axis=0)
    tl.store(ACC + slot, tl.load(ACC + slot) + 1.0)
    tl.store(ACC + sum_slot, tl.load(ACC + sum_slot) + share.to(tl.float64))


def record_density_kernel(kept: torch.Tensor, total: int, bounds: torch.Tensor, acc: torch.Tensor, bucket0: int,
                          sum_slot: int) -> None:
    """acc[bucket0 + bucket of kept.sum() / total] += 1 and acc[sum_slot] += that share (kept: int32 pages,
    contiguous, any shape, e.g. a slice of a CSR indptr; bounds fp32; acc fp64; all on one device)."""
    base, offset = storage_base(kept)  # (a slice at any offset: one compiled variant, `kernels/launch.py`)
    _record_density_kernel[(1,)](base, offset, kept.numel(), float(total), bounds, acc, bucket0, sum_slot,
                                 N_BOUNDS=bounds.numel(), BLOCK=1024,
                                 BOUNDS_PAD=triton.next_power_of_2(bounds.numel()), num_warps=4)
