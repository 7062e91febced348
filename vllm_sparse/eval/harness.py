"""`vllm-sparse eval`: the same model through vLLM twice in one process, dense then sparse.

Accuracy on synthetic long-context tasks per (length, task), the kept density per layer
(requested by the budgets, and after block union), and optionally the per-layer operator check:
on real text (Python's own sources), the sparse attention output against dense attention —
relative error and the share of the dense attention mass the kept blocks hold.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_sparse import envs
from vllm_sparse.eval.tasks import TASKS, real_text_prompt


@dataclass
class EngineRun:
    label: str
    completions: list[list[str]]  # per prompt group
    prompt_tokens: list[list[int]]
    seconds: float
    layers: list[dict]  # per prompt group: layer -> {unions, requested/union density, rel_err, kept_mass}


def instrument(worker, enabled: bool, audit: bool, candidates: list[dict] | None) -> None:
    """In each worker: this engine's eval counters, dense audit and calibration candidates, from nothing counted.
    The workers' `STATS` reads them from the environment once, at import: an engine whose workers live in this
    process (VLLM_ENABLE_V1_MULTIPROCESSING=0) after another one would keep the first engine's settings."""
    from vllm_sparse.selection.stats import STATS

    STATS.enabled, STATS.audit = enabled, audit
    STATS.calibrate(candidates)
    STATS.reset()


def read_stats(worker):
    from vllm_sparse.selection.stats import STATS

    out = {}
    for layer, st in STATS.snapshot().items():
        audit = st.audit
        out[layer] = {
            "unions": st.unions, "requested_density": st.requested_density, "union_density": st.union_density,
            "rel_err": statistics.mean(a[0] for a in audit) if audit else None,
            "rel_err_worst": max((a[0] for a in audit), default=None),
            "kept_mass": statistics.mean(a[1] for a in audit) if audit else None,
            "kept_mass_worst": min((a[1] for a in audit), default=None),
        }
        if st.head_mass:  # audit, per head, over the rows past dense_below
            out[layer].update(head_mass=st.head_mass, head_tokens=st.head_tokens, kv_read=st.kv_read,
                              kv_causal=st.kv_causal, head_recall=st.head_recall, kv_density=st.kv_density)
    STATS.reset()
    return out


def read_calibration(worker):
    """`vllm-sparse calibrate`'s sums per layer since the last read (`backend/calibration.py`)."""
    from vllm_sparse.selection.stats import STATS

    out = {layer: st.raw() for layer, st in sorted(STATS.calibration.items())}
    STATS.reset()
    return out


# collective_rpc with a function (the stats readers) needs vLLM's pickle path: for this engine only
@envs.set_for(vllm={"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"})
def run_engine(model: str, groups: list[list[str]], config: str | None, engine: dict, label: str,
               max_tokens: int = 16, read=read_stats, on_group=None) -> EngineRun:
    """Generate greedily for each group of prompts in turn; stats are read per group (`read`, in the
    workers; rank 0's), and `on_group()` called after each (a progress bar)."""
    from vllm import LLM, SamplingParams

    kw = dict(model=model, seed=0, **engine)
    if config is not None:
        kw.update(attention_backend="sparse", additional_config={"sparse": {"config": config}})
    llm = LLM(**kw)
    if config is not None:  # (the settings the caller put in the environment, as a worker of its own would read them)
        from vllm_sparse.selection.stats import SparseStats

        now = SparseStats()
        llm.collective_rpc(instrument, args=(now.enabled, now.audit, now.candidates))
    run = EngineRun(label, [], [], 0.0, [])
    try:
        for prompts in groups:
            t0 = time.perf_counter()
            outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
            run.seconds += time.perf_counter() - t0
            run.completions.append([o.outputs[0].text for o in outs])
            run.prompt_tokens.append([len(o.prompt_token_ids) for o in outs])
            run.layers.append({} if config is None else llm.collective_rpc(read)[0])
            if on_group is not None:
                on_group()
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return run


