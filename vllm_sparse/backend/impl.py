"""The attention impl half of SPARSE: per layer, the sparse chunks of a step through
estimate -> select -> attend, everything else through the dense backend's forward.

`SparseImplMixin` goes in front of a dense backend's impl (`cuda.py`, `cpu.py`), which sets
`kv_view`: how the sparse path reads that backend's KV cache as pages.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from vllm_sparse import compat
from vllm_sparse.backend.checks import (
    check_forced_kernel,
    check_fp8_query_input,
    check_head_size,
    check_summaries,
    column_layers,
    fp8_cache,
    layer_index,
    rank_shard,
)
from vllm_sparse.backend.instrumented import attend_observed
from vllm_sparse.backend.kernel_choice import selected_kernel
from vllm_sparse.backend.plan_cache import plan_for
from vllm_sparse.backend.reserve import (
    layer_temporaries_bytes,
    packed_lists_itemsize,
    reserve_estimator_workspace,
    touch_step_temporaries,
)
from vllm_sparse.backend.sparse_path import dequantize_queries
from vllm_sparse.backend.split_groups import rank_layer
from vllm_sparse.config.errors import SparseConfigError
from vllm_sparse.decode.memory import refit_after_load, summaries_for
from vllm_sparse.decode.step import DecodeLayer, decode_row_limit, reserve_decode
from vllm_sparse.kernels.flash_compact import FLASH_VERSIONS
from vllm_sparse.kernels.paged import FP8_DTYPES, PagedKV
from vllm_sparse.kernels.workspace import WORKSPACE
from vllm_sparse.metrics.worker import worker_metrics


def unsupported_features(arguments: dict) -> list[str]:
    """What of a layer's attention (the dense impl's constructor arguments) the sparse path lacks."""
    a = arguments
    return [why for why, bad in (
        ("sliding window", a.get("sliding_window") not in (None, -1, (-1, -1))),
        ("ALiBi", a.get("alibi_slopes") is not None),
        ("logit soft-capping", a.get("logits_soft_cap") not in (None, 0, 0.0)),
        ("attention sinks", a.get("sinks") is not None),
        # Its keys are another layer's (vLLM writes none for it): the page summaries never see them.
        ("KV shared with another layer", a.get("kv_sharing_target_layer_name") is not None),
        ("non-decoder attention", str(getattr(a.get("attn_type"), "value", a.get("attn_type")))
         not in ("decoder", "None")),
    ) if bad]


def capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class SparseImplMixin:
    kv_view: Callable[[torch.Tensor], PagedKV]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        bound = inspect.signature(super().__init__).bind(*args, **kwargs)
        bound.apply_defaults()
        self.unsupported = unsupported_features(bound.arguments)  # read by checks.warn_dense_layers
        # Resolve (and validate) the plan now, at engine start, not on the first request.
        vllm_config = self._vllm_config = compat.current_vllm_config()  # (not set while a step runs)
        self._plan = plan_for(vllm_config)
        # Read on every KV write: a property that walks every layer and head would cost the step ~2 ms of
        # host time (32 layers x 1,024 heads; seen in a follow-up turn's profile, H200).
        self._needs_summaries = self._plan.needs_summaries
        self._summaries_cover_cache = False  # checked at the layer's first cache write
        # Layers the sparse path does not take run dense and need no shard; for the others a head
        # layout the plan cannot map is an error now.
        self._shard = None if self.unsupported else rank_shard(self._plan, self.num_heads, self.num_kv_heads)
        # The sparse chunks' attention kernel, chosen once (VLLM_SPARSE_KERNEL or by device), not per call.
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self._kernel = selected_kernel(device) if self._shard is not None and self._plan.is_sparse else None
        check_forced_kernel(self._plan, self._kernel)
        check_summaries(self._plan, vllm_config)
        # An fp8 cache (`checks.kv_cache_problem`): vLLM quantizes the queries for FA3, the sparse path reads both.
        self._fp8_cache = fp8_cache(getattr(self, "kv_cache_dtype", "auto"))
        self._fp8_dtype = compat.fp8_dtype() if self._fp8_cache else None  # (resolved once, not per forward)
        check_fp8_query_input(self._plan, self._kernel, getattr(self, "kv_cache_dtype", "auto"),
                              getattr(self, "supports_quant_query_input", False))
        self._temporaries = 0  # bytes of one sparse chunk-layer's temporaries at the longest context (CUDA)
        if self._shard is not None and torch.cuda.is_available():
            check_head_size(self._plan, self.head_size)
            # While vLLM loads the model: counted with the weights, before the KV cache is sized.
            reserve_estimator_workspace(self._plan, self.num_heads,
                                        vllm_config.scheduler_config.max_num_batched_tokens,
                                        vllm_config.model_config.max_model_len,
                                        torch.device("cuda", torch.cuda.current_device()), self.num_kv_heads,
                                        self.head_size,
                                        packed_lists_itemsize(self._kernel, vllm_config.model_config.dtype))
            # The int8 key columns one launch may hold: one KV head's at the longest context, as counted below.
            WORKSPACE.count_key_columns(vllm_config.model_config.max_model_len,
                                        torch.device("cuda", torch.cuda.current_device()))
            # What one sparse layer's forward may hold at the longest context, touched in vLLM's profiling
            # forward so that its memory profile, which sizes the KV cache, includes them (`reserve.py`).
            self._temporaries = layer_temporaries_bytes(
                self._plan, self.num_heads, self.num_kv_heads, vllm_config.scheduler_config.max_num_batched_tokens,
                vllm_config.model_config.max_model_len,
                self._plan.page_size_at_start(vllm_config.cache_config.block_size,
                                              vllm_config.cache_config.user_specified_block_size), self.head_size,
                vllm_config.model_config.dtype.itemsize, fp8_queries=self._fp8_cache,
                page_csr=self._kernel not in FLASH_VERSIONS or bool(column_layers(self._plan)), shard=self._shard)
            if self._fp8_cache and self._plan.is_sparse_decode:  # decode dequantizes the step's fp8 queries
                self._temporaries = max(self._temporaries, vllm_config.scheduler_config.max_num_batched_tokens
                                        * self.num_heads * self.head_size * vllm_config.model_config.dtype.itemsize)
            if self._plan.is_sparse_decode:  # decode's workspace and page summaries, before the KV cache is sized
                # fp8 pages: the summaries' share doubles. Reserved once, from the first layer built: an fp8 engine
                # counts every layer as fp8 (a layer `--kv-cache-dtype-skip-layers` keeps in 16 bits then
                # over-reserves its share, where counting all as 16-bit from a skipped first layer under-reserved).
                fp8_pages = self._fp8_cache or fp8_cache(str(vllm_config.cache_config.cache_dtype or "auto"))
                reserve_decode(vllm_config, self._plan, self.num_heads, self.num_kv_heads, self.head_size,
                               1 if fp8_pages else None)
        self._decode_layer = False  # this layer's DecodeLayer (None: vLLM's decode), bound on first use
        self._heads = None  # this layer's per-local-head plans, bound on first use
        self._metrics = False  # this process's WorkerMetrics (None: disabled), bound on first sparse step
        self._split = None  # this rank's part in a GQA group that spans ranks (`split_groups.py`)

    def _head_plans(self, layer) -> list | None:
        if self._heads is None:
            idx = self._layer_idx = layer_index(layer.layer_name)
            lp = self._plan.layer(idx)
            heads = None
            if lp.is_sparse:
                if not self.unsupported:  # (else dense: the builder said so at start)
                    heads, self._split = rank_layer(lp, self._shard)  # this rank's slice, plans number heads unsharded
            self._heads = heads or []
        return self._heads or None

    def _decode_for(self, layer, device: torch.device) -> DecodeLayer | None:
        """This layer's decode selection. In a layer group where some layers select pages at decode,
        the dense backend sees shortened decode rows, so every layer of the group runs the decode path
        (heads without a decode plan read every block)."""
        if self._decode_layer is False:
            self._decode_layer = None
            lp = self._plan.layer(layer_index(layer.layer_name))
            summaries = summaries_for(layer.layer_name)
            if self._shard is not None:  # (the builder checked the group's layers at start)
                vc = self._vllm_config
                self._decode_layer = DecodeLayer(
                    lp.decode_for(self._shard), summaries, self._plan.decode_block_tokens,
                    self._plan.decode_dense_below, decode_row_limit(vc), vc.model_config.max_model_len,
                    self.num_heads, self.head_size, device, lp.index, self._plan.tidal_selector_of(lp.index))
        return self._decode_layer

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        """vLLM calls this once the weights are loaded, before it measures memory: the page summaries'
        reservation, made before the weights were in memory, is taken again of what they left."""
        super().process_weights_after_loading(act_dtype)
        if self._plan.is_sparse_decode:
            refit_after_load()

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping, *args, **kwargs):
        """Where vLLM writes keys, the page summaries follow (prefill, decode, recompute)."""
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping, *args, **kwargs)
        if self._needs_summaries and slot_mapping is not None:
            summaries = summaries_for(layer.layer_name)  # (None for a layer that keeps none)
            if summaries is not None:
                if not self._summaries_cover_cache:  # once per layer (CUDA: graph capture, at start)
                    self._check_summaries_cover(layer, summaries, kv_cache)
                summaries.update(key, slot_mapping)

    def _check_summaries_cover(self, layer, summaries, kv_cache: torch.Tensor) -> None:
        """The summaries were sized from vLLM's block count and page size; the cache's own pages are what the
        slots index. Where vLLM splits its blocks into smaller kernel pages the two differ, and the summaries'
        update would write past its pages: stop, naming the layer, before the first write."""
        kv = self.kv_view(kv_cache)
        pages = kv.key.shape[0]
        if kv.page_size != summaries.page_size or pages > summaries.num_pages:
            raise SparseConfigError(self._plan.source, [("decode.estimator", (
                f"layer {layer.layer_name}: Quest's page summaries cover {summaries.num_pages} pages of "
                f"{summaries.page_size} tokens, the KV cache holds {pages} of {kv.page_size} (vLLM's kernel block "
                "size differs from its cache block size): use tidal decode (no summaries) or a --block-size its "
                "attention kernel takes whole"))])
        self._summaries_cover_cache = True

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        if attn_metadata is None and self._temporaries and not capturing(query):  # vLLM's profiling forward
            touch_step_temporaries(self._temporaries, query.device)
        batch = getattr(attn_metadata, "sparse_batch", None)  # set only on the sparse metadata class
        head_plans = self._head_plans(layer) if batch is not None and batch.chunks else None
        if head_plans is not None and self._layer_idx in batch.dense_layers:
            head_plans = None  # this layer's chunks kept most of their blocks lately: dense wins (`density_guard.py`)
        if head_plans is None:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        else:
            self._forward_sparse_chunks(layer, query, key, value, kv_cache, attn_metadata, output, batch, head_plans,
                                        *args, **kwargs)
        if batch is not None and batch.decode is not None:
            decode = self._decode_for(layer, query.device)
            # A captured graph replays whatever launched now: on capture, always launch (the kernels
            # skip rows that are not sparse decode rows on the device).
            if decode is not None and (batch.decode.any_sparse or capturing(query)):
                q = query.view(-1, self.num_heads, self.head_size)
                if q.dtype in FP8_DTYPES:  # (vLLM quantized the queries for FA3 over an fp8 cache)
                    q = dequantize_queries(q, layer._q_scale_float, output.dtype)
                decode.attend(q, output.view(-1, self.num_heads, self.head_size), self._paged_kv(layer, kv_cache),
                              attn_metadata.block_table, batch.decode, self.scale)
        return output

    def _paged_kv(self, layer, kv_cache: torch.Tensor) -> PagedKV:
        """The layer's cache as pages; an fp8 cache (vLLM stores it as bytes) as fp8 values with the layer's
        scales, read now (vLLM may compute them at run time, `calculate_kv_scales`)."""
        kv = self.kv_view(kv_cache)
        return kv.as_fp8(self._fp8_dtype, layer) if self._fp8_cache else kv

    def _forward_dense_tokens(self, layer, query, key, value, kv_cache, output, batch, *args, **kwargs):
        """The step's dense requests through the dense backend, on copies of their tokens (counted in the
        temporaries: `dense_token_bytes`), freed on return, before the sparse chunks' temporaries."""
        idx = batch.dense_tokens
        sub_out = output.new_empty((idx.shape[0], *output.shape[1:]))  # (written whole by the dense backend)
        super().forward(layer, query[idx], key[idx] if key is not None else None,
                        value[idx] if value is not None else None, kv_cache, batch.dense_metadata,
                        sub_out, *args, **kwargs)
        output[idx] = sub_out

    def _forward_sparse_chunks(self, layer, query, key, value, kv_cache, attn_metadata, output, batch, head_plans,
                               *args, **kwargs):
        if batch.dense_metadata is not None:
            self._forward_dense_tokens(layer, query, key, value, kv_cache, output, batch, *args, **kwargs)
        if self._metrics is False:
            self._metrics = worker_metrics(query.device, len(self._plan.layers))
        attend_observed(query, output, self._paged_kv(layer, kv_cache), attn_metadata.block_table, batch.chunks,
                        head_plans, self._plan.block_size, self.scale, self._plan.union_tile, self._layer_idx,
                        kernel=self._kernel, union_heads=self._plan.union_heads, dense_below=self._plan.dense_below,
                        dense_tail=self._plan.dense_tail, split=self._split, metrics=self._metrics, tiles=batch.tiles,
                        q_scale=(layer._q_scale, layer._q_scale_float) if query.dtype in FP8_DTYPES else None,
                        guard=batch.guard if self._split is None else None)  # (split groups: not guarded)
