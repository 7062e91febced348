"""The process's plan, resolved once from the engine's config at start-up (first layer built)."""

from __future__ import annotations

import torch

from vllm_sparse import compat
from vllm_sparse.backend.checks import check_summaries, kv_layout_problems, kv_problems, prefill_reachable
from vllm_sparse.config.build import build_plan
from vllm_sparse.config.errors import SparseConfigError
from vllm_sparse.config.plan import ModelShape, SparsePlan
from vllm_sparse.log import logger, quiet

_cache: dict[int, tuple[object, SparsePlan]] = {}


def model_shape(vllm_config) -> ModelShape:
    mc = vllm_config.model_config
    # Name globs in configs match the model path or hub id the user passed.
    return ModelShape.from_hf_config(mc.hf_config, mc.model)


def device_type(vllm_config) -> str:
    """The engine's device kind ("cuda", "cpu"): which `auto` floors apply."""
    kind = getattr(getattr(vllm_config, "device_config", None), "device_type", None)
    return kind or ("cuda" if torch.cuda.is_available() else "cpu")


def plan_for(vllm_config) -> SparsePlan:
    key = id(vllm_config)
    hit = _cache.get(key)
    if hit is not None and hit[0] is vllm_config:
        return hit[1]
    plan = engine_plan(vllm_config)
    _cache[key] = (vllm_config, plan)
    return plan


def check_engine_config(vllm_config) -> None:
    """The plan's errors (the config file, the engine settings it cannot honour), raised as the engine's config is
    made from its arguments (`compat.on_engine_config`): `vllm serve` and `LLM(...)` stop before an engine process
    starts, and `LLM(...)` raises the error itself. The engine resolves the plan again as its layers are built
    (`plan_for`), with the checks that need them; its warnings are said there, once, so none is said here."""
    if not compat.attends_on_sparse(vllm_config):
        return
    with quiet():
        plan = engine_plan(vllm_config)
    check_summaries(plan, vllm_config)
    # A KV connector, context parallelism or a KV dtype the sparse paths cannot read, refused here where every
    # layer the plan numbers attends on SPARSE (else by the layers' builders, which know which layers do). The
    # dtype only where no layer is skipped: `--kv-cache-dtype-skip-layers` keeps some in 16 bits, and only a
    # layer group knows its cache's dtype then (`group_cache_dtype`).
    if plan.is_sparse and compat.every_attention_layer_on_sparse(vllm_config):
        cache = getattr(vllm_config, "cache_config", None)
        uniform = cache is not None and not getattr(cache, "kv_cache_dtype_skip_layers", None)
        problems = kv_problems(vllm_config, cuda=device_type(vllm_config) == "cuda") if uniform \
            else kv_layout_problems(vllm_config)
        if problems:
            raise SparseConfigError(plan.source, problems)


def engine_plan(vllm_config) -> SparsePlan:
    """The plan this engine runs: the config found for its model, less what the engine can never reach."""
    plan = build_plan(getattr(vllm_config, "additional_config", None), model_shape(vllm_config))
    if plan.is_sparse and getattr(vllm_config, "speculative_config", None) is not None:
        # Verify steps over a long context, and a draft model whose layers the plan does not number,
        # would reach the sparse path: refused here, at start, rather than guessed at.
        raise SparseConfigError(plan.source, [("speculative_config", (
            "speculative decoding (--speculative-config) is not supported with a sparse plan; run without it, "
            "or with a config whose layers are all dense for this model"))])
    max_len = getattr(getattr(vllm_config, "model_config", None), "max_model_len", None)
    if plan.is_sparse_decode and max_len is not None and max_len < plan.decode_dense_below:
        # Decode selection starts at decode.dense_below tokens of context, which this engine never reaches: its
        # page summaries and workspace would take memory for nothing.
        logger.warning("vllm-sparse: decode selection (%s, from %d tokens of context) is off on this engine: "
                    "max_model_len %d is shorter; its decode runs on vLLM's attention", plan.decode,
                    plan.decode_dense_below, max_len)
        plan = plan.without_decode()
    if plan.is_sparse_prefill and getattr(vllm_config, "scheduler_config", None) is not None and max_len is not None \
            and not prefill_reachable(vllm_config, plan, device_type(vllm_config)):
        plan = plan.without_prefill()  # (no chunk of this engine clears the plan's floors: no workspace for it)
    return plan
