"""The SPARSE backend inside vLLM's CPU engine, end to end, against the stock backend.

One long prompt (chunked: several prefill chunks, sparse once the context passes dense_below),
one medium and one short prompt submitted together, so steps mix decodes with prefill chunks
of several requests.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import yaml

from tests.engines import CPU_ENGINE, run_each, run_specs

pytestmark = [pytest.mark.engine, CPU_ENGINE]

ENGINE = {"kv_cache_memory_bytes": 1 << 30, "dtype": "float32", "max_model_len": 4096, "block_size": 32,
          "max_num_batched_tokens": 256, "max_num_seqs": 8}
LENGTHS = (1100, 420, 40)
DENSE_BELOW = 300  # the long prompt's first 256-token chunk stays dense, later ones go sparse


def _prompts(model: Path) -> list[dict]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    text = (Path(os.__file__).parent / "argparse.py").read_text()
    ids = tok.encode(text).ids
    return [{"prompt_token_ids": ids[i * 97: i * 97 + n]} for i, n in enumerate(LENGTHS)]


def _config(tmp: Path, name: str, rule: dict, **settings) -> str:
    path = tmp / f"{name}.yaml"
    # min_chunk_work 0, min_query_tokens 16: these prompts' chunks are far below the floors `auto` gives on
    # CUDA (the GPU twin runs this too), and they are here to reach the sparse path.
    path.write_text(yaml.safe_dump({"version": 1, "models": [{
        "match": {"architectures": ["LlamaForCausalLM"]}, "min_chunk_work": 0, "min_query_tokens": 16, "block_size": 64,
        "dense_below": DENSE_BELOW, **settings, "layers": [dict(layers="all", **rule)]}]}))
    return str(path)


def run_plans(model: Path, tmp: Path, engine: dict) -> dict:
    """The same prompts through the stock backend and through SPARSE with a dense plan, a keep-all
    plan and a real sparse plan (the GPU twin runs this too), a process each."""
    return run_specs(plan_specs(model, tmp, engine), one_process=False)


def plan_specs(model: Path, tmp: Path, engine: dict) -> dict[str, dict]:
    """`run_plans`' engines, as tests/engine_runner.py specs."""
    base = {"model": str(model), "prompts": _prompts(model), "engine": engine, "max_tokens": 6}
    sink_local = {"name": "sink_local", "sink_blocks": 1, "local_blocks": 2}
    specs = {
        "stock": {},
        "dense_plan": {"backend": "sparse", "config": _config(tmp, "dense", {"dense": True})},
        "keep_all": {"backend": "sparse", "config": _config(tmp, "keep_all", {
            "estimator": sink_local, "budget": {"keep_ratio": 1.0}})},
        "sparse": {"backend": "sparse", "config": _config(tmp, "sparse", {
            "estimator": sink_local, "budget": {"top_k": 3, "sink_blocks": 1, "local_blocks": 2}})},
        # A dense tail as long as the token budget: every row of every chunk reads every block (the setting reaches
        # the engine's attention; tests/test_dense_tail.py checks a tail shorter than its chunk)
        "tail_all": {"backend": "sparse", "config": _config(tmp, "tail_all", {
            "estimator": sink_local, "budget": {"top_k": 3, "sink_blocks": 1, "local_blocks": 2}},
            dense_tail=engine["max_num_batched_tokens"], union_tile=1)},
        # MInference's lines with every key a kept column, read token by token beside the diagonals' blocks
        "columns_all": {"backend": "sparse", "config": _config(tmp, "columns_all", {
            "estimator": {"name": "vertical_slash", "last_q": 64, "vertical_size": 100_000, "slash_size": 50,
                          "blocks": "columns"}, "budget": {"top_p": 1.0, "sink_blocks": 0, "local_blocks": 1}}),
                        "counters": True},
    }
    return {name: {**base, **spec} for name, spec in specs.items()}


def run_chats_beside(model: Path, tmp: Path, engine: dict) -> dict:
    """Two short chats submitted before a long prompt, through the stock backend and through SPARSE with
    layer 0 dense and layer 1 sparse (one KV cache group): the chats decode in the steps that prefill the
    long prompt's sparse chunks, so those steps build the chats' metadata apart from the whole batch's,
    which the dense layer reads (the GPU twin runs this with CUDA graphs on)."""
    return run_specs(chats_specs(model, tmp, engine), one_process=False)


def chats_specs(model: Path, tmp: Path, engine: dict) -> dict[str, dict]:
    """`run_chats_beside`'s engines, as tests/engine_runner.py specs."""
    long, _, chat = _prompts(model)
    other = {"prompt_token_ids": long["prompt_token_ids"][500:560]}
    base = {"model": str(model), "prompts": [chat, other, long], "engine": engine, "max_tokens": 12,
            "prompt_logprobs": False, "counters": True}
    path = tmp / "layer1_sparse.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "models": [{
        "match": {"architectures": ["LlamaForCausalLM"]}, "min_chunk_work": 0, "min_query_tokens": 16,
        "block_size": 64, "dense_below": DENSE_BELOW, "layers": [
            {"layers": [0], "dense": True},
            {"layers": [1], "estimator": {"name": "sink_local", "sink_blocks": 1, "local_blocks": 2},
             "budget": {"top_k": 3, "sink_blocks": 1, "local_blocks": 2}}]}]}))
    return {"stock": base, "sparse": {**base, "backend": "sparse", "config": str(path)}}


