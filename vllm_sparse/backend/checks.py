"""Start-up checks of the SPARSE backend: each refuses, with a message naming the setting, a setup the
sparse path cannot honour, while vLLM builds the model and its attention metadata builders."""

from __future__ import annotations

import torch

from vllm_sparse import compat, envs
from vllm_sparse.config.errors import SparseConfigError
from vllm_sparse.config.plan import chunk_work
from vllm_sparse.config.sharding import head_shard
from vllm_sparse.kernels.flash_compact import FLASH_VERSIONS
from vllm_sparse.log import logger

GPU_HEAD_SIZES = (16, 32, 64, 128, 256)  # the Triton kernels and the fused estimators (powers of two)


def layer_index(layer_name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer_name)


def layer_span(layer_names: list[str]) -> str:
    idx = sorted(layer_index(n) for n in layer_names)
    return f"{idx[0]}-{idx[-1]}" if len(idx) > 1 else str(idx[0])


def check_kv_written_before_forward(dense_backend: type) -> None:
    """The sparse path runs instead of the dense forward for its chunks: their keys and values must
    already be in the cache when forward runs (vLLM writes them first, for these backends)."""
    if getattr(dense_backend, "forward_includes_kv_cache_update", True):
        raise RuntimeError(f"vllm-sparse: {dense_backend.__name__} writes the KV cache inside forward; the "
                           "SPARSE backend needs a vLLM whose attention writes it before (0.26 or later)")


def check_block_size(block_size: int, page_size: int, source: str) -> None:
    if block_size % page_size:
        raise SparseConfigError(source, [(
            "block_size",
            f"selection block_size {block_size} must be a multiple of the KV cache block size {page_size} "
            f"(vLLM's --block-size, or the attention backend's page where none is given); use a multiple of "
            f"{page_size}",
        )])


# The fp8 caches the sparse CUDA path reads: those vLLM's FlashAttention backend (FA3) reads, e4m3 with per-tensor
# scales, with the queries vLLM quantizes for it (FA3 takes fp8 queries with fp8 pages).
FP8_CACHE_DTYPES = ("fp8", "fp8_e4m3")


def fp8_cache(cache_dtype) -> bool:
    """Whether vLLM's kv_cache_dtype setting stores the cache in fp8 (as bytes; `kv_cache_problem` says which
    ones the sparse path reads)."""
    return str(cache_dtype).startswith("fp8")


def group_cache_dtype(vllm_config, layer_names: list[str]) -> str:
    """The kv_cache_dtype of one metadata builder's layers: vLLM resolves it per layer (`--kv-cache-dtype-skip-layers`
    keeps some layers in the model's dtype under a global fp8 setting) and gives each layer spec, dtype included, a
    builder of its own, so a builder's layers say it, not the global setting; that one where no layer does."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention

    dtypes = {str(getattr(layer, "kv_cache_dtype", None) or "auto")
              for layer in get_layers_from_vllm_config(vllm_config, Attention, layer_names).values()}
    if not dtypes:
        return str(vllm_config.cache_config.cache_dtype or "auto")
    return next((d for d in sorted(dtypes) if d != "auto"), "auto")  # (a group's layers share one cache layout)


def kv_cache_problem(vllm_config, cuda: bool | None = None, cache_dtype: str | None = None) -> str | None:
    """Why the sparse paths cannot read this engine's KV cache, or None: unquantized caches everywhere, fp8
    (e4m3, per-tensor scales) on CUDA. `cuda`: the engine's device (default: whether this process has one);
    `cache_dtype`: one group's (`group_cache_dtype`; default: the engine's setting)."""
    dtype = str(cache_dtype or vllm_config.cache_config.cache_dtype or "auto")
    if dtype == "auto" or dtype.startswith(("bfloat16", "float16", "half")):
        return None
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda and torch.version.hip is not None and fp8_cache(dtype):  # (ROCm's fp8 may be e4m3fnuz)
        return f"the sparse path reads fp8 KV caches on NVIDIA GPUs only, not kv_cache_dtype={dtype} on ROCm"
    if cuda and dtype in FP8_CACHE_DTYPES:
        return None
    if cuda:
        return (f"the sparse path reads 16-bit and fp8 e4m3 KV caches ({', '.join(FP8_CACHE_DTYPES)}), not "
                f"kv_cache_dtype={dtype}")
    return f"the sparse path on CPU reads unquantized KV caches only, not kv_cache_dtype={dtype}"


def check_fp8_scales(vllm_config, layer_names: list[str], plan) -> None:
    """An fp8 cache's scales must be per tensor (one k, v and q scale per layer), which the sparse kernels fold
    into their logit and output scales: a checkpoint with per-head scales stops the engine at start, naming the
    layer, where the plan makes it sparse (prefill or decode)."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention

    # Where some layer of the group selects pages at decode, every layer of it runs the decode path.
    decode_group = any(plan.layer(layer_index(n)).is_sparse_decode for n in layer_names)
    for name, layer in get_layers_from_vllm_config(vllm_config, Attention, layer_names).items():
        lp = plan.layer(layer_index(name))
        prefill = lp.is_sparse and not getattr(layer.impl, "unsupported", None)  # (else the layer runs dense)
        if not (prefill or decode_group):
            continue
        per_head = [s for s in ("_q_scale", "_k_scale", "_v_scale") if getattr(layer, s).numel() != 1]
        if per_head:
            raise SparseConfigError(plan.source, [("kv_cache_dtype", (
                f"layer {lp.index} ({name}) has per-head fp8 scales ({', '.join(per_head)}); the sparse path reads "
                "fp8 caches with per-tensor scales: use --kv-cache-dtype auto, or a plan that keeps this layer "
                "dense"))])


