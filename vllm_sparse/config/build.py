"""One call from (where the config may be, model shape) to the plan, with the warnings a user sees."""

from __future__ import annotations

from vllm_sparse.config.discovery import find_config
from vllm_sparse.config.loader import load_config
from vllm_sparse.config.plan import ModelShape, SparsePlan, resolve_plan
from vllm_sparse.log import logger


def build_plan(additional_config: dict | None, shape: ModelShape) -> SparsePlan:
    path, how = find_config(additional_config, shape)
    if path is None:
        plan = SparsePlan.dense(shape, "none", no_plan_note(shape))
    else:
        # A config the user named must fit the model; only discovery may fall back to dense.
        shipped = how == "shipped config"
        plan = resolve_plan(load_config(path), shape, f"{path} (from {how})", explicit=not shipped, by_name=shipped)
    for note in plan.notes:
        logger.warning("vllm-sparse: %s", note)
    if path is not None and not plan.is_sparse and not plan.is_sparse_decode:  # (named, yet nothing in it applies)
        logger.warning("vllm-sparse: the plan from %s keeps every layer dense for %s (no layer rule gives a sparse "
                       "estimator or a decode setting): the engine runs vLLM's attention", plan.source, shape.name)
    if plan.is_sparse:
        n = sum(layer.is_sparse for layer in plan.layers)
        logger.info("vllm-sparse: plan from %s: %d of %d layers sparse, block %d, dense below %d tokens",
                    plan.source, n, len(plan.layers), plan.block_size, plan.dense_below)
    return plan


def no_plan_note(shape: ModelShape) -> str:
    """What a user whose model no shipped plan names reads: it runs dense, and how to get a plan."""
    return (f"no sparse config given and no shipped plan names {shape.name} ({', '.join(shape.architectures) or '-'}); "
            "shipped plans apply to the model families they name (`vllm-sparse plan --model MODEL` shows which), so "
            "every layer runs dense. To get a plan: `vllm-sparse import minference FILE.json --model MODEL --out "
            "PLAN.yaml` (MInference's published per-head settings, where it has them for this model) or "
            "`vllm-sparse calibrate --model MODEL --out PLAN.yaml`, then --additional-config "
            "'{\"sparse\": {\"config\": \"PLAN.yaml\"}}'")
