"""OpenAI server: start-up time and a long prompt's prefill, stock backend vs SPARSE, in one run.

    python benchmarks/server_prefill.py --model DIR [--config YAML ...] [--tokens 4096] [--out results.json]

CPU (the default settings) or GPU, e.g. a 64K-token prompt to a dummy-weight Llama-3.1-8B shape:
    ... --tokens 65536 --chunk 16384 --kv-cache-gib 20 --serve-arg=--load-format=dummy

Each backend gets a fresh `vllm serve` (prefix caching off, so every request is a full prefill).
Prefill time is the latency of a completion with max_tokens=1 (time to first token), median of
--repeats distinct prompts. Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.server import vllm_server  # noqa: E402


def prompts_of(model: str, n_tokens: int, count: int) -> list[list[int]]:
    """`count` prompts of n_tokens of real text (Python's own sources, from argparse.py on), each a
    different slice of it. Tokenized once, here, so every backend gets the same prompts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    lib = Path(os.__file__).parent
    ids: list[int] = []
    for path in [lib / "argparse.py", *sorted(lib.glob("*.py"))]:
        ids += tok(path.read_text(errors="ignore"), add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens + 4096:
            break
    starts = [(seed * 1009) % (len(ids) - n_tokens + 1) for seed in range(count)]
    return [ids[start:start + n_tokens] for start in starts]


def measure(model: str, args, prompts: list[list[int]], extra: list[str], log: Path) -> dict:
    kv_bytes = str(int(args.kv_cache_gib * 2**30))
    serve = [model, "--max-model-len", str(args.tokens + 512), "--max-num-batched-tokens", str(args.chunk),
             "--no-enable-prefix-caching", "--enforce-eager", "--kv-cache-memory-bytes", kv_bytes,
             "--dtype", args.dtype, *args.serve_arg, *extra]
    with vllm_server(serve, log, timeout=args.startup_timeout) as (url, startup):
        times = []
        for ids in prompts:
            t0 = time.perf_counter()
            r = requests.post(url + "/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 1,
                                                             "temperature": 0}, timeout=1800)
            times.append(time.perf_counter() - t0)
            r.raise_for_status()
            body = r.json()
            if body["usage"]["prompt_tokens"] != len(ids) or not body["choices"]:
                raise RuntimeError(f"unexpected answer: {body}")
    return {"startup_s": startup, "prefill_s": statistics.median(times), "prefill_all_s": times,
            "prompt_tokens": len(ids)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--config", action="append", default=[],
                   help="sparse config for a SPARSE run (repeatable); SPARSE with config discovery always runs")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=2048, help="--max-num-batched-tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    p.add_argument("--serve-arg", action="append", default=[], help="extra `vllm serve` argument (repeatable)")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--out", default="benchmarks/server_prefill.json")
    args = p.parse_args()
    runs = {"stock": [], "SPARSE": ["--attention-backend", "sparse"]}
    for cfg in args.config:
        runs[f"SPARSE:{Path(cfg).stem}"] = ["--attention-backend", "sparse", "--additional-config",
                                            json.dumps({"sparse": {"config": cfg}})]
    logs = Path(args.out).with_suffix(".logs")
    logs.mkdir(parents=True, exist_ok=True)
    prompts = prompts_of(args.model, args.tokens, args.repeats)
    results = {name: measure(args.model, args, prompts, extra, logs / f"{name}.log") for name, extra in runs.items()}
    import torch
    import vllm

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    meta = {"model": args.model, "tokens": args.tokens, "chunk": args.chunk, "dtype": args.dtype,
            "configs": args.config, "vllm": vllm.__version__, "torch": torch.__version__, "gpu": gpu,
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    d = results["stock"]
    print(f"\n{args.model}  {args.tokens}-token prefill, chunk {args.chunk}, {args.dtype}, vLLM {vllm.__version__}, "
          f"{gpu or 'CPU'}")
    print(f"{'backend':30} {'startup s':>10} {'prefill s':>10} {'startup x':>10} {'prefill x':>10}")
    for name, r in results.items():
        print(f"{name:30} {r['startup_s']:10.2f} {r['prefill_s']:10.2f} {r['startup_s'] / d['startup_s']:10.2f} "
              f"{r['prefill_s'] / d['prefill_s']:10.2f}")


if __name__ == "__main__":
    main()
