"""The plan's `dense_above` rule (`backend/density_guard.py`): layers whose sparse chunks read most of their
blocks run dense for a while, decided from counts read a step later, never with a host sync."""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.engines import CPU_ENGINE
from vllm_sparse.backend import density_guard as dg
from vllm_sparse.config.plan import AUTO_DENSE_ABOVE, DENSE_ABOVE_PROBE_STEPS

GPU = torch.cuda.is_available()


def _guard(num_layers=4, dense_above=0.8):
    return dg.DensityGuard(torch.device("cuda" if GPU else "cpu"), num_layers, dense_above)


def _sync(guard):
    if GPU:
        torch.cuda.synchronize()


L = 100_000  # a chunk ending past 64K: the 128K bucket


def test_a_layer_that_reads_most_blocks_goes_dense_a_step_later_then_measures_again():
    g = _guard()
    assert g.begin_step([L]) == frozenset()  # nothing counted yet
    g.record(0, L, 9, 10)  # 90% > 0.8: dense
    g.record(1, L, torch.tensor([3, 4], dtype=torch.int32, device=g.device), 10)  # 70%: stays sparse
    g.record(1, L, 1, 10)  # the layer's chunks of a step add up: 8 of 20
    # The step that queues the copy does not see it yet (no sync): only the next one reads it.
    assert g.begin_step([L]) == frozenset()
    _sync(g)
    assert g.begin_step([L]) == {0}
    # Dense layers are counted by nobody (the layer runs vLLM's attention): it stays dense PROBE_STEPS steps...
    for _ in range(DENSE_ABOVE_PROBE_STEPS - 1):
        assert g.begin_step([L]) == {0}
    # ...then runs sparse again, and a sparser document keeps it sparse.
    assert g.begin_step([L]) == frozenset()
    g.record(0, L, 2, 10)
    g.begin_step([L])
    _sync(g)
    assert g.begin_step([L]) == frozenset()


def test_densities_are_kept_apart_by_the_chunks_length():
    """A layer keeps less of a longer context: what a prompt's first chunks read does not decide for its last
    ones, and a step runs a layer dense only if every sparse chunk of it is in a bucket where the layer does."""
    assert [dg.context_bucket(n) for n in (1, 16384, 16385, 32768, 65537, 131072, 2**20, 2**20 + 1, 2**24)] == \
        [0, 0, 1, 1, 3, 3, 6, 7, 7]
    g = _guard(num_layers=2)
    g.record(0, 20_000, 95, 100)  # 32K bucket: dense
    g.record(0, L, 30, 100)  # 128K bucket: sparse
    g.record(1, 20_000, 10, 100)
    g.begin_step([20_000])
    _sync(g)
    assert g.begin_step([20_000]) == {0}
    assert g.begin_step([L]) == frozenset()  # the long chunks' own density
    assert g.begin_step([20_000, L]) == frozenset()  # a step with both: layer 0 runs its sparse path
    assert g.begin_step([20_000, 30_000]) == {0}  # (both in the 32K bucket)
    assert g.begin_step([5_000]) == frozenset()  # a bucket nothing measured yet: sparse


