"""The metadata builder half of SPARSE: once per step, which prefill chunks go sparse.

`SparseBuilderMixin` goes in front of a dense backend's builder (`cuda.py`, `cpu.py`). The dense
builder builds the step's metadata as always; when some chunks go sparse, the step's metadata
becomes the platform's sparse metadata class, the dense fields plus a `SparseBatch`: the chunks,
and the dense backend's own metadata for the requests that stay dense.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_sparse import compat, envs
from vllm_sparse.backend.batch import SparseBatch, classify, tile_geometry
from vllm_sparse.backend.checks import (
    check_block_size,
    check_decode,
    check_decode_layers,
    check_fp8_scales,
    fp8_cache,
    group_cache_dtype,
    kv_problems,
    layer_index,
    layer_span,
    warn_dense_layers,
)
from vllm_sparse.backend.decode_rows import DecodeRowsBuilder
from vllm_sparse.backend.density_guard import DensityGuard
from vllm_sparse.backend.instrumented import active_observer
from vllm_sparse.backend.plan_cache import plan_for
from vllm_sparse.backend.warmup import warm_up, warm_up_decode
from vllm_sparse.config.errors import SparseConfigError
from vllm_sparse.decode.memory import allocate_summaries, drop_summaries
from vllm_sparse.decode.step import decode_row_limit
from vllm_sparse.log import logger
from vllm_sparse.metrics.worker import worker_metrics
from vllm_sparse.transfer import to_device

# VLLM_SPARSE_LOG_STEPS=1: one log line per step (per layer group) that sends chunks to the sparse path,
# from host data the builder has anyway: a way to see that a request went sparse.
_LOG_STEPS = envs.flag("VLLM_SPARSE_LOG_STEPS")


def with_sparse_batch(metadata_cls: type, dense_md, batch: SparseBatch):
    """The dense metadata as `metadata_cls` (its subclass with a `sparse_batch` field), fields shared,
    without re-running the dense class's __init__/__post_init__."""
    md = metadata_cls.__new__(metadata_cls)
    md.__dict__.update(vars(dense_md))
    md.sparse_batch = batch
    return md


def count_step_tokens(metrics, cm, chunks, sparse_decodes: int) -> None:
    """The step's prefill tokens (requests with more than one query token) and decode tokens by path,
    from host data (`sparse_decodes`: the builder's count, by host lengths that may be upper bounds:
    off by a token at the threshold)."""
    qsl = cm.query_start_loc_cpu[: cm.num_reqs + 1].numpy()  # numpy: quicker than torch on a few numbers
    q_lens = qsl[1:] - qsl[:-1]
    prefill = int(q_lens[q_lens > 1].sum())
    if prefill:
        sparse = sum(c.q_end - c.q_start for c in chunks)
        metrics.count_step(sparse, prefill - sparse, len(chunks))
    decodes = int(np.count_nonzero(q_lens == 1))
    if decodes:
        metrics.count_decode(sparse_decodes, decodes - sparse_decodes)


