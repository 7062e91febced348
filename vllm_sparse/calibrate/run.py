"""`vllm-sparse calibrate`: run the model in vLLM on calibration prompts, measure every candidate estimator
and budget per layer and q head, choose a plan, write it, and check it.

1. Sweep: every full-attention layer takes the sparse path in calibration mode (`backend/calibration.py`):
   it attends densely, so each layer sees the dense model's activations, and for every candidate sums
   the dense attention mass its blocks would hold (per q head) and the blocks its union reads (per KV
   head), over the rows past dense_below.
2. Choose (`choose.py`, pure): per layer, the candidate reaching the target recall in every q head at the
   lowest kept density; per KV head's group of q heads where that reads less; dense where none does.
   With --answer-rows, it must also reach the target on each prompt's final query block (the rows that
   produce the answer), lowest over the prompts.
3. Write the YAML (`plan_yaml.py`) and validate it against the model, as the engine would.
4. Verify (unless --no-verify): run the written plan on the same prompts with the audit on (the plan's
   sparse outputs now feed the later layers) and record its recall and kept density in the YAML too.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from vllm_sparse import envs
from vllm_sparse.calibrate.candidates import candidates as make_candidates
from vllm_sparse.calibrate.candidates import check_candidates, head_plan_of, label
from vllm_sparse.calibrate.choose import (
    LayerChoice,
    LayerTable,
    choose,
    combine,
    lowest,
    require_answer_rows,
    table_from_sums,
)
from vllm_sparse.calibrate.plan_yaml import render_plan

BUILTIN_DATA = {
    "builtin": "builtin (Python's language reference, English prose)",
    "builtin-code": "builtin-code (Python's standard-library sources)",
    "builtin-retrieval": "builtin-retrieval (the prose with lockers and their items at spread depths, and a "
                         "question about one at the end)",
}


@dataclass
class CalibrationSpec:
    model: str
    lengths: list[int]
    estimators: list[dict]
    budgets: list[dict]
    target: float = 0.95
    data: str = "builtin"  # or a text file
    samples: int = 1  # prompts per length
    max_density: float = 0.9
    per_group: bool = True
    block_size: int = 128
    dense_below: int = 8192
    union_tile: int | None = 1
    engine: dict = field(default_factory=dict)
    verify: bool = True
    command: str = ""
    row_quantile: float | None = None  # recall of the worst rows (this share of queries) instead of the mean
    answer_rows: bool = False  # also the target on each prompt's final query block (the rows of its answer)


def prompts_for(tokenizer, spec: CalibrationSpec) -> dict[int, list[str]]:
    from vllm_sparse.eval.tasks import builtin_text, retrieval_prompt, stdlib_text, text_windows

    need = max(spec.lengths) * spec.samples
    if spec.data in ("builtin", "builtin-retrieval"):
        text = builtin_text(tokenizer, need)
    elif spec.data == "builtin-code":
        text = stdlib_text(tokenizer, need)
    else:
        text = Path(spec.data).read_text(errors="replace")
    try:
        windows = {n: text_windows(tokenizer, text, n, spec.samples) for n in spec.lengths}
    except ValueError as e:
        raise ValueError(f"--data {spec.data}: {e}") from None
    if spec.data != "builtin-retrieval":
        return windows
    seeds = iter(range(len(spec.lengths) * spec.samples))  # another question in every prompt
    return {n: [retrieval_prompt(tokenizer, filler, n, next(seeds))[0] for filler in fillers]
            for n, fillers in windows.items()}


def probe_config(shape, spec: CalibrationSpec, path: Path) -> None:
    """The config the sweep's engine runs: every full-attention layer on the sparse path (which, while
    calibrating, attends densely and measures), with the plan's block, dense_below and union tile. Its
    estimator is the candidate whose fused scorer needs the most workspace, so the engine reserves
    enough for every candidate (on GPUs)."""
    from vllm_sparse.estimators.registry import get_estimator

    def rows(c):
        hp = head_plan_of(c)
        return get_estimator(hp.estimator).workspace_rows(hp.params, spec.engine.get("max_num_batched_tokens", 4096))

    first = max(make_candidates(spec.estimators, spec.budgets), key=rows)
    entry = {"match": {"architectures": list(shape.architectures), "names": ["*"]},
             "block_size": spec.block_size, "dense_below": spec.dense_below, "union_tile": spec.union_tile,
             "layers": [{"layers": "full_attention", **first}]}
    path.write_text(yaml.safe_dump({"version": 1, "models": [entry]}, sort_keys=False))


def _summed(a, b):
    """Element-wise sum of equally nested lists (or of two numbers)."""
    return [_summed(x, y) for x, y in zip(a, b)] if isinstance(a, list) else a + b


def _add(into: dict, sums: dict) -> None:
    for layer, s in sums.items():
        acc = into.get(layer)
        if acc is None:
            into[layer] = json.loads(json.dumps(s))
            continue
        for key in ("mass", "read", "rows", "tokens", "causal"):
            acc[key] = _summed(acc[key], s[key])


def _verified_table(layer: int, stats: list[dict]) -> LayerTable | None:
    """The audit's per-head sums of one layer over a length's prompts -> a one-candidate table."""
    stats = [s for s in stats if s.get("head_mass")]
    if not stats:
        return None
    mass = [sum(s["head_mass"][h] for s in stats) for h in range(len(stats[0]["head_mass"]))]
    read = [sum(s["kv_read"][k] for s in stats) for k in range(len(stats[0]["kv_read"]))]
    tokens, causal = sum(s["head_tokens"] for s in stats), sum(s["kv_causal"] for s in stats)
    return table_from_sums(layer, {"mass": [mass], "read": [read], "tokens": tokens, "causal": causal})


def _meta() -> dict:
    import torch

    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        from importlib.metadata import version

        meta["vllm_sparse"] = version("vllm-sparse")
    except Exception:
        meta["vllm_sparse"] = "?"
    try:
        import vllm

        meta["vllm"] = vllm.__version__
    except Exception:
        meta["vllm"] = "?"
    meta["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return meta


def header_lines(spec: CalibrationSpec, shape, meta: dict, labels: list[str], verified: bool) -> list[str]:
    full = [i for i in range(shape.num_layers) if shape.is_full_attention(i)]
    sliding = "" if len(full) == shape.num_layers else \
        f"; the other {shape.num_layers - len(full)} (sliding window) always stay dense"
    data = BUILTIN_DATA.get(spec.data, spec.data)
    lines = [
        f"Calibrated plan for {spec.model}, written by `vllm-sparse calibrate` on {meta['date']}",
        f"(vllm-sparse {meta['vllm_sparse']}, vLLM {meta['vllm']}, {meta['device']}).",
        "Backed by: CALIBRATION (provenance below). Discovery never applies it on its own: name it by path.",
        "",
        f"command: {spec.command}",
        f"model: {spec.model} ({', '.join(shape.architectures)}; {shape.num_layers} layers, "
        f"{shape.num_q_heads} q heads, {shape.num_kv_heads} KV heads); calibrated layers: "
        f"{', '.join(map(str, full))}{sliding}",
        f"data: {data}, {spec.samples} prompt(s) per length; lengths: {', '.join(map(str, spec.lengths))} tokens",
        f"target recall: {spec.target:g} for every q head, where recall is the share of the head's dense attention",
        "  mass in the KV blocks it reads after union, " + (
            "mean over its queries past dense_below" if not spec.row_quantile else
            f"of its worst query block rows (the {spec.row_quantile:g} quantile of its queries past dense_below "
            "by their row's recall)") + ", lowest over the",
        "  lengths (measured with dense attention in every layer). kept: the share of causal KV blocks read",
        "  after union over those rows, mean over KV heads and lengths.",
        *(["answer rows: every q head must also reach the target on each prompt's final query block (the rows",
           "  that produce its answer), lowest over the prompts; each rule's recall below is the lower of the two."]
          if spec.answer_rows else []),
        f"max density {spec.max_density:g}: a layer (or KV head's group) whose cheapest candidate reads more "
        "stays dense.",
        f"candidates ({len(labels)}): {', '.join(labels)}",
    ]
    if verified:
        lines += ["verified: the written plan run on the same prompts with the audit on (its sparse outputs feed "
                  "the", "  later layers); figures after 'verified:'."]
    return lines


def write_plan(path: Path, spec: CalibrationSpec, shape, meta: dict, choices: list[LayerChoice],
               cands: list[dict], verified: dict[int, LayerTable] | None) -> str:
    labels = [label(c) for c in cands]
    name = Path(spec.model.rstrip("/")).name
    provenance = {"kind": "calibrated", "command": spec.command,
                  "source": f"vllm-sparse calibrate on {meta['date']} ({meta['device']}): recall target "
                            f"{spec.target:g}{' (answer rows too)' if spec.answer_rows else ''} on {spec.data} "
                            f"text at {', '.join(map(str, spec.lengths))} tokens"}
    settings = {"block_size": spec.block_size, "dense_below": spec.dense_below, "decode": "dense"}
    if spec.union_tile is not None:
        settings["union_tile"] = spec.union_tile
    text = render_plan(header_lines(spec, shape, meta, labels, verified is not None), [f"*{name}*"], provenance,
                       settings, choices, cands, verified)
    path.write_text(text)
    return text


def check_plan(path: Path, shape):
    """Load and resolve the written plan as the engine would; raises SparseConfigError if it does not fit."""
    from vllm_sparse.config.loader import load_config
    from vllm_sparse.config.plan import resolve_plan

    return resolve_plan(load_config(path), shape, str(path), explicit=True)


def calibrate(spec: CalibrationSpec, out: str | Path, progress: bool = True) -> dict:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from vllm_sparse.config.plan import ModelShape
    from vllm_sparse.eval.harness import read_calibration, read_stats, run_engine

    out = Path(out)
    t_start = time.perf_counter()
    shape = ModelShape.from_pretrained(spec.model)
    tok = AutoTokenizer.from_pretrained(spec.model)
    prompts = prompts_for(tok, spec)
    groups = [[p] for n in spec.lengths for p in prompts[n]]  # one prompt per group: sums read per prompt
    length_of = [n for n in spec.lengths for _ in prompts[n]]
    cands = make_candidates(spec.estimators, spec.budgets)
    check_candidates(cands, spec.block_size)
    labels = [label(c) for c in cands]
    # No prefix caching: a prompt sharing another's start (the same text window at two lengths) would skip
    # those rows, and they would go unmeasured.
    engine = {"dtype": "bfloat16", "max_model_len": max(spec.lengths) + 256, "enforce_eager": True,
              "enable_prefix_caching": False, **spec.engine}
    meta = _meta()

    with tempfile.TemporaryDirectory(prefix="vllm-sparse-calibrate-") as tmp:
        probe = Path(tmp) / "probe.yaml"
        probe_config(shape, spec, probe)
        with envs.set_for(VLLM_SPARSE_CALIBRATE=json.dumps(cands)):  # read by the engine's workers
            with tqdm(total=len(groups), desc=f"calibrating {len(cands)} candidates", unit="prompt",
                      disable=not progress) as bar:
                sweep = run_engine(spec.model, groups, str(probe), engine, "calibrate", 1, read=read_calibration,
                                   on_group=bar.update)
    sums: dict[int, dict] = {}
    for n, layers in zip(length_of, sweep.layers):
        _add(sums.setdefault(n, {}), {int(k): v for k, v in layers.items()})
    layers = sorted({layer for per in sums.values() for layer in per})
    if not layers:
        raise ValueError(f"nothing measured: no calibration tokens past dense_below ({spec.dense_below}); "
                         f"lengths {spec.lengths} must exceed it")
    per_length = {n: {layer: table_from_sums(layer, sums[n][layer], spec.row_quantile) for layer in layers}
                  for n in spec.lengths}
    tables = [combine([per_length[n][layer] for n in spec.lengths]) for layer in layers]
    answers = answer_row_recall(sweep.layers, sweep.prompt_tokens, length_of, layers)
    choices = choose(chosen_by(tables, answers, spec), spec.target, spec.max_density, spec.per_group, labels)
    write_plan(out, spec, shape, meta, choices, cands, None)
    plan = check_plan(out, shape)

    verified = None
    if spec.verify and plan.is_sparse:
        with envs.set_for(VLLM_SPARSE_STATS="1", VLLM_SPARSE_AUDIT="1"):
            with tqdm(total=len(groups), desc="verifying the plan", unit="prompt", disable=not progress) as bar:
                run = run_engine(spec.model, groups, str(out), engine, "verify", 1, read=read_stats,
                                 on_group=bar.update)
        verified = {}
        for layer in layers:
            per_n = [_verified_table(layer, [s.get(str(layer)) or s.get(layer) or {} for s, m in
                                             zip(run.layers, length_of) if m == n]) for n in spec.lengths]
            if all(t is not None for t in per_n):
                verified[layer] = combine(per_n)
        write_plan(out, spec, shape, meta, choices, cands, verified)
        check_plan(out, shape)

    result = {
        "meta": meta, "spec": asdict(spec), "plan": str(out), "candidates": cands, "labels": labels,
        "num_q_heads": shape.num_q_heads, "num_kv_heads": shape.num_kv_heads, "layers": layers,
        "shape": asdict(shape),  # so --from-json needs no model directory
        "tables": {str(t.layer): asdict(t) for t in tables},
        "per_length": {str(n): {str(layer): asdict(t) for layer, t in per.items()} for n, per in per_length.items()},
        "row_quantiles": row_quantile_tables(sums, layers, spec),
        "answer_rows": answers,
        "choices": choices_json(choices, labels),
        "verified": None if verified is None else {str(k): asdict(v) for k, v in verified.items()},
        "seconds": time.perf_counter() - t_start,
    }
    return result


ROW_QUANTILES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # saved for --from-json; "0" is the mean


def row_quantile_tables(sums: dict, layers: list[int], spec: CalibrationSpec) -> dict:
    """Recall [candidate][q head] per row quantile, length and layer: what --from-json can choose by
    (the per-row histograms themselves would make the JSON large on big models)."""
    qs = sorted({0.0, *ROW_QUANTILES, *([spec.row_quantile] if spec.row_quantile else [])})
    return {f"{q:g}": {str(n): {str(layer): table_from_sums(layer, sums[n][layer], q or None).recall
                                for layer in layers} for n in spec.lengths} for q in qs}


def answer_row_recall(sweeps: list[dict], prompt_tokens: list[list[int]], length_of: list[int],
                      layers: list[int]) -> dict:
    """Recall [candidate][q head] of each prompt's final query block (the rows that produce its answer:
    the block of the chunk ending at its last token), the lowest over a length's prompts, per length and
    layer; absent where some prompt's was not measured (its last chunk went dense: a single token)."""
    per: dict[tuple[int, int], list] = {}
    for n, tokens, sums in zip(length_of, prompt_tokens, sweeps):
        sums = {int(k): v for k, v in sums.items()}
        for layer in layers:
            ends = {int(end): f for end, f in sums.get(layer, {}).get("final_block", {}).items()}
            final = ends.get(tokens[0])
            per.setdefault((n, layer), []).append(None if final is None else
                                                  [[m / max(q, 1e-12) for m, q in zip(row, final["queries"])]
                                                   for row in final["mass"]])
    out: dict[str, dict] = {}
    for (n, layer), recalls in per.items():
        if None not in recalls:
            out.setdefault(str(n), {})[str(layer)] = lowest(recalls)
    return out


