"""The class the SPARSE enum entry points at: the sparse backend built on this platform's dense one."""

from __future__ import annotations

from vllm.platforms import current_platform

from vllm_sparse.backend.factory import make_sparse_backend
from vllm_sparse.kernels.paged import PagedKV

if current_platform.is_cpu():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend as _Dense

    _kv_view = PagedKV.from_cpu_cache
else:
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend as _Dense

    _kv_view = PagedKV.from_flash_cache

SparseAttentionBackend = make_sparse_backend(_Dense, _kv_view)
