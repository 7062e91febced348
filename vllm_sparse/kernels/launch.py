"""Launch arguments that keep Triton from compiling a kernel again mid-request.

Triton specialises a kernel on each integer argument (== 1, divisible by 16) and on each
pointer's 16-byte alignment, and our row-sized kernels take the row length as a constexpr.
A new combination compiles for a second or more, which a request would wait for. So: integer
arguments are marked `do_not_specialize`, pointers are passed as their allocation's base with an
element offset (or, for the step's tile geometry, which several kernels take as slices of one copy, each
slice starts 16-byte aligned: `backend/batch.tile_geometry`), and row lengths are rounded up to a few buckets
the engine compiles at start. `VLLM_SPARSE_LOG_COMPILES=1` shows any compile that still happens in a request.
"""

from __future__ import annotations

import torch
import triton

MIN_ROW_BUCKET = 1024  # one compiled variant covers 128K tokens in 128-token blocks


def row_bucket(n: int, device: torch.device) -> int:
    """The constexpr row length for rows of n elements (no floor in Triton's CPU interpreter, which
    compiles nothing and runs row-sized work at Python speed)."""
    return triton.next_power_of_2(n) if device.type == "cpu" else max(MIN_ROW_BUCKET, triton.next_power_of_2(n))


def row_buckets(max_n: int) -> list[int]:
    """Every bucket rows of up to max_n elements can use."""
    out, b = [], MIN_ROW_BUCKET
    while True:
        out.append(b)
        if b >= max_n:
            return out
        b *= 2


def storage_base(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(a 1-D tensor over t's whole allocation, t's element offset in it): an aligned pointer for Triton."""
    base = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage())
    return base, t.storage_offset()