def full_attention_layers(model: str) -> list[int]:
    """The model's layers with full attention (the ones a plan may make sparse)."""
    from vllm_sparse.config.plan import ModelShape

    shape = ModelShape.from_pretrained(model)
    return [layer for layer in range(shape.num_layers) if shape.is_full_attention(layer)]


def kept_over_full_layers(layers: dict, full_layers: list[int]) -> float | None:
    """Kept density over every full-attention layer, those the plan leaves dense counting 100%: what
    compares plans that make different layers sparse (the mean over sparse layers alone does not)."""
    by_layer = {int(k): v["union_density"] for k, v in layers.items()}
    return statistics.mean(by_layer.get(layer, 1.0) for layer in full_layers) if full_layers else None


def answers_against(check, answers: list[str], reference: list[str], other: list[str]) -> dict:
    """Prompt by prompt against `reference`'s answers: {lost, gained, same_text} of `other` (lost: the task's
    check finds the answer in the reference's completion and not in the other's; gained: the reverse)."""
    ref_ok = [check(c, a) for c, a in zip(reference, answers)]
    other_ok = [check(c, a) for c, a in zip(other, answers)]
    return {"lost": sum(r and not o for r, o in zip(ref_ok, other_ok)),
            "gained": sum(o and not r for r, o in zip(ref_ok, other_ok)),
            "same_text": sum(r == o for r, o in zip(reference, other))}


# Stats are counted inside vLLM's worker processes, which inherit this (for this eval's engines only).
@envs.set_for(VLLM_SPARSE_STATS="1")
def evaluate(model: str, config: str, lengths: list[int], tasks: list[str], samples: int, engine: dict,
             operator_check: int | None = None, seed: int = 0, max_tokens: int = 32,
             dense_twin_chunk: int | None = None) -> dict:
    """`dense_twin_chunk`: dense once more with prefill chunks of that many tokens (max_num_batched_tokens): the
    same attention, summed in another order and batched in other shapes, so its answers are as much dense's as
    the first run's. What it loses and gains against the first run is one sample of how far dense's own greedy
    answers move on these prompts (a lower bound on that spread): a prompt it flips may be borderline for dense
    itself, and a plan's lost / gained are read beside it."""
    from transformers import AutoTokenizer

    from vllm_sparse.config.loader import load_config
    from vllm_sparse.config.plan import ModelShape, resolve_plan

    # The plan must resolve for this model before the dense run, not after it (a typo costs no engine run).
    resolve_plan(load_config(config), ModelShape.from_pretrained(model), config, explicit=True)
    tok = AutoTokenizer.from_pretrained(model)
    # One prompt group per length, so kept densities are read per length.
    groups = [[(task, *TASKS[task](tok, n, i, seed + i)) for task in tasks for i in range(samples)] for n in lengths]
    prompts = [[c[1] for c in g] for g in groups]
    empty = EngineRun("none", [[] for _ in groups], [[] for _ in groups], 0.0, [{} for _ in groups])
    dense = run_engine(model, prompts, None, engine, "dense", max_tokens) if tasks else empty
    twin = None
    if dense_twin_chunk and tasks:
        twin = run_engine(model, prompts, None, {**engine, "max_num_batched_tokens": dense_twin_chunk},
                          "dense-twin", max_tokens)
    sparse = run_engine(model, prompts, config, engine, "sparse", max_tokens) if tasks else empty
    rows, completions = [], []
    full = full_attention_layers(model)
    for gi, (n, group) in enumerate(zip(lengths, groups)):
        layers = sparse.layers[gi]
        union = statistics.mean(s["union_density"] for s in layers.values()) if layers else None
        union_all = kept_over_full_layers(layers, full)
        for task in tasks:
            idx = [i for i, c in enumerate(group) if c[0] == task]
            check = TASKS[task].check
            answers = [group[i][2] for i in idx]
            dense_text = [dense.completions[gi][i] for i in idx]
            sparse_text = [sparse.completions[gi][i] for i in idx]
            row = {
                "length": n, "task": task, "samples": len(idx),
                "prompt_tokens": statistics.mean(dense.prompt_tokens[gi][i] for i in idx),
                "dense_acc": sum(check(c, a) for c, a in zip(dense_text, answers)) / len(idx),
                "sparse_acc": sum(check(c, a) for c, a in zip(sparse_text, answers)) / len(idx),
                # The standard is dense's answers, prompt by prompt: equal accuracies can hide a lost and a gained.
                **answers_against(check, answers, dense_text, sparse_text),
                "kept_union": union,
                "kept_all": union_all,
            }
            if twin is not None:
                row["twin"] = answers_against(check, answers, dense_text, [twin.completions[gi][i] for i in idx])
            rows.append(row)
        # `sample`: the prompt's number in its task and length (prompt seed + sample), to name a lost one.
        completions += [{"task": c[0], "length": n, "sample": seed + i % samples, "answer": c[2], "dense": d,
                         "sparse": s, **({} if twin is None else {"dense_twin": twin.completions[gi][i]})}
                        for i, (c, d, s) in enumerate(zip(group, dense.completions[gi], sparse.completions[gi]))]
    result = {"model": model, "config": config, "seed": seed, "rows": rows,
              "layers": {str(n): layers for n, layers in zip(lengths, sparse.layers)},
              "seconds": {"dense": dense.seconds, "sparse": sparse.seconds}, "completions": completions}
    if twin is not None:
        result["dense_twin"] = {"max_num_batched_tokens": dense_twin_chunk,
                                "of_dense": engine.get("max_num_batched_tokens")}
        result["seconds"]["dense_twin"] = twin.seconds
    if operator_check:
        with envs.set_for(VLLM_SPARSE_AUDIT="1"):
            audit = run_engine(model, [[real_text_prompt(tok, operator_check)]], config, engine, "audit", 1)
        result["operator_check"] = {"length": operator_check, "layers": audit.layers[0]}
    return result


