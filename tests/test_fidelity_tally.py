"""`benchmarks/fidelity_tally.py`: lost / gained against dense, summed over results of one plan, as the eval scores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmark_modules import load_benchmark
from vllm_sparse.eval.harness import lost_answer

fidelity_tally = load_benchmark("fidelity_tally")
numbered, tally = fidelity_tally.numbered, fidelity_tally.tally

ROOT = Path(__file__).parents[1]


def _result(config: str, seed: int, cells: list[tuple[str, int, str, str, str]], recorded: bool = True) -> dict:
    completions = []
    for i, (task, length, answer, dense, sparse) in enumerate(cells):
        c = {"task": task, "length": length, "answer": answer, "dense": dense, "sparse": sparse}
        if recorded:
            c["sample"] = seed + sum(1 for t, n, *_ in cells[:i] if (t, n) == (task, length))
        completions.append(c)
    return {"config": config, "seed": seed, "completions": completions}


def test_lost_and_gained_follow_the_tasks_checks_prompt_by_prompt():
    a = _result("plan.yaml", 0, [
        ("passkey", 16384, "12345", " 12345. ", " 12345. "),  # same
        ("passkey", 16384, "11111", " 11111.", " 22222."),  # lost
        ("multikey", 16384, "7654321", " 1234567", " 7654321"),  # gained
        ("passkey", 29696, "99999", " 9999 and 99999", " 99999"),  # dense's first number is wrong: gained
    ])
    b = _result("plan.yaml", 20, [("passkey", 16384, "55555", " 55555", " 5555")], recorded=False)  # lost, #20
    other = _result("other.yaml", 0, [("passkey", 16384, "12345", " 12345", " 12345")])
    rows = tally([a, b, other])
    assert rows["plan.yaml"] == {"prompts": 5, "dense": 3, "lost": 2, "gained": 2, "same": 1, "seeds": [0, 20],
                                 "lost_prompts": ["passkey 16384 #1 (seed 0)", "passkey 16384 #20 (seed 20)"],
                                 "twin_prompts": 0, "twin_lost": 0, "twin_gained": 0, "twin_same": 0,
                                 "twin_lost_prompts": [], "twin_chunks": [], "moved_plan_only": 0,
                                 "moved_twin_only": 0, "p_loses": 0.6875}  # P(>= 2 of 4 | even odds) = 11/16
    assert rows["other.yaml"]["lost"] == 0 and rows["other.yaml"]["same"] == 1
    # the eval's own lost-answer rule names the same prompts
    assert [c["sample"] for c in numbered(a) + numbered(b) if lost_answer(c)] == [1, 20]


def test_the_script_prints_and_writes_the_table(tmp_path):
    f = tmp_path / "eval.json"
    r = _result("plan.yaml", 0, [("passkey", 16384, "11111", " 11111", " 2")])
    r["dense_twin"], r["completions"][0]["dense_twin"] = {"max_num_batched_tokens": 2048, "of_dense": 4096}, " 1"
    f.write_text(json.dumps(r))
    proc = subprocess.run([sys.executable, "benchmarks/fidelity_tally.py", str(f), "--json", str(tmp_path / "t.json")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "passkey 16384 #0 (seed 0)" in proc.stdout
    assert ("dense again in 2048-token chunks (plan.yaml): of 1 prompts lost 1, gained 0, same 0: "
            "passkey 16384 #0 (seed 0)") in proc.stdout
    assert "sign test (plan.yaml): P(>= 1 of 1 moved answers lost | as accurate as dense) = 0.500" in proc.stdout
    assert ("answers moved by the plan only 0, by dense again only 0: P(>= 0 of 0 | the plan moves no more than "
            "dense's chunk size) = 1.000") in proc.stdout
    assert json.loads((tmp_path / "t.json").read_text())["plan.yaml"]["lost"] == 1


def test_dense_run_twice_counts_its_own_spread_apart_from_the_plans():
    """`eval --dense-twin-chunk` results: the second dense run's answers against the first, summed beside the plan's
    (the plan's lost / gained stay against the first dense run)."""
    r = _result("plan.yaml", 0, [
        ("multikey", 29696, "7654321", " 7654321", " 1234567"),  # the plan loses it, and so does dense again
        ("multikey", 29696, "1111111", " 1111111", " 1111111"),  # all three agree
        ("passkey", 16384, "22222", " 3", " 22222"),  # the plan and dense again both gain it
    ])
    r["dense_twin"] = {"max_num_batched_tokens": 2048, "of_dense": 4096}
    for c, again in zip(r["completions"], [" 7654320", " 1111111", " 22222"]):
        c["dense_twin"] = again
    row = tally([r, _result("plan.yaml", 20, [("passkey", 16384, "55555", " 55555", " 55555")])])["plan.yaml"]
    assert (row["lost"], row["gained"], row["prompts"]) == (1, 1, 4)
    assert (row["twin_prompts"], row["twin_lost"], row["twin_gained"]) == (3, 1, 1)  # the seed-20 run had no twin
    assert row["twin_lost_prompts"] == ["multikey 29696 #0 (seed 0)"]
    assert (row["twin_same"], row["twin_chunks"]) == (1, [2048])
    assert [c["sample"] for c in numbered(r) if lost_answer(c, "dense_twin")] == [0]
    # Both moved the same two answers: neither moved one the other did not, and nothing can be read.
    assert (row["moved_plan_only"], row["moved_twin_only"], row["p_moves_more"]) == (0, 0, 1.0)


def test_the_exact_tests_read_the_counts_as_the_binomial_does():
    at_least = fidelity_tally.at_least_half_chance  # (the eval's own, `harness.at_least_half_chance`)
    assert at_least(0, 0) == at_least(0, 5) == 1.0
    assert at_least(5, 5) == 1 / 32 and at_least(1, 1) == 0.5
    assert at_least(3, 10) == 1 - (1 + 10 + 45) / 1024  # 10 moved, 3 of them lost
    assert at_least(8, 10) == (45 + 10 + 1) / 1024
    # The plan moves answers dense again leaves, and dense again one the plan leaves: a paired count per prompt.
    r = _result("plan.yaml", 0, [
        ("passkey", 16384, "11111", " 11111", " 2"),  # the plan loses it; dense again keeps it
        ("passkey", 16384, "22222", " 3", " 22222"),  # the plan gains it; dense again does not
        ("passkey", 16384, "33333", " 33333", " 33333"),  # dense again loses it; the plan keeps it
        ("passkey", 16384, "44444", " 44444", " 44444"),  # nobody moves
    ])
    r["dense_twin"] = {"max_num_batched_tokens": 2048, "of_dense": 4096}
    for c, again in zip(r["completions"], [" 11111", " 3", " 4", " 44444"]):
        c["dense_twin"] = again
    row = tally([r])["plan.yaml"]
    assert (row["lost"], row["gained"], row["p_loses"]) == (1, 1, 0.75)
    assert (row["moved_plan_only"], row["moved_twin_only"]) == (2, 1)
    assert row["p_moves_more"] == at_least(2, 3) == 0.5


def test_twins_lend_dense_run_twice_to_a_plan_that_ran_dense_once_only_where_dense_agrees():
    """`--twins`: another plan's second dense run pairs prompt by prompt (same task, length, sample, seed) with a
    result that ran dense once; a prompt whose first dense completion differs is an error, never a silent pair."""
    twin = _result("other.yaml", 0, [
        ("passkey", 16384, "11111", " 11111", " 11111"),
        ("passkey", 16384, "22222", " 22222", " 22222"),
    ])
    twin["dense_twin"] = {"max_num_batched_tokens": 2048, "of_dense": 4096}
    for c, again in zip(twin["completions"], [" 11111", " 2"]):  # dense again loses #1
        c["dense_twin"] = again
    plan = _result("plan.yaml", 0, [
        ("passkey", 16384, "11111", " 11111", " 1"),  # the plan loses #0, which dense again keeps
        ("passkey", 16384, "22222", " 22222", " 22222"),
    ])
    fidelity_tally.lend_twins([plan], [twin])
    row = tally([plan])["plan.yaml"]
    assert (row["twin_prompts"], row["twin_lost"], row["twin_chunks"]) == (2, 1, [2048])
    assert (row["moved_plan_only"], row["moved_twin_only"]) == (1, 1)
    # the other plan's own completions stay its own
    assert "sparse" in twin["completions"][0] and twin["completions"][0]["sparse"] == " 11111"

    alone = _result("plan.yaml", 0, [("passkey", 16384, "11111", " 11111", " 1")])
    fidelity_tally.lend_twins([alone], [])  # no --twins: nothing lent, nothing refused
    assert "dense_twin" not in alone and tally([alone])["plan.yaml"]["twin_prompts"] == 0
    differs = _result("plan.yaml", 0, [("passkey", 16384, "11111", " 11112", " 1")])
    with pytest.raises(SystemExit, match=r"passkey 16384 #0 \(seed 0\): plan.yaml's dense completion differs"):
        fidelity_tally.lend_twins([differs], [twin])
    unseen = _result("plan.yaml", 40, [("passkey", 16384, "11111", " 11111", " 1")])
    with pytest.raises(SystemExit, match=r"no second dense run for passkey 16384 #40 \(seed 40\)"):
        fidelity_tally.lend_twins([unseen], [twin])
