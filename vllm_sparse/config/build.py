"""One call from (where the config may be, model shape) to the plan, with the warnings a user sees."""

from __future__ import annotations

from vllm_sparse.config.discovery import find_config
from vllm_sparse.config.loader import load_config
from vllm_sparse.config.plan import ModelShape, SparsePlan, resolve_plan
from vllm_sparse.log import logger


def build_plan(additional_config: dict | None, shape: ModelShape) -> SparsePlan:
    path, how = find_config(additional_config, shape)
    if path is None:
        plan = SparsePlan.dense(
            shape, "none",
            f"no sparse config given (--additional-config '{{\"sparse\": {{\"config\": PATH}}}}' or "
            f"VLLM_SPARSE_CONFIG) and no shipped config matches {', '.join(shape.architectures) or shape.name}: "
            "every layer runs dense",
        )
    else:
        # A config the user named must fit the model; only discovery may fall back to dense.
        plan = resolve_plan(load_config(path), shape, f"{path} (from {how})", explicit=how != "shipped config")
    for note in plan.notes:
        logger.warning("vllm-sparse: %s", note)
    if plan.is_sparse:
        n = sum(layer.is_sparse for layer in plan.layers)
        logger.info("vllm-sparse: plan from %s: %d of %d layers sparse, block %d, dense below %d tokens",
                    plan.source, n, len(plan.layers), plan.block_size, plan.dense_below)
    return plan
