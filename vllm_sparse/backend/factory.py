"""Build the SPARSE backend as subclasses of the platform's dense backend.

Subclassing (rather than wrapping) keeps everything vLLM asks of a backend — KV cache
shape and layout, block sizes, dtypes, isinstance checks on the impl — exactly as the dense
backend answers it; we only add the sparse prefill path on top.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable

import torch

from vllm_sparse import compat
from vllm_sparse.backend.batch import SparseBatch, classify
from vllm_sparse.backend.kernel_choice import check_kernel_choice, selected_kernel
from vllm_sparse.backend.plan_cache import plan_for
from vllm_sparse.backend.reserve import reserve_estimator_workspace
from vllm_sparse.backend.sparse_path import attend_sparse_chunks
from vllm_sparse.backend.warmup import run_dummy_sparse_steps, warm_up_selection_kernels
from vllm_sparse.config.errors import SparseConfigError
from vllm_sparse.config.sharding import head_shard
from vllm_sparse.kernels.paged import PagedKV
from vllm_sparse.log import logger

_SPARSE_BATCH = "sparse_batch"  # attribute set on the dense metadata object for this step
# VLLM_SPARSE_LOG_STEPS=1: one log line per step (per layer group) that sends chunks to the sparse path,
# from host data the builder has anyway: a way to see that a request went sparse.
_LOG_STEPS = os.environ.get("VLLM_SPARSE_LOG_STEPS", "0") == "1"


def _layer_index(layer_name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer_name)


def check_block_size(block_size: int, page_size: int, source: str) -> None:
    if block_size % page_size:
        raise SparseConfigError(source, [(
            "block_size",
            f"selection block_size {block_size} must be a multiple of the KV cache block size {page_size} "
            f"(vLLM --block-size); use a multiple of {page_size}",
        )])


def _kv_cache_problem(vllm_config) -> str | None:
    dtype = vllm_config.cache_config.cache_dtype
    if dtype not in ("auto", None) and not str(dtype).startswith(("bfloat16", "float16", "half")):
        return f"the sparse path reads unquantized KV caches only, not kv_cache_dtype={dtype}"
    return None


def _layer_span(layer_names: list[str]) -> str:
    idx = sorted(_layer_index(n) for n in layer_names)
    return f"{idx[0]}-{idx[-1]}" if len(idx) > 1 else str(idx[0])


_warned_split_groups = False


def _rank_shard(plan, num_heads: int, num_kv_heads: int):
    """This rank's heads. With a sparse plan, a layout that cannot be sharded, or a layer whose local
    head counts are not the plan model's split, stops the engine here, at start; a dense plan needs
    no shard (None)."""
    global _warned_split_groups
    if not plan.is_sparse:
        return None
    tp = compat.tensor_parallel_size()
    shard = head_shard(plan.num_q_heads, plan.num_kv_heads, compat.tensor_parallel_rank(), tp, plan.source)
    if (len(shard.q_heads), len(shard.kv_heads)) != (num_heads, num_kv_heads):
        raise SparseConfigError(plan.source, [("tensor_parallel_size", (
            f"an attention layer has {num_heads} query / {num_kv_heads} KV heads on this rank, but the model's "
            f"{plan.num_q_heads} / {plan.num_kv_heads} heads split over tensor_parallel_size={tp} give "
            f"{len(shard.q_heads)} / {len(shard.kv_heads)}: the plan cannot say which heads this layer has"))])
    if shard.splits_groups and not _warned_split_groups:
        _warned_split_groups = True
        logger.warning("vllm-sparse: tensor parallelism over %d ranks spreads each GQA group (%d query heads "
                       "per KV head) over several ranks; each rank's block union covers only its own query "
                       "heads, so sparse outputs differ from a single GPU's", shard.tp_size, shard.group_size)
    return shard


GPU_HEAD_SIZES = (16, 32, 64, 128, 256)  # the Triton kernels and the fused estimators (powers of two)


def check_head_size(plan, head_size: int) -> None:
    """On GPUs the sparse kernels take power-of-two head sizes up to 256: others stop the engine at start."""
    if head_size not in GPU_HEAD_SIZES:
        raise SparseConfigError(plan.source, [("model", (
            f"attention head size {head_size}: the sparse GPU kernels take {', '.join(map(str, GPU_HEAD_SIZES))}; "
            "run this model with a config that keeps its layers dense"))])


def _warm_up(plan, kv_cache_spec, vllm_config, device: torch.device) -> None:
    """Compile the selection kernels this engine can launch, now rather than on the first long prompt."""
    kernel = selected_kernel(device)
    if kernel == "reference":
        return
    local_q_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
    spec = kv_cache_spec
    warm_up_selection_kernels(plan, local_q_heads // spec.num_kv_heads, spec.block_size, spec.head_size, spec.dtype,
                              vllm_config.model_config.max_model_len, device, with_tables=kernel == "fa3")
    shard = _rank_shard(plan, local_q_heads, spec.num_kv_heads)
    if shard is not None:
        run_dummy_sparse_steps(plan, shard, spec.num_kv_heads, spec.head_size, spec.block_size, spec.dtype, device)


def make_sparse_backend(
    dense_backend: type,
    kv_view: Callable[[torch.Tensor], PagedKV],
    prepare_builder: Callable[[object, list[str]], str | None] = lambda builder, layer_names: None,
) -> type:
    """`kv_view` reads the dense backend's KV cache as pages; `prepare_builder` adapts a new builder
    to what the sparse path needs and returns why it cannot, if it cannot (those layers run dense)."""
    if getattr(dense_backend, "forward_includes_kv_cache_update", True):
        # The sparse path runs instead of the dense forward for its chunks: their keys and values must
        # already be in the cache when forward runs (vLLM writes them first, for these backends).
        raise RuntimeError(f"vllm-sparse: {dense_backend.__name__} writes the KV cache inside forward; the "
                           "SPARSE backend needs a vLLM whose attention writes it before (0.26 or later)")
    dense_builder = dense_backend.get_builder_cls()
    dense_impl = dense_backend.get_impl_cls()

    class SparseMetadataBuilder(dense_builder):
        def __init__(self, kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs):
            super().__init__(kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs)
            self._plan = plan_for(vllm_config)
            self._has_sparse_layer = any(self._plan.layer(_layer_index(n)).is_sparse for n in layer_names)
            if self._has_sparse_layer:
                check_block_size(self._plan.block_size, kv_cache_spec.block_size, self._plan.source)
                check_kernel_choice(torch.device(device))  # VLLM_SPARSE_KERNEL, checked before any request
                why = _kv_cache_problem(vllm_config) or prepare_builder(self, layer_names)
                if why:
                    logger.warning("vllm-sparse: %s; layers %s run dense", why, _layer_span(layer_names))
                    self._has_sparse_layer = False
            if self._has_sparse_layer and torch.device(device).type == "cuda":
                _warm_up(self._plan, kv_cache_spec, vllm_config, torch.device(device))

        @classmethod
        def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
            """With a sparse plan, full CUDA graphs only for decode-only batches: a prefill chunk's sparse
            step is planned on the host per chunk, which a replayed graph would not redo."""
            base = super().get_cudagraph_support(vllm_config, kv_cache_spec)
            if not plan_for(vllm_config).is_sparse:
                return base
            decode_only = type(base).UNIFORM_SINGLE_TOKEN_DECODE
            return base if base.value <= decode_only.value else decode_only

        def build(self, common_prefix_len, common_attn_metadata, *args, **kwargs):
            md = super().build(common_prefix_len, common_attn_metadata, *args, **kwargs)
            if not self._has_sparse_layer:
                return md
            chunks, dense_reqs, dense_tokens = classify(common_attn_metadata, self._plan.dense_below,
                                                        min_query_len=self._plan.min_query_tokens)
            if not chunks:
                return md
            if _LOG_STEPS:
                logger.info("vllm-sparse: step goes sparse for %d chunk(s): %s", len(chunks), ", ".join(
                    f"{c.q_end - c.q_start} tokens after {c.context_len}" for c in chunks))
            dense_md = None
            if len(dense_reqs):
                sub = compat.slice_common_metadata(common_attn_metadata, dense_reqs, dense_tokens)
                dense_md = super().build(0, sub, *args, **kwargs)
            # The dense metadata stays what vLLM expects; the sparse step rides along as an attribute.
            object.__setattr__(md, _SPARSE_BATCH, SparseBatch(
                tuple(chunks), dense_tokens.to(common_attn_metadata.query_start_loc.device) if len(dense_reqs)
                else None, dense_md))
            return md

    class SparseAttentionImpl(dense_impl):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bound = inspect.signature(dense_impl.__init__).bind(self, *args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            self._unsupported = [
                why for why, bad in (
                    ("sliding window", a.get("sliding_window") not in (None, -1, (-1, -1))),
                    ("ALiBi", a.get("alibi_slopes") is not None),
                    ("logit soft-capping", a.get("logits_soft_cap") not in (None, 0, 0.0)),
                    ("attention sinks", a.get("sinks") is not None),
                    ("non-decoder attention", str(getattr(a.get("attn_type"), "value", a.get("attn_type")))
                     not in ("decoder", "None")),
                ) if bad
            ]
            # Resolve (and validate) the plan now, at engine start, not on the first request.
            vllm_config = compat.current_vllm_config()
            self._plan = plan_for(vllm_config)
            # Layers the sparse path does not take run dense and need no shard; for the others a head
            # layout the plan cannot map is an error now.
            self._shard = None if self._unsupported else _rank_shard(self._plan, self.num_heads, self.num_kv_heads)
            if self._shard is not None and torch.cuda.is_available():
                check_head_size(self._plan, self.head_size)
                # While vLLM loads the model: counted with the weights, before the KV cache is sized.
                reserve_estimator_workspace(self._plan, self.num_heads,
                                            vllm_config.scheduler_config.max_num_batched_tokens,
                                            vllm_config.model_config.max_model_len,
                                            torch.device("cuda", torch.cuda.current_device()))
            self._heads = None  # this layer's per-local-head plans, bound on first use

        def _head_plans(self, layer) -> list | None:
            if self._heads is None:
                idx = self._layer_idx = _layer_index(layer.layer_name)
                lp = self._plan.layer(idx)
                heads = []
                if lp.is_sparse:
                    if self._unsupported:
                        logger.warning("vllm-sparse: layer %d (%s) has %s, which the sparse path does not "
                                       "support: it runs dense", idx, layer.layer_name, ", ".join(self._unsupported))
                    else:  # this rank's slice of the layer's heads (plans number heads unsharded)
                        heads = list(lp.heads_for(self._shard))
                self._heads = heads if any(h is not None for h in heads) else []
            return self._heads or None

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
            batch = getattr(attn_metadata, _SPARSE_BATCH, None)
            if batch is None:
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
            head_plans = self._head_plans(layer)
            if head_plans is None:
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
            if batch.dense_metadata is not None:
                idx = batch.dense_tokens
                sub_out = output[idx]
                super().forward(layer, query[idx], key[idx] if key is not None else None,
                                value[idx] if value is not None else None, kv_cache, batch.dense_metadata,
                                sub_out, *args, **kwargs)
                output[idx] = sub_out
            attend_sparse_chunks(query, output, kv_view(kv_cache), attn_metadata.block_table, batch.chunks,
                                 head_plans, self._plan.block_size, self.scale, self._plan.union_tile,
                                 self._layer_idx, dense_below=self._plan.dense_below)
            return output

    class SparseAttentionBackend(dense_backend):
        @staticmethod
        def get_name() -> str:
            return compat.BACKEND_NAME

        @staticmethod
        def get_impl_cls():
            return SparseAttentionImpl

        @staticmethod
        def get_builder_cls():
            return SparseMetadataBuilder

    return SparseAttentionBackend
