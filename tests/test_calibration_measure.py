"""What `vllm-sparse calibrate` measures inside the engine (`backend/calibration.py`), on random paged
inputs: the chunk attends densely, and each candidate's recall and kept density are those the audit
measures when the candidate runs as the plan (`backend/attention_mass.py` is their one measure)."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.paged import random_paged_batch
from vllm_sparse.backend.attention_mass import RECALL_BINS
from vllm_sparse.backend.batch import SparseChunk
from vllm_sparse.backend.instrumented import attend_observed
from vllm_sparse.calibrate.choose import histogram_quantile
from vllm_sparse.config.plan import HeadPlan
from vllm_sparse.estimators.registry import get_estimator
from vllm_sparse.kernels.reference import dense_causal_attention_ref
from vllm_sparse.selection.budget import Budget
from vllm_sparse.selection.stats import STATS

CANDIDATES = [
    {"estimator": {"name": "sink_local"}, "budget": {"keep_ratio": 1.0}},
    {"estimator": {"name": "sink_local", "sink_blocks": 1, "local_blocks": 1}, "budget": {"top_k": 2}},
    {"estimator": {"name": "antidiagonal", "stride": 4}, "budget": {"top_p": 0.9}},
    {"estimator": {"name": "antidiagonal", "stride": 4}, "budget": {"keep_ratio": 0.3, "share": "group"}},
]
BLOCK, DENSE_BELOW, SCALE = 64, 256, 0.25


def _plan(cand: dict) -> HeadPlan:
    spec = dict(cand["estimator"])
    name = spec.pop("name")
    return HeadPlan(name, get_estimator(name).params(**spec), Budget(**cand["budget"]))


def _run(b, plans, chunk, tile):
    out = torch.full_like(b.q, float("nan"))
    attend_observed(b.q, out, b.kv, b.block_table, (chunk,), plans, BLOCK, SCALE, union_tile=tile, layer=0,
                    dense_below=DENSE_BELOW)
    return out


@pytest.mark.parametrize("context,tile", [(384, 1), (128, 3)])
def test_calibration_attends_densely_and_measures_what_the_audit_measures(context, tile):
    b = random_paged_batch([1024], [1024 - context], 4, 2, 16, 16, seed=13)
    chunk = SparseChunk(0, 0, 1024 - context, context)
    STATS.calibrate(CANDIDATES)
    try:
        out = _run(b, [None] * 4, chunk, tile)
        st = STATS.calibration[0].raw()
    finally:
        STATS.calibrate(None)
    ref = dense_causal_attention_ref(b.q, b.keys[0], b.values[0], SCALE)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    recall = [[m / st["tokens"] for m in row] for row in st["mass"]]
    density = [[r / st["causal"] for r in row] for row in st["read"]]
    # Tokens past dense_below (256) in the chunk, and causal cells of rows 4..15 (5+...+16 per KV head).
    assert st["tokens"] == 1024 - max(context, DENSE_BELOW)
    assert st["causal"] == sum(r + 1 for r in range(max(context, DENSE_BELOW) // BLOCK, 16))
    assert recall[0] == pytest.approx([1.0] * 4) and density[0] == [1.0, 1.0]
    for i, cand in enumerate(CANDIDATES):
        STATS.enable(audit=True)
        STATS.reset()
        try:
            _run(b, [_plan(cand)] * 4, chunk, tile)
            layer = STATS.snapshot()[0]
        finally:
            STATS.enabled = STATS.audit = False
            STATS.reset()
        assert layer.head_tokens == st["tokens"] and layer.kv_causal == st["causal"]
        assert layer.head_recall == pytest.approx(recall[i], abs=1e-5), cand
        assert layer.kv_density == density[i], cand
    assert min(recall[1]) < 1 and max(density[1]) < 1  # sink + diagonal drops mass


def test_recall_is_the_dense_mass_in_the_blocks_read():
    """Brute force for one candidate: per head, the softmax mass of each query on the union's blocks."""
    b = random_paged_batch([1024], [640], 4, 2, 16, 16, seed=2)
    STATS.calibrate(CANDIDATES[1:2])
    try:
        _run(b, [None] * 4, SparseChunk(0, 0, 640, 384), tile=10)  # one union for the chunk
        st = STATS.calibration[0].raw()
    finally:
        STATS.calibrate(None)
    # sink_local top_k=2 with one union for all rows 6..15: blocks {0} and the diagonals {6..15}.
    allowed = torch.zeros(1024, dtype=torch.bool)
    allowed[:64] = True
    allowed[384:] = True
    q_pos = torch.arange(384, 1024)
    k = b.keys[0].double()
    for h in range(4):
        logits = b.q[:, h].double() @ k[:, h // 2].T * SCALE
        probs = logits.masked_fill(torch.arange(1024)[None] > q_pos[:, None], float("-inf")).softmax(-1)
        assert st["mass"][0][h] / st["tokens"] == pytest.approx(float(probs[:, allowed].sum(-1).mean()), rel=1e-6)
        # Per query block row (64 queries each): its recall, binned; the histogram counts queries.
        row_recall = probs[:, allowed].sum(-1).view(10, 64).mean(-1)
        want = torch.zeros(RECALL_BINS, dtype=torch.float64)
        want.index_add_(0, (row_recall * RECALL_BINS).long().clamp(max=RECALL_BINS - 1), torch.full((10,), 64.0,
                        dtype=torch.float64))
        assert st["rows"][0][h] == pytest.approx(want.tolist())
        worst = sorted(row_recall.tolist())[0]  # a tenth of the queries: the worst row
        assert histogram_quantile(st["rows"][0][h], 0.1) == pytest.approx(int(worst * RECALL_BINS) / RECALL_BINS)
    causal_read = sum(1 + (r - 6 + 1) for r in range(6, 16))  # sink + diagonals up to each row
    assert st["read"][0] == [causal_read, causal_read]


def test_final_query_block_of_each_chunk_is_kept_by_its_end():
    """The answer rows: each chunk's final query block apart, keyed by the chunk's end (the run takes the
    one at the prompt's end). Two chunks, 600..800 and 800..1000, both ending mid-block; brute force on the
    second's final block (queries 960..999) for sink_local top_k=2 per row: blocks 0 and 15."""
    b = random_paged_batch([1000], [400], 4, 2, 16, 16, seed=5)
    STATS.calibrate(CANDIDATES[:2])
    try:
        attend_observed(b.q, torch.empty_like(b.q), b.kv, b.block_table,
                        (SparseChunk(0, 0, 200, 600), SparseChunk(0, 200, 400, 800)), [None] * 4, BLOCK, SCALE,
                        union_tile=1, layer=0, dense_below=DENSE_BELOW)
        final = STATS.calibration[0].raw()["final_block"]
    finally:
        STATS.calibrate(None)
    assert sorted(final) == [800, 1000]
    assert final[800]["queries"] == pytest.approx([32.0] * 4) and final[1000]["queries"] == pytest.approx([40.0] * 4)
    allowed = torch.zeros(1000, dtype=torch.bool)
    allowed[:64] = True
    allowed[960:] = True
    q_pos = torch.arange(960, 1000)
    for h in range(4):
        logits = b.q[-40:, h].double() @ b.keys[0][:, h // 2].double().T * SCALE
        probs = logits.masked_fill(torch.arange(1000)[None] > q_pos[:, None], float("-inf")).softmax(-1)
        assert final[1000]["mass"][0][h] == pytest.approx(40.0)  # keep_ratio 1.0: all of it
        assert final[1000]["mass"][1][h] == pytest.approx(float(probs[:, allowed].sum()), rel=1e-6)


def test_warm_up_and_unnumbered_layers_add_nothing():
    """The engine's warm-up step (layer -1, on GPUs) runs while calibrating: it must not add sums."""
    from vllm_sparse.backend.warmup import run_dummy_sparse_steps
    from vllm_sparse.config.loader import parse_config
    from vllm_sparse.config.plan import ModelShape, resolve_plan
    from vllm_sparse.config.sharding import HeadShard

    b = random_paged_batch([1024], [640], 4, 2, 16, 16, seed=2)
    STATS.calibrate(CANDIDATES)
    try:
        out = torch.full_like(b.q, float("nan"))  # poison: every token written
        attend_observed(b.q, out, b.kv, b.block_table, (SparseChunk(0, 0, 640, 384),), [None] * 4, BLOCK, SCALE)
        assert STATS.calibration == {}
        torch.testing.assert_close(out, dense_causal_attention_ref(b.q, b.keys[0], b.values[0], SCALE),
                                   atol=1e-5, rtol=1e-5)
        assert STATS.candidates == CANDIDATES
        plan = resolve_plan(parse_config({"version": 1, "models": [{
            "match": {"names": ["*"]}, "block_size": 64, "layers": [{"layers": "all", **CANDIDATES[1]}]}]}, "t"),
            ModelShape("m", ("X",), 2, 4, 2), "t")
        shard = HeadShard(0, 1, range(4), range(2), 2)
        run_dummy_sparse_steps(plan, shard, 2, 16, 16, torch.float32, torch.device("cpu"))
        assert STATS.calibration == {} and STATS.candidates == CANDIDATES
    finally:
        STATS.calibrate(None)
