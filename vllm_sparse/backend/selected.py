"""The class the SPARSE enum entry points at: the sparse backend built on this platform's dense one."""

from __future__ import annotations

from vllm.platforms import current_platform

from vllm_sparse.backend.factory import make_sparse_backend
from vllm_sparse.kernels.paged import PagedKV
from vllm_sparse.log import logger

if current_platform.is_cpu():
    from vllm.platforms import CpuArchEnum
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend as _Dense

    def _cpu_vec_layout(builder, layer_names):
        # PagedKV.from_cpu_cache reads the vec/vec16 page layout. The AMX layout packs keys
        # differently, so on AMX machines the sparse layers' group keeps the vec layout instead.
        if builder.isa in ("vec", "vec16"):
            return None
        if current_platform.get_cpu_architecture() != CpuArchEnum.X86:
            return f"the CPU sparse path does not read the {builder.isa!r} KV page layout"
        logger.info("vllm-sparse: using the 'vec' CPU attention layout instead of %r for sparse layers",
                    builder.isa)
        builder.isa = "vec"
        builder._set_isa_to_layers(layer_names)
        return None

    SparseAttentionBackend = make_sparse_backend(_Dense, PagedKV.from_cpu_cache, _cpu_vec_layout)
elif current_platform.is_cuda():
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend as _Dense

    SparseAttentionBackend = make_sparse_backend(_Dense, PagedKV.from_flash_cache)
else:  # ROCm, XPU, TPU, ...: their FlashAttention classes and cache layouts are not the ones read here
    raise RuntimeError(f"vllm-sparse: the SPARSE attention backend runs on CUDA GPUs and on CPUs, not on "
                       f"{current_platform.device_name or current_platform.device_type}; drop "
                       "--attention-backend sparse")

# vLLM resolves the selected class again from "module.qualname": make that this attribute.
SparseAttentionBackend.__module__ = __name__
SparseAttentionBackend.__qualname__ = SparseAttentionBackend.__name__ = "SparseAttentionBackend"
