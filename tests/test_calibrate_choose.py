"""`vllm-sparse calibrate`'s choice from a recall table (pure), the candidate short forms, and the YAML it
writes: it validates against the model, carries every rule's figures, and a lower target never reads more."""

from __future__ import annotations

import re

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_sparse.calibrate.candidates import candidates, label, parse_budgets, parse_estimators
from vllm_sparse.calibrate.choose import (
    LayerTable,
    choose,
    choose_layer,
    combine,
    histogram_quantile,
    require_answer_rows,
    table_from_sums,
)
from vllm_sparse.calibrate.plan_yaml import render_plan
from vllm_sparse.config.loader import parse_config
from vllm_sparse.config.plan import ModelShape, resolve_plan

# 4 q heads, 2 KV heads. Candidates: 0 cheap (good for group 0 only), 1 middle (good for both), 2 costly.
TABLE = LayerTable(3, recall=[[0.97, 0.96, 0.70, 0.80], [0.96, 0.95, 0.95, 0.96], [0.99, 0.99, 0.99, 0.99]],
                   density=[[0.10, 0.12], [0.40, 0.45], [0.80, 0.85]])


def test_lowest_density_reaching_the_target_in_every_head():
    c = choose_layer(TABLE, 0.95, per_group=False)
    assert [g.candidate for g in c.groups] == [1, 1] and not c.per_group and not c.dense
    assert c.density == pytest.approx(0.425) and c.recall == (0.96, 0.95, 0.95, 0.96)
    assert [g.candidate for g in choose_layer(TABLE, 0.97, per_group=False).groups] == [2, 2]


def test_per_group_where_the_groups_need_different_budgets():
    c = choose_layer(TABLE, 0.95)
    assert c.per_group and [g.candidate for g in c.groups] == [0, 1]
    assert c.density == pytest.approx((0.10 + 0.45) / 2)
    # When one candidate suits every group, the layer keeps one rule.
    same = LayerTable(0, [[0.99] * 4, [0.5] * 4], [[0.3, 0.3], [0.1, 0.1]])
    assert not choose_layer(same, 0.95).per_group


def test_unreachable_or_too_dense_stays_dense_and_says_why():
    c = choose_layer(TABLE, 0.995)
    assert c.dense and c.density == 1.0 and c.recall == (1.0,) * 4
    assert "no candidate reaches recall 0.995" in c.why_dense and "candidate 2" in c.why_dense
    c = choose_layer(TABLE, 0.97, max_density=0.5, labels=["a", "b", "c"])
    assert c.dense and "(c) reads 82.5% > max density 50%" in c.why_dense


def test_target_one_keeps_everything():
    t = LayerTable(0, [[0.9999] * 4, [1.0 - 1e-8] * 4], [[0.5, 0.5], [1.0, 1.0]])
    assert choose_layer(t, 1.0).dense  # the only candidate reaching 1.0 reads every block: dense
    assert [g.candidate for g in choose_layer(t, 1.0, max_density=1.0).groups] == [1, 1]  # keep-all
    with pytest.raises(ValueError, match="target recall"):
        choose([t], 1.5)


@st.composite
def tables(draw):
    kv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    n = draw(st.integers(1, 6))
    unit = st.floats(0.0, 1.0)
    recall = [[draw(unit) for _ in range(kv * group)] for _ in range(n)]
    density = [[draw(unit) for _ in range(kv)] for _ in range(n)]
    return LayerTable(0, recall, density)


@settings(max_examples=300, deadline=None, derandomize=True)  # the same examples every run
@given(tables(), st.floats(0.01, 1.0), st.floats(0.01, 1.0), st.floats(0.05, 1.0), st.booleans())
def test_a_lower_target_never_reads_more(table, t1, t2, max_density, per_group):
    lo, hi = sorted((t1, t2))
    a = choose_layer(table, lo, max_density, per_group)
    b = choose_layer(table, hi, max_density, per_group)
    assert a.density <= b.density + 1e-12
    for c, target in ((a, lo), (b, hi)):
        assert all(r >= target - 1e-6 for r in c.recall)  # every head reaches the target (dense: 1.0)
        assert c.dense or c.density <= max_density + 1e-12
        assert c.per_group or len({g.candidate for g in c.groups}) == 1


