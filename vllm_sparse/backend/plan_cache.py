"""The process's plan, resolved once from the engine's config at start-up (first layer built)."""

from __future__ import annotations

from vllm_sparse.config.build import build_plan
from vllm_sparse.config.plan import ModelShape, SparsePlan

_cache: dict[int, tuple[object, SparsePlan]] = {}


def model_shape(vllm_config) -> ModelShape:
    mc = vllm_config.model_config
    # Name globs in configs match the model path or hub id the user passed.
    return ModelShape.from_hf_config(mc.hf_config, mc.model)


def plan_for(vllm_config) -> SparsePlan:
    key = id(vllm_config)
    hit = _cache.get(key)
    if hit is not None and hit[0] is vllm_config:
        return hit[1]
    plan = build_plan(getattr(vllm_config, "additional_config", None), model_shape(vllm_config))
    _cache[key] = (vllm_config, plan)
    return plan
