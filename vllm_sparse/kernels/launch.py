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

import functools

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
    """(a tensor whose pointer is t's allocation's, t's element offset in it): an aligned pointer for Triton. A
    tensor at offset 0 is its own base (Triton reads only the pointer and dtype), so a fresh allocation costs no
    op (a sparse chunk-layer passes six such tensors)."""
    offset = t.storage_offset()
    if offset == 0:
        return t, 0
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage()), offset


# Shared memory a block may opt into, by compute capability (CUDA C++ Programming Guide, technical specifications per
# compute capability): where torch does not report it. More than a kernel's launch asks for, the GPU refuses it.
OPTIN_SHARED_BYTES = {(8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): 232448,
                      (10, 0): 232448, (12, 0): 101376}
_SMALL_SHARED = 128 * 1024


@functools.cache
def shared_memory_per_block(device: torch.device) -> int:
    """Bytes of shared memory a block may use on `device` (CPU: Hopper's, so the interpreter takes CUDA's tiles)."""
    if device.type != "cuda":
        return OPTIN_SHARED_BYTES[(9, 0)]
    props = torch.cuda.get_device_properties(device)
    if torch.version.hip is not None:  # (ROCm: no opt-in figure, and its capabilities are not NVIDIA's)
        return props.shared_memory_per_block
    return (getattr(props, "shared_memory_per_block_optin", 0)
            or OPTIN_SHARED_BYTES.get((props.major, props.minor), min(OPTIN_SHARED_BYTES.values())))


def needs_small_tiles(head_dim: int, device: torch.device) -> bool:
    """Whether kernels whose tiles were sized on Hopper take smaller ones: head_dim > 128 on a GPU that gives a block
    128 KiB of shared memory or less (sm_86, sm_89, sm_120: 99 KiB), where Hopper's do not fit. `tests/gpu_compile.py`
    compiles every launch variant of the shipped and benchmark plans for sm_80, sm_86, sm_89, sm_90 and sm_100."""
    return head_dim > 128 and shared_memory_per_block(device) <= _SMALL_SHARED