def chosen_by(tables: list[LayerTable], answers: dict | None, spec: CalibrationSpec) -> list[LayerTable]:
    """The tables the choice reads: as measured or, with --answer-rows, each recall held to the answer
    rows' too (lowest over the lengths)."""
    if not spec.answer_rows:
        return tables
    if answers is None:
        raise ValueError("--answer-rows: this calibration JSON has no answer-row measurements (written before "
                         "them); calibrate again")
    out = []
    for t in tables:
        per_n = [answers.get(str(n), {}).get(str(t.layer)) for n in spec.lengths]
        missing = [n for n, a in zip(spec.lengths, per_n) if a is None]
        if missing:
            raise ValueError(f"--answer-rows: the final query block of the {missing[0]}-token prompts was not "
                             f"measured in layer {t.layer} (their last chunk went dense: a single token)")
        out.append(require_answer_rows(t, lowest(per_n)))
    return out


def choices_json(choices: list[LayerChoice], labels: list[str]) -> list[dict]:
    return [{"layer": c.layer, "dense": c.dense, "per_group": c.per_group, "why_dense": c.why_dense,
             "recall": list(c.recall), "density": c.density,
             "groups": [{"candidate": g.candidate, "label": "dense" if g.candidate is None else labels[g.candidate],
                         "recall": list(g.recall), "density": g.density} for g in c.groups]} for c in choices]