def check_summaries(plan, vllm_config) -> None:
    """Where Quest's page summaries cannot be kept right, stop at start rather than risk memory or wrong bounds
    mid-request (each problem named):
    - under pipeline parallelism: they are reserved at load as a share of the KV cache computed over the model's
      layers; each rank's cache holds its own layers, whose share may be larger (and a rank with none keeps the
      reservation);
    - with prefix caching on a hybrid (Mamba) model: a prefix-cache hit may end inside an attention page, and vLLM
      copies that page for the request (copy-on-write) without the cache write the summaries follow, so the copy's
      keys would be bounded by another page's summary."""
    if not plan.needs_summaries:
        return
    layers = [lp.index for lp in plan.layers if lp.needs_summaries]
    problems = []
    pp = getattr(getattr(vllm_config, "parallel_config", None), "pipeline_parallel_size", 1) or 1
    if pp > 1:
        problems.append(("decode.estimator", (
            f"quest decode on layers {layers} keeps page summaries, which are not supported with "
            f"pipeline_parallel_size={pp}: use tidal decode (no summaries), or no pipeline parallelism")))
    cache = getattr(vllm_config, "cache_config", None)
    mode = getattr(cache, "mamba_cache_mode", "none") or "none"
    if getattr(cache, "enable_prefix_caching", False) and mode != "none":
        problems.append(("decode.estimator", (
            f"quest decode on layers {layers} keeps page summaries, which follow the KV cache's writes, and prefix "
            f"caching on this hybrid model (mamba_cache_mode={mode!r}) copies partly hit pages without one: use "
            "tidal decode (no summaries) or --no-enable-prefix-caching")))
    if problems:
        raise SparseConfigError(plan.source, problems)


def check_forced_kernel(plan, kernel: str | None) -> None:
    """`VLLM_SPARSE_KERNEL=fa3` (or fa2) with layers that keep key columns token by token: their chunks need the
    Triton kernel (the column pass joins the block pass by the log-sum-exp it writes), so the setting cannot be
    honoured there: stop at start rather than run Triton in its place. (Chosen by device, FlashAttention leaves
    them to Triton.)"""
    from vllm_sparse.backend.kernel_choice import ENV_VAR

    if kernel in FLASH_VERSIONS and envs.get(ENV_VAR) == kernel and column_layers(plan):
        raise SparseConfigError(plan.source, [(ENV_VAR, (
            f"{ENV_VAR}={kernel}, but layers {column_layers(plan)} keep key columns token by token (vertical_slash "
            f"blocks: columns), which only the Triton kernel attends: unset it ({kernel} then runs the other "
            "layers), or use blocks: crossed"))])


