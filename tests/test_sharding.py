"""Tensor parallelism on CPU: each simulated rank runs exactly its own heads of the plan (numbered as the
unsharded model), and the ranks' sparse outputs put together equal one device's."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.paged import random_paged_batch
from vllm_sparse.backend.batch import SparseChunk
from vllm_sparse.backend.sparse_path import attend_sparse_chunks
from vllm_sparse.config.errors import SparseConfigError
from vllm_sparse.config.loader import parse_config
from vllm_sparse.config.plan import HeadPlan, ModelShape, resolve_plan
from vllm_sparse.config.sharding import head_shard
from vllm_sparse.estimators.registry import get_estimator
from vllm_sparse.kernels.paged import PagedKV
from vllm_sparse.selection.budget import Budget

LAYOUTS = [(32, 8, 1), (32, 8, 2), (32, 8, 4), (32, 8, 8), (8, 2, 4), (8, 2, 8), (4, 1, 2), (16, 16, 4)]


@pytest.mark.parametrize("num_q, num_kv, tp", LAYOUTS)
def test_ranks_cover_every_head_once_and_read_their_own_kv_heads(num_q, num_kv, tp):
    group = num_q // num_kv
    shards = [head_shard(num_q, num_kv, r, tp) for r in range(tp)]
    assert [q for s in shards for q in s.q_heads] == list(range(num_q))
    for s in shards:
        # vLLM's layout on the rank: local query head i reads local KV head i // local group.
        for i, q in enumerate(s.q_heads):
            assert s.kv_heads.start + s.local_kv_head(i) == q // group
        assert s.splits_groups == (tp > num_kv)
    if tp <= num_kv:  # KV heads split, not replicated: each held by exactly one rank
        assert [k for s in shards for k in s.kv_heads] == list(range(num_kv))


@pytest.mark.parametrize("num_q, num_kv, tp, field", [
    (32, 8, 3, "tensor_parallel_size"), (12, 6, 4, "tensor_parallel_size"), (8, 3, 2, "tensor_parallel_size")])
def test_layouts_vllm_cannot_shard_are_named(num_q, num_kv, tp, field):
    with pytest.raises(SparseConfigError) as e:
        head_shard(num_q, num_kv, 0, tp, "my.yaml")
    assert "my.yaml" in str(e.value) and field in str(e.value)


def test_head_rules_keep_unsharded_numbering_on_every_rank():
    shape = ModelShape("org/llama-3-tiny", ("LlamaForCausalLM",), num_layers=2, num_q_heads=8, num_kv_heads=4)
    data = {"version": 1, "models": [{"match": {"architectures": ["LlamaForCausalLM"]}, "layers": [
        {"layers": "all", "estimator": {"name": "pooled"}, "budget": {"top_k": 4},
         "heads": [{"heads": "0-1", "dense": True}, {"heads": 5, "budget": {"top_k": 9}}]}]}]}
    plan = resolve_plan(parse_config(data, "t.yaml"), shape, "t.yaml")
    full = plan.layer(1).heads
    for tp in (1, 2, 4):
        got = [h for r in range(tp) for h in plan.layer(1).heads_for(head_shard(8, 4, r, tp))]
        assert tuple(got) == full
    rank1 = plan.layer(1).heads_for(head_shard(8, 4, 1, 2))  # global heads 4-7
    assert rank1[1].budget.top_k == 9 and rank1[0].budget.top_k == 4
    rank0 = plan.layer(1).heads_for(head_shard(8, 4, 0, 2))
    assert rank0[0] is None and rank0[1] is None and rank0[2] is not None


def _group_plans(num_kv: int, group: int, keep_all: bool = False) -> list[HeadPlan | None]:
    """Different plans per GQA group (one group dense), the same within a group."""
    est = {n: get_estimator(n) for n in ("pooled", "sink_local", "lowbit")}
    if keep_all:
        per_group = [HeadPlan("pooled", est["pooled"].params(), Budget(keep_ratio=1.0))] * num_kv
    else:
        per_group = [HeadPlan("pooled", est["pooled"].params(), Budget(keep_ratio=0.3, sink_blocks=1, local_blocks=1)),
                     HeadPlan("sink_local", est["sink_local"].params(), Budget(top_k=2, local_blocks=1)),
                     None,
                     HeadPlan("lowbit", est["lowbit"].params(sample_stride=4), Budget(top_p=0.8))][:num_kv]
    return [p for p in per_group for _ in range(group)]


def _run_ranks(b, plans, num_q, num_kv, tp, chunks):
    """Each simulated rank: its query heads, its KV heads of the cache, its slice of the plan."""
    out = torch.full_like(b.q, float("nan"))
    for r in range(tp):
        s = head_shard(num_q, num_kv, r, tp)
        q_sl, kv_sl = slice(s.q_heads.start, s.q_heads.stop), slice(s.kv_heads.start, s.kv_heads.stop)
        kv = PagedKV(b.kv.key[:, kv_sl], b.kv.value[:, kv_sl])
        part = torch.full_like(b.q[:, q_sl], float("nan"))
        attend_sparse_chunks(b.q[:, q_sl].contiguous(), part, kv, b.block_table, chunks, plans[q_sl], 32, 32**-0.5,
                             union_tile=2)
        out[:, q_sl] = part
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_ranks_together_equal_one_device_when_groups_stay_whole(tp):
    num_q, num_kv = 8, 4
    b = random_paged_batch((400, 260), (300, 260), num_q, num_kv, 32, 16, seed=11 + tp)
    chunks = (SparseChunk(0, 0, 300, 100), SparseChunk(1, 300, 560, 0))
    plans = _group_plans(num_kv, num_q // num_kv)
    one = torch.full_like(b.q, float("nan"))
    attend_sparse_chunks(b.q, one, b.kv, b.block_table, chunks, plans, 32, 32**-0.5, union_tile=2)
    dense = torch.full_like(b.q, float("nan"))
    attend_sparse_chunks(b.q, dense, b.kv, b.block_table, chunks, _group_plans(num_kv, num_q // num_kv, True), 32,
                         32**-0.5, union_tile=2)
    assert (one - dense)[:, :4].abs().max() > 1e-2  # the plan really drops blocks (groups 0 and 1)
    ranks = _run_ranks(b, plans, num_q, num_kv, tp, chunks)
    assert not ranks.isnan().any()
    torch.testing.assert_close(ranks, one, atol=1e-5, rtol=1e-5)


def test_split_groups_run_and_keep_all_still_equals_one_device():
    # 2 KV heads over 4 ranks: each rank holds a replicated KV head and half a group. Its union covers
    # its own query heads only, so only a keep-everything plan must match one device exactly.
    num_q, num_kv, tp = 8, 2, 4
    b = random_paged_batch((330,), (330,), num_q, num_kv, 32, 16, seed=3)
    chunks = (SparseChunk(0, 0, 330, 0),)
    plans = _group_plans(num_kv, num_q // num_kv, keep_all=True)
    one = torch.full_like(b.q, float("nan"))
    attend_sparse_chunks(b.q, one, b.kv, b.block_table, chunks, plans, 32, 32**-0.5, union_tile=2)
    torch.testing.assert_close(_run_ranks(b, plans, num_q, num_kv, tp, chunks), one, atol=1e-5, rtol=1e-5)
    sparse = _group_plans(num_kv, num_q // num_kv)
    assert not _run_ranks(b, sparse, num_q, num_kv, tp, chunks).isnan().any()


def test_a_layout_that_cannot_be_sharded_stops_the_engine_at_start(monkeypatch):
    """`rank_shard` runs while the attention layers are built: with a sparse plan, heads that do not
    split over the ranks, or a layer whose local heads are not the plan model's split, are an error
    naming tensor_parallel_size; a dense plan needs no shard."""
    from vllm_sparse import compat
    from vllm_sparse.backend.checks import rank_shard
    from vllm_sparse.config.plan import SparsePlan

    shape = ModelShape("m", ("LlamaForCausalLM",), 2, 12, 4)
    plan = resolve_plan(parse_config({"version": 1, "models": [{"match": {"architectures": ["LlamaForCausalLM"]},
                                                                "layers": [{"layers": "all"}]}]}, "x.yaml"),
                        shape, "x.yaml")
    monkeypatch.setattr(compat, "tensor_parallel_size", lambda: 8)
    monkeypatch.setattr(compat, "tensor_parallel_rank", lambda: 0)
    with pytest.raises(SparseConfigError, match="tensor_parallel_size: 12 query heads do not split over 8 ranks"):
        rank_shard(plan, 2, 1)
    monkeypatch.setattr(compat, "tensor_parallel_size", lambda: 2)
    assert rank_shard(plan, 6, 2).q_heads == range(0, 6)
    with pytest.raises(SparseConfigError, match="tensor_parallel_size=2 give 6 / 2"):
        rank_shard(plan, 4, 1)  # e.g. a draft model's layer: not this plan's heads
    assert rank_shard(SparsePlan.dense(shape, "x", "dense"), 4, 1) is None
