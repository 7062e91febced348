"""Host cost of a dense-routed follow-up turn, dense vs SPARSE, on any device vLLM runs (issue 26).

A short turn on a long cached prompt (prefix-cache hit, N new tokens, 1 token out) runs no sparse work when the
plan's floors route it dense; what is left is host work, which this times per engine in its own process:

    python benchmarks/follow_host.py --model DIR --config PLAN.yaml [--doc 15000] [--new 8] [--turns 12] \
        [--engines dense,sparse,dense] [--out follow_host.json]

Prints each engine's median and spread of the follow-up turns, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time


def engine(args) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    kw = dict(model=args.model, seed=0, enforce_eager=not args.graphs, dtype=args.dtype, max_model_len=args.doc + 512,
              block_size=args.block_size, max_num_batched_tokens=args.chunk, enable_prefix_caching=True)
    if args.kv_bytes:
        kw["kv_cache_memory_bytes"] = args.kv_bytes
    if args.backend == "sparse":
        kw.update(attention_backend="sparse", additional_config={"sparse": {"config": args.config}})
    llm = LLM(**kw)
    rng = random.Random(0)
    doc = [rng.randrange(3, 500) for _ in range(args.doc)]
    params = SamplingParams(max_tokens=1, temperature=0)
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": doc}], params, use_tqdm=False)
    first = time.perf_counter() - t
    turns, cached = [], None
    for _ in range(args.turns):
        prompt = doc + [rng.randrange(3, 500) for _ in range(args.new)]
        t = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        turns.append((time.perf_counter() - t) * 1e3)
        cached = out[0].num_cached_tokens
    return {"backend": args.backend, "first_s": first, "follow_ms": turns, "cached_tokens": cached}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--config", required=True, help="the sparse plan")
    ap.add_argument("--doc", type=int, default=15000, help="cached prompt tokens")
    ap.add_argument("--new", type=int, default=8, help="new tokens per follow-up turn")
    ap.add_argument("--turns", type=int, default=12)
    ap.add_argument("--engines", default="dense,sparse,dense", help="in this order, a process each")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--kv-bytes", type=int, default=1 << 30, help="kv_cache_memory_bytes (0: vLLM's default)")
    ap.add_argument("--graphs", action="store_true")
    ap.add_argument("--out", default="follow_host.json")
    ap.add_argument("--backend", help=argparse.SUPPRESS)  # set in the engine's own process
    args = ap.parse_args()
    if args.backend:
        print("FOLLOW_HOST " + json.dumps(engine(args)), flush=True)
        return
    rows = []
    for backend in args.engines.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--backend", backend]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("FOLLOW_HOST ")), None)
        if line is None:
            raise SystemExit(f"{backend} engine failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        rows.append(json.loads(line[len("FOLLOW_HOST "):]))
    steady = lambda r: r["follow_ms"][1:]  # noqa: E731  (the first turn after the document apart)
    print(f"{args.doc} cached + {args.new} new tokens, {args.turns} turns; median / min-max of turns 2..n (ms)")
    for r in rows:
        t = steady(r)
        print(f"  {r['backend']:7s} {statistics.median(t):7.1f}  {min(t):6.1f}-{max(t):6.1f}  "
              f"cached {r['cached_tokens']}")
    with open(args.out, "w") as f:
        json.dump({"argv": sys.argv, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
