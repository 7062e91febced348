"""Sparse decode (Quest page selection, TidalDecode) inside vLLM's CPU engine, against the stock backend.

Three prompts decode together: two whose context passes the decode `dense_below` (they select
pages) and a short one (dense). The CPU path runs the torch references; the kernels are compared
with them in test_decode_kernels.py, and the GPU twin of this test runs the kernels in vLLM.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from tests.engines import CPU_ENGINE, run_each, run_engine
from tests.test_engine_cpu import _prompts

pytestmark = [pytest.mark.engine, CPU_ENGINE]

ENGINE = {"kv_cache_memory_bytes": 1 << 30, "dtype": "float32", "max_model_len": 4096, "block_size": 32,
          "max_num_batched_tokens": 512, "max_num_seqs": 8}
MAX_TOKENS = 12
DENSE_BELOW = 300


def _config(tmp: Path, name: str, decode: dict, layers: list | None = None) -> str:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "models": [{
        "match": {"architectures": ["LlamaForCausalLM"]},
        "decode": {"block_tokens": 32, "dense_below": DENSE_BELOW, **decode}, "layers": layers or []}]}))
    return str(path)


TIDAL = {"estimator": "tidal", "top_k_tokens": 64, "sink_blocks": 1, "local_blocks": 1}


def _tidal_config(tmp: Path, name: str, decode: dict) -> str:
    return _config(tmp, name, decode, [{"layers": 0, "dense": True, "decode": {**decode, "selector": True}}])


def base_spec(model: Path, engine: dict) -> dict:
    """What every decode-plan engine of these tests shares: the model, the engine, greedy tokens with log-probs."""
    return {"model": str(model), "engine": engine, "max_tokens": MAX_TOKENS, "logprobs": True, "ignore_eos": True}


def run_decode_plans(model: Path, tmp: Path, engine: dict, prefix_hit: bool = False,
                     only: tuple[str, ...] | None = None, extra: dict[str, dict] | None = None,
                     last: dict[str, dict] | None = None, one_process: bool = False, outputs: bool = False) -> dict:
    """The decode plans' engines (`only` those named), after any `extra` specs and before any `last` ones;
    `one_process`: one after the other in one process (tests/engines.py), else a process each; `outputs`:
    name -> (result, output) rather than name -> result."""
    prompts = _prompts(model)  # 1100, 420 and 40 tokens
    base = base_spec(model, engine)
    specs = {
        "stock": {"prompts": prompts},
        "keep_all": {"prompts": prompts, "backend": "sparse",
                     "config": _config(tmp, "keep_all", {"top_k_tokens": 4096})},
        "sparse": {"prompts": prompts, "backend": "sparse",
                   "config": _config(tmp, "sparse", {"top_k_tokens": 64, "sink_blocks": 1, "local_blocks": 1})},
        # TidalDecode: layer 0 attends fully and selects, layer 1 reads its blocks.
        "tidal": {"prompts": prompts, "backend": "sparse", "config": _tidal_config(tmp, "tidal", TIDAL)},
        "tidal_keep_all": {"prompts": prompts, "backend": "sparse",
                           "config": _tidal_config(tmp, "tidal_keep_all", {**TIDAL, "top_k_tokens": 4096})},
    }
    if prefix_hit:  # (on CPU the summary check below covers prefix hits, with one engine fewer)
        # The same long prompt twice, one after the other: the second reads the first's pages from the
        # prefix cache, and their summaries must be the ones its own prefill would have written.
        # No prompt log-probabilities: vLLM reads no prefix cache for a request that asks for them.
        specs["prefix_hit"] = {
            "prompts": [prompts[0], prompts[0]], "backend": "sparse", "sequential": True, "prompt_logprobs": False,
            "engine": {**engine, "enable_prefix_caching": True},
            "config": _config(tmp, "prefix", {"top_k_tokens": 64, "sink_blocks": 1, "local_blocks": 1})}
    specs = {name: {**base, **spec} for name, spec in specs.items() if only is None or name in only}
    done = run_each({**(extra or {}), **specs, **(last or {})}, one_process)
    return done if outputs else {name: result for name, (result, _) in done.items()}


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    """The prefill-and-TidalDecode plan's two engines (its counters: the first sparse engine of the process),
    then the decode plans', in one process."""
    tmp = tmp_path_factory.mktemp("configs")
    # Last, test_decode_settings_the_engine_cannot_honour_stop_it_at_start's engine, which must not start.
    bad = {"model": str(tiny_llama), "backend": "sparse", "prompts": ["hi"], "engine": ENGINE, "expect_error": True,
           "config": _config(tmp, "bad", {"top_k_tokens": 64, "block_tokens": 16})}  # pages are 32 tokens
    done = run_decode_plans(tiny_llama, tmp, ENGINE, extra=_prefill_and_tidal_specs(tiny_llama, tmp), last={"bad": bad},
                            one_process=True, outputs=True)
    return {name: result for name, (result, _) in done.items()} | {"bad_output": done["bad"][1]}


