"""SPARSE on CPUs: vLLM's CPU attention backend with the sparse prefill path in front."""

from __future__ import annotations

from dataclasses import dataclass

from vllm.platforms import CpuArchEnum, current_platform
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_sparse import compat
from vllm_sparse.backend.batch import SparseBatch
from vllm_sparse.backend.builder import SparseBuilderMixin
from vllm_sparse.backend.capabilities import SparseBackendCapabilities
from vllm_sparse.backend.checks import check_kv_written_before_forward
from vllm_sparse.backend.impl import SparseImplMixin
from vllm_sparse.kernels.paged import PagedKV
from vllm_sparse.log import logger

check_kv_written_before_forward(CPUAttentionBackend)


@dataclass
class SparseCPUAttentionMetadata(CPUAttentionMetadata):
    sparse_batch: SparseBatch | None = None


class SparseCPUAttentionMetadataBuilder(SparseBuilderMixin, CPUAttentionMetadataBuilder):
    metadata_cls = SparseCPUAttentionMetadata

    def prepare_sparse_layers(self, layer_names: list[str]) -> str | None:
        # PagedKV.from_cpu_cache reads the vec/vec16 page layout. The AMX layout packs keys
        # differently, so on AMX machines the sparse layers' group keeps the vec layout instead.
        if self.isa in ("vec", "vec16"):
            return None
        if current_platform.get_cpu_architecture() != CpuArchEnum.X86:
            return f"the CPU sparse path does not read the {self.isa!r} KV page layout"
        logger.info("vllm-sparse: using the 'vec' CPU attention layout instead of %r for sparse layers", self.isa)
        compat.set_cpu_attention_isa(self, "vec", layer_names)
        return None

    def match_dense_builder(self, dense_builder) -> None:
        dense_builder.isa = self.isa  # the sparse layers' group's KV layout (its layers were set above)


class SparseCPUAttentionImpl(SparseImplMixin, CPUAttentionBackendImpl):
    kv_view = staticmethod(PagedKV.from_cpu_cache)


class SparseCPUAttentionBackend(SparseBackendCapabilities, CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return compat.BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[SparseCPUAttentionImpl]:
        return SparseCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SparseCPUAttentionMetadataBuilder]:
        return SparseCPUAttentionMetadataBuilder
