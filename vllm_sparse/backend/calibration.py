"""`vllm-sparse calibrate` inside the engine: a sparse layer's chunks attend densely (so every layer
sees the dense model's activations) while each candidate estimator + budget is tried on them: its
kept blocks, after dense_below and the union over tiles and GQA groups exactly as the sparse path
forms them, are held against the chunk's dense attention mass (`attention_mass.py`).

Candidates come from STATS.candidates (the VLLM_SPARSE_CALIBRATE environment variable): a list of
{"estimator": {"name": ..., params}, "budget": {BudgetSpec fields}}. Sums per layer land in
STATS.calibration; `vllm_sparse.calibrate.run` reads them. Each chunk's final query block is also kept
apart, by the chunk's end: the run takes the one ending at each prompt's last token (`--answer-rows`).
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch

from vllm_sparse.backend.attention_mass import (
    RECALL_BINS,
    dense_attention_mass,
    read_cells,
    read_mass_rows,
    row_recall_histogram,
    row_unions,
)
from vllm_sparse.backend.sparse_path import budget_masks, keep_dense_rows, selected_rows
from vllm_sparse.estimators.base import ChunkContext
from vllm_sparse.selection.budget import Budget
from vllm_sparse.selection.stats import STATS, CalibrationStats


@lru_cache(maxsize=4)
def _grouped(candidates_json: str) -> list[tuple[str, object, list[tuple[int, Budget]]]]:
    """Candidates grouped by estimator (name and parameters): each estimator scores a chunk once."""
    from vllm_sparse.calibrate.candidates import head_plan_of

    groups: dict[str, tuple[str, object, list]] = {}
    for i, cand in enumerate(json.loads(candidates_json)):
        hp = head_plan_of(cand)
        key = f"{hp.estimator}:{hp.params.model_dump_json()}"
        groups.setdefault(key, (hp.estimator, hp.params, []))[2].append((i, hp.budget))
    return list(groups.values())


def calibrate_chunk(ctx: ChunkContext, out: torch.Tensor, layer: int, dense_below: int, tile: int) -> None:
    """Write the chunk's dense attention into `out` [q_len, q_heads, Dv]; add every candidate's dense mass
    read (per q head), cells read (per KV head) and per-row recall histogram (per q head), over the rows
    past dense_below, to STATS.calibration; and, by the chunk's end, the mass read in its final query
    block (where the chunk ends the prompt: the rows that produce the answer)."""
    dense, mass = dense_attention_mass(ctx)
    out.copy_(dense.to(out.dtype))
    chosen = selected_rows(ctx, dense_below)
    first = chosen.start
    if first >= ctx.num_query_blocks or layer < 0:  # nothing past dense_below, or not a model layer (warm-up)
        return
    candidates = STATS.candidates
    num_kv = ctx.kv.num_kv_heads
    st = STATS.calibration.get(layer)
    if st is None:
        dev = ctx.q.device
        st = STATS.calibration[layer] = CalibrationStats(
            torch.zeros(len(candidates), ctx.q.shape[1], dtype=torch.float64, device=dev),
            torch.zeros(len(candidates), num_kv, dtype=torch.int64, device=dev),
            torch.zeros(len(candidates), ctx.q.shape[1], RECALL_BINS, dtype=torch.float64, device=dev))
    causal = ctx.causal_block_mask()[first:]
    past = mass[:, first:].double()  # once, not per candidate
    queries = past.sum(2)  # [q_heads, rows]: each query's row of dense attention sums to 1
    final = torch.zeros_like(st.mass)  # the chunk's final query block: per candidate, mass read per q head
    for name, params, budgets in _grouped(json.dumps(candidates)):
        masks = budget_masks(ctx, name, params, [b for _, b in budgets])
        for (i, _), mask in zip(budgets, masks):
            union = row_unions(keep_dense_rows(mask, ctx, chosen), tile, num_kv)[:, first:]
            rows = read_mass_rows(past, union, ctx.kv_head_of)
            st.mass[i] += rows.sum(1)
            st.rows[i] += row_recall_histogram(rows, queries)
            st.read[i] += read_cells(union, causal)
            final[i] = rows[:, -1]
    st.add_final_block(ctx.seq_len, final, queries[:, -1])
    st.tokens += ctx.seq_len - max(ctx.context_len, (ctx.first_query_block + first) * ctx.block_size)
    st.causal += int(causal.sum())