def check_fp8_query_input(plan, kernel: str | None, cache_dtype: str, quantizes_queries: bool) -> None:
    """FA3 takes fp8 pages with fp8 queries only. vLLM quantizes them where its FlashAttention says it takes them
    (`supports_quant_query_input`); where it does not, the first sparse chunk over an fp8 cache would fail
    mid-request: stop the engine at start instead (the Triton kernel reads 16-bit queries over fp8 pages). FA2
    reads no fp8 pages at all (vLLM's FlashAttention refuses an fp8 cache without FA3 before this)."""
    if kernel == "fa2" and fp8_cache(cache_dtype):
        raise SparseConfigError(plan.source, [("kv_cache_dtype", (
            f"kv_cache_dtype={cache_dtype}: FA2 over the compacted tables reads no fp8 cache (FA3, on Hopper, "
            "does): use VLLM_SPARSE_KERNEL=triton, or --kv-cache-dtype auto"))])
    if kernel == "fa3" and fp8_cache(cache_dtype) and not quantizes_queries:
        raise SparseConfigError(plan.source, [("kv_cache_dtype", (
            f"kv_cache_dtype={cache_dtype}: FA3 over the compacted tables reads an fp8 cache with fp8 queries, "
            "and this vLLM's FlashAttention does not quantize them (supports_quant_query_input is false): use "
            "VLLM_SPARSE_KERNEL=triton, or --kv-cache-dtype auto"))])


def kv_problems(vllm_config, cache_dtype: str | None = None, cuda: bool | None = None) -> list[tuple[str, str]]:
    """(setting, why) for every way this engine's KV cache is one the sparse paths cannot read: quantized other
    than as they read it (`kv_cache_problem`), or not all in this rank's paged cache, written there by the
    layer's own attention (the sparse path reads pages in place and decode's page summaries follow the writes).
    With a plan that has sparse prefill or decode layers they stop the engine at start (`SparseBuilderMixin`):
    one rule for both. `cache_dtype`: the group's (`group_cache_dtype`; default: the engine's setting); `cuda`: the
    engine's device (default: whether this process has one)."""
    problems = []
    why = kv_cache_problem(vllm_config, cuda=cuda, cache_dtype=cache_dtype)
    if why:
        problems.append(("kv_cache_dtype", f"{why}: use --kv-cache-dtype auto, or a plan that keeps every layer "
                         "dense"))
    return problems + kv_layout_problems(vllm_config)


def kv_layout_problems(vllm_config) -> list[tuple[str, str]]:
    """(setting, why) for the engine settings that put KV where the sparse path does not read it: pages loaded and
    stored by a KV connector, a request's context sharded across ranks. Engine-wide settings, so the engine's
    config says them before any layer is built (`plan_cache.check_engine_config`)."""
    problems = []
    if compat.kv_transfer_config(vllm_config) is not None:
        problems.append(("kv_transfer_config", (
            "a KV connector or KV offloading (--kv-transfer-config, --kv-offloading-size) loads and stores KV "
            "pages outside the attention's own writes, which the sparse path and decode page selection do not "
            "follow: run without it, or with a plan that keeps every layer dense")))
    for name, size in compat.context_parallel_sizes(vllm_config.parallel_config).items():
        if size > 1:
            problems.append((name, (
                f"{name}={size} shards each request's KV across ranks by token, and the sparse path selects "
                "and reads blocks of one rank's whole context: use 1, or a plan that keeps every layer dense")))
    return problems


def check_head_size(plan, head_size: int) -> None:
    """On GPUs the sparse kernels take power-of-two head sizes up to 256: others stop the engine at start."""
    if head_size not in GPU_HEAD_SIZES:
        raise SparseConfigError(plan.source, [("model", (
            f"attention head size {head_size}: the sparse GPU kernels take {', '.join(map(str, GPU_HEAD_SIZES))}; "
            "run this model with a config that keeps its layers dense"))])