def test_sums_to_table_and_lengths_combine():
    t = table_from_sums(5, {"mass": [[50.0, 40.0]], "read": [[30]], "tokens": 50, "causal": 60})
    assert t.recall == [[1.0, 0.8]] and t.density == [[0.5]]
    u = LayerTable(5, [[0.9, 0.9]], [[0.3]])
    both = combine([t, u])
    assert both.recall == [[0.9, 0.8]] and both.density == [[pytest.approx(0.4)]]


def test_row_quantile_judges_by_the_worst_rows():
    """Candidate 0 is cheaper and reaches 0.95 on the mean, but a tenth of its queries sit in rows at
    recall 0.5; candidate 1 holds 0.96 in every row. The mean takes 0, the 5% row quantile takes 1."""
    bins = 100
    hist0, hist1 = [0.0] * bins, [0.0] * bins
    hist0[50], hist0[99] = 10.0, 90.0
    hist1[96] = 100.0
    sums = {"mass": [[95.0], [96.0]], "read": [[30], [50]], "rows": [[hist0], [hist1]], "tokens": 100, "causal": 100}
    assert choose([table_from_sums(0, sums)], 0.95)[0].groups[0].candidate == 0
    worst = table_from_sums(0, sums, row_quantile=0.05)
    assert worst.recall == [[0.5], [0.96]]
    assert choose([worst], 0.95)[0].groups[0].candidate == 1
    assert histogram_quantile(hist0, 0.2) == 0.99 and histogram_quantile([0.0] * bins, 0.1) == 1.0


def test_answer_rows_reject_a_candidate_whose_mean_passes():
    """Candidate 0 is cheaper and reaches 0.95 on the mean, but one q head keeps only 0.6 of the mass on a
    prompt's final query block (the question's rows); candidate 1 reaches 0.95 on both."""
    table = LayerTable(0, [[0.97, 0.96], [0.98, 0.97]], [[0.3], [0.5]])
    answer = [[0.99, 0.6], [0.96, 0.95]]
    assert choose([table], 0.95)[0].groups[0].candidate == 0
    both = require_answer_rows(table, answer)
    assert both.recall == [[0.97, 0.6], [0.96, 0.95]] and both.density == table.density
    assert choose([both], 0.95)[0].groups[0].candidate == 1


def test_answer_rows_from_the_sweep_lowest_over_prompts_and_lengths():
    """The run takes each prompt's block ending at its last token (not another chunk's end), the lowest
    over a length's prompts, then over the lengths; a prompt whose final block went unmeasured leaves
    its length out, and choosing by the answer rows then says so."""
    from vllm_sparse.calibrate.run import CalibrationSpec, answer_row_recall, chosen_by

    def final(*recall):  # one candidate, 2 q heads, 10 queries in the block
        return {"mass": [[10 * r for r in recall]], "queries": [10.0, 10.0]}

    sweeps = [{0: {"final_block": {512: final(0.1, 0.1), 600: final(0.9, 0.8)}}},
              {"0": {"final_block": {"601": final(0.7, 0.95)}}},  # keys as JSON would have them
              {0: {"final_block": {1000: final(0.99, 0.98)}}},
              {0: {"final_block": {512: final(0.5, 0.5)}}}]  # a 1000-token prompt's last block not measured
    answers = answer_row_recall(sweeps, [[600], [601], [1000], [1000]], [600, 600, 1000, 1000], [0])
    assert answers == {"600": {"0": [[pytest.approx(0.7), pytest.approx(0.8)]]}}
    spec = CalibrationSpec("m", [600], [], [], answer_rows=True)
    table = LayerTable(0, [[0.9, 0.75]], [[0.4]])
    assert chosen_by([table], answers, spec)[0].recall == [[pytest.approx(0.7), 0.75]]
    assert chosen_by([table], answers, CalibrationSpec("m", [600], [], []))[0] is table
    with pytest.raises(ValueError, match="1000-token prompts was not measured in layer 0"):
        chosen_by([table], answers, CalibrationSpec("m", [600, 1000], [], [], answer_rows=True))
    with pytest.raises(ValueError, match="no answer-row measurements"):
        chosen_by([table], None, spec)