class SparseBuilderMixin:
    """Put in front of a dense `AttentionMetadataBuilder`. Subclasses set `metadata_cls` and may
    override `prepare_sparse_layers`."""

    # vLLM may reuse one KV cache group's metadata for another of the same spec by swapping its block
    # table: each group here builds its own step (its layers' sparse chunks, its dense requests' metadata
    # over its own table). See `capabilities.py`.
    supports_update_block_table = False
    metadata_cls: type

    def prepare_sparse_layers(self, layer_names: list[str]) -> str | None:
        """Adapt this builder to what the sparse path reads; return why it cannot (those layers run dense)."""
        return None

    def match_dense_builder(self, dense_builder) -> None:
        """Give the sub-batch builder what `prepare_sparse_layers` changed on this one (same KV layout)."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs)
        self._plan = plan_for(vllm_config)
        planned = any(self._plan.layer(layer_index(n)).is_sparse for n in layer_names)  # (some may yet run dense)
        # This group's layers that run sparse (`warn_dense_layers`); none: its steps need no sparse split.
        self._sparse_layers: frozenset[int] = frozenset()
        # A sparse step's dense requests get their metadata from a builder of their own. The dense builder
        # keeps persistent buffers (FA3's scheduler metadata under CUDA graphs, R-SWA prefix lengths,
        # multimodal ranges) that the step's whole-batch metadata points into, which the layers this plan
        # keeps dense read: a second build on this builder would overwrite them. Made now, before
        # `prepare_sparse_layers` (a CPU builder's start sets its layers' KV layout).
        self._dense_builder = None
        if planned:
            mro = type(self).__mro__
            dense_cls = mro[mro.index(SparseBuilderMixin) + 1]
            self._dense_builder = dense_cls(kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs)
        # (a step's dense rows copy only the columns they reach: `compat.slice_common_metadata`)
        self._max_model_len, self._block_size = vllm_config.model_config.max_model_len, kv_cache_spec.block_size
        self._cache_dtype = group_cache_dtype(vllm_config, layer_names)  # (this group's: skip layers keep 16 bits)
        kind = torch.device(device).type  # which chunks can win sparse: the plan's floors on this device
        self._min_query, self._min_work = self._plan.query_token_floor(kind), self._plan.chunk_work_floor(kind)
        self._min_context = self._plan.sparse_context_floor
        if planned or any(self._plan.layer(layer_index(n)).is_sparse_decode for n in layer_names):
            problems = kv_problems(vllm_config, self._cache_dtype)  # one rule for prefill and decode, at start
            if problems:
                raise SparseConfigError(self._plan.source, problems)
            if fp8_cache(self._cache_dtype):
                check_fp8_scales(vllm_config, layer_names, self._plan)
        self._decode = self._prepare_decode(kv_cache_spec, layer_names, vllm_config, torch.device(device))
        # Why the plugin cannot read these layers' KV pages, asked once for prefill and decode (a decode-only plan
        # asks too: on a CPU with AMX the layout would otherwise stay one the plugin cannot read).
        why = self.prepare_sparse_layers(layer_names) if planned or self._decode is not None else None
        if planned:
            compat.check_common_metadata()  # the step's split knows every field of this vLLM's batch metadata
            check_block_size(self._plan.block_size, kv_cache_spec.block_size, self._plan.source)
            if why:
                logger.warning("vllm-sparse: %s; layers %s run dense", why, layer_span(layer_names))
            else:
                self.match_dense_builder(self._dense_builder)
                # (a group whose sparse layers all run dense splits no step: no per-step classify and sub-build)
                self._sparse_layers = warn_dense_layers(vllm_config, layer_names, self._plan)
        if self._decode is not None and why:  # (decode selection reads the same pages: it would read garbage)
            raise SparseConfigError(self._plan.source, [("decode", (
                f"{why}: decode selection for layers {layer_span(layer_names)} reads those pages; run their "
                "decode dense (decode: dense)"))])
        if self._sparse_layers and torch.device(device).type == "cuda":
            warm_up(self._plan, kv_cache_spec, vllm_config, torch.device(device), self._cache_dtype)
        if self._decode is not None and torch.device(device).type == "cuda":
            warm_up_decode(self._plan, layer_names, kv_cache_spec, vllm_config, torch.device(device),
                           self._cache_dtype)
        # One builder per process counts prefill tokens (a model with several KV cache groups builds
        # each step once per group), on the first pipeline stage only (every stage builds every step).
        counted = (bool(self._sparse_layers) or self._decode is not None) and compat.pipeline_parallel_rank() == 0
        metrics = worker_metrics(torch.device(device), len(self._plan.layers)) if counted else None
        self._metrics = metrics if metrics is not None and metrics.claim_step_counting(self) else None
        # The plan's `dense_above` rule for this group's layers (`density_guard.py`): counted by them, read here.
        above = self._plan.dense_above_on(kind)
        self._guard = DensityGuard(torch.device(device), len(self._plan.layers), above) \
            if self._sparse_layers and above < 1 else None

    def _prepare_decode(self, kv_cache_spec, layer_names, vllm_config, device) -> DecodeRowsBuilder | None:
        """Decode selection for this group's layers: checked, page summaries allocated (the cache's page
        count is known now), and the per-step row buffer."""
        drop_summaries(layer_names)  # an earlier engine's in this process: only this plan's Quest layers get new ones
        decode_layers = [n for n in layer_names if self._plan.layer(layer_index(n)).is_sparse_decode]
        if not decode_layers:
            return None
        check_decode(self._plan, kv_cache_spec.block_size, vllm_config.model_config.max_model_len)
        check_decode_layers(vllm_config, layer_names, self._plan)
        pages = vllm_config.cache_config.num_gpu_blocks
        if pages is None:  # vLLM 0.32's CUDA-graph memory profile builds builders over a minimal cache before it
            return None  # sets the page count: decode selection joins when the real cache's builders are made
        summary_layers = [n for n in decode_layers if self._plan.layer(layer_index(n)).needs_summaries]
        # In the model's dtype, as reserved at load: summaries follow the keys vLLM writes (before an fp8 cache's
        # quantization; its spec dtype is bytes).
        allocate_summaries(summary_layers, pages, kv_cache_spec.num_kv_heads, kv_cache_spec.head_size,
                           kv_cache_spec.block_size, vllm_config.model_config.dtype, device)
        return DecodeRowsBuilder(self._plan.decode_dense_below, decode_row_limit(vllm_config), device)

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
        decode_rows = None
        if self._decode is not None:  # the dense backend attends sparse decode rows over one token only
            common_attn_metadata, decode_rows = self._decode.shorten(common_attn_metadata)
        md = super().build(common_prefix_len, common_attn_metadata, *args, **kwargs)
        chunks, dense_reqs, dense_tokens = [], None, None
        dense_layers, guard = frozenset(), None
        if self._sparse_layers:
            chunks, dense_reqs, dense_tokens = classify(
                common_attn_metadata, self._min_context, self._min_query, self._min_work, self._plan.dense_tail,
                self._plan.block_size, self._plan.dense_below)
            # The `dense_above` rule (host numbers, a step or two late); not while eval or calibration measure the
            # plan itself (every chunk-layer sparse, as they report it).
            if chunks and self._guard is not None and active_observer() is None:
                guard = self._guard
                dense_layers = guard.begin_step([c.seq_len for c in chunks])
                if self._sparse_layers <= dense_layers:  # every sparse layer runs dense: so does the step
                    chunks = []
        if self._metrics is not None:
            count_step_tokens(self._metrics, common_attn_metadata, chunks,
                              decode_rows.host_sparse if decode_rows is not None else 0)
        if not chunks:
            return md if decode_rows is None else with_sparse_batch(
                self.metadata_cls, md, SparseBatch((), None, None, decode_rows))
        if _LOG_STEPS:
            logger.info("vllm-sparse: step goes sparse for %d chunk(s): %s", len(chunks), ", ".join(
                f"{c.q_end - c.q_start} tokens after {c.context_len}" for c in chunks))
        dense_md = None
        if len(dense_reqs):
            sub = compat.slice_common_metadata(common_attn_metadata, dense_reqs, dense_tokens, self._max_model_len,
                                               self._block_size)
            dense_md = self._dense_builder.build(0, sub, *args, **kwargs)  # (its own buffers: see __init__)
        device = common_attn_metadata.query_start_loc.device
        dense_idx = to_device(dense_tokens, device) if len(dense_reqs) else None
        tiles = tile_geometry(chunks, self._plan.block_size, self._plan.union_tile, device, self._plan.dense_tail)
        return with_sparse_batch(self.metadata_cls, md, SparseBatch(tuple(chunks), dense_idx, dense_md, decode_rows,
                                                                    tiles, dense_layers, guard))