def warn_dense_layers(vllm_config, layer_names: list[str], plan) -> frozenset[int]:
    """At start, the layers the plan makes sparse whose attention has features the sparse path lacks (sliding
    window, ALiBi, ...): with a plan found by discovery one line each, and they run dense; with a config the
    user named, an error listing them (what it asks must run). -> the indices of the group's layers the plan
    makes sparse that do run sparse (none: the group's steps need no sparse split)."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention

    sparse = {name for name in layer_names if plan.layer(layer_index(name)).is_sparse}
    problems = []
    for name, layer in get_layers_from_vllm_config(vllm_config, Attention, layer_names).items():
        why = getattr(layer.impl, "unsupported", None)
        if why and name in sparse:
            if getattr(plan, "explicit", False):
                problems.append((f"layer {layer_index(name)}", (
                    f"layer {layer_index(name)} ({name}) has {', '.join(why)}, which the sparse path does not "
                    "support: leave it out of the sparse layers (e.g. `layers: full_attention`) or make it dense")))
                continue
            logger.warning("vllm-sparse: layer %d (%s) has %s, which the sparse path does not support: it "
                           "runs dense", layer_index(name), name, ", ".join(why))
            sparse.discard(name)
    if problems:
        raise SparseConfigError(plan.source, problems)
    return frozenset(layer_index(name) for name in sparse)


def prefill_reachable(vllm_config, plan, device_type: str) -> bool:
    """Whether some prefill chunk of this engine can go sparse under the plan's rule (`batch.classify`): its
    longest prompt passes the rows that attend densely, and its largest chunk (the token budget's query tokens at
    the longest context) clears both floors. A floor the config sets that no chunk can clear is an error naming
    it (in a config the user named); an `auto` floor above every chunk (sparse would be slower there: dense is the
    rule's answer) and a `dense_below` past max_model_len are said in a warning, and the engine's prefill runs
    dense. Called once per engine, as its plan is resolved (`plan_cache.plan_for`)."""
    max_len = vllm_config.model_config.max_model_len
    q_max = min(compat.prefill_chunk_limit(vllm_config), max_len)
    q_floor, work_floor = plan.query_token_floor(device_type), plan.chunk_work_floor(device_type)
    budget = f"a token budget of {q_max} a step" if q_max < max_len else f"max_model_len {max_len}"
    if max_len < plan.sparse_context_floor:
        why = (f"no prompt reaches dense_below ({plan.dense_below} tokens): max_model_len is {max_len}")
    elif q_max < q_floor:
        why = (f"no prefill chunk has min_query_tokens ({q_floor}{'' if plan.min_query_tokens else ', auto'}) "
               f"query tokens: {budget}")
        if plan.min_query_tokens is not None and plan.explicit:
            raise SparseConfigError(plan.source, [("min_query_tokens", (
                f"{why} (the engine's most a step gives one request): lower min_query_tokens or raise "
                f"{'--max-num-batched-tokens' if q_max < max_len else '--max-model-len'}"))])
    elif (largest := chunk_work(q_max, max_len)) < work_floor:
        why = (f"no prefill chunk reaches min_chunk_work ({work_floor} token pairs"
               f"{'' if plan.min_chunk_work else ', auto'}): the largest, {q_max} query tokens at {max_len} "
               f"tokens of context, has {largest}")
        if plan.min_chunk_work is not None and plan.explicit:
            raise SparseConfigError(plan.source, [("min_chunk_work", (
                f"{why}: lower min_chunk_work or raise --max-num-batched-tokens / --max-model-len"))])
    else:
        return True
    logger.warning("vllm-sparse: sparse prefill is off on this engine (%s): %s; every prefill runs on vLLM's "
                   "attention%s", plan.source, why, "" if max_len < plan.sparse_context_floor else (
                       " (below the auto floors a sparse chunk is slower than dense: raise "
                       "--max-num-batched-tokens for sparse prefill)"))
    return False


def rank_shard(plan, num_heads: int, num_kv_heads: int):
    """This rank's heads. With a sparse plan, a layout that cannot be sharded, or a layer whose local
    head counts are not the plan model's split, stops the engine here, at start; a dense plan needs
    no shard (None)."""
    if not plan.is_sparse:
        return None
    tp = compat.tensor_parallel_size()
    shard = head_shard(plan.num_q_heads, plan.num_kv_heads, compat.tensor_parallel_rank(), tp, plan.source)
    if (len(shard.q_heads), len(shard.kv_heads)) != (num_heads, num_kv_heads):
        raise SparseConfigError(plan.source, [("tensor_parallel_size", (
            f"an attention layer has {num_heads} query / {num_kv_heads} KV heads on this rank, but the model's "
            f"{plan.num_q_heads} / {plan.num_kv_heads} heads split over tensor_parallel_size={tp} give "
            f"{len(shard.q_heads)} / {len(shard.kv_heads)}: the plan cannot say which heads this layer has"))])
    if shard.splits_groups and not plan.union_heads and plan.is_sparse_prefill:
        raise SparseConfigError(plan.source, [("union_heads", (
            f"union_heads: false gives each q head its own page list, and tensor_parallel_size={tp} splits the "
            f"model's {plan.num_kv_heads} KV head(s) across ranks, where every rank reads its group's union: use a "
            f"tensor_parallel_size of at most {plan.num_kv_heads}, or union_heads: true"))])
    if shard.splits_groups and column_layers(plan):
        raise SparseConfigError(plan.source, [("estimator.blocks", (
            f"layers {column_layers(plan)} keep key columns token by token (vertical_slash blocks: columns), and "
            f"tensor_parallel_size={tp} splits the model's {plan.num_kv_heads} KV head(s) across ranks, where every "
            f"rank reads its group's union of blocks only: use a tensor_parallel_size of at most "
            f"{plan.num_kv_heads}, or blocks: crossed"))])
    return shard


def column_layers(plan) -> list[int]:
    """The layers whose plan reads kept key columns token by token (`vertical_slash` with `blocks: columns`)."""
    return [i for i, layer in enumerate(plan.layers)
            if any(h is not None and h.reads_columns for h in layer.heads)]


def check_decode(plan, page_size: int, max_model_len: int) -> None:
    """Decode selection's settings against the engine's KV cache and context length, at start."""
    from vllm_sparse.decode.step import check_row_blocks

    block = plan.decode_block_tokens
    problems = []
    if page_size & (page_size - 1) or block % page_size:
        problems.append(("decode.block_tokens", f"decode block_tokens {block} must be a multiple of the KV cache "
                         f"block size {page_size} (vLLM --block-size), which must be a power of two"))
    why = check_row_blocks(max_model_len, block)
    if why:
        problems.append(("decode.block_tokens", why))
    if problems:
        raise SparseConfigError(plan.source, problems)


def check_decode_layers(vllm_config, layer_names: list[str], plan) -> None:
    """Every layer of a KV cache group with decode selection runs the decode path (the dense backend
    sees its sparse decode rows shortened): each must be one the path can run, on this rank."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention

    problems = []
    shard = head_shard(plan.num_q_heads, plan.num_kv_heads, compat.tensor_parallel_rank(),
                       compat.tensor_parallel_size(), plan.source)
    if shard.splits_groups:
        problems.append(("tensor_parallel_size", (
            f"decode selection scores blocks per GQA group, and tensor_parallel_size={shard.tp_size} splits the "
            f"model's {plan.num_kv_heads} KV head(s) across ranks: use a tensor_parallel_size of at most "
            f"{plan.num_kv_heads}, or `decode: dense`")))
    if compat.micro_batches(vllm_config.parallel_config) > 1:
        problems.append(("enable_dbo", (
            "decode selection keeps each step's chosen blocks in one workspace per process, and dual-batch "
            "overlap (--enable-dbo, ubatch_size > 1) interleaves two micro-batches layer by layer: turn it off "
            "or keep decode dense")))
    present = {layer_index(n) for n in layer_names}
    for idx in sorted(present):
        selector = plan.tidal_selector_of(idx)
        if selector is not None and selector not in present:
            problems.append((f"layer {idx}", (
                f"layer {idx} reuses the tidal selection of layer {selector}, which this rank's KV cache group "
                "does not run (pipeline parallelism or another cache group): make a layer of this group a selector")))
    for name, layer in get_layers_from_vllm_config(vllm_config, Attention, layer_names).items():
        idx = layer_index(name)
        why = list(getattr(layer.impl, "unsupported", None) or [])
        if not plan.layer(idx).full_attention:
            why.append("a sliding window")
        if why:
            problems.append((f"layer {idx}", (
                f"{name} has {', '.join(why)}, which the sparse decode path does not support, and shares its KV "
                "cache group with layers that select pages at decode: keep decode dense on this model")))
    if problems:
        raise SparseConfigError(plan.source, problems)
