"""What a profiled turn's timeline says: when the GPU ran and what the host's Python did meanwhile.

`workload.py --profile CLASS --trace` keeps the profiled turn's torch-profiler timeline as gzipped Chrome trace JSON
(`*.trace.json.gz`). This reads one and prints: the GPU's kernels, copies and memsets (how many, the span from the
first to the last, the time busy), its idle gaps longer than `--gap-ms` (a GPU waiting for the host's launches),
and the Python functions whose names contain any of `--frames`, by inclusive time and calls (the profiler's own
overhead included: compare shares, not absolute times, with an unprofiled turn). Writes JSON with `--out`.

    python benchmarks/trace_summary.py results/x.profile-PLAN.trace.json.gz [--frames vllm_sparse triton/runtime]
        [--gap-ms 0.2] [--top 40] [--out summary.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def gpu_timeline(events: list[dict], gap_us: float) -> dict:
    """The GPU's work in the trace: count, span and busy time (ms, the union of its intervals), idle gaps over
    `gap_us` (start ms after the first GPU event, length ms), and the host's lead and trail: from the trace's first
    host event to the first GPU event (what the host did before the GPU had work) and from the last GPU event's end
    to the last host event's end."""
    gpu = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    if not gpu:
        return {"events": 0, "span_ms": 0.0, "busy_ms": 0.0, "gaps": [], "lead_ms": 0.0, "trail_ms": 0.0}
    host = [e for e in events if e.get("ph") == "X" and e.get("cat") not in GPU_CATEGORIES and "dur" in e]
    first = gpu[0]["ts"]
    lead = (first - min(e["ts"] for e in host)) / 1e3 if host else 0.0
    host_end = max(e["ts"] + e["dur"] for e in host) if host else None
    busy, gaps = 0.0, []
    start, end = gpu[0]["ts"], gpu[0]["ts"] + gpu[0]["dur"]
    for e in gpu[1:]:
        if e["ts"] > end:  # (overlapping events, e.g. on two streams, count once)
            busy += end - start
            if e["ts"] - end > gap_us:
                gaps.append(((end - first) / 1e3, (e["ts"] - end) / 1e3))
            start = e["ts"]
        end = max(end, e["ts"] + e["dur"])
    busy += end - start
    trail = max(host_end - end, 0.0) / 1e3 if host_end is not None else 0.0
    return {"events": len(gpu), "span_ms": (end - first) / 1e3, "busy_ms": busy / 1e3, "gaps": gaps,
            "lead_ms": lead, "trail_ms": trail}


def python_frames(events: list[dict], needles: list[str]) -> list[tuple[str, int, float]]:
    """(function, calls, inclusive ms) of the Python frames whose names contain any needle, longest first."""
    total: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "python_function" and any(n in e["name"] for n in needles):
            total[e["name"]][0] += 1
            total[e["name"]][1] += e["dur"] / 1e3
    return sorted(((name, c, ms) for name, (c, ms) in total.items()), key=lambda row: -row[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path)
    ap.add_argument("--frames", nargs="*", default=["vllm_sparse", "triton/runtime", "flash_attn", "execute_model"])
    ap.add_argument("--gap-ms", type=float, default=0.2)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    events = load_events(args.trace)
    gpu = gpu_timeline(events, args.gap_ms * 1e3)
    frames = python_frames(events, args.frames)
    idle = sum(g[1] for g in gpu["gaps"])
    print(f"{args.trace.name}: GPU {gpu['events']} events, busy {gpu['busy_ms']:.1f} ms of a {gpu['span_ms']:.1f} ms "
          f"span; {len(gpu['gaps'])} gaps over {args.gap_ms} ms, {idle:.1f} ms idle in them; the host's lead "
          f"{gpu['lead_ms']:.1f} ms before the first GPU event, trail {gpu['trail_ms']:.1f} ms after the last")
    for at, ms in sorted(gpu["gaps"], key=lambda g: -g[1])[:8]:
        print(f"  gap of {ms:.2f} ms at {at:.1f} ms")
    print(f"{'inclusive ms':>12} {'calls':>6}  python function (names containing {', '.join(args.frames)})")
    for name, calls, ms in frames[:args.top]:
        print(f"{ms:12.2f} {calls:6d}  {name[:140]}")
    if args.out:
        args.out.write_text(json.dumps({"trace": str(args.trace), "gpu": gpu, "gap_ms": args.gap_ms,
                                        "frames": frames}, indent=1))


if __name__ == "__main__":
    main()