def format_report(result: dict) -> str:
    answer_rows = result["spec"].get("answer_rows")
    lines = [f"calibrated {result['spec']['model']}: target recall {result['spec']['target']:g}"
             f"{' (answer rows too)' if answer_rows else ''}, "
             f"lengths {', '.join(map(str, result['spec']['lengths']))}, {len(result['labels'])} candidates", "",
             f"{'layer':>5}  {'choice':<44} {'recall':>7} {'lowest':>7} {'kept':>6}  {'verified':>8} {'kept':>6}"]
    verified = result.get("verified") or {}
    for c in result["choices"]:
        if c["dense"]:
            what = "dense"
        elif c["per_group"]:
            what = "per KV head: " + "; ".join(g["label"] for g in c["groups"])
        else:
            what = c["groups"][0]["label"]
        recall = c["recall"]
        v = verified.get(str(c["layer"]))
        vtxt = "" if v is None else f"{min(v['recall'][0]):>8.3f} {sum(v['density'][0]) / len(v['density'][0]):>6.1%}"
        lines.append(f"{c['layer']:>5}  {what[:44]:<44} {sum(recall) / len(recall):>7.3f} {min(recall):>7.3f} "
                     f"{c['density']:>6.1%}  {vtxt}".rstrip())
        if c["dense"] and c["why_dense"]:
            lines.append(f"{'':>7}{c['why_dense']}")
    sparse = [c for c in result["choices"] if not c["dense"]]
    mean = sum(c["density"] for c in result["choices"]) / max(1, len(result["choices"]))
    q = result["spec"].get("row_quantile")
    what = f"the {q:g} row quantile of" if q else "lowest over lengths of"
    lines += ["", f"recall: {what} each q head's dense attention mass in the blocks read "
              "(mean over heads, lowest head)" + ("; with --answer-rows the lower of that and its recall on each "
              "prompt's final query block (lowest over the prompts)" if answer_rows else "") +
              "; kept: causal KV blocks read after union; verified: the written plan run with the audit on (lowest "
              "head recall, kept)",
              f"wrote {result['plan']}: {len(sparse)} of {len(result['choices'])} calibrated layers sparse, "
              f"{mean:.1%} of their causal KV blocks read (dense layers count 100%); "
              f"{result['seconds']:.0f} s"]
    return "\n".join(lines)


