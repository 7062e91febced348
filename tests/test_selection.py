"""Budget and block-union invariants (property tests), and the sparse path against masked attention."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.paged import random_paged_batch
from vllm_sparse.backend.batch import SparseChunk
from vllm_sparse.backend.instrumented import attend_observed
from vllm_sparse.backend.sparse_path import chunk_block_mask
from vllm_sparse.config.plan import HeadPlan
from vllm_sparse.estimators.base import ChunkContext
from vllm_sparse.estimators.registry import get_estimator
from vllm_sparse.kernels.reference import dense_causal_attention_ref
from vllm_sparse.selection.budget import Budget, select_blocks
from vllm_sparse.selection.pages import block_mask_to_page_csr
from vllm_sparse.selection.union import blocks_to_pages, union_blocks


@st.composite
def budgets(draw):
    rule = draw(st.sampled_from(["top_k", "top_p", "keep_ratio"]))
    sink, local = draw(st.integers(0, 3)), draw(st.integers(1, 4))
    kw = {"sink_blocks": sink, "local_blocks": local, "min_blocks": draw(st.integers(1, 6))}
    if draw(st.booleans()):
        kw["max_blocks"] = draw(st.integers(max(kw["min_blocks"], sink + local), 12))
    if rule == "top_k":
        kw["top_k"] = draw(st.integers(1, 10))
    elif rule == "top_p":
        kw["top_p"] = draw(st.floats(0.05, 1.0))
    else:
        kw["keep_ratio"] = draw(st.floats(0.01, 1.0))
    return Budget(**kw)


@settings(max_examples=150, deadline=None, derandomize=True)  # the same examples every run
@given(budget=budgets(), heads=st.integers(1, 4), first=st.integers(0, 20), rows=st.integers(1, 8),
       seed=st.integers(0, 2**16))
def test_budget_invariants(budget, heads, first, rows, seed):
    nkb = first + rows
    scores = torch.randn(heads, rows, nkb, generator=torch.Generator().manual_seed(seed))
    mask = select_blocks(scores, budget, first)
    row_block = torch.arange(first, first + rows)[:, None]
    kb = torch.arange(nkb)[None, :]
    causal = kb <= row_block
    assert not (mask & ~causal[None]).any(), "a block past the row's diagonal was kept"
    forced = causal & ((kb < budget.sink_blocks) | (kb > row_block - budget.local_blocks))
    assert (mask | ~forced[None]).all(), "a sink/local/diagonal block was dropped"
    assert mask[:, torch.arange(rows), torch.arange(first, first + rows)].all(), "diagonal block dropped"
    count = mask.sum(-1)
    n_causal, n_forced = causal.sum(-1)[None], forced.sum(-1)[None]
    assert (count >= torch.minimum(n_causal, torch.tensor(budget.min_blocks))).all()
    if budget.max_blocks is not None:
        assert (count <= torch.maximum(n_forced, torch.tensor(budget.max_blocks))).all()
    if budget.top_k is not None:
        want = torch.clamp(torch.maximum(n_forced, torch.tensor(budget.top_k)), min=budget.min_blocks)
        if budget.max_blocks is not None:
            want = torch.minimum(want, torch.maximum(n_forced, torch.tensor(budget.max_blocks)))
        assert torch.equal(count, torch.minimum(want, n_causal).expand_as(count))
    if budget.keep_ratio is not None:
        ratio_count = torch.tensor([math.ceil(budget.keep_ratio * (first + r + 1)) for r in range(rows)])
        capped = budget.max_blocks is not None and (ratio_count > budget.max_blocks).any()
        if not capped:
            assert (count >= ratio_count[None]).all()
    if budget.top_p is not None and budget.max_blocks is None:
        # The kept non-forced blocks carry at least top_p of the non-forced softmax mass.
        s = scores.masked_fill(~causal[None] | forced[None], float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        kept = (p * mask).sum(-1)
        has_free = (causal & ~forced).any(-1)[None].expand_as(kept)
        assert (kept[has_free] >= budget.top_p - 1e-5).all()


def test_budget_keeps_highest_scores():
    scores = torch.full((1, 1, 10), -5.0)
    scores[0, 0, 4] = 3.0
    scores[0, 0, 6] = 2.0
    mask = select_blocks(scores, Budget(top_k=4, sink_blocks=1, local_blocks=1), first_query_block=9)
    assert torch.nonzero(mask[0, 0]).flatten().tolist() == [0, 4, 6, 9]


@settings(max_examples=100, deadline=None, derandomize=True)  # the same examples every run
@given(q_heads=st.sampled_from([1, 2, 4, 8]), group=st.sampled_from([1, 2, 4]), rows=st.integers(1, 6),
       nkb=st.integers(6, 20), block=st.sampled_from([32, 64, 128]), page=st.sampled_from([16, 32]),
       seed=st.integers(0, 2**16))
def test_union_invariants(q_heads, group, rows, nkb, block, page, seed):
    if q_heads % group:
        group = 1
    num_kv = q_heads // group
    g = torch.Generator().manual_seed(seed)
    first = nkb - rows
    mask = (torch.rand(q_heads, rows, nkb, generator=g) < 0.3) & \
        (torch.arange(nkb)[None, :] <= torch.arange(first, nkb)[:, None])[None]
    kv_head_of = torch.arange(q_heads) // group
    union = union_blocks(mask, kv_head_of, num_kv)
    for h in range(q_heads):  # superset of every row's and head's selection
        assert (union[kv_head_of[h]] | ~mask[h].any(0)).all()
    assert not (union & ~mask.view(num_kv, group, rows, nkb).any(1).any(1)).any(), "union added a block"
    seq_len = nkb * block - int(torch.randint(0, block, (1,), generator=g))
    for h in range(num_kv):
        pages = blocks_to_pages(torch.nonzero(union[h]).flatten(), block, page, seq_len)
        assert torch.equal(pages, torch.unique(pages)), "pages not sorted or duplicated"
        assert (pages < (seq_len + page - 1) // page).all()
        covered = set((pages * page // block).tolist())
        past_end = {b for b in range(nkb) if b * block >= seq_len}
        assert covered == set(torch.nonzero(union[h]).flatten().tolist()) - past_end



@settings(max_examples=60, deadline=None, derandomize=True)  # the same examples every run
@given(rows=st.integers(1, 8), nkb=st.integers(1, 12), block=st.sampled_from([16, 64, 128]),
       page=st.sampled_from([16, 32]), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_page_csr_matches_per_row_lists(rows, nkb, block, page, density, seed):
    """The sync-free CSR builder gives, row by row, exactly blocks_to_pages of the row's blocks."""
    if block % page:
        page = block
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, nkb, generator=g) < density
    seq_lens = torch.randint(1, nkb * block + 1, (rows,), generator=g)
    indptr, indices = block_mask_to_page_csr(mask, block, page, (seq_lens + page - 1) // page)
    assert indptr.dtype == indices.dtype == torch.int32 and indptr[0] == 0
    for r in range(rows):
        want = blocks_to_pages(torch.nonzero(mask[r]).flatten(), block, page, int(seq_lens[r]))
        assert indices[indptr[r]:indptr[r + 1]].tolist() == want.tolist()

def _chunk_ctx(b, s, block, kv_head_of):
    q0, q1 = int(b.query_start_loc[s]), int(b.query_start_loc[s + 1])
    return ChunkContext(b.q[q0:q1], kv_head_of, b.kv, b.block_table[s], int(b.seq_lens[s]) - (q1 - q0), block, 1.0)


def test_sink_local_finds_its_shape():
    b = random_paged_batch([1000], [300], 2, 1, 16, 16)
    ctx = _chunk_ctx(b, 0, 64, torch.zeros(2, dtype=torch.long))
    est = get_estimator("sink_local")
    scores = est.score(ctx, est.params(sink_blocks=2, local_blocks=3))
    mask = select_blocks(scores, Budget(top_k=5, sink_blocks=0, local_blocks=1), ctx.first_query_block)
    for r, qb in enumerate(ctx.query_block_ids().tolist()):
        want = {0, 1} | set(range(max(0, qb - 2), qb + 1))
        assert set(torch.nonzero(mask[0, r]).flatten().tolist()) == want


def _run_path(b, head_plans, block):
    out = torch.full_like(b.q, float("nan"))
    chunks = tuple(SparseChunk(s, int(b.query_start_loc[s]), int(b.query_start_loc[s + 1]),
                               int(b.seq_lens[s]) - int(b.query_start_loc[s + 1] - b.query_start_loc[s]))
                   for s in range(len(b.seq_lens)))
    attend_observed(b.q, out, b.kv, b.block_table, chunks, head_plans, block, 0.25)
    return out


def test_sparse_path_keep_all_equals_dense():
    b = random_paged_batch([700, 333], [200, 333], 8, 2, 16, 16, seed=3)
    est = get_estimator("sink_local")
    plan = HeadPlan("sink_local", est.params(), Budget(keep_ratio=1.0))
    out = _run_path(b, [plan] * 8, 64)
    for s in range(2):
        rows = slice(int(b.query_start_loc[s]), int(b.query_start_loc[s + 1]))
        ref = dense_causal_attention_ref(b.q[rows], b.keys[s], b.values[s], 0.25)
        torch.testing.assert_close(out[rows], ref, atol=1e-5, rtol=1e-5)


def test_sparse_path_attends_to_the_union_only():
    """A sink+local plan on one KV group: output equals attention masked to the union's blocks."""
    b = random_paged_batch([1024], [256], 4, 2, 16, 16, seed=5)
    est = get_estimator("sink_local")
    sparse = HeadPlan("sink_local", est.params(sink_blocks=1, local_blocks=1), Budget(top_k=2, local_blocks=1))
    out = _run_path(b, [sparse, sparse, None, None], 128)  # kv head 0 sparse, kv head 1 dense
    q_pos = torch.arange(768, 1024)
    allowed = torch.zeros(1024, dtype=torch.bool)
    allowed[:128] = True  # sink block
    allowed[768:] = True  # the chunk's own blocks (local/diagonal of rows 6 and 7)
    k, v = b.keys[0], b.values[0]
    for h, mask in ((0, allowed), (1, torch.ones(1024, dtype=torch.bool))):
        logits = torch.einsum("thd,kd->htk", b.q[:, 2 * h:2 * h + 2].double(), k[:, h].double()) * 0.25
        ok = (torch.arange(1024)[None, :] <= q_pos[:, None]) & mask[None, :]
        ref = torch.einsum("htk,kd->thd", logits.masked_fill(~ok[None], float("-inf")).softmax(-1),
                           v[:, h].double())
        torch.testing.assert_close(out[:, 2 * h:2 * h + 2].double(), ref, atol=1e-5, rtol=1e-5)


def test_union_tile_of_one_row_attends_each_row_to_its_own_blocks():
    """With union_tile=1 every query block row reads only what it selected: sink block + its diagonal."""
    b = random_paged_batch([1024], [256], 2, 1, 16, 16, seed=9)
    est = get_estimator("sink_local")
    plan = HeadPlan("sink_local", est.params(sink_blocks=1, local_blocks=1), Budget(top_k=2, local_blocks=1))
    out = torch.full_like(b.q, float("nan"))
    chunk = SparseChunk(0, 0, 256, 768)
    attend_observed(b.q, out, b.kv, b.block_table, (chunk,), [plan, plan], 128, 0.25, union_tile=1)
    k, v = b.keys[0][:, 0].double(), b.values[0][:, 0].double()
    for pos in (768, 800, 895, 896, 1023):
        qb = pos // 128
        allowed = torch.zeros(1024, dtype=torch.bool)
        allowed[:128] = True
        allowed[qb * 128:] = True
        ok = allowed & (torch.arange(1024) <= pos)
        logits = (b.q[pos - 768].double() @ k.T * 0.25).masked_fill(~ok[None], float("-inf"))
        torch.testing.assert_close(out[pos - 768].double(), logits.softmax(-1) @ v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,params", [("pooled", {"share": "group"}), ("sink_local", {"local_blocks": 2})])
def test_group_shared_scores_select_once_per_group_and_keep_the_same_blocks(monkeypatch, name, params):
    """An estimator that scores every head of a GQA group alike is selected once per KV head (a
    mask row per group): the blocks each head keeps, and the attention output, are those of
    selecting per head."""
    from vllm_sparse.estimators import registry

    b = random_paged_batch([1500, 900], [700, 900], 8, 2, 16, 16, seed=11)
    est = get_estimator(name)
    plan = HeadPlan(name, est.params(**params), Budget(keep_ratio=0.3, sink_blocks=1, local_blocks=1))
    ctx = _chunk_ctx(b, 0, 128, torch.arange(8) // 4)
    shared = chunk_block_mask(ctx, [plan] * 8)
    per_head = select_blocks(est.score(ctx, plan.params), plan.budget, ctx.first_query_block)
    assert shared.shape == (2, *per_head.shape[1:])
    assert torch.equal(shared.repeat_interleave(4, 0), per_head)
    out = _run_path(b, [plan] * 8, 128)
    monkeypatch.setitem(registry._REGISTRY, name, dataclasses.replace(est, same_in_group=lambda p: False))
    assert chunk_block_mask(ctx, [plan] * 8).shape[0] == 8
    torch.testing.assert_close(_run_path(b, [plan] * 8, 128), out)  # same blocks; CPU BLAS may round apart


def test_stats_count_requested_and_union_density_and_audit():
    from vllm_sparse.selection.stats import STATS

    b = random_paged_batch([1024], [512], 4, 2, 16, 16, seed=4)
    est = get_estimator("sink_local")
    plan = HeadPlan("sink_local", est.params(sink_blocks=1, local_blocks=1), Budget(top_k=2, local_blocks=1))
    STATS.enable(audit=True)
    STATS.reset()
    try:
        out = torch.empty_like(b.q)
        attend_observed(b.q, out, b.kv, b.block_table, (SparseChunk(0, 0, 512, 512),), [plan] * 4, 128, 0.25,
                        layer=3)
        st = STATS.snapshot()[3]
    finally:
        STATS.enabled = STATS.audit = False
        STATS.reset()
    # Rows are blocks 4..7, causal cells 5+6+7+8 = 26 per head; each row keeps 2 (sink + diagonal). Counted
    # per q head, also where sink_local's mask holds a row per KV head.
    assert (st.requested_kept, st.requested_total) == (4 * 8, 4 * 26)
    # One union for the chunk: blocks {0, 4, 5, 6, 7}; causal cells of those per row: 2+3+4+5 = 14, per kv head.
    assert (st.union_kept, st.union_total) == (2 * 14, 2 * 26)
    assert st.unions == 1
    (rel, mass), = st.audit
    assert 0 < rel < 2 and 0 < mass < 1


@pytest.mark.parametrize("name,params", [("lowbit", {"sample_stride": 4}), ("antidiagonal", {"stride": 4})])
def test_group_share_budget_keeps_the_budget_after_union(name, params):
    """`share: group`: the q heads of a KV head select once, from their mean block mass, so the union
    per KV head keeps exactly what the budget asks (per head it keeps more), and a group's pick is
    the top of the summed masses of its heads."""
    from vllm_sparse.backend.sparse_path import plan_scores
    from vllm_sparse.selection.union import union_blocks

    b = random_paged_batch([2000], [1000], 8, 2, 16, 16, seed=21)
    ctx = _chunk_ctx(b, 0, 64, torch.arange(8) // 4)
    est = get_estimator(name)
    budget = Budget(keep_ratio=0.2, sink_blocks=1, local_blocks=1)
    shared = HeadPlan(name, est.params(**params), dataclasses.replace(budget, share="group"))
    per_head = HeadPlan(name, est.params(**params), budget)
    mask_group = chunk_block_mask(ctx, [shared] * 8)
    mask_head = chunk_block_mask(ctx, [per_head] * 8)
    assert mask_group.shape[0] == 2 and mask_head.shape[0] == 8
    kept = mask_group.sum(-1)
    want = select_blocks(torch.zeros(2, *mask_group.shape[1:]), budget, ctx.first_query_block).sum(-1)
    assert torch.equal(kept, want)  # the budget's count per row, per KV head
    union_head = union_blocks(mask_head, torch.arange(8) // 4, 2)
    assert union_head.sum() > union_blocks(mask_group, torch.arange(2), 2).sum()
    # The group's scores are the log of its heads' mean mass.
    scores = est.score(ctx, shared.params).double()
    mean = scores.exp().view(2, 4, *scores.shape[1:]).mean(1).log()
    got = plan_scores(ctx, shared).double()
    finite = torch.isfinite(mean)
    assert torch.equal(finite, torch.isfinite(got))
    torch.testing.assert_close(got[finite], mean[finite], atol=1e-5, rtol=1e-5)
    # Mixed plans (the path for per-head rules) give the same group picks for those heads.
    mixed = chunk_block_mask(ctx, [shared] * 4 + [None] * 4)
    assert torch.equal(mixed[:4], mask_group[0:1].expand(4, -1, -1))


def test_group_share_budget_selects_per_kv_head_when_a_plan_covers_unequal_parts_of_groups():
    """Head rules may give a `share: group` plan all of one group and part of another: each KV head's
    heads of the plan still select once, from their own mean mass (not per head, and not depending on
    the other group)."""
    from vllm_sparse.backend.sparse_path import group_mean_scores

    b = random_paged_batch([2000], [1000], 8, 2, 16, 16, seed=21)
    ctx = _chunk_ctx(b, 0, 64, torch.arange(8) // 4)
    est = get_estimator("antidiagonal")
    shared = HeadPlan("antidiagonal", est.params(stride=4), Budget(keep_ratio=0.2, share="group"))
    other = HeadPlan("sink_local", get_estimator("sink_local").params(), Budget(top_k=2))
    mask = chunk_block_mask(ctx, [shared] * 6 + [other] * 2)
    sub = ChunkContext(ctx.q[:, :6], torch.arange(6) // 4, ctx.kv, ctx.block_table, ctx.context_len, 64, 1.0)
    scores = est.score(sub, shared.params)
    for heads in (range(0, 4), range(4, 6)):
        idx = list(heads)
        want = select_blocks(group_mean_scores(scores[idx], len(idx)), shared.budget, ctx.first_query_block)
        assert torch.equal(mask[idx], want.expand(len(idx), -1, -1))
