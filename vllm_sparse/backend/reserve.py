"""What the sparse path reserves at engine start: the fused estimators' workspace.

Called while vLLM builds the model, so the reservation counts with the weights before vLLM
sizes the KV cache; nothing the sparse path needs later grows with the context on its own.
"""

from __future__ import annotations

import torch

from vllm_sparse.config.plan import SparsePlan
from vllm_sparse.estimators.registry import get_estimator
from vllm_sparse.kernels.workspace import WORKSPACE


def estimator_workspace_bytes(plan: SparsePlan, local_q_heads: int, max_chunk_tokens: int, max_model_len: int) -> int:
    """Bytes the largest chunk (`max_chunk_tokens` queries at `max_model_len`) needs between the fused
    scorer's two kernels: a float per (q head, scored row, KV block), for the plan's most demanding
    estimator; at least one query block's rows (the smallest slab)."""
    kv_blocks = -(-max_model_len // plan.block_size)
    need = 0
    for hp in {hp for lp in plan.layers for hp in lp.heads if hp is not None}:
        est = get_estimator(hp.estimator)
        rows = est.workspace_rows(hp.params, max_chunk_tokens)
        if rows:
            one_block = est.workspace_rows(hp.params, plan.block_size) + 1
            need = max(need, local_q_heads * max(rows, one_block) * kv_blocks * 4)
    return need


def reserve_estimator_workspace(plan: SparsePlan, local_q_heads: int, max_chunk_tokens: int, max_model_len: int,
                                device: torch.device) -> int:
    """Reserve it on `device` (capped by VLLM_SPARSE_WORKSPACE_MIB; larger chunks run in slabs). -> bytes held."""
    need = estimator_workspace_bytes(plan, local_q_heads, max_chunk_tokens, max_model_len)
    return WORKSPACE.reserve(need, device) if need else 0