def test_retrieval_calibration_prompts(tiny_llama):
    """--data builtin-retrieval: prompts of exactly the requested tokens, the same every time, each with
    its lockers at spread depths in the prose and a question about one at the end, in none of the eval
    tasks' wording."""
    from transformers import PreTrainedTokenizerFast  # the tiny Llama's (AutoTokenizer's import takes seconds)

    from vllm_sparse.calibrate.run import CalibrationSpec, prompts_for
    from vllm_sparse.eval import tasks

    tok = PreTrainedTokenizerFast.from_pretrained(tiny_llama)
    spec = CalibrationSpec("m", [700, 1200], [], [], data="builtin-retrieval", samples=2)
    prompts = prompts_for(tok, spec)
    assert prompts == prompts_for(tok, spec)
    every = [p for n in spec.lengths for p in prompts[n]]
    assert len(set(every)) == 4
    for n in spec.lengths:
        assert [tasks._count(tok, p) for p in prompts[n]] == [n, n]
    filler = prompts_for(tok, CalibrationSpec("m", [700], [], [], samples=1))[700][0]
    prompt, item = tasks.retrieval_prompt(tok, filler, 700, seed=0)
    assert prompt == prompts[700][0]
    body = prompt.split("\n\n", 1)[1].rsplit("\n\n", 1)[0]  # between the intro and the question
    prose = re.sub(r"\nThe locker of \w+ holds item [A-Z]{2}-\d{3}\.", "", body)
    assert filler.startswith(prose) and len(prose) > 0.5 * len(filler)  # the builtin prose, cut to fit
    owner = prompt.rsplit("locker of ", 1)[1].split(" holds")[0]
    assert prompt.endswith(tasks.LOCKER_QUESTION.format(owner=owner))
    needle = tasks.LOCKER.format(owner=owner, item=item)
    assert prompt.count(needle) == 1 and prompt.index(needle) < 0.9 * len(prompt)
    assert prompt.count("The locker of ") == 5  # four lockers, one question
    eval_wording = [tasks.INTRO, tasks.QUESTION, "pass key", "special magic number", "VAR ", *tasks._SENTENCES]
    assert not any(w in p for w in eval_wording for p in every)
    assert not set(tasks._OWNERS) & set(tasks._WORDS)


def test_candidate_short_forms():
    est = parse_estimators("antidiagonal:stride=16,lowbit:bits=4")
    assert est == [{"name": "antidiagonal", "stride": 16}, {"name": "lowbit", "bits": 4}]
    bud = parse_budgets("top_p=0.9,keep_ratio=0.1:share=group:local_blocks=2")
    assert bud == [{"top_p": 0.9, "sink_blocks": 1, "local_blocks": 1},
                   {"keep_ratio": 0.1, "share": "group", "local_blocks": 2, "sink_blocks": 1}]
    cands = candidates(est, bud)
    assert len(cands) == 4 and label(cands[3]) == "lowbit(bits=4) keep_ratio=0.1 share=group local_blocks=2"
    for bad, msg in (("magic", "unknown estimator 'magic'"), ("antidiagonal:strid=8", "strid"),
                     ("dense", "keeps every block"), ("antidiagonal:8", "key=value")):
        with pytest.raises(ValueError, match=msg):
            parse_estimators(bad)
    for bad, msg in (("top_p=2", "less than or equal to 1"), ("top_p=0.9:top_k=3", "exactly one of")):
        with pytest.raises(ValueError, match=msg):
            parse_budgets(bad)


