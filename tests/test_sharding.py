"""Tensor parallelism on CPU: each simulated rank runs exactly its own heads of the plan (numbered as the
unsharded model), and the ranks' sparse outputs put together equal one device's, also where a GQA
group spans ranks (the ranks run in threads, exchanging through a fake all-gather)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.fixtures.paged import random_paged_batch
from vllm_sparse.backend.batch import SparseChunk
from vllm_sparse.backend.instrumented import attend_observed
from vllm_sparse.backend.sparse_path import kept_blocks
from vllm_sparse.backend.split_groups import rank_layer
from vllm_sparse.config.errors import SparseConfigError
from vllm_sparse.config.loader import parse_config
from vllm_sparse.config.plan import HeadPlan, LayerPlan, ModelShape, resolve_plan
from vllm_sparse.config.sharding import head_shard
from vllm_sparse.estimators.base import ChunkContext
from vllm_sparse.estimators.registry import get_estimator
from vllm_sparse.kernels.paged import PagedKV
from vllm_sparse.selection.budget import Budget
from vllm_sparse.selection.tile_tables import tile_unions

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
    for s in shards:  # the ranks that hold a rank's KV heads run exactly the q heads that read them
        assert s.rank in s.group_ranks and all(shards[r].kv_heads == s.kv_heads for r in s.group_ranks)
        assert [q for r in s.group_ranks for q in shards[r].q_heads] == list(s.group_q_heads)


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


class FakeTPGroup:
    """vLLM's tensor-parallel all-gather for ranks simulated in threads: a rank that skips a call the
    others make leaves them waiting, which times out (the engine would hang)."""

    def __init__(self, tp: int):
        self.slots: list[torch.Tensor | None] = [None] * tp
        self.barrier = threading.Barrier(tp, timeout=60)
        self.calls = [0] * tp

    def all_gather_of(self, rank: int):
        def all_gather(t: torch.Tensor, dim: int) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = t.clone()
            self.barrier.wait()
            out = torch.cat(self.slots, dim)
            self.barrier.wait()  # nobody overwrites a slot before every rank has read it
            return out
        return all_gather


def _on_ranks(tp: int, fn):
    """fn(rank, all_gather) on every simulated rank at once -> results in rank order."""
    group = FakeTPGroup(tp)
    with ThreadPoolExecutor(tp) as pool:
        results = [f.result() for f in [pool.submit(fn, r, group.all_gather_of(r)) for r in range(tp)]]
    assert len(set(group.calls)) == 1  # every rank made the same collective calls
    return results


def _rank_view(b, s):
    """What rank s holds: its query heads and its KV heads of the cache."""
    q_sl, kv_sl = slice(s.q_heads.start, s.q_heads.stop), slice(s.kv_heads.start, s.kv_heads.stop)
    return b.q[:, q_sl].contiguous(), PagedKV(b.kv.key[:, kv_sl], b.kv.value[:, kv_sl])


def _run_ranks(b, plans, num_q, num_kv, tp, chunks):
    """Each simulated rank: its query heads, its KV heads of the cache, its slice of the plan, chosen as
    the backend chooses it (`rank_layer`); a rank the layer leaves dense keeps every block."""
    layer = LayerPlan(0, True, tuple(plans))

    def rank(r, all_gather):
        s = head_shard(num_q, num_kv, r, tp)
        q, kv = _rank_view(b, s)
        heads, split = rank_layer(layer, s, all_gather)
        part = torch.full_like(q, float("nan"))
        attend_observed(q, part, kv, b.block_table, chunks, heads or [None] * q.shape[1], 32, 32**-0.5,
                        union_tile=2, split=split)
        return part

    return torch.cat(_on_ranks(tp, rank), dim=1)


def _one_device(b, plans, chunks):
    out = torch.full_like(b.q, float("nan"))
    attend_observed(b.q, out, b.kv, b.block_table, chunks, plans, 32, 32**-0.5, union_tile=2)
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_ranks_together_equal_one_device_when_groups_stay_whole(tp):
    num_q, num_kv = 8, 4
    b = random_paged_batch((400, 260), (300, 260), num_q, num_kv, 32, 16, seed=11 + tp)
    chunks = (SparseChunk(0, 0, 300, 100), SparseChunk(1, 300, 560, 0))
    plans = _group_plans(num_kv, num_q // num_kv)
    one = _one_device(b, plans, chunks)
    dense = _one_device(b, _group_plans(num_kv, num_q // num_kv, True), chunks)
    assert (one - dense)[:, :4].abs().max() > 1e-2  # the plan really drops blocks (groups 0 and 1)
    ranks = _run_ranks(b, plans, num_q, num_kv, tp, chunks)
    assert not ranks.isnan().any()
    torch.testing.assert_close(ranks, one, atol=1e-5, rtol=1e-5)


def _plan(name: str, share: str = "head", **params) -> HeadPlan:
    budget = Budget(keep_ratio=0.3, sink_blocks=1, local_blocks=1, share=share)
    return HeadPlan(name, get_estimator(name).params(**params), budget)


POOLED, LOWBIT = _plan("pooled"), _plan("lowbit", sample_stride=4)
ANTIDIAGONAL, SINK = _plan("antidiagonal", stride=4), _plan("sink_local")
# Per layout (q heads, KV heads, ranks), layers whose GQA groups span ranks:
SPLIT_LAYERS = {
    # each head selects alone (the ranks exchange masks), plans differing inside a group; one plan
    # for all heads, a mask row per KV head (sink_local)
    "per head": (8, 2, 4, [POOLED, LOWBIT, ANTIDIAGONAL, POOLED, ANTIDIAGONAL, ANTIDIAGONAL, LOWBIT, POOLED]),
    "one plan per KV head": (4, 1, 2, [SINK] * 4),
    # selections that read the group (the ranks exchange queries)
    "share group budget": (4, 1, 2, [_plan("antidiagonal", "group", stride=4)] * 4),
    "pooled over the group": (8, 2, 4, [_plan("pooled", share="group")] * 8),
    "proxy heads": (8, 2, 4, [_plan("pooled", proxy_heads=1)] * 8),
    "share group over a group and a half": (8, 2, 4, [_plan("antidiagonal", "group", stride=4)] * 6 + [POOLED] * 2),
    # rank 0's heads are dense, rank 1's are not: rank 0 must still join, and the group keeps every block
    "a rank's heads all dense": (4, 1, 2, [None, None, POOLED, LOWBIT]),
    # group 0 dense on ranks 0-1, group 1 sparse, part of it with share: group
    "a group all dense": (8, 2, 4, [None] * 4 + [POOLED, _plan("lowbit", "group")] + [ANTIDIAGONAL] * 2),
}


@pytest.mark.parametrize("case", list(SPLIT_LAYERS))
def test_split_groups_give_every_rank_one_devices_union(case):
    """Where a GQA group's q heads are spread over ranks, each rank's kept blocks, and so its block
    union per tile, are those one device keeps for the group's KV head; the outputs of the ranks put
    together are one device's."""
    num_q, num_kv, tp, plans = SPLIT_LAYERS[case]
    group = num_q // num_kv
    b = random_paged_batch((900, 500), (600, 500), num_q, num_kv, 32, 16, seed=5)
    ctx1 = ChunkContext(b.q[:600], torch.arange(num_q) // group, b.kv, b.block_table[0], 300, 32, 32**-0.5,
                        tuple(h // group for h in range(num_q)), False)
    one = kept_blocks(ctx1, plans)
    one = one.repeat_interleave(num_q // one.shape[0], 0)  # a row per q head
    layer = LayerPlan(0, True, tuple(plans))

    def rank(r, all_gather):
        s = head_shard(num_q, num_kv, r, tp)
        q, kv = _rank_view(b, s)
        heads, split = rank_layer(layer, s, all_gather)
        assert heads is not None and split is not None  # every rank takes the sparse path and exchanges
        ctx = ChunkContext(q[:600], torch.zeros(q.shape[1], dtype=torch.long), kv, b.block_table[0], 300, 32,
                           32**-0.5, (0,) * q.shape[1], False)
        return s, kept_blocks(ctx, heads, split)

    for s, mask in _on_ranks(tp, rank):
        g = slice(s.group_q_heads.start, s.group_q_heads.stop)
        assert torch.equal(mask, one[g])
        assert torch.equal(tile_unions(mask, 2, 1)[0], tile_unions(one, 2, num_kv)[s.kv_heads.start])
    chunks = (SparseChunk(0, 0, 600, 300), SparseChunk(1, 600, 1100, 0))
    ranks = _run_ranks(b, plans, num_q, num_kv, tp, chunks)
    assert not ranks.isnan().any()
    torch.testing.assert_close(ranks, _one_device(b, plans, chunks), atol=1e-5, rtol=1e-5)


def test_split_groups_need_the_exchange():
    """Without the exchange a rank's union covers only its own q heads: outputs move (the cases above
    do not pass by luck)."""
    num_q, num_kv, tp, plans = SPLIT_LAYERS["per head"]
    b = random_paged_batch((900,), (600,), num_q, num_kv, 32, 16, seed=5)
    chunks = (SparseChunk(0, 0, 600, 300),)
    alone = []
    for r in range(tp):
        s = head_shard(num_q, num_kv, r, tp)
        q, kv = _rank_view(b, s)
        part = torch.full_like(q, float("nan"))
        attend_observed(q, part, kv, b.block_table, chunks, plans[s.q_heads.start:s.q_heads.stop], 32,
                        32**-0.5, union_tile=2)
        alone.append(part)
    assert (torch.cat(alone, 1) - _one_device(b, plans, chunks)).abs().max() > 1e-2


def test_split_groups_run_and_keep_all_still_equals_one_device():
    # 2 KV heads over 4 ranks: each rank holds a replicated KV head and half a group.
    num_q, num_kv, tp = 8, 2, 4
    b = random_paged_batch((330,), (330,), num_q, num_kv, 32, 16, seed=3)
    chunks = (SparseChunk(0, 0, 330, 0),)
    plans = _group_plans(num_kv, num_q // num_kv, keep_all=True)
    torch.testing.assert_close(_run_ranks(b, plans, num_q, num_kv, tp, chunks), _one_device(b, plans, chunks),
                               atol=1e-5, rtol=1e-5)


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
    # A list per q head cannot be honoured where a rank holds part of a group that reads one union.
    per_head = resolve_plan(parse_config({"version": 1, "models": [{"match": {"architectures": ["LlamaForCausalLM"]},
                                                                    "union_heads": False,
                                                                    "layers": [{"layers": "all"}]}]}, "x.yaml"),
                            shape, "x.yaml")
    assert rank_shard(per_head, 6, 2).q_heads == range(0, 6)  # groups whole: fine
    monkeypatch.setattr(compat, "tensor_parallel_size", lambda: 12)  # 3 ranks per KV head
    assert rank_shard(plan, 1, 1).q_heads == range(0, 1)
    with pytest.raises(SparseConfigError, match="union_heads: union_heads: false .* tensor_parallel_size=12"):
        rank_shard(per_head, 1, 1)
    # Columns read token by token likewise: a rank of a split group reads its group's union of blocks only.
    columns = resolve_plan(parse_config({"version": 1, "models": [{"match": {"architectures": ["LlamaForCausalLM"]},
                                                                   "budget": {"top_p": 1.0},
                                                                   "layers": [{"layers": [1], "estimator": {
                                                                       "name": "vertical_slash", "blocks": "columns"}}]
                                                                   }]}, "x.yaml"), shape, "x.yaml")
    with pytest.raises(SparseConfigError, match=r"estimator.blocks: layers \[1\] keep key columns .* at most 4"):
        rank_shard(columns, 1, 1)
    monkeypatch.setattr(compat, "tensor_parallel_size", lambda: 2)
    assert rank_shard(columns, 6, 2).q_heads == range(0, 6)


def test_stats_on_a_rank_of_a_split_group_count_what_one_device_counts_for_its_kv_head():
    """A rank of a split group holds half the group's q heads but the group's mask (a row per q head of
    the group): its counters are one device's for that KV head, not half of them or double."""
    from vllm_sparse.backend.stats_record import record_density
    from vllm_sparse.selection.stats import STATS
    from vllm_sparse.selection.union import union_blocks

    b = random_paged_batch((900,), (600,), 4, 1, 32, 16, seed=5)
    full = ChunkContext(b.q[:600], torch.zeros(4, dtype=torch.long), b.kv, b.block_table[0], 300, 32, 1.0)
    rank0 = ChunkContext(b.q[:600, :2], torch.zeros(2, dtype=torch.long), b.kv, b.block_table[0], 300, 32, 1.0)
    rows = slice(0, full.num_query_blocks)
    mask = (torch.rand(4, full.num_query_blocks, full.num_kv_blocks, generator=torch.Generator().manual_seed(0))
            < 0.3) & full.causal_block_mask()
    union = union_blocks(mask, torch.zeros(4, dtype=torch.long), 1)
    STATS.reset()
    try:
        record_density(0, full, mask, union, rows)
        record_density(1, rank0, mask, union, rows)
        one, split = STATS.snapshot()[0], STATS.snapshot()[1]
    finally:
        STATS.reset()
    assert one == split and one.requested_total == 4 * int(full.causal_block_mask().sum())
