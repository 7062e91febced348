"""estimate -> select -> union -> attend, for the sparse prefill chunks of one layer.

This module orchestrates; the attention over kept blocks is `attend.py`, the kernel choice
`kernel_choice.py`. Evaluation and calibration wrap it (`instrumented.py`): they reach it only through
the `observer` argument, None while serving.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict

import torch

from vllm_sparse.backend.attend import attend_chunk_reference, attend_chunk_with_kernel
from vllm_sparse.backend.attention_mass import dense_rows, tail_rows
from vllm_sparse.backend.batch import SparseChunk
from vllm_sparse.backend.kernel_choice import selected_kernel
from vllm_sparse.backend.split_groups import SplitGroup, per_q_head
from vllm_sparse.config.plan import HeadPlan
from vllm_sparse.estimators.base import COLUMN_PAD, ChunkContext
from vllm_sparse.estimators.registry import Estimator, EstimatorParams, get_estimator
from vllm_sparse.kernels.paged import PagedKV
from vllm_sparse.metrics.worker import WorkerMetrics
from vllm_sparse.selection.budget import Budget, select_blocks
from vllm_sparse.selection.select_kernel import select_blocks_triton
from vllm_sparse.transfer import constant_on


@functools.lru_cache(maxsize=16)
def kv_head_map(num_q: int, num_kv: int, device: torch.device) -> torch.Tensor:
    """[num_q] the KV head of each q head (consecutive GQA groups), made once per shape and device."""
    return torch.arange(num_q, device=device) // (num_q // num_kv)


def plan_scores(chunk: ChunkContext, plan: HeadPlan) -> torch.Tensor:
    """Block scores of every head of the chunk under one plan: [q_heads, rows, kv_blocks], or
    [kv_heads, rows, kv_blocks] (one row per GQA group) when the group selects together: the
    estimator gives every head of a group the same scores (a strided view), or the budget says
    `share: group` (the group's mean block mass). Selection then sorts each group's rows once."""
    estimator = get_estimator(plan.estimator)
    return selection_scores(estimator.score(chunk, plan.params), estimator, plan.params, plan.budget,
                            chunk.kv_group_size)


def selection_scores(scores: torch.Tensor, estimator: Estimator, params: EstimatorParams, budget: Budget,
                     group: int | None) -> torch.Tensor:
    """An estimator's per-head scores as the budget selects from them (`plan_scores`)."""
    if group is None or group == 1:
        return scores
    if estimator.same_in_group(params):
        return scores[::group]
    if budget.share == "group":
        return group_mean_scores(scores, group)
    return scores


def budget_masks(chunk: ChunkContext, name: str, params: EstimatorParams, budgets: list[Budget]) -> list[torch.Tensor]:
    """The kept-block masks `chunk_block_mask` gives when every head has the plan (name, params, budget),
    for each budget, from one scoring of the chunk (calibration tries many budgets per estimator)."""
    estimator = get_estimator(name)
    scores = estimator.score(chunk, params)
    select = select_blocks_triton if chunk.q.is_cuda else select_blocks
    return [select(selection_scores(scores, estimator, params, b, chunk.kv_group_size), b, chunk.first_query_block)
            for b in budgets]


def group_mean_scores(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Log-mass scores [heads, rows, kv_blocks] of consecutive groups of `group` heads -> the log of
    each group's mean mass, [heads // group, rows, kv_blocks] (-inf stays -inf)."""
    grouped = scores.view(scores.shape[0] // group, group, *scores.shape[1:])
    return torch.logsumexp(grouped, dim=1) - math.log(group)


def chunk_block_mask(chunk: ChunkContext, head_plans: list[HeadPlan | None]) -> torch.Tensor:
    """Kept-block mask [mask_heads, query_blocks, kv_blocks] for the chunk's q heads.

    mask_heads is q_heads, or kv_heads when one plan covers every head and its estimator scores
    per GQA group (`plan_scores`); `attend.mask_kv_heads` maps either to KV heads. Heads sharing one
    plan are scored together; a dense head (None) keeps every causal block.
    """
    select = select_blocks_triton if chunk.q.is_cuda else select_blocks  # same blocks; one launch on GPUs
    only = head_plans[0]
    # One plan for every head: score the chunk as it is. (Resolution interns equal plans, so identity answers
    # first; equality only for plans built elsewhere.)
    if only is not None and all(p is only or p == only for p in head_plans):
        return select(plan_scores(chunk, only), only.budget, chunk.first_query_block)
    heads_of: dict[HeadPlan | None, list[int]] = defaultdict(list)
    for h, plan in enumerate(head_plans):
        heads_of[plan].append(h)
    causal = chunk.causal_block_mask()
    mask = causal[None].repeat(len(head_plans), 1, 1)
    columns = []  # (heads, their kept columns) from the scoring calls that keep columns token by token
    for plan, heads, per_head in scoring_groups(heads_of):
        idx = constant_on(heads, chunk.q.device)
        kv_ids = tuple(chunk.kv_head_ids[h] for h in heads) if chunk.kv_head_ids is not None else None
        sub = ChunkContext(chunk.q[:, idx], chunk.kv_head_of[idx], chunk.kv, chunk.block_table,
                           chunk.context_len, chunk.block_size, chunk.scale, kv_ids, chunk.kernels)
        estimator = get_estimator(plan.estimator)
        scores = estimator.score(sub, plan.params) if per_head is None else estimator.score_heads(sub, per_head)
        if plan.budget.share == "group":
            mask[idx] = select_per_kv_head(scores, sub.host_kv_head_ids(), plan.budget, select,
                                           chunk.first_query_block)
        else:
            mask[idx] = select(scores, plan.budget, chunk.first_query_block)
        if "columns" in sub.extras:
            columns.append((idx, sub.extras["columns"]))
    if columns:  # a row per q head of the chunk; heads that keep none hold only padding
        width = max(c.shape[1] for _, c in columns)
        full = torch.full((len(head_plans), width), COLUMN_PAD, dtype=torch.int32, device=chunk.q.device)
        for idx, c in columns:
            full[idx, :c.shape[1]] = c
        chunk.extras["columns"] = full
    return mask


def scoring_groups(heads_of: dict) -> list[tuple[HeadPlan, list[int], list | None]]:
    """The chunk's scoring calls: (plan, its heads, None) per distinct plan, except that heads whose plans
    differ only in settings their estimator takes per head (`per_head_fields`, e.g. MInference's sizes) and
    that select per head are scored in one call: (first plan, their heads, each head's parameters)."""
    calls: dict = {}
    for plan, heads in heads_of.items():
        if plan is None:
            continue
        est = get_estimator(plan.estimator)
        if est.score_heads is None or plan.budget.share != "head":
            calls[plan] = (plan, list(heads), None)
            continue
        shared = plan.params.model_copy(update={f: None for f in est.per_head_fields})
        key = (plan.estimator, shared.model_dump_json(), plan.budget)
        first, all_heads, per_head = calls.get(key, (plan, [], []))
        calls[key] = (first, all_heads + list(heads), per_head + [plan.params] * len(heads))
    out = []
    for plan, heads, per_head in calls.values():
        if per_head is None or len(set(map(id, per_head))) == 1:  # one plan: its estimator's own call
            out.append((plan, heads, None))
        else:  # heads in order, so the fused scorers pack each GQA group's q heads together
            order = sorted(range(len(heads)), key=heads.__getitem__)
            out.append((plan, [heads[i] for i in order], [per_head[i] for i in order]))
    return out


def select_per_kv_head(scores: torch.Tensor, kv_ids: list[int], budget, select, first_query_block: int
                       ) -> torch.Tensor:
    """`share: group` for one plan's heads: the heads of each KV head select once, from their mean mass,
    also when head rules give the plan a different number of each group's heads (so a group's pick
    does not depend on which other groups the plan covers)."""
    members = [[h for h, k in enumerate(kv_ids) if k == g] for g in dict.fromkeys(kv_ids)]
    n = len(members[0])
    if all(m == list(range(i * n, (i + 1) * n)) for i, m in enumerate(members)):  # equal groups: one selection
        return select(group_mean_scores(scores, n), budget, first_query_block).repeat_interleave(n, 0)
    mask = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    for m in members:
        idx = constant_on(m, scores.device)
        mask[idx] = select(group_mean_scores(scores[idx], len(m)), budget, first_query_block).expand(len(m), -1, -1)
    return mask


def kept_blocks(ctx: ChunkContext, head_plans: list[HeadPlan | None], split: SplitGroup | None = None
                ) -> torch.Tensor:
    """The chunk's kept-block mask (`chunk_block_mask`); where the rank's GQA group spans ranks, the
    whole group's, a row per q head of the group, as one device selects for that KV head."""
    if split is None:
        return chunk_block_mask(ctx, head_plans)
    if split.share_queries:
        group = split.group_context(ctx)
        return per_q_head(chunk_block_mask(group, list(split.plans)), group.q.shape[1])
    return split.gather_masks(chunk_block_mask(ctx, head_plans), ctx.q.shape[1])


def selected_rows(ctx: ChunkContext, dense_below: int, dense_tail: int = 0) -> slice:
    """The chunk's query block rows the plan selects blocks for: past those whose tokens all lie before position
    `dense_below` (each sees at most `dense_below` tokens: a token attends densely or sparsely by its position, not
    by where the scheduler cut the chunk it came in), and before the rows holding the chunk's last `dense_tail`
    tokens (the plan's `dense_tail`: a prompt's last tokens, which its first output token is read from)."""
    return slice(dense_rows(ctx, dense_below), ctx.num_query_blocks - tail_rows(ctx, dense_tail))


def keep_dense_rows(mask: torch.Tensor, ctx: ChunkContext, selected: slice) -> torch.Tensor:
    """Keep every causal block in the rows outside `selected` (`selected_rows`): those attend densely."""
    if selected.start:
        mask[:, :selected.start] = ctx.causal_block_mask()[:selected.start]
    t = ctx.num_query_blocks - selected.stop
    if t:  # (the last row sees every block; the rows before it all but the blocks after them: a [t, t - 1] corner)
        mask[:, -t:] = True
        if t > 1:
            mask[:, -t:, -t + 1:] = torch.ones(t, t - 1, dtype=torch.bool, device=mask.device).tril(-1)
    return mask


def dequantize_queries(q: torch.Tensor, q_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """fp8 queries (vLLM's per-tensor static quantization: q / `layer._q_scale`) as `dtype` values: a chunk's
    worth, counted in the step's temporaries (`reserve.step_temporaries_bytes`). The scale as a host number is
    applied in fp32 with one rounding (a scale rounded to bf16 first would bias every logit by up to 2^-8, where
    FA3 applies the exact fp32 descale). No host sync."""
    return q.to(dtype).mul_(q_scale)


def attend_sparse_chunks(
    query: torch.Tensor,  # [num_tokens, q_heads, D] whole batch
    output: torch.Tensor,  # [num_tokens, q_heads, Dv] written for the chunks' tokens
    kv: PagedKV,
    block_table: torch.Tensor,  # [num_reqs, max_pages]
    chunks: tuple[SparseChunk, ...],
    head_plans: list[HeadPlan | None],  # per local q head
    block_size: int,
    scale: float,
    union_tile: int | None = None,  # query blocks per union; None: one union for the whole chunk
    layer: int = -1,  # for the stats only
    kernel: str | None = None,  # "fa3" | "fa2" | "triton" | "reference"; None: by device (selected_kernel)
    dense_below: int = 0,  # query blocks whose tokens all lie before this position attend densely
    dense_tail: int = 0,  # the query blocks holding each chunk's last this many tokens attend densely
    split: SplitGroup | None = None,  # this rank's GQA group spans ranks: attend to the group's union
    metrics: WorkerMetrics | None = None,  # estimation time and kept density, for /metrics
    union_heads: bool = True,  # the q heads of a KV head attend to their union; False: each to its own blocks
    observer=None,  # eval / calibration hooks (`instrumented.StatsObserver`); None while serving
    tiles: tuple | None = None,  # per chunk, the builder's tile geometry (`batch.tile_geometry`); None: made here
    # fp8 queries (vLLM quantized them for an fp8 cache): their per-tensor scale, (device tensor, host float)
    q_scale: tuple[torch.Tensor, float] | None = None,
    guard=None,  # the plan's `dense_above` rule (`density_guard.DensityGuard`): counts what each chunk-layer reads
) -> None:
    num_q, num_kv = query.shape[1], kv.num_kv_heads
    kv_head_of = kv_head_map(num_q, num_kv, query.device)
    kv_head_ids = tuple(h // (num_q // num_kv) for h in range(num_q))
    kernel = kernel or selected_kernel(query.device)
    fused = kernel != "reference"  # the estimators' Triton kernels go with the attention kernel's choice
    if observer is not None:
        kernel = observer.kernel(kernel)
    for i, c in enumerate(chunks):
        q, fa3_query = query[c.q_start:c.q_end], None
        if q_scale is not None:  # FA3 reads the fp8 queries with their descale; the estimators the 16-bit values
            fa3_query, q = (q, q_scale[0]), dequantize_queries(q, q_scale[1], output.dtype)
        ctx = ChunkContext(q, kv_head_of, kv, block_table[c.req], c.context_len, block_size, scale, kv_head_ids, fused)
        if observer is not None and observer.calibrating():  # attend densely, measure the candidates
            observer.calibrate(ctx, output[c.q_start:c.q_end], layer, dense_below, union_tile or ctx.num_query_blocks)
            continue
        timer = metrics.start_timer() if metrics is not None else None
        chosen = selected_rows(ctx, dense_below, dense_tail)
        mask = keep_dense_rows(kept_blocks(ctx, head_plans, split), ctx, chosen)
        if metrics is not None:
            metrics.stop_timer(timer)
        tile = union_tile or ctx.num_query_blocks
        if kernel == "reference":
            pages = attend_chunk_reference(ctx, mask, tile, c, output, block_table, layer,
                                           chosen, union_heads, observer)
        else:
            geometry = tiles[i] if tiles is not None else None
            # (a tuple compare: the step's geometry, its dense tail split included, is this call's plan's)
            if geometry is not None and geometry.made_for != (block_size, union_tile, dense_tail):
                raise ValueError(f"attend_sparse_chunks: the step's tile geometry was made for (block, union tile, "
                                 f"dense_tail) {geometry.made_for}, not {(block_size, union_tile, dense_tail)}: its "
                                 f"dense tail split {geometry.tail and geometry.tail[:2]} is not this chunk's")
            pages = attend_chunk_with_kernel(ctx, mask, tile, c, output, block_table, kernel, layer, union_heads,
                                             observer, geometry, fa3_query, dense_tail)
        if metrics is not None:
            metrics.record_density(layer, *pages)
        if guard is not None:
            guard.record(layer, c.seq_len, *pages)
