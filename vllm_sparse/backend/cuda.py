"""SPARSE on CUDA: vLLM's FlashAttention backend with the sparse prefill path in front."""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)

from vllm_sparse import compat
from vllm_sparse.backend.batch import SparseBatch
from vllm_sparse.backend.builder import SparseBuilderMixin
from vllm_sparse.backend.capabilities import SparseBackendCapabilities
from vllm_sparse.backend.checks import check_kv_written_before_forward
from vllm_sparse.backend.impl import SparseImplMixin
from vllm_sparse.kernels.paged import PagedKV

check_kv_written_before_forward(FlashAttentionBackend)


@dataclass
class SparseFlashAttentionMetadata(FlashAttentionMetadata):
    sparse_batch: SparseBatch | None = None


class SparseFlashAttentionMetadataBuilder(SparseBuilderMixin, FlashAttentionMetadataBuilder):
    metadata_cls = SparseFlashAttentionMetadata


class SparseFlashAttentionImpl(SparseImplMixin, FlashAttentionImpl):
    kv_view = staticmethod(PagedKV.from_flash_cache)


class SparseFlashAttentionBackend(SparseBackendCapabilities, FlashAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return compat.BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[SparseFlashAttentionImpl]:
        return SparseFlashAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SparseFlashAttentionMetadataBuilder]:
        return SparseFlashAttentionMetadataBuilder