def saved_shape(result: dict):
    """The model's shape as the calibration saved it (None in JSONs written before it was saved)."""
    from vllm_sparse.config.plan import ModelShape

    saved = result.get("shape")
    if not saved:
        return None
    return ModelShape(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def _shape_from_model(model: str):
    from vllm_sparse.config.plan import ModelShape

    try:
        return ModelShape.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise ValueError(f"this calibration JSON predates saved model shapes, and its model {model!r} (for the "
                         f"layer and head counts) cannot be loaded here: {e}") from e


def rechoose(result: dict, target: float, out: str | Path, command: str, max_density: float | None = None,
             per_group: bool | None = None, row_quantile: float | None = None,
             answer_rows: bool | None = None) -> dict:
    """A new plan from a saved calibration (its --json) at another target (or row quantile, 0 for the
    mean; or with or without the answer rows): no model run; unverified."""
    spec = CalibrationSpec(**{**result["spec"], "target": target, "verify": False, "command": command})
    if max_density is not None:
        spec.max_density = max_density
    if per_group is not None:
        spec.per_group = per_group
    if answer_rows is not None:
        spec.answer_rows = answer_rows
    shape = saved_shape(result) or _shape_from_model(spec.model)
    tables = [LayerTable(**result["tables"][str(layer)]) for layer in result["layers"]]
    if row_quantile is not None:
        saved = result.get("row_quantiles", {})
        if f"{row_quantile:g}" not in saved:
            have = ", ".join(saved) or "none (written before row quantiles)"
            raise ValueError(f"--row-quantile {row_quantile:g}: this calibration saved row quantiles {have}; "
                             "calibrate again with --row-quantile for another")
        spec.row_quantile = row_quantile or None
        per_q = saved[f"{row_quantile:g}"]
        tables = [combine([LayerTable(layer, per_q[str(n)][str(layer)],
                                      result["per_length"][str(n)][str(layer)]["density"]) for n in spec.lengths])
                  for layer in result["layers"]]
    choices = choose(chosen_by(tables, result.get("answer_rows"), spec), target, spec.max_density, spec.per_group,
                     result["labels"])
    out = Path(out)
    write_plan(out, spec, shape, result["meta"], choices, result["candidates"], None)
    check_plan(out, shape)
    new = dict(result, spec=asdict(spec), plan=str(out), verified=None, seconds=0.0)
    new["choices"] = choices_json(choices, result["labels"])
    new["tables"] = {str(t.layer): asdict(t) for t in tables}
    return new