def at_least_half_chance(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2): the one-sided exact sign test (McNemar's exact test on paired answers;
    1.0 where nothing moved). Were the plan as accurate as dense, each answer it moves would be a loss or a gain with
    even odds: `at_least_half_chance(lost, lost + gained)` is how likely so many losses are by chance alone."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n if n else 1.0


def moved_only(completions: list[dict], one: str, other: str) -> int:
    """Prompts whose answer `one` ("sparse", "dense_twin") moves against dense's (right where dense is wrong, or
    the reverse) and `other` leaves: the discordant count of the paired test of which moves answers more."""
    moved = 0
    for c in completions:
        check = TASKS[c["task"]].check
        dense = check(c["dense"], c["answer"])
        moved += check(c[one], c["answer"]) != dense and check(c[other], c["answer"]) == dense
    return moved


def lost_answer(completion: dict, other: str = "sparse") -> bool:
    """Whether dense's completion of this prompt holds its answer and `other`'s (the plan's, or "dense_twin")
    does not."""
    check = TASKS[completion["task"]].check
    return check(completion["dense"], completion["answer"]) and not check(completion[other], completion["answer"])


def format_report(result: dict) -> str:
    lines = [f"model {result['model']}  config {result['config']}", "",
             f"{'length':>7} {'task':<10} {'n':>3} {'tokens':>7} {'dense':>6} {'sparse':>7} {'lost':>5} "
             f"{'gained':>6} {'same':>5} {'kept':>6} {'kept(all)':>9}"]
    for r in result["rows"]:
        kept = "-" if r["kept_union"] is None else f"{r['kept_union']:.1%}"
        kept_all = "-" if r.get("kept_all") is None else f"{r['kept_all']:.1%}"
        lines.append(f"{r['length']:>7} {r['task']:<10} {r['samples']:>3} {r['prompt_tokens']:>7.0f} "
                     f"{r['dense_acc']:>6.0%} {r['sparse_acc']:>7.0%} {r['lost']:>5} {r['gained']:>6} "
                     f"{r['same_text']:>5} {kept:>6} {kept_all:>9}")
    n_lost, n_gained = (sum(r[k] for r in result["rows"]) for k in ("lost", "gained"))  # the plan's, all cells
    if result["rows"]:
        lines += ["", "lost / gained: prompts whose answer dense gives and the plan does not, and the reverse; same: "
                  "completions equal to dense's, token for token"]
        lost = [f"{c['task']} {c['length']} #{c['sample']}" for c in result["completions"] if lost_answer(c)]
        if lost:  # (#: the prompt's seed, from --seed on)
            lines.append(f"lost (--seed {result['seed']}): " + ", ".join(lost))
        if n_lost + n_gained:  # (a few answers moving is read against chance, not by eye)
            lines.append(f"sign test: P(>= {n_lost} of {n_lost + n_gained} moved answers lost | the plan as accurate "
                         f"as dense) = {at_least_half_chance(n_lost, n_lost + n_gained):.3f}")
    twin = result.get("dense_twin")
    if twin and result["rows"]:
        total = {k: sum(r["twin"][k] for r in result["rows"]) for k in ("lost", "gained", "same_text")}
        prompts = sum(r["samples"] for r in result["rows"])
        lines += ["", f"dense again with prefill chunks of {twin['max_num_batched_tokens']} tokens (not "
                  f"{twin['of_dense']}): lost {total['lost']}, gained {total['gained']}, same {total['same_text']} "
                  f"of {prompts} against the first dense run (one sample of how far dense's own answers move here; "
                  f"the plan: lost {n_lost}, gained {n_gained})"]
        flipped = [f"{c['task']} {c['length']} #{c['sample']}" for c in result["completions"]
                   if lost_answer(c, "dense_twin")]
        if flipped:
            lines.append(f"lost by dense again (--seed {result['seed']}): " + ", ".join(flipped))
        plan_only = moved_only(result["completions"], "sparse", "dense_twin")
        twin_only = moved_only(result["completions"], "dense_twin", "sparse")
        if plan_only + twin_only:
            lines.append(f"answers moved by the plan only {plan_only}, by dense again only {twin_only}: "
                         f"P(>= {plan_only} of {plan_only + twin_only} | the plan moves no more than dense's chunk "
                         f"size) = {at_least_half_chance(plan_only, plan_only + twin_only):.3f}")
    lines += ["", "kept: share of causal KV blocks attended after union, mean over sparse layers; kept(all): mean "
              "over every full-attention layer, dense ones counting 100%", "",
              f"{'length':>7} {'layer':>5} {'unions':>6} {'kept(req)':>9} {'kept(union)':>11}"]
    for n, layers in result["layers"].items():
        for layer, s in sorted(layers.items(), key=lambda kv: int(kv[0])):
            lines.append(f"{n:>7} {layer:>5} {s['unions']:>6} {s['requested_density']:>9.1%} "
                         f"{s['union_density']:>11.1%}")
    op = result.get("operator_check")
    if op:
        lines += ["", f"operator check on real text, {op['length']} tokens (mean over unions, and the worst)",
                  f"{'layer':>5} {'rel err':>8} {'worst':>7} {'kept mass':>9} {'worst':>7} {'kept(union)':>11}"]
        for layer, s in sorted(op["layers"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"{layer:>5} {s['rel_err']:>8.2%} {s['rel_err_worst']:>7.1%} {s['kept_mass']:>9.2%} "
                         f"{s['kept_mass_worst']:>7.1%} {s['union_density']:>11.1%}")
    secs = result["seconds"]
    if result["rows"]:
        again = f", dense again {secs['dense_twin']:.1f} s" if "dense_twin" in secs else ""
        lines += ["", f"generate time: dense {secs['dense']:.1f} s, sparse {secs['sparse']:.1f} s{again}"]
    return "\n".join(lines)


def save(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=1, default=lambda o: asdict(o)))
