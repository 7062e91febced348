"""`vllm-sparse calibrate` end to end on the tiny Llama in vLLM's CPU engine (one engine: the sweep), then
new plans from its JSON at other targets (no engine): the plans validate, every rule carries its figures,
recall 1.0 leaves every layer dense, a lower target never reads more, and the answer rows (each prompt's
final query block) are saved and can be required."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.engines import CPU_ENGINE, IN_PROCESS, engine_env
from vllm_sparse.cli.main import main

pytestmark = pytest.mark.engine

ESTIMATORS = "antidiagonal:stride=8,vertical_slash:last_q=16"
TOP_P = (0.5, 0.8, 0.95)
KEEP = (0.25, 0.5, 1.0)
BUDGETS = ",".join([f"top_p={p}" for p in TOP_P] + [f"keep_ratio={r}" for r in KEEP])


@CPU_ENGINE
def test_calibrate_writes_a_plan_that_validates_and_records_its_figures(tiny_llama, tmp_path, capsys, monkeypatch):
    out = tmp_path / "plan.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_sparse.cli.main", "calibrate", "--model", str(tiny_llama), "--lengths", "600,1000",
         "--target-recall", "0.5", "--out", str(out), "--estimators", ESTIMATORS, "--budgets", BUDGETS,
         "--plan-block-size", "64", "--dense-below", "256", "--dtype", "float32", "--block-size", "32",
         "--max-num-batched-tokens", "512", "--kv-cache-memory-bytes", str(1 << 30)],
        capture_output=True, text=True, timeout=600, env={**engine_env(), **IN_PROCESS})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "calibrating 12 candidates" in proc.stderr  # the progress bar
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["layers"] == [0, 1] and len(result["labels"]) == 12
    for layer in ("0", "1"):
        table = result["tables"][layer]
        for est in range(2):
            top_p = range(est * 6, est * 6 + 3)
            keep = range(est * 6 + 3, est * 6 + 6)
            for rule in (top_p, keep):  # a larger top_p or ratio keeps a superset: more recall, more density
                for a, b in zip(rule, rule[1:]):
                    assert all(x <= y + 1e-9 for x, y in zip(table["recall"][a], table["recall"][b]))
                    assert all(x <= y for x, y in zip(table["density"][a], table["density"][b]))
            everything = est * 6 + 5  # keep_ratio 1.0: every block, so all the mass
            assert table["density"][everything] == [1.0, 1.0]
            assert table["recall"][everything] == pytest.approx([1.0] * 4, abs=1e-5)
            assert all(0 < r <= 1 + 1e-6 for row in table["recall"] for r in row)
    assert main(["validate", str(out), "--model", str(tiny_llama)]) == 0
    text = out.read_text()
    for needle in (f"model: {tiny_llama}", "data: builtin", "lengths: 600, 1000 tokens", "target recall: 0.5",
                   "candidates (12): antidiagonal(stride=8) top_p=0.5", "kind: calibrated",
                   "command: \"vllm-sparse calibrate --model"):
        assert needle in text, needle
    for layer in (0, 1):
        comment = next(line for line in text.splitlines() if line.strip().startswith(f"# layer {layer}:"))
        assert ("recall" in comment and "kept" in comment) or "dense:" in comment
        # The written plan run again with the audit on (its engine in this process after the sweep's: its workers
        # take the verify run's settings, not the sweep's candidates): a sparse layer carries its verified figures.
        assert "dense:" in comment or "| verified: recall" in comment, comment
    assert "| verified: recall" in text  # (target 0.5 makes a layer sparse, so the verify run happens)
    assert "calibrated layers sparse" in proc.stdout

    # Other targets from the saved measurements: no engine.
    density = {}
    for target in (1.0, 0.95, 0.9, 0.8, 0.5):
        plan = tmp_path / f"plan-{target}.yaml"
        assert main(["calibrate", "--from-json", str(out.with_suffix(".json")), "--target-recall", str(target),
                     "--out", str(plan)]) == 0
        saved = json.loads(plan.with_suffix(".json").read_text())
        density[target] = [c["density"] for c in saved["choices"]]
        assert main(["validate", str(plan), "--model", str(tiny_llama)]) == 0
        for c in saved["choices"]:
            assert c["dense"] or min(c["recall"]) >= target - 1e-6
        if target == 1.0:
            assert all(c["dense"] for c in saved["choices"])
            assert "0 of 2 layers sparse" in capsys.readouterr().out
    targets = sorted(density)
    for lo, hi in zip(targets, targets[1:]):
        assert all(a <= b + 1e-12 for a, b in zip(density[lo], density[hi])), (lo, hi, density)
    assert density[0.5] != density[1.0]  # the low target does make something sparse

    # By the worst rows instead of the mean (from the same saved per-row sums): never a cheaper plan,
    # and the recall it reports is the rows' quantile, never above the mean.
    plan = tmp_path / "plan-rows.yaml"
    assert main(["calibrate", "--from-json", str(out.with_suffix(".json")), "--target-recall", "0.8",
                 "--row-quantile", "0.1", "--out", str(plan)]) == 0
    rows = json.loads(plan.with_suffix(".json").read_text())
    mean = json.loads((tmp_path / "plan-0.8.yaml").with_suffix(".json").read_text())
    assert all(a >= b - 1e-12 for a, b in zip([c["density"] for c in rows["choices"]], density[0.8]))
    for layer in rows["layers"]:
        for q_row, m_row in zip(rows["tables"][str(layer)]["recall"], mean["tables"][str(layer)]["recall"]):
            assert all(q <= m + 1e-9 for q, m in zip(q_row, m_row))
    assert "quantile of its queries" in plan.read_text()
    assert main(["calibrate", "--from-json", str(out.with_suffix(".json")), "--row-quantile", "1.5",
                 "--out", str(plan)]) == 2

    # The answer rows: each prompt's final query block, per length, layer, candidate and q head; required
    # too, never a cheaper plan, and every sparse choice reaches the target on them; without them again
    # (--no-answer-rows), the mean's plan. A JSON from before them says so.
    answers = result["answer_rows"]
    assert sorted(answers) == ["1000", "600"] and all(sorted(answers[n]) == ["0", "1"] for n in answers)
    for n in answers:
        for layer in ("0", "1"):
            table = answers[n][layer]
            assert len(table) == 12 and all(0 <= r <= 1 + 1e-6 for row in table for r in row)
            assert table[5] == pytest.approx([1.0] * 4, abs=1e-5)  # keep_ratio 1.0
    plan = tmp_path / "plan-answer.yaml"
    assert main(["calibrate", "--from-json", str(out.with_suffix(".json")), "--target-recall", "0.5",
                 "--answer-rows", "--out", str(plan)]) == 0
    both = json.loads(plan.with_suffix(".json").read_text())
    assert both["spec"]["answer_rows"] and "answer rows: every q head must also reach" in plan.read_text()
    assert all(a >= b - 1e-12 for a, b in zip([c["density"] for c in both["choices"]], density[0.5]))
    assert not all(c["dense"] for c in both["choices"])
    for c in both["choices"]:
        for kv, g in enumerate(c["groups"]):
            for h in (2 * kv, 2 * kv + 1):  # its q heads
                assert g["candidate"] is None or \
                    min(answers[n][str(c["layer"])][g["candidate"]][h] for n in answers) >= 0.5 - 1e-6
    assert main(["calibrate", "--from-json", str(plan.with_suffix(".json")), "--target-recall", "0.5",
                 "--no-answer-rows", "--out", str(tmp_path / "plan-mean.yaml")]) == 0
    assert json.loads((tmp_path / "plan-mean.json").read_text())["choices"] == \
        json.loads((tmp_path / "plan-0.5.json").read_text())["choices"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps({k: v for k, v in result.items() if k != "answer_rows"}))
    capsys.readouterr()
    assert main(["calibrate", "--from-json", str(old), "--answer-rows", "--out", str(plan)]) == 2
    assert "no answer-row measurements" in capsys.readouterr().err

    # The saved measurements carry the model's shape: re-choosing needs no model directory (calibrate on
    # the GPU machine, choose anywhere).
    from transformers import AutoConfig

    from vllm_sparse.calibrate.run import saved_shape
    from vllm_sparse.config.plan import ModelShape

    result = json.loads(out.with_suffix(".json").read_text())
    assert saved_shape(result) == ModelShape.from_hf_config(AutoConfig.from_pretrained(str(tiny_llama)),
                                                            str(tiny_llama))
    def no_model(model):
        raise AssertionError(f"read the model {model} for its shape")

    monkeypatch.setattr("vllm_sparse.calibrate.run._shape_from_model", no_model)
    assert main(["calibrate", "--from-json", str(out.with_suffix(".json")), "--target-recall", "0.8", "--out",
                 str(tmp_path / "plan-no-model.yaml")]) == 0
    assert (tmp_path / "plan-no-model.yaml").read_text().split("version: 1")[1] == \
        (tmp_path / "plan-0.8.yaml").read_text().split("version: 1")[1].replace("plan-0.8", "plan-no-model")


def test_every_candidate_is_checked_at_the_plans_block_size_before_the_sweep():
    """Not only the candidate that sizes the probe engine's workspace: a stride that does not divide the block
    stopped the sweep mid-run."""
    from vllm_sparse.calibrate.candidates import candidates, check_candidates, parse_budgets, parse_estimators

    cands = candidates(parse_estimators("antidiagonal:stride=32,lowbit"), parse_budgets("top_p=0.9"))
    check_candidates(cands, 64)
    with pytest.raises(ValueError, match=r"candidate antidiagonal\(stride=32\) top_p=0.9: antidiagonal stride 32 "
                                         r"must divide the block size 16"):
        check_candidates(cands, 16)
