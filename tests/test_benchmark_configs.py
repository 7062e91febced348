"""Every plan under benchmarks/configs resolves on the model shape its file name targets, as the engine's start
resolves it, so a plan that would fail at engine start (a tidal reader with no selector before it, a layer list
that does not fit the model, a decode block that a 1M context cannot use) fails here on CPU instead of on a
borrowed GPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.benchmark_modules import load_benchmark
from tests.test_config import GEMMA
from vllm_sparse.config.loader import load_config
from vllm_sparse.config.plan import ModelShape, resolve_plan
from vllm_sparse.decode.step import check_row_blocks

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "benchmarks/configs").rglob("*.yaml"))

TINY_LLAMA = ModelShape("tiny-llama-v512-s0", ("LlamaForCausalLM",), num_layers=2, num_q_heads=4, num_kv_heads=2)


E2E = load_benchmark("e2e")


def shape_of(name: str) -> tuple[ModelShape, int]:
    """(the shape a benchmark plan is written for, by its file name; the longest context it is run at)."""
    if name.startswith("gemma-3"):
        return GEMMA, 32768
    if name.startswith("tiny-llama"):
        return TINY_LLAMA, 16384
    if name.startswith("qwen2.5-7b-1m"):
        return E2E.model_shape("qwen2.5-7b-1m"), 1 << 20  # (the decode runs' max_model_len stays within 2^20)
    if name.startswith("qwen2.5-7b"):
        return E2E.model_shape("qwen2.5-7b"), 131072
    if name.startswith(("llama-3-8b", "llama-3.1-8b")):
        return E2E.model_shape("llama-3.1-8b"), 131072
    raise AssertionError(f"{name}: no shape for this benchmark plan's name: add it to shape_of")


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "benchmarks/configs")) for p in CONFIGS])
def test_benchmark_plan_resolves_on_its_shape(path):
    shape, longest = shape_of(path.name)
    plan = resolve_plan(load_config(path), shape, str(path), explicit=True)
    assert plan.is_sparse, f"{path.name}: no sparse layer on {shape.name}"
    if any(d for layer in plan.layers for d in layer.decode):
        # Decode selection takes a bounded number of blocks a row: the context it is benchmarked at must fit.
        assert check_row_blocks(longest, plan.decode_block_tokens) is None, path.name


# A timing plan (dummy weights: its speed) names the gemma-3-270m plan whose answers back it (benchmarks/RESULTS.md).
TIMING = [p for p in CONFIGS if not p.name.startswith(("gemma-3", "tiny-llama"))]
TWIN = re.compile(r"gemma-3-[a-z0-9_.-]+\.yaml")


def prefill_setting(plan) -> tuple:
    """What a prefill plan selects with, over its sparse layers: (estimator, its parameters, budget), the block
    size, the union's tile and over heads, and which rows go sparse (from where, and the dense tail)."""
    heads = frozenset((h.estimator, h.params, h.budget) for layer in plan.layers for h in layer.heads if h)
    return heads, plan.block_size, plan.union_tile, plan.union_heads, plan.dense_below, plan.dense_tail


def decode_setting(plan) -> set:
    return {(d.estimator, d.top_k_blocks, d.sink_blocks, d.local_blocks, plan.decode_block_tokens,
             plan.decode_dense_below) for layer in plan.layers for d in layer.decode if d}


@pytest.mark.parametrize("path", TIMING, ids=[p.name for p in TIMING])
def test_a_timing_plan_names_a_fidelity_twin_with_its_estimator_and_budget(path):
    """Every speed figure's plan has its fidelity measured with the same estimator and budget: a gemma-3-270m plan
    its header names selects as it does (a decode plan: as its decode does; what it prefills with only brings the
    context in). A plan without one says what backs it (MInference's imports: published) or that nothing does."""
    text = path.read_text()
    twins = sorted(set(TWIN.findall(text)))
    if not twins:
        assert re.search(r"Backed by: PUBLISHED|No gemma-3-270m twin", text), (
            f"{path.name}: name the gemma-3-270m plan that backs it, or say that none does")
        return
    shape, _ = shape_of(path.name)
    plan = resolve_plan(load_config(path), shape, str(path), explicit=True)
    setting = decode_setting if decode_setting(plan) else prefill_setting
    assert any(setting(resolve_plan(load_config(REPO / "benchmarks/configs" / t), GEMMA, t, explicit=True))
               == setting(plan) for t in twins), f"{path.name}: no twin among {twins} selects as it does"


def test_the_1m_decode_plans_take_the_same_budget_in_the_same_blocks():
    """Quest and TidalDecode (TidalDecode's recipe, one without dense layers, one with a single selector) at 1M are
    compared on one budget: 4,096 tokens per KV head in 64-token blocks."""
    shape, longest = shape_of("qwen2.5-7b-1m")
    names = ("quest-4k", "tidal-4k", "tidal-4k-l0", "tidal-4k-one")
    plans = {name: resolve_plan(load_config(REPO / f"benchmarks/configs/qwen2.5-7b-1m-own-heads-decode-{name}.yaml"),
                                shape, name, explicit=True) for name in names}
    for name, plan in plans.items():
        budgets = {(d.kept_blocks * plan.decode_block_tokens, plan.decode_block_tokens)
                   for layer in plan.layers for d in layer.decode if d}
        assert budgets == {(4096 + 3 * 64, 64)}, (name, budgets)
        assert check_row_blocks(longest, plan.decode_block_tokens) is None
    for name, want_selectors, want_dense in (("tidal-4k", [2, 13], [0, 1]), ("tidal-4k-l0", [0, 13], []),
                                             ("tidal-4k-one", [0], [])):
        tidal = plans[name]
        selectors = [layer.index for layer in tidal.layers if any(d and d.selector for d in layer.decode)]
        dense = [layer.index for layer in tidal.layers if not any(layer.decode)]
        assert selectors == want_selectors and dense == want_dense, name


def test_decode_cases_parse_and_a_shared_document_differs_only_in_its_questions():
    assert E2E.parse_case("4x1048448") == (4, 1048448, False)
    assert E2E.parse_case("4x1048448s") == (4, 1048448, True)
    for bad in ("4x", "x4096", "4x4096t", f"2x{E2E.SHARED_SUFFIX}s"):
        with pytest.raises(SystemExit, match="decode case"):
            E2E.parse_case(bad)
    assert E2E.case_name(*E2E.parse_case("2x640s")) == "2x640s"
    prompts, params = E2E.decode_batch(3, 640, 8, seed=1, shared=True)
    ids = [p["prompt_token_ids"] for p in prompts]
    doc = 640 - E2E.SHARED_SUFFIX
    assert all(len(x) == 640 for x in ids) and params.max_tokens == 9
    assert ids[0][:doc] == ids[1][:doc] == ids[2][:doc]  # one document, prefilled once through the prefix cache
    assert len({tuple(x[doc:]) for x in ids}) == 3  # each request asks its own question
    # The profile decodes the timed prompts again: the same seed gives the same ids, so they come from the cache.
    assert [p["prompt_token_ids"] for p in E2E.decode_batch(3, 640, 32, seed=1, shared=True)[0]] == ids
    distinct = [p["prompt_token_ids"] for p in E2E.decode_batch(2, 640, 8, seed=1)[0]]
    assert distinct[0][:doc] != distinct[1][:doc]