def _diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def test_prefill_is_untouched_by_a_decode_plan(runs):
    for stock, ours in zip(runs["stock"]["results"], runs["sparse"]["results"]):
        assert ours["prompt_logprobs"] == stock["prompt_logprobs"]


@pytest.mark.parametrize("plan", ["keep_all", "tidal_keep_all"])
def test_keep_all_budget_equals_dense_decode(runs, plan):
    for stock, ours in zip(runs["stock"]["results"], runs[plan]["results"]):
        assert ours["token_ids"] == stock["token_ids"]
        assert _diff(stock["logprobs"], ours["logprobs"]) < 1e-3


def test_sparse_decode_selects_pages_for_long_contexts_only(runs):
    stock, sparse = runs["stock"]["results"], runs["sparse"]["results"]
    for o in sparse:
        assert len(o["token_ids"]) == MAX_TOKENS and all(math.isfinite(x) for x in o["logprobs"])
    # 4 of 35 blocks read at the long prompt's decode steps: the tokens' log-probabilities moved.
    assert _diff(stock[0]["logprobs"], sparse[0]["logprobs"]) > 1e-3
    # The short prompt decodes under dense_below: bit for bit the stock backend's.
    assert sparse[2]["token_ids"] == stock[2]["token_ids"]
    assert sparse[2]["logprobs"] == stock[2]["logprobs"]


def test_tidal_decode_reuses_a_selection_for_long_contexts_only(runs):
    stock, tidal = runs["stock"]["results"], runs["tidal"]["results"]
    for s, o in zip(stock, tidal):
        assert o["prompt_logprobs"] == s["prompt_logprobs"]
        assert len(o["token_ids"]) == MAX_TOKENS and all(math.isfinite(x) for x in o["logprobs"])
    # Layer 1 reads 4 of 35 blocks at the long prompt's decode steps; layer 0 reads all of them.
    assert _diff(stock[0]["logprobs"], tidal[0]["logprobs"]) > 1e-3
    assert tidal[2]["token_ids"] == stock[2]["token_ids"] and tidal[2]["logprobs"] == stock[2]["logprobs"]


def test_page_summaries_match_the_cache_through_preemption_and_prefix_hits(tiny_llama, tmp_path):
    """With the debug check on (every sparse decode row's summaries recomputed from its keys in the
    cache), the scheduler's hard cases run through: steps mixing prefill chunks and decodes, a
    prefix-cache hit with a suffix, and requests preempted under KV-cache pressure and recomputed."""
    from tests.test_engine_scheduling import ENGINE as SCHED
    from tests.test_engine_scheduling import _prompts as sched_prompts
    from tests.test_engine_scheduling import _run

    config = _config(tmp_path, "check", {"top_k_tokens": 64, "sink_blocks": 1, "local_blocks": 1})
    prompts = sched_prompts(tiny_llama)
    check = {"VLLM_SPARSE_CHECK_SUMMARIES": "1"}
    runs = _run(tiny_llama, config, prompts, {**SCHED, "enable_prefix_caching": True}, ["batch", "prefix"],
                max_tokens=24, env=check)
    assert all(len(r["token_ids"]) == 24 for sc in runs.values() for r in sc["runs"].values())
    assert runs["prefix"]["runs"]["long_a_long_suffix"]["cached_tokens"] > 0
    ids = [t for name in ("long_a", "long_b") for t in prompts[name]]
    four = {f"p{i}": ids[i * 450: i * 450 + 400] for i in range(4)}
    tight = {**SCHED, "kv_cache_memory_bytes": 52 * 32768, "max_model_len": 1536}
    batch = _run(tiny_llama, config, four, tight, ["batch"], max_tokens=250, env=check)["batch"]
    assert batch["preempted"], "the cache was meant to be too small for the batch"
    assert all(len(r["token_ids"]) == 250 for r in batch["runs"].values())