@pytest.mark.parametrize("kernel", ["reference", "triton"])
@pytest.mark.parametrize("keep_all", [True, False], ids=["keep-all", "two-blocks"])
def test_a_prompts_first_chunk_counts_its_dense_rows_too(keep_all, kernel):
    """A prompt's first chunk (no context, rows below `dense_below` reading every block by rule) is counted as
    every chunk is: the pages the sparse path read, its dense rows' included, against the causal pages, what
    dense attention would read. Such a chunk pays estimation for its later rows: a layer that keeps most of the
    rest goes dense for it too (left out, the shipped Llama plan's 32K prompts stayed 3% slower than dense on an
    H100, 2026-12-05). The torch reference path and the Triton kernels' (on the GPU where there is one, else
    interpreted) count alike; random paged GQA data, fp32 (the interpreter's bf16 products are wrong), into layer 1
    of two."""
    from tests.fixtures.paged import random_paged_batch
    from vllm_sparse.backend.attention_mass import dense_rows
    from vllm_sparse.backend.batch import SparseChunk
    from vllm_sparse.backend.sparse_path import attend_sparse_chunks
    from vllm_sparse.config.plan import HeadPlan
    from vllm_sparse.estimators.base import ChunkContext
    from vllm_sparse.estimators.registry import get_estimator
    from vllm_sparse.selection.budget import Budget

    hq, hkv, d, page, bs, seq, dense_below = 4, 2, 32, 16, 32, 320, 128
    device = torch.device("cuda" if GPU else "cpu")
    b = random_paged_batch([seq], [seq], hq, hkv, d, page, seed=3).to(device)
    q, kv, table = b.q, b.kv, b.block_table
    est = get_estimator("sink_local")
    budget = Budget(keep_ratio=1.0) if keep_all else Budget(top_k=2, sink_blocks=1, local_blocks=1)
    plan = HeadPlan("sink_local", est.params(sink_blocks=1, local_blocks=1), budget)
    g = dg.DensityGuard(device, 2, 0.8)
    out = torch.full_like(q, float("nan"))
    attend_sparse_chunks(q, out, kv, table, (SparseChunk(0, 0, seq, 0),), [plan] * hq, bs, d**-0.5,
                         union_tile=1, layer=1, kernel=kernel, dense_below=dense_below, guard=g)
    assert not out.isnan().any()
    slot = dg.BUCKETS + dg.context_bucket(seq)
    assert int(g._kept[:dg.BUCKETS].sum()) == 0 and not any(g._causal[:dg.BUCKETS])  # (layer 0: nothing)
    kept, causal = int(g._kept[slot]), g._causal[slot]
    # Per KV head, query block r (of 10) may read r + 1 blocks of 32 tokens (two pages each); the first four
    # rows (dense_below 128) read all of theirs, later ones two (top_k 2: the sink and their own).
    rows = seq // bs
    ctx = ChunkContext(q, None, kv, table[0], 0, bs, d**-0.5, None, False)
    assert dense_rows(ctx, dense_below) == dense_below // bs == 4
    assert causal == hkv * 2 * sum(r + 1 for r in range(rows))
    if keep_all:
        assert kept == causal
    else:
        assert kept == hkv * 2 * (sum(r + 1 for r in range(4)) + 2 * (rows - 4))
    g.begin_step([seq])
    _sync(g)
    assert g.begin_step([seq]) == (frozenset({1}) if keep_all else frozenset())


def test_the_share_is_compared_with_the_pages_the_chunks_could_read():
    g = _guard(num_layers=3, dense_above=0.5)
    g.record(0, L, 50, 100)  # exactly the share: not above it
    g.record(1, L, 51, 100)
    g.record(2, L, 0, 0)  # a layer with nothing causal counted (cannot happen serving): no decision
    g.begin_step([L])
    _sync(g)
    assert g.begin_step([L]) == {1}


def test_counts_of_a_copy_in_flight_wait_for_the_next_copy():
    """Counts recorded while a copy is queued and not yet read are not lost: they go in the next copy; a copy
    whose event has not completed is left for a later step (never waited for)."""
    g = _guard(num_layers=2)
    g.record(0, L, 1, 10)
    g.begin_step([L])  # queues layer 0's 10%
    g.record(1, L, 9, 10)  # after the copy: counted on the device for the next one

    class Pending:  # a copy the GPU has not run yet
        def query(self):
            return False

    _sync(g)
    event, causal = g._in_flight
    g._in_flight = (Pending(), causal)
    for _ in range(3):
        assert g.begin_step([L]) == frozenset() and g._in_flight[0].__class__ is Pending  # not read, not replaced
    g._in_flight = (event, causal)
    assert g.begin_step([L]) == frozenset()  # reads 10% for layer 0, queues layer 1's 90%
    _sync(g)
    assert g.begin_step([L]) == {1}


