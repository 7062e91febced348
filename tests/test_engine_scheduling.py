"""The SPARSE backend under vLLM's scheduler, in the CPU engine: batches that mix long prefills with
decodes, prefix-cache hits, a request aborted mid-prefill, and preemption under KV-cache pressure.

The plan (sink + local blocks, one union per query block, every layer sparse from 300 tokens, every
prefill chunk sparse however short: `min_query_tokens: 2`) picks blocks by position only, so a
request's output does not depend on how the scheduler chunks it or what shares its steps: every
scenario must give each request the tokens it gets alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.engine_scenarios import RESULT_MARK
from tests.engines import CPU_ENGINE, IN_PROCESS, REPO, engine_env

pytestmark = [pytest.mark.engine, CPU_ENGINE]

ENGINE = {"kv_cache_memory_bytes": 1 << 30, "dtype": "float32", "max_model_len": 4096, "block_size": 32,
          "max_num_batched_tokens": 256, "max_num_seqs": 8, "enable_prefix_caching": False}
LENGTHS = {"long_a": 1100, "long_b": 900, "short_1": 40, "short_2": 120, "short_3": 60}


def _prompts(model: Path) -> dict[str, list[int]]:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(model / "tokenizer.json")).encode(
        (Path(os.__file__).parent / "argparse.py").read_text()).ids
    prompts = {name: ids[i * 211: i * 211 + n] for i, (name, n) in enumerate(LENGTHS.items())}
    prompts["long_a_short_suffix"] = prompts["long_a"] + ids[5000:5040]  # a cache hit, then 40 new tokens
    prompts["long_a_long_suffix"] = prompts["long_a"] + ids[6000:6300]  # a cache hit, then 300 new tokens
    return prompts


def _run(model: Path, config: str, prompts: dict, engine: dict, scenarios: list[str], max_tokens: int = 6,
         env: dict | None = None, fresh_prefix_cache: bool = False) -> dict:
    spec = {"model": str(model), "config": config, "engine": engine, "prompts": prompts, "scenarios": scenarios,
            "max_tokens": max_tokens, "fresh_prefix_cache": fresh_prefix_cache}
    proc = subprocess.run([sys.executable, "-m", "tests.engine_scenarios", json.dumps(spec)], cwd=REPO,
                          capture_output=True, text=True, timeout=900,
                          env={**engine_env(), **IN_PROCESS, **(env or {})})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith(RESULT_MARK))
    return json.loads(line[len(RESULT_MARK):])


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    config = tmp_path_factory.mktemp("scheduling") / "sparse.yaml"
    config.write_text(yaml.safe_dump({"version": 1, "models": [{
        "match": {"architectures": ["LlamaForCausalLM"]}, "min_chunk_work": 0,
        "block_size": 64, "dense_below": 300, "union_tile": 1,
        "min_query_tokens": 2,
        "layers": [{"layers": "all", "estimator": {"name": "sink_local", "sink_blocks": 1, "local_blocks": 2},
                    "budget": {"top_k": 3, "sink_blocks": 1, "local_blocks": 2}}]}]}))
    prompts = _prompts(tiny_llama)
    # One engine with prefix caching for the four scenarios, its cache emptied before each: "alone" and "batch"
    # ask for prompt log-probs, for which vLLM reads no prefix cache; "prefix" and "abort" read it.
    runs = _run(tiny_llama, str(config), prompts, {**ENGINE, "enable_prefix_caching": True},
                ["alone", "batch", "prefix", "abort"], fresh_prefix_cache=True)
    return tiny_llama, str(config), prompts, runs


def _same_tokens(got: dict, want: dict) -> None:
    for name, run in got.items():
        assert run["token_ids"] == want[name]["token_ids"], name


def test_long_prefills_sharing_steps_with_decodes_give_each_request_its_own_tokens(setup):
    _, _, _, plain = setup
    alone, batch = plain["alone"]["runs"], plain["batch"]["runs"]
    _same_tokens(batch, alone)
    # Prefix caching is on in this engine, but requests that ask for prompt log-probs read none of it.
    assert all(run["cached_tokens"] == 0 for runs in (alone, batch) for run in runs.values())
    for name, run in batch.items():  # fp32: only the order of sums differs with the batch around
        assert max(abs(a - b) for a, b in zip(run["prompt_logprobs"], alone[name]["prompt_logprobs"])) < 1e-3
    for stats in (plain["alone"]["stats"], plain["batch"]["stats"]):
        assert sorted(stats) == ["0", "1"] and all(s["unions"] > 0 and s["union_density"] < 1 for s in stats.values())


def test_prefix_cache_hits_with_short_and_long_suffixes(setup):
    plain, run = setup[3], setup[3]["prefix"]
    runs, stats = run["runs"], run["stats"]
    assert runs["long_a"]["cached_tokens"] == 0
    for name in ("long_a_short_suffix", "long_a_long_suffix"):
        assert runs[name]["cached_tokens"] >= 1024, name  # long_a's full blocks came from the cache
    # Without the cache the same prompts give the same tokens: the sparse path reads cached pages as its own.
    _same_tokens(runs, plain["alone"]["runs"])
    # Only the new tokens are computed, over the cached context: the sparse path ran for both suffixes.
    for name in ("long_a_short_suffix", "long_a_long_suffix"):
        assert sorted(stats[name]) == ["0", "1"] and all(s["unions"] > 0 for s in stats[name].values()), name


def test_a_request_aborted_mid_prefill_leaves_the_engine_serving(setup):
    plain, run = setup[3], setup[3]["abort"]
    _same_tokens(run["runs"], plain["alone"]["runs"])


def test_preemption_under_kv_pressure_keeps_what_was_generated(setup):
    """Four 400-token prompts generating 250 tokens each need 2,600 tokens of cache; 52 pages of 32
    tokens hold 1,664. vLLM admits three (their prompts fit), preempts one while they decode, and
    later recomputes it: its prompt and the tokens it had generated are prefilled again, through the
    sparse path. Every request completes; the ones never preempted get their tokens alone; a
    preempted one keeps every token it had before the preemption. (After it, its generated tokens
    were attended densely as decodes before and sparsely in the recompute, so what follows may
    differ from an unpreempted run: docs/config.md, "Limits".)"""
    model, config, prompts, _ = setup
    ids = [t for name in ("long_a", "long_b") for t in prompts[name]]
    four = {f"p{i}": ids[i * 450: i * 450 + 400] for i in range(4)}
    # 32 KiB a page: 2 layers x K and V x 2 KV heads x 32 dims x 32 tokens x fp32. One request alone fits
    # (21 pages): the same engine gives each its tokens alone first, then runs the four at once.
    tight = {**ENGINE, "kv_cache_memory_bytes": 52 * 32768, "max_model_len": 1536}
    runs = _run(model, config, four, tight, ["alone", "batch"], max_tokens=250)
    alone, batch = runs["alone"], runs["batch"]
    assert not alone["preempted"]
    preempted = dict(batch["preempted"])  # name -> tokens generated when (first) preempted
    assert preempted, "the cache was meant to be too small for the batch"
    assert all(s["unions"] > 0 for s in batch["stats"].values())
    for name, run in batch["runs"].items():
        want = alone["runs"][name]["token_ids"]
        assert len(run["token_ids"]) == 250
        n = preempted.get(name, 250)
        assert run["token_ids"][:n] == want[:n], name