def check_chats_beside(runs: dict) -> None:
    stock, sparse = runs["stock"]["results"], runs["sparse"]["results"]
    assert [r["prompt_tokens"] for r in stock] == [40, 60, 1100]
    assert runs["sparse"]["counters"]["prefill"]["sparse"] > 0  # the long prompt's later chunks went sparse
    for name, s, o in zip(("chat", "other chat"), stock, sparse):
        assert o["token_ids"] == s["token_ids"], name


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    """`run_plans`' engines, then `run_chats_beside`'s, each set one after the other in one process (vLLM
    imported once); an engine that reads the plugin's counters first among the sparse ones of its process."""
    tmp = tmp_path_factory.mktemp("configs")
    plans = plan_specs(tiny_llama, tmp, ENGINE)
    plans = {"columns_all": plans.pop("columns_all"), **plans}
    chats = {f"chats_{name}": spec for name, spec in chats_specs(tiny_llama, tmp, ENGINE).items()}
    bad = tmp / "bad.yaml"  # test_bad_config_stops_engine_start's: last, it must not start
    bad.write_text(yaml.safe_dump({"version": 1, "models": [{
        "match": {"architectures": ["LlamaForCausalLM"]},
        "layers": [{"layers": [0, 5], "estimator": {"name": "sink_local"}}]}]}))
    chats["bad"] = {"model": str(tiny_llama), "backend": "sparse", "config": str(bad), "prompts": ["hi"],
                    "engine": ENGINE, "expect_error": True}
    done = run_each(chats, one_process=True)
    return {**run_specs(plans, one_process=True), **{name: r for name, (r, _) in done.items()},
            "bad_output": (str(bad), done["bad"][1])}


def test_chats_beside_a_sparse_prefill_decode_as_stock(runs):
    check_chats_beside({"stock": runs["chats_stock"], "sparse": runs["chats_sparse"]})


def _max_logprob_diff(a: dict, b: dict) -> float:
    return max(abs(x - y) for x, y in zip(a["prompt_logprobs"], b["prompt_logprobs"]))


def test_prompts_are_the_lengths_we_meant(runs):
    assert [r["prompt_tokens"] for r in runs["stock"]["results"]] == list(LENGTHS)


def test_dense_plan_equals_stock_backend_exactly(runs):
    for stock, ours in zip(runs["stock"]["results"], runs["dense_plan"]["results"]):
        assert ours["token_ids"] == stock["token_ids"]
        assert ours["prompt_logprobs"] == stock["prompt_logprobs"]


def test_keep_all_budget_equals_dense(runs):
    for stock, ours in zip(runs["stock"]["results"], runs["keep_all"]["results"]):
        assert ours["token_ids"] == stock["token_ids"]
        assert _max_logprob_diff(stock, ours) < 1e-3


def test_a_dense_tail_as_long_as_each_chunk_equals_dense(runs):
    """`dense_tail` at the token budget: the rows of each sparse chunk's last 256 tokens, all of them, attend densely
    under a plan that keeps 3 blocks a row (which alone moves the long prompt's scores: the test below)."""
    for stock, ours in zip(runs["stock"]["results"], runs["tail_all"]["results"]):
        assert ours["token_ids"] == stock["token_ids"]
        assert _max_logprob_diff(stock, ours) < 1e-3


def test_every_column_kept_token_by_token_equals_dense(runs):
    """`vertical_slash` with `blocks: columns` and every key among the kept columns: the column pass reads
    every key the diagonals' blocks do not hold, and the two joined are dense attention."""
    for stock, ours in zip(runs["stock"]["results"], runs["columns_all"]["results"]):
        assert ours["token_ids"] == stock["token_ids"]
        assert _max_logprob_diff(stock, ours) < 1e-3
    assert runs["columns_all"]["counters"]["prefill"]["sparse"] > 0  # the long prompt's later chunks went sparse


def test_sparse_plan_runs_and_changes_only_long_prompts(runs):
    stock, sparse = runs["stock"]["results"], runs["sparse"]["results"]
    for o in sparse:
        assert len(o["token_ids"]) == 6 and all(math.isfinite(x) for x in o["prompt_logprobs"])
    # The long prompt's later chunks took the sparse path (top 3 of up to 18 blocks): scores moved.
    assert _max_logprob_diff(stock[0], sparse[0]) > 1e-2
    # Below dense_below nothing changes, bit for bit: the short prompt, and the long prompt's
    # first chunk (positions 0-255, context 256 < dense_below).
    assert sparse[2]["prompt_logprobs"] == stock[2]["prompt_logprobs"]
    assert sparse[0]["prompt_logprobs"][:255] == stock[0]["prompt_logprobs"][:255]
    assert sparse[0]["prompt_logprobs"][255:] != stock[0]["prompt_logprobs"][255:]


def test_bad_config_stops_engine_start(runs):
    bad, output = runs["bad_output"]
    assert runs["bad"] is None
    assert f"invalid sparse-attention config {bad}" in output
    assert "models[0].layers[0].layers: layer 5 is beyond the model, which has 2 layers (0-1)" in output
    # Refused as the engine's config was made, before vLLM started an engine process: LLM(...) raised the plugin's
    # own error (not vLLM's "Engine core initialization failed", the cause only in the log above it).
    assert "vllm_sparse.config.errors.SparseConfigError: vllm-sparse: invalid sparse-attention config" in output
    assert "Engine core initialization failed" not in output and "EngineCore" not in output
