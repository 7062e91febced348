"""The class the SPARSE enum entry points at: this platform's sparse backend (`cuda.py`, `cpu.py`)."""

from __future__ import annotations

from vllm.platforms import current_platform

if current_platform.is_cuda():
    from vllm_sparse.backend.cuda import SparseFlashAttentionBackend as SparseAttentionBackend
elif current_platform.is_cpu():
    from vllm_sparse.backend.cpu import SparseCPUAttentionBackend as SparseAttentionBackend
else:  # ROCm, XPU, TPU, ...: their FlashAttention classes and cache layouts are not the ones read here
    raise RuntimeError(f"vllm-sparse: the SPARSE attention backend runs on CUDA GPUs and on CPUs, not on "
                       f"{current_platform.device_name or current_platform.device_type}; drop "
                       "--attention-backend sparse")

__all__ = ["SparseAttentionBackend"]