def test_a_one_token_prefill_after_a_full_prefix_hit_is_a_decode_step(tiny_llama, tmp_path):
    """A prompt sent again whose every whole page is cached leaves one token to prefill (vLLM recomputes
    the last one): a single query over a long cached context, which is what a decode step is. The
    plugin treats it as one: it selects pages like every later token of the request (decided here, and
    in docs/decode.md), from the summaries the first request's prefill wrote (checked against the cache)."""
    ids = [t for p in _prompts(tiny_llama)[:2] for t in p["prompt_token_ids"]]
    prompt = {"prompt_token_ids": ids[:34 * 32 + 1]}  # 34 whole 32-token pages, then one token
    config = _config(tmp_path, "full_hit", {"top_k_tokens": 64, "sink_blocks": 1, "local_blocks": 1})
    result, _ = run_engine({"model": str(tiny_llama), "backend": "sparse", "config": config, "prompts": [prompt] * 2,
                            "sequential": True, "engine": {**ENGINE, "enable_prefix_caching": True}, "max_tokens": 4,
                            "ignore_eos": True, "prompt_logprobs": False, "logprobs": True, "counters": True},
                           env={"VLLM_SPARSE_CHECK_SUMMARIES": "1"})
    first, second = result["results"]
    assert (first["cached_tokens"], second["cached_tokens"]) == (0, 34 * 32)
    assert all(math.isfinite(x) for r in (first, second) for x in r["logprobs"]) and len(second["token_ids"]) == 4
    # Sparse decode rows: the first request's 3 decode steps, the second's 1-token prefill and its 3.
    assert result["counters"]["decode"] == {"sparse": 3 + 4, "dense": 0}
    assert result["counters"]["prefill"] == {"sparse": 0, "dense": 34 * 32 + 1}  # the plan has no prefill layers


def test_decode_settings_the_engine_cannot_honour_stop_it_at_start(runs):
    assert runs["bad"] is None
    assert "decode.block_tokens: decode block_tokens 16 must be a multiple of the KV cache block size 32" in runs[
        "bad_output"]


def _prefill_and_tidal_specs(model: Path, tmp: Path) -> dict[str, dict]:
    """A plan like the shipped Llama 3 8B one (issue 28, item 4): every layer's prefill sparse, decode by
    TidalDecode (layer 0 selects, layer 1 reads); and the stock backend, prefilling in the same chunks."""
    prefill = {"estimator": {"name": "sink_local", "sink_blocks": 1, "local_blocks": 2},
               "budget": {"top_k": 3, "sink_blocks": 1, "local_blocks": 2}}
    path = tmp / "prefill_and_tidal.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "models": [{
        "match": {"architectures": ["LlamaForCausalLM"]}, "block_size": 64, "dense_below": DENSE_BELOW,
        "min_query_tokens": 16, "min_chunk_work": 0,
        "decode": {"block_tokens": 32, "dense_below": DENSE_BELOW, **TIDAL},
        "layers": [{"layers": 0, **prefill, "decode": {**TIDAL, "selector": True}}, {"layers": 1, **prefill}]}]}))
    prompts = _prompts(model)  # 1100, 420 and 40 tokens
    base = {"model": str(model), "engine": {**ENGINE, "max_num_batched_tokens": 256}, "max_tokens": MAX_TOKENS,
            "logprobs": True, "ignore_eos": True, "prompts": prompts}
    return {"prefill_and_tidal_stock": base,
            "prefill_and_tidal": {**base, "backend": "sparse", "config": str(path), "counters": True}}


def test_sparse_prefill_and_tidal_decode_in_one_plan(runs):
    """Both paths of `_prefill_and_tidal_specs`' plan run in one engine: the long prompt's later chunks go sparse
    and its decode steps select; the short prompt is the stock backend's, bit for bit."""
    stock = runs["prefill_and_tidal_stock"]["results"]
    both = runs["prefill_and_tidal"]
    counters, ours = both["counters"], both["results"]
    assert counters["prefill"]["sparse"] > 0 and counters["decode"]["sparse"] > 0
    assert len(ours) == len(stock)
    for o in ours:
        assert len(o["token_ids"]) == MAX_TOKENS and all(math.isfinite(x) for x in o["logprobs"])
    assert _diff(stock[0]["prompt_logprobs"], ours[0]["prompt_logprobs"]) > 1e-3  # sparse prefill moved them
    assert ours[2]["token_ids"] == stock[2]["token_ids"] and ours[2]["logprobs"] == stock[2]["logprobs"]
