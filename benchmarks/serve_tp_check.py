"""`vllm serve` with tensor parallelism and SPARSE: one long completion through the OpenAI API, and
the server log shows every rank sending its heads down the sparse path (issue 14).

    python benchmarks/serve_tp_check.py --tp 2 --tokens 65536 --out $OUT/serve_tp2.json --log $OUT/serve_tp2.log

Writes the Llama-3.1-8B-shaped dummy model (`benchmarks/e2e.py`'s), then starts

    vllm serve MODEL --tensor-parallel-size N --attention-backend sparse --load-format dummy
        --max-model-len 131072 --enable-chunked-prefill --max-num-batched-tokens 16384 --enforce-eager

with VLLM_SPARSE_LOG_STEPS=1 and no --additional-config, so the plan is the one discovery finds
(the shipped configs/llama-3.yaml matches LlamaForCausalLM). Waits for /health, sends one
completion whose prompt is --tokens random token ids (max_tokens small), then stops the server
and reads its log: vLLM 0.26 prefixes each worker's lines with "(Worker_TP<rank> pid=...)", and
the plugin logs "vllm-sparse: step goes sparse for ..." per step on each rank. Passes when the
answer is HTTP 200 with the prompt's token count, every rank logged sparse steps, no rank said it
runs dense, and the log has no traceback. JSON summary to --out; exit status 1 if it did not pass.

The same check at a million tokens on one GPU (issue 29, item 1), with a plan, CUDA graphs, prefix caching on
(vLLM's default) and a follow-up turn on the cached prompt:

    python benchmarks/serve_tp_check.py --tp 1 --shape qwen2.5-7b-1m --max-model-len 1048576 --tokens 1048000 \
        --graphs --follow 8 --config benchmarks/configs/qwen2.5-7b-1m-antidiagonal-10-s16-int8-own-heads.yaml \
        --serve-arg=--gpu-memory-utilization=0.9 --serve-arg=--enable-prompt-tokens-details
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from e2e import build_model  # noqa: E402

STEP = "vllm-sparse: step goes sparse"
PREFIX = re.compile(r"^\((?P<proc>[A-Za-z_0-9]+) pid=\d+\)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict | None = None, timeout: float = 5) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def read_log(log: Path, tp: int, served_bytes: int | None) -> dict:
    """Sparse steps from the whole log; tracebacks and errors from the part written while serving
    (before the server was asked to stop), and separately from the shutdown."""
    raw = log.read_bytes()
    served_bytes = len(raw) if served_bytes is None else served_bytes
    lines = raw.decode(errors="replace").splitlines()
    serving = raw[:served_bytes].decode(errors="replace").splitlines()
    shutdown = raw[served_bytes:].decode(errors="replace").splitlines()
    steps: dict[str, int] = {}
    examples: dict[str, str] = {}
    for line in lines:
        if STEP in line:
            m = PREFIX.match(line)
            proc = m.group("proc") if m else "(no prefix)"
            steps[proc] = steps.get(proc, 0) + 1
            examples.setdefault(proc, line.strip()[:300])
    ranks = [f"Worker_TP{r}" for r in range(tp)] if tp > 1 else None
    sparse_lines = [x.strip()[:300] for x in lines if "vllm-sparse" in x and STEP not in x]
    return {
        "sparse_steps_per_process": steps,
        "sparse_step_examples": examples,
        "ranks_expected": ranks,
        "ranks_with_sparse_steps": sorted(steps) if ranks is None else [r for r in ranks if steps.get(r)],
        "tracebacks": sum("Traceback" in x for x in serving),
        "error_lines": [x.strip()[:300] for x in serving if " ERROR " in x or "Error:" in x][:20],
        "tracebacks_at_shutdown": sum("Traceback" in x for x in shutdown),
        "runs_dense_lines": [x.strip()[:300] for x in lines if "run dense" in x or "runs dense" in x][:10],
        "other_vllm_sparse_lines": sparse_lines[:20],
        "log_lines": len(lines),
    }


def scrape_sparse_metrics(url: str) -> dict:
    """The vllm_sparse: samples on /metrics, by name and labels."""
    try:
        status, text = http(url + "/metrics", timeout=10)
    except OSError as e:
        return {"error": repr(e)}
    samples = {}
    for line in text.splitlines():
        if line.startswith("vllm_sparse:") and ("_total" in line or "_count" in line or "_sum" in line):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return {"http_status": status, "samples": samples}


def complete(url: str, body: dict, timeout: float, summary: dict, prefix: str) -> int | None:
    """One completion: its time, HTTP status, usage and text into `summary` (keys after `prefix`)."""
    t1 = time.perf_counter()
    try:
        status, text = http(url + "/v1/completions", body, timeout=timeout)
    except OSError as e:
        status, text = None, repr(e)
    summary[prefix + "request_s"] = time.perf_counter() - t1
    summary[prefix + "http_status"] = status
    try:
        answer = json.loads(text)
        choice = (answer.get("choices") or [{}])[0]
        summary.update({prefix + "usage": answer.get("usage"), prefix + "completion_text": choice.get("text"),
                        prefix + "finish_reason": choice.get("finish_reason")})
    except (ValueError, AttributeError):
        summary[prefix + "response_head"] = text[:2000]
    return status


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2, help="--tensor-parallel-size")
    ap.add_argument("--tokens", type=int, default=65536, help="prompt length (random token ids)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--startup-timeout", type=float, default=420)
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--out", default="serve_tp_check.json")
    ap.add_argument("--log", default="serve_tp_check.log")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `vllm serve` argument (repeatable)")
    ap.add_argument("--shape", default="llama-3.1-8b", help="the dummy-weight model's shape (e2e.py's SHAPES)")
    ap.add_argument("--max-model-len", type=int, default=131072)
    ap.add_argument("--graphs", action="store_true", help="CUDA graphs on (default: --enforce-eager)")
    ap.add_argument("--config", help="a plan (--additional-config); default: the one discovery finds")
    ap.add_argument("--follow", type=int, default=0,
                    help="then a second turn: the same prompt and this many new tokens (a prefix-cache hit)")
    args = ap.parse_args()
    # The server runs in a session of its own: a `timeout` around this script signals only this process, so
    # SIGTERM unwinds through the `finally` below that stops the server (else it would keep the GPU's memory).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    model = build_model(Path(tempfile.mkdtemp(prefix="serve-tp-")), args.shape)
    port = free_port()
    serve = ["serve", str(model), "--tensor-parallel-size", str(args.tp), "--attention-backend", "sparse",
             "--load-format", "dummy", "--max-model-len", str(args.max_model_len), "--enable-chunked-prefill",
             "--max-num-batched-tokens", "16384", *([] if args.graphs else ["--enforce-eager"]),
             *(["--additional-config", json.dumps({"sparse": {"config": str(Path(args.config).resolve())}})]
               if args.config else []),
             "--host", "127.0.0.1", "--port", str(port), *args.serve_arg]
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", *serve]  # what the `vllm` command runs
    env = {**os.environ, "VLLM_SPARSE_LOG_STEPS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("VLLM_SPARSE_CONFIG", None)  # discovery: the shipped plan
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    summary: dict = {"command": "vllm " + " ".join(serve), "env": {"VLLM_SPARSE_LOG_STEPS": "1"},
                     "tp": args.tp, "prompt_tokens_sent": args.tokens, "date": time.strftime("%Y-%m-%d")}
    try:
        import torch

        summary["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        summary["torch"] = torch.__version__
        import vllm

        summary["vllm"] = vllm.__version__
    except Exception as e:  # the summary still gets written
        summary["meta_error"] = repr(e)

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1))

    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    try:
        healthy = False
        while time.perf_counter() - t0 < args.startup_timeout:
            if proc.poll() is not None:
                summary["failure"] = f"server exited with {proc.returncode} before /health answered"
                break
            try:
                if http(url + "/health", timeout=2)[0] == 200:
                    healthy = True
                    break
            except OSError:
                pass
            time.sleep(1)
        else:
            summary["failure"] = f"/health not OK after {args.startup_timeout:.0f} s"
        summary["startup_s"] = time.perf_counter() - t0
        print(f"server healthy: {healthy} after {summary['startup_s']:.1f} s", flush=True)
        save()
        if healthy:
            rng = random.Random(args.tokens)
            ids = [rng.randrange(3, 500) for _ in range(args.tokens)]
            body = {"model": str(model), "prompt": ids, "max_tokens": args.max_tokens, "temperature": 0,
                    "ignore_eos": True}
            status = complete(url, body, args.request_timeout, summary, "")
            print(f"completion: HTTP {status} in {summary['request_s']:.2f} s, usage {summary.get('usage')}",
                  flush=True)
            save()
            if args.follow and status == 200:  # the same prompt and new tokens: served from the prefix cache
                body["prompt"] = ids + [rng.randrange(3, 500) for _ in range(args.follow)]
                status = complete(url, body, args.request_timeout, summary, "follow_")
                print(f"follow-up (+{args.follow}): HTTP {status} in {summary['follow_request_s']:.2f} s", flush=True)
            time.sleep(2)  # let the workers' log lines (and metric snapshots, ~1 s) reach their files
            summary["metrics"] = scrape_sparse_metrics(url)
    finally:
        served_bytes = log.stat().st_size
        if proc.poll() is None:  # the API server stops its engine and workers on SIGTERM
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                summary["server_killed"] = True
                proc.kill()
                proc.wait()
        try:  # whatever of its process group is left
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        summary["server_exit"] = proc.returncode
    summary.update(read_log(log, args.tp, served_bytes))
    usage = summary.get("usage") or {}
    checks = {
        "http_200": summary.get("http_status") == 200,
        "prompt_tokens": usage.get("prompt_tokens") == args.tokens,
        "every_rank_sparse": bool(summary["ranks_with_sparse_steps"]) and (
            summary["ranks_expected"] is None or summary["ranks_with_sparse_steps"] == summary["ranks_expected"]),
        "no_rank_dense": not summary["runs_dense_lines"],
        "no_traceback": summary["tracebacks"] == 0,
        "metrics_sparse_tokens_every_rank": all(
            (summary.get("metrics") or {}).get("samples", {}).get(
                f'vllm_sparse:prefill_tokens_total{{path="sparse",rank="{r}"}}', 0) > 0 for r in range(args.tp)),
    }
    if args.follow:
        checks["follow_http_200"] = summary.get("follow_http_status") == 200
        # Served from the prefix cache (vLLM reports it with --enable-prompt-tokens-details): all but the last
        # partial page of the first prompt.
        details = (summary.get("follow_usage") or {}).get("prompt_tokens_details") or {}
        summary["follow_cached_tokens"] = details.get("cached_tokens")
        if "--enable-prompt-tokens-details" in args.serve_arg:
            checks["follow_from_prefix_cache"] = (details.get("cached_tokens") or 0) >= args.tokens - 16
    summary["checks"] = checks
    summary["passed"] = all(checks.values())
    save()
    print(json.dumps({k: summary.get(k) for k in ("checks", "sparse_steps_per_process", "startup_s", "request_s",
                                                   "http_status", "usage", "follow_request_s", "follow_cached_tokens",
                                                   "passed")}, indent=1))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
