"""How long a bad sparse config takes to stop an engine: refused where vLLM makes the engine's config from its
arguments (the plugin's check, `compat.on_engine_config`, before any engine process starts) against refused in the
engine's worker as the model's layers are built (where it was refused before that check; the check switched off in
that case's process).

    python benchmarks/refusal_time.py --out $OUT/refusal_time.json                  # GPU: Llama-3.1-8B shape, dummy
    python benchmarks/refusal_time.py --shape tiny --engine '{"dtype": "float32", "kv_cache_memory_bytes": 1073741824}'

Each case in a process of its own; the clock starts at `LLM(...)` (vLLM already imported) and stops when it raises.
Table last; JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
CASES = ("config", "worker")  # where the error is raised
# A config error a user makes: a field the estimator does not have.
BAD = {"version": 1, "models": [{"match": {"architectures": ["LlamaForCausalLM"]},
                                 "layers": [{"layers": "all", "estimator": {"name": "sink_local", "sinks": 2}}]}]}


def child(case: str, model: str, config: str, engine: dict) -> dict:
    from vllm import LLM

    if case == "worker":  # (the check the plugin adds where the config is made, off: the worker refuses)
        import vllm_sparse.backend.plan_cache as plan_cache

        plan_cache.check_engine_config = lambda vllm_config: None
    start = time.perf_counter()
    try:
        LLM(model=model, load_format="dummy", attention_backend="sparse", enforce_eager=True, max_model_len=4096,
            additional_config={"sparse": {"config": config}}, **engine)
    except Exception as e:  # noqa: BLE001  (what the user's call raises, whatever it is)
        return {"case": case, "seconds": time.perf_counter() - start, "raised": type(e).__name__,
                "names_the_field": "unknown field(s) 'sinks'" in str(e)}
    return {"case": case, "seconds": time.perf_counter() - start, "raised": None, "names_the_field": False}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", help="e2e.py's shapes, or `tiny` (tests' tiny Llama)")
    ap.add_argument("--engine", default="{}", help="more LLM(...) arguments, JSON")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per case")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    engine = json.loads(args.engine)
    if args.child:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(child(spec["case"], spec["model"], spec["config"], engine)), flush=True)
        return 0
    root = Path(tempfile.mkdtemp(prefix="refusal-"))
    if args.shape == "tiny":
        sys.path.insert(0, str(REPO))
        from tests.fixtures.tiny_llama import build_tiny_llama

        model = build_tiny_llama(root)
    else:
        from e2e import build_model

        model = build_model(root, args.shape)
    config = root / "bad.yaml"
    config.write_text(yaml.safe_dump(BAD))
    rows = []
    for case in CASES:
        spec = json.dumps({"case": case, "model": str(model), "config": str(config)})
        try:
            run = subprocess.run([sys.executable, __file__, "--engine", args.engine, "--child", spec],
                                 capture_output=True, text=True, timeout=args.timeout)
            found = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
            row = json.loads(found[-1][7:]) if found else {"case": case, "error": (run.stdout + run.stderr)[-2000:]}
            row["said"] = "unknown field(s) 'sinks'" in run.stdout + run.stderr  # (in the log, where vLLM puts it)
        except subprocess.TimeoutExpired:
            row = {"case": case, "error": f"timed out after {args.timeout} s"}
        rows.append(row)
        if args.out:  # (written as they come)
            Path(args.out).write_text(json.dumps({"shape": args.shape, "engine": engine, "rows": rows}, indent=1))
    print(f"{'refused where':<13} {'seconds':>8}  {'LLM(...) raised':<24} {'the error names the field':<26} in the log")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<13} {'-':>8}  {r['error'][-200:]}")
            continue
        print(f"{r['case']:<13} {r['seconds']:8.1f}  {str(r['raised']):<24} {str(r['names_the_field']):<26} "
              f"{r['said']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
