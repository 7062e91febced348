"""Answers lost and gained against dense over several `vllm-sparse eval` results (seeds, runs), per plan.

    python benchmarks/fidelity_tally.py benchmarks/results/eval_gemma_antidiagonal-10-s16-int8-tail_h100_20_*.json

The project's fidelity standard is dense's answers, prompt by prompt: "lost" counts prompts whose answer dense's
completion holds and the plan's does not (the task's own check, scored by the eval's `answers_against`), "gained"
the reverse, "same" completions equal token for token. Results of one plan (their `config`) are summed; each lost
prompt is named by task, length, number (the prompt's seed: the run's `--seed` + sample; results written before
`sample` was recorded: their order in the file) and the run's seed (a pass key's prompt also depends on the sample's
place). Results of `eval --dense-twin-chunk` also count dense's own spread: the second dense run's lost / gained
against the first. Prints a table and, with --json, writes it.

Two exact tests read the counts (a few answers in hundreds move; the counts alone do not say whether that is more
than chance): the sign test of lost against gained (McNemar's exact test: were the plan as accurate as dense, each
moved answer would be a loss or a gain with even odds, so P(at least `lost` of `lost + gained`)); and, where dense ran
twice, the same test on the prompts whose answer only one of them moved (the plan, or dense again): P(at least the
plan's share of those, were the plan to move answers no more often than dense's own chunk size does). A small value
says the plan loses (moves) more than chance would; a large one says these prompts cannot tell.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from vllm_sparse.eval.harness import answers_against, at_least_half_chance, moved_only
from vllm_sparse.eval.tasks import TASKS


def numbered(result: dict) -> list[dict]:
    """The result's completions, each with its `sample` number (recorded, or from its place in the file)."""
    seen: dict[tuple, int] = defaultdict(int)
    out = []
    for c in result["completions"]:
        cell = (c["task"], c["length"])
        out.append({**c, "sample": c.get("sample", result.get("seed", 0) + seen[cell])})
        seen[cell] += 1
    return out


def _key(result: dict, c: dict) -> tuple:
    return (c["task"], c["length"], c["sample"], result.get("seed", 0))


def lend_twins(results: list[dict], twins: list[dict]) -> None:
    """Each completion without a second dense run takes the one `twins` hold for its prompt (see the docstring)."""
    if not twins:
        return
    held = {_key(t, c): (c["dense"], c["dense_twin"], t["dense_twin"]) for t in twins for c in numbered(t)
            if "dense_twin" in c}
    for r in results:
        if "dense_twin" in r:
            continue
        completions, lent = numbered(r), None
        for c in completions:
            key = _key(r, c)
            if key not in held:
                raise SystemExit(f"--twins: no second dense run for {key[0]} {key[1]} #{key[2]} (seed {key[3]}) of "
                                 f"{r['config']}")
            dense, twin, lent = held[key]
            if dense != c["dense"]:
                raise SystemExit(f"--twins: {key[0]} {key[1]} #{key[2]} (seed {key[3]}): {r['config']}'s dense "
                                 "completion differs from the twin's first dense run: not the same prompt or engine")
            c["dense_twin"] = twin
        r["completions"], r["dense_twin"] = completions, lent


def _add(row: dict, prefix: str, one: dict, name: str) -> None:
    """One prompt's `answers_against` (the eval's scoring) into the row's `prefix` counts; its name if lost."""
    row[prefix + "lost"] += one["lost"]
    row[prefix + "gained"] += one["gained"]
    row[prefix + "same"] += one["same_text"]
    if one["lost"]:
        row[prefix + "lost_prompts"].append(name)


def tally(results: list[dict]) -> dict[str, dict]:
    """{config: {prompts, dense, lost, gained, same, lost_prompts}} over the results."""
    rows: dict[str, dict] = {}
    for r in results:
        row = rows.setdefault(r["config"], {"prompts": 0, "dense": 0, "lost": 0, "gained": 0, "same": 0,
                                            "lost_prompts": [], "seeds": [], "twin_prompts": 0, "twin_lost": 0,
                                            "twin_gained": 0, "twin_same": 0, "twin_lost_prompts": [],
                                            "twin_chunks": [], "moved_plan_only": 0, "moved_twin_only": 0})
        row["seeds"].append(r.get("seed", 0))
        if "dense_twin" in r:  # the second dense run's prefill chunk size
            row["twin_chunks"].append(r["dense_twin"]["max_num_batched_tokens"])
        for c in numbered(r):
            check = TASKS[c["task"]].check
            name = f"{c['task']} {c['length']} #{c['sample']} (seed {r.get('seed', 0)})"
            row["prompts"] += 1
            row["dense"] += check(c["dense"], c["answer"])
            _add(row, "", answers_against(check, [c["answer"]], [c["dense"]], [c["sparse"]]), name)
            if "dense_twin" in c:  # (`eval --dense-twin-chunk`: dense again, chunked otherwise)
                row["twin_prompts"] += 1
                _add(row, "twin_", answers_against(check, [c["answer"]], [c["dense"]], [c["dense_twin"]]), name)
                row["moved_plan_only"] += moved_only([c], "sparse", "dense_twin")
                row["moved_twin_only"] += moved_only([c], "dense_twin", "sparse")
    for row in rows.values():
        row["p_loses"] = at_least_half_chance(row["lost"], row["lost"] + row["gained"])
        if row["twin_prompts"]:
            row["p_moves_more"] = at_least_half_chance(row["moved_plan_only"],
                                                       row["moved_plan_only"] + row["moved_twin_only"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="`vllm-sparse eval --json` files")
    ap.add_argument("--twins", nargs="+", default=[], metavar="RESULT",
                    help="`eval --dense-twin-chunk` results whose second dense run pairs with results that ran dense "
                         "once, prompt by prompt")
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args()
    results = [json.loads(Path(p).read_text()) for p in args.results]
    lend_twins(results, [json.loads(Path(p).read_text()) for p in args.twins])
    rows = tally(results)
    width = max(len(c) for c in rows)
    print(f"{'plan':<{width}} {'seeds':>8} {'prompts':>7} {'dense':>5} {'lost':>4} {'gained':>6} {'same':>5}  "
          "lost prompts")
    for config, r in rows.items():
        seeds = ",".join(map(str, sorted(set(r["seeds"]))))
        print(f"{config:<{width}} {seeds:>8} {r['prompts']:>7} {r['dense']:>5} {r['lost']:>4} {r['gained']:>6} "
              f"{r['same']:>5}  {'; '.join(r['lost_prompts']) or '-'}")
    for config, r in rows.items():
        print(f"sign test ({config}): P(>= {r['lost']} of {r['lost'] + r['gained']} moved answers lost | as accurate "
              f"as dense) = {r['p_loses']:.3f}")
        if r["twin_prompts"]:  # dense's own spread, where the results ran dense twice
            chunks = ",".join(map(str, sorted(set(r["twin_chunks"]))))
            print(f"dense again in {chunks}-token chunks ({config}): of {r['twin_prompts']} prompts lost "
                  f"{r['twin_lost']}, gained {r['twin_gained']}, same {r['twin_same']}: "
                  f"{'; '.join(r['twin_lost_prompts']) or '-'}")
            only = r["moved_plan_only"] + r["moved_twin_only"]
            print(f"  answers moved by the plan only {r['moved_plan_only']}, by dense again only "
                  f"{r['moved_twin_only']}: P(>= {r['moved_plan_only']} of {only} | the plan moves no more than "
                  f"dense's chunk size) = {r['p_moves_more']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