SHAPE = ModelShape("org/tiny-model", ("LlamaForCausalLM",), num_layers=4, num_q_heads=4, num_kv_heads=2)


def test_written_plan_validates_and_carries_every_rules_figures():
    cands = candidates(parse_estimators("antidiagonal:stride=8,sink_local"),
                       parse_budgets("top_p=0.9,keep_ratio=0.2"))  # 4 candidates
    tables = [LayerTable(0, [[0.99] * 4, [0.96] * 4, [0.5] * 4, [0.5] * 4], [[0.7] * 2, [0.3] * 2, [0.2] * 2,
                                                                            [0.2] * 2]),
              LayerTable(1, [[0.99, 0.99, 0.5, 0.5], [0.6, 0.6, 0.97, 0.97], [0.5] * 4, [0.5] * 4],
                         [[0.2, 0.2], [0.2, 0.2], [0.1, 0.1], [0.1, 0.1]]),
              LayerTable(2, [[0.5] * 4] * 4, [[0.1] * 2] * 4)]
    labels = [label(c) for c in cands]
    choices = choose(tables, 0.95, labels=labels)
    verified = {0: LayerTable(0, [[0.955, 0.96, 0.97, 0.98]], [[0.31, 0.29]])}
    text = render_plan(["Calibrated plan for org/tiny-model", "target recall: 0.95"], ["*tiny-model*"],
                       {"kind": "calibrated", "source": "test", "command": "vllm-sparse calibrate --model x"},
                       {"block_size": 64, "dense_below": 256, "decode": "dense", "union_tile": 1}, choices, cands,
                       verified)
    plan = resolve_plan(parse_config(yaml.safe_load(text), "plan.yaml"), SHAPE, "plan.yaml", explicit=True)
    assert text.startswith("# Calibrated plan for org/tiny-model\n# target recall: 0.95\n")
    assert (plan.block_size, plan.dense_below, plan.union_tile) == (64, 256, 1)
    h = plan.layer(0).heads[0]
    assert (h.estimator, h.budget.keep_ratio) == ("antidiagonal", 0.2) and len(set(plan.layer(0).heads)) == 1
    layer1 = plan.layer(1).heads  # per KV head: antidiagonal tau 0.9 for heads 0-1, keep 20% for 2-3
    assert layer1[0] == layer1[1] and layer1[0].budget.top_p == 0.9
    assert layer1[2] == layer1[3] and layer1[2].budget.keep_ratio == 0.2
    assert not plan.layer(2).is_sparse and not plan.layer(3).is_sparse  # 2: no candidate reaches; 3: not measured
    assert ("# layer 0: antidiagonal(stride=8) keep_ratio=0.2: recall 0.960 mean, 0.960 lowest q head; kept 30.0% "
            "| verified: recall 0.966 mean, 0.955 lowest q head; kept 30.0%") in text
    assert "# KV head 0 (q heads 0-1): antidiagonal(stride=8) top_p=0.9: recall 0.990 mean" in text
    assert "# KV head 1 (q heads 2-3): antidiagonal(stride=8) keep_ratio=0.2: recall 0.970 mean" in text
    assert "# layer 2: dense: no candidate reaches recall 0.95 in every head" in text
    data = yaml.safe_load(text)["models"][0]
    assert data["provenance"] == {"kind": "calibrated", "source": "test", "command": "vllm-sparse calibrate --model x"}


def test_verified_figures_from_the_audits_sums():
    from vllm_sparse.calibrate.run import _verified_table

    stats = [{"head_mass": [9.0, 8.0], "head_tokens": 10, "kv_read": [3], "kv_causal": 6},
             {"head_mass": [10.0, 10.0], "head_tokens": 10, "kv_read": [6], "kv_causal": 6}, {}]
    t = _verified_table(4, stats)
    assert t.layer == 4 and t.recall == [[0.95, 0.9]] and t.density == [[0.75]]
    assert _verified_table(4, [{}, {"unions": 3}]) is None