def test_the_one_launch_count_equals_the_torch_count():
    """CUDA's path (here in Triton's interpreter): the page counts of any shape, also a slice at an odd
    offset of a larger buffer (as serving passes a CSR index array's end), summed into the layer's slot."""
    device = torch.device("cuda" if GPU else "cpu")
    counts = []
    for use_kernel in (False, True):
        g = dg.DensityGuard(device, 3, 0.8)
        g.use_kernel = use_kernel
        buf = torch.randint(0, 1000, (300,), dtype=torch.int32, generator=torch.Generator().manual_seed(3)).to(device)
        g.record(2, L, buf[7:290].view(283, 1), 10**6)
        g.record(0, 4096, buf[5:6], 10**3)
        g.record(2, L, buf[:3], 10)
        counts.append(g._kept.cpu().view(3, dg.BUCKETS))
    assert torch.equal(counts[0], counts[1])
    assert int(counts[0][1].sum()) == 0 and int(counts[0][2][3]) > 0 and int(counts[0][0][0]) > 0


def test_auto_is_on_for_cuda_and_off_on_cpu_and_a_setting_is_checked(tmp_path):
    from vllm_sparse.config.errors import SparseConfigError
    from vllm_sparse.config.loader import load_config
    from vllm_sparse.config.plan import ModelShape, resolve_plan

    shape = ModelShape("m", ("LlamaForCausalLM",), 2, 4, 2)

    def plan(**settings):
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({"version": 1, "models": [{
            "match": {"architectures": ["LlamaForCausalLM"]}, **settings,
            "layers": [{"layers": "all", "estimator": {"name": "sink_local"}, "budget": {"top_p": 0.9}}]}]}))
        return resolve_plan(load_config(path), shape, "test")

    auto = plan()
    assert auto.dense_above is None and auto.dense_above_on("cuda") == AUTO_DENSE_ABOVE["cuda"] == 0.8
    assert auto.dense_above_on("cpu") == 1.0
    assert plan(dense_above=0.5).dense_above_on("cpu") == 0.5 and plan(dense_above=1).dense_above_on("cuda") == 1
    for bad in (0, 1.5, -0.1, "high", True):
        with pytest.raises(SparseConfigError, match="dense_above"):
            plan(dense_above=bad)


