"""`vllm-sparse eval` end to end on the tiny model: both runs, the accuracy table, densities, operator check."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.engines import CPU_ENGINE, IN_PROCESS, engine_env
from vllm_sparse.eval.harness import lost_answer
from vllm_sparse.eval.tasks import TASKS

pytestmark = pytest.mark.engine


@CPU_ENGINE
def test_eval_runs_dense_then_sparse_and_reports(tiny_llama, tmp_path):
    config = tmp_path / "sparse.yaml"
    config.write_text(yaml.safe_dump({"version": 1, "models": [{
        "match": {"architectures": ["LlamaForCausalLM"]}, "min_chunk_work": 0, "min_query_tokens": 16,
        "block_size": 64, "dense_below": 256, "union_tile": 2,
        "layers": [{"layers": "all", "estimator": {"name": "pooled"}, "budget": {"top_k": 3}}]}]}))
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_sparse.cli.main", "eval", "--model", str(tiny_llama), "--config", str(config),
         "--lengths", "500,900", "--tasks", "passkey,multikey,vt", "--samples", "1", "--operator-check", "800",
         "--dtype", "float32", "--block-size", "32", "--max-num-batched-tokens", "512", "--max-tokens", "4",
         "--kv-cache-memory-bytes", str(1 << 30), "--seed", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=900, env={**engine_env(), **IN_PROCESS})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [(r["length"], r["task"]) for r in result["rows"]] == [
        (n, t) for n in (500, 900) for t in ("passkey", "multikey", "vt")]
    for r in result["rows"]:
        # Each cell's accuracy is the share of its completions that carry the answer: scored again here.
        done = [c for c in result["completions"] if (c["task"], c["length"]) == (r["task"], r["length"])]
        check = TASKS[r["task"]].check
        assert len(done) == r["samples"] == 1
        assert r["dense_acc"] == sum(check(c["dense"], c["answer"]) for c in done) / len(done)
        assert r["sparse_acc"] == sum(check(c["sparse"], c["answer"]) for c in done) / len(done)
        # dense's answers prompt by prompt: lost, gained and equal completions, each prompt named by its number
        assert r["lost"] == sum(lost_answer(c) for c in done)
        assert r["gained"] == sum(check(c["sparse"], c["answer"]) and not check(c["dense"], c["answer"]) for c in done)
        assert r["same_text"] == sum(c["dense"] == c["sparse"] for c in done)
        assert "twin" not in r and "dense_twin" not in done[0]  # (no --dense-twin-chunk: one dense run)
        assert [c["sample"] for c in done] == [3]  # --seed 3, the first sample
        assert r["prompt_tokens"] <= r["length"] and r["prompt_tokens"] > 0.9 * r["length"]
        assert r["kept_union"] == pytest.approx(
            sum(s["union_density"] for s in result["layers"][str(r["length"])].values()) / 2)
        assert r["kept_all"] == pytest.approx(r["kept_union"])  # both layers are full attention and sparse
    for n in ("500", "900"):
        layers = result["layers"][n]
        assert sorted(layers) == ["0", "1"]
        for s in layers.values():
            assert s["unions"] > 0 and 0 < s["requested_density"] <= s["union_density"] <= 1
    audit = result["operator_check"]["layers"]
    for s in audit.values():
        # top_k=3 of up to 13 blocks: the sparse output moves, and the kept blocks miss some mass.
        assert 0 < s["rel_err"] <= s["rel_err_worst"] < float("inf")
        assert 0 < s["kept_mass_worst"] <= s["kept_mass"] < 1
    assert len(result["completions"]) == 6
    # --seed 3: the prompts the tasks give from seed 3 (another run's --seed gives other prompts)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert result["seed"] == 3 and [c["answer"] for c in result["completions"]] == [
        TASKS[t](tok, n, 0, 3)[1] for n in (500, 900) for t in ("passkey", "multikey", "vt")]
    assert "operator check on real text, 800 tokens (mean over unions, and the worst)" in proc.stdout
    assert "kept(union)" in proc.stdout and "kept(all)" in proc.stdout
    assert "lost / gained: prompts whose answer dense gives and the plan does not" in proc.stdout
    assert "dense_twin" not in result and "dense again" not in proc.stdout
    lost = [f"{c['task']} {c['length']} #{c['sample']}" for c in result["completions"] if lost_answer(c)]
    assert (f"lost (--seed 3): {', '.join(lost)}" in proc.stdout) if lost else "\nlost (" not in proc.stdout


def test_kept_over_full_layers_counts_dense_layers_as_read_whole():
    from vllm_sparse.eval.harness import kept_over_full_layers

    layers = {"5": {"union_density": 0.4}, 17: {"union_density": 0.6}}  # JSON keys or the engine's ints
    assert kept_over_full_layers(layers, [5, 11, 17]) == pytest.approx((0.4 + 1.0 + 0.6) / 3)
    assert kept_over_full_layers(layers, [5, 17]) == pytest.approx(0.5)
    assert kept_over_full_layers({}, [5, 11]) == 1.0
    assert kept_over_full_layers(layers, []) is None


def test_passkey_depths_sweeps_the_needle_through_the_second_half(tiny_llama):
    """`passkey_depths`: each sample its own key, at its own depth in the same repetitive filler, most of
    them past the middle of the haystack, every prompt within the length asked."""
    from transformers import AutoTokenizer

    from vllm_sparse.eval.tasks import NEEDLE, TASKS

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    seen = []
    for i in range(12):
        prompt, key = TASKS["passkey_depths"](tok, 3000, i, seed=i)
        assert len(tok.encode(prompt)) <= 3000 and TASKS["passkey_depths"].check(f" {key}.", key)
        needle = prompt.index(NEEDLE.format(key=key))
        hay_start, hay_end = prompt.index("\n\n") + 2, prompt.rindex("\n\n")
        seen.append(round((needle - hay_start) / (hay_end - hay_start), 2))
    assert seen == sorted(seen[:9]) + seen[9:]  # the sweep, then three shallower checks
    assert sum(d > 0.5 for d in seen) == 9 and len({s for s in seen}) == 12


def test_eval_and_calibrate_refuse_bad_input_before_any_engine_runs(tiny_llama, tmp_path):
    """A config that does not resolve for the model, or an output folder that does not exist, stops the command
    at once (exit 2, one line naming it), not after the dense run."""
    from vllm_sparse.cli.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"version": 1, "models": [{"match": {"architectures": ["LlamaForCausalLM"]},
                                                             "layers": [{"layers": 99}]}]}))
    args = ["eval", "--model", str(tiny_llama), "--lengths", "500", "--tasks", "passkey", "--samples", "1"]
    assert main([*args, "--config", str(bad)]) == 2  # (layer 99 of a 2-layer model: no engine started)
    assert main([*args, "--config", str(bad), "--json", str(tmp_path / "no" / "such" / "eval.json")]) == 2
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"version": 1, "models": [{"match": {"architectures": ["LlamaForCausalLM"]},
                                                              "layers": [{"layers": "all"}]}]}))
    # dense again with the first run's chunks (the default 4096: no twin at all), below --max-num-seqs (4: vLLM
    # would refuse it after the first dense run), or with no task to run: refused before any engine
    for chunk, more in (("4096", []), ("0", []), ("-8", []), ("3", []), ("512", ["--tasks", "none"])):
        assert main([*args, "--config", str(good), "--dense-twin-chunk", chunk, *more]) == 2, chunk
    assert main(["schema", "-o", str(tmp_path / "no" / "x.json")]) == 2
    assert main(["calibrate", "--from-json", str(tmp_path / "none.json"), "--out", str(tmp_path / "p.yaml")]) == 2


def test_dense_twin_chunk_reaches_the_harness_from_the_command_line(tiny_llama, tmp_path, monkeypatch):
    """`--dense-twin-chunk` is handed to `evaluate` with the first run's engine settings (the second dense engine,
    run for real on gemma-3-270m in benchmarks/RESULTS.md, thirtieth session; here the harness is stood in for)."""
    from vllm_sparse.cli.main import main
    from vllm_sparse.eval import harness

    config = tmp_path / "plan.yaml"
    config.write_text(yaml.safe_dump({"version": 1, "models": [{"match": {"architectures": ["LlamaForCausalLM"]},
                                                                "layers": [{"layers": "all"}]}]}))
    seen = {}

    def fake_evaluate(model, cfg, lengths, tasks, samples, engine, **kw):
        seen.update(engine=engine, **kw)
        return {"model": model, "config": cfg, "seed": 0, "rows": [], "layers": {}, "seconds": {}, "completions": []}

    monkeypatch.setattr(harness, "evaluate", fake_evaluate)
    assert main(["eval", "--model", str(tiny_llama), "--config", str(config), "--lengths", "500", "--tasks",
                 "passkey", "--max-num-batched-tokens", "512", "--dense-twin-chunk", "256"]) == 0
    assert seen["dense_twin_chunk"] == 256 and seen["engine"]["max_num_batched_tokens"] == 512


def test_dense_again_is_scored_prompt_by_prompt_against_the_first_dense_run(tiny_llama, tmp_path, monkeypatch):
    """Two lengths x two tasks x three prompts, each engine's completions distinct (stand-ins for the engines): the
    second dense run's completion lands on its own prompt, its lost / gained / same are against the first dense run
    (as the plan's are), and the report names the prompts it loses."""
    from vllm_sparse.eval import harness

    config = tmp_path / "plan.yaml"
    config.write_text(yaml.safe_dump({"version": 1, "models": [{"match": {"architectures": ["LlamaForCausalLM"]},
                                                                "layers": [{"layers": "all"}]}]}))
    runs = []

    stats = []
    monkeypatch.delenv("VLLM_SPARSE_STATS", raising=False)

    def fake_run_engine(model, groups, cfg, engine, label, max_tokens=16, **kw):
        runs.append((label, engine["max_num_batched_tokens"]))
        stats.append(os.environ.get("VLLM_SPARSE_STATS"))
        out = []
        for gi, prompts in enumerate(groups):
            # each engine answers its own subset of the group right, by place
            texts = []
            for i in range(len(prompts)):
                right = {"dense": i % 2 == 0, "dense-twin": i % 3 == 0, "sparse": i != 1}[label]
                texts.append(f" {label}-{gi}-{i}" + (" ANSWER" if right else ""))
            out.append(texts)
        return harness.EngineRun(label, out, [[len(p) for p in g] for g in groups], 1.0, [{} for _ in groups])

    monkeypatch.setattr(harness, "run_engine", fake_run_engine)
    tasks = {"passkey": "ANSWER", "multikey": "ANSWER"}
    monkeypatch.setattr(harness, "TASKS", {t: _StubTask(a) for t, a in tasks.items()})
    result = harness.evaluate(str(tiny_llama), str(config), [300, 400], ["passkey", "multikey"], 3,
                              {"max_num_batched_tokens": 256}, seed=5, dense_twin_chunk=128)
    assert runs == [("dense", 256), ("dense-twin", 128), ("sparse", 256)]
    # the eval's engines count stats; the process is left as it was (engines served after it keep `dense_above`)
    assert stats == ["1"] * 3 and "VLLM_SPARSE_STATS" not in os.environ
    done = result["completions"]
    assert len(done) == 12
    for c in done:  # each twin completion is its own prompt's (the same group, task and place as dense's)
        assert c["dense_twin"].replace("dense-twin", "dense").split(" ANSWER")[0] == c["dense"].split(" ANSWER")[0]
    # per cell of 3 prompts (places 0, 1, 2 in the cell, tasks in turn within a length): dense right at even places
    # of the group, the twin at multiples of 3; counted against dense, prompt by prompt
    for r in result["rows"]:
        cell = [c for c in done if (c["task"], c["length"]) == (r["task"], r["length"])]
        d = ["ANSWER" in c["dense"] for c in cell]
        t = ["ANSWER" in c["dense_twin"] for c in cell]
        assert r["twin"] == {"lost": sum(a and not b for a, b in zip(d, t)),
                             "gained": sum(b and not a for a, b in zip(d, t)), "same_text": 0}
    assert sum(r["twin"]["lost"] for r in result["rows"]) > 0 and sum(r["twin"]["gained"] for r in result["rows"]) > 0
    report = harness.format_report(result)
    flipped = [f"{c['task']} {c['length']} #{c['sample']}" for c in done
               if "ANSWER" in c["dense"] and "ANSWER" not in c["dense_twin"]]
    assert f"lost by dense again (--seed 5): {', '.join(flipped)}" in report
    assert "dense again with prefill chunks of 128 tokens (not 256)" in report
    # The counts read by exact tests: lost against gained, and the answers only one of plan / dense again moved.
    lost, gained = (sum(r[k] for r in result["rows"]) for k in ("lost", "gained"))
    assert lost + gained > 0
    assert (f"sign test: P(>= {lost} of {lost + gained} moved answers lost | the plan as accurate as dense) = "
            f"{harness.at_least_half_chance(lost, lost + gained):.3f}") in report
    right = [("ANSWER" in c["dense"], "ANSWER" in c["sparse"], "ANSWER" in c["dense_twin"]) for c in done]
    plan_only = sum(s != d and t == d for d, s, t in right)
    twin_only = sum(t != d and s == d for d, s, t in right)
    assert plan_only + twin_only > 0
    assert (f"answers moved by the plan only {plan_only}, by dense again only {twin_only}: P(>= {plan_only} of "
            f"{plan_only + twin_only} | the plan moves no more than dense's chunk size) = "
            f"{harness.at_least_half_chance(plan_only, plan_only + twin_only):.3f}") in report


class _StubTask:
    """A task whose prompt ends in its answer and whose check looks for it (stands in for the real tasks)."""

    def __init__(self, answer: str):
        self.answer = answer

    def __call__(self, tok, n, i, seed):
        return f"prompt {n} {i} {seed}", self.answer

    def check(self, completion: str, answer: str) -> bool:
        return answer in completion