@pytest.mark.engine
@CPU_ENGINE
def test_an_engine_runs_a_layer_dense_once_its_chunks_read_most_blocks(tiny_llama, tmp_path):
    """In vLLM's CPU engine (two layers, one KV cache group): layer 0 keeps every block, layer 1 a few. With
    `dense_above: 0.7` layer 0 runs sparse in the first steps with sparse chunks and dense once the builder has
    read its density, while layer 1 stays sparse in the same steps (a step with a layer routed dense and one
    sparse); with `dense_above: 1` both run sparse throughout. The same tokens (layer 0's keep-all equals dense).
    The long prompt's chunks: 256 tokens a step, sparse from the second (tests/test_engine_cpu.py's)."""
    from tests.engines import run_engine
    from tests.test_engine_cpu import DENSE_BELOW, ENGINE, _prompts

    sink_local = {"name": "sink_local", "sink_blocks": 1, "local_blocks": 1}
    out = {}
    for above in (0.7, 1):
        path = tmp_path / f"guard_{above}.yaml"
        path.write_text(yaml.safe_dump({"version": 1, "models": [{
            "match": {"architectures": ["LlamaForCausalLM"]}, "min_chunk_work": 0, "min_query_tokens": 16,
            "block_size": 64, "dense_below": DENSE_BELOW, "dense_above": above, "union_tile": 1, "layers": [
                {"layers": [0], "estimator": sink_local, "budget": {"keep_ratio": 1.0}},
                {"layers": [1], "estimator": sink_local, "budget": {"top_k": 2, "sink_blocks": 1, "local_blocks": 1}},
            ]}]}))
        out[above] = run_engine({"model": str(tiny_llama), "backend": "sparse", "config": str(path),
                                 "kept_density": True, "prompts": _prompts(tiny_llama), "engine": ENGINE,
                                 "max_tokens": 4})[0]
    # The chunk-layers that ran sparse, by what they read (/metrics' histogram, layers 0-1 together; buckets up
    # to 0.02, 0.05, ..., 0.9, 1.0, above): layer 0's at 100% (the 1.0 bucket), layer 1's at 60% or less (two
    # blocks a query block: the first and its own; its pages are vLLM's 32 tokens).
    from vllm_sparse.metrics.paths import DENSITY_BUCKETS

    top = DENSITY_BUCKETS.index(1.0)
    (guarded,), (unguarded,) = (list(out[a]["kept_density"].values()) for a in (0.7, 1))
    assert sum(guarded[top - 3:top]) == sum(unguarded[top - 3:top]) == guarded[-1] == unguarded[-1] == 0
    runs = {a: (int(c[top]), int(sum(c[:top]))) for a, c in ((0.7, guarded), (1, unguarded))}
    print(f"chunk-layers run sparse (layer 0, layer 1): dense_above 0.7 {runs[0.7]}, dense_above 1 {runs[1]}")
    # Layer 0 ran sparse only in the steps before its density was read; layer 1 in every step, as without the rule.
    assert 0 < runs[0.7][0] < runs[1][0] and runs[0.7][1] == runs[1][1] > 0, runs
    assert [r["token_ids"] for r in out[0.7]["results"]] == [r["token_ids"] for r in out[1]["results"]]


@pytest.mark.engine
@CPU_ENGINE
def test_an_engine_runs_a_later_prompts_first_chunk_dense_too(tiny_llama, tmp_path):
    """In vLLM's CPU engine: every layer keeps every block (`dense_above: 0.7`), dense_below 128 (a prompt's first
    256-token chunk is half rows that read every block by rule, half sparse rows). The first prompt runs its first
    chunks sparse until the builder has read their counts; the next prompt of that length, its first chunk
    included, runs dense (counted dense in /metrics). Before 2026-12-05's change a first chunk was not counted and
    so never routed dense: on an H100 the shipped Llama plan's 32K prompts stayed 3% slower than dense."""
    from tests.engines import run_engine
    from tests.test_engine_cpu import ENGINE, _prompts

    path = tmp_path / "keep_all.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "models": [{
        "match": {"architectures": ["LlamaForCausalLM"]}, "min_chunk_work": 0, "min_query_tokens": 16,
        "block_size": 64, "dense_below": 128, "dense_above": 0.7, "union_tile": 1, "layers": [
            {"layers": "all", "estimator": {"name": "sink_local", "sink_blocks": 1, "local_blocks": 1},
             "budget": {"keep_ratio": 1.0}}]}]}))
    long = _prompts(tiny_llama)[0]["prompt_token_ids"]  # 1,100 tokens: five chunks of up to 256
    prompts = [{"prompt_token_ids": long}, {"prompt_token_ids": long[::-1]}]  # (no prefix-cache hit)
    out = run_engine({"model": str(tiny_llama), "backend": "sparse", "config": str(path), "counters": True,
                      "prompts": prompts, "sequential": True, "engine": ENGINE, "max_tokens": 2,
                      "prompt_logprobs": False})[0]
    prefill = out["counters"]["prefill"]
    print("prefill tokens by path:", prefill)
    # The first prompt: its first two chunks sparse (the count of the first is read two steps later), the rest
    # dense; the second prompt dense throughout, its first chunk included.
    assert prefill["sparse"] == 512 and prefill["dense"] == 2 * len(long) - 512, prefill
