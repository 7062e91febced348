"""The host's speed over time, with nothing else running: `workload.py`'s host probe (131,072 tokens hashed in
16-token blocks as vLLM's prefix cache does) repeated, with the CPU it ran on and the machine's CPU time by kind
(/proc/stat: user, system, idle, iowait, irq, softirq, steal) over each probe. On the GPU machines the same probe
on one CPU took 9.4-19.9 ms (RESULTS.md, thirteenth session), with no steal reported: what a host-bound turn
measured in one process can be compared with only at equal probe times (`host_matched.py`).

    python benchmarks/host_speed.py [--probes 400] [--pause-ms 50] [--out host_speed.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import host_probe, main_thread_sched  # noqa: E402
from workload import summary as summary_of  # noqa: E402  (median, p90, n)

KINDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_times() -> list[int] | None:
    """The machine's CPU time by kind so far, in ticks (Linux; None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:1 + len(KINDS)]]
    except (OSError, ValueError):
        return None


def sample(probes: int, pause_s: float) -> list[dict]:
    rows = []
    for _ in range(probes):
        t0 = cpu_times()
        ms = host_probe()
        t1 = cpu_times()
        sched = main_thread_sched()
        row = {"probe_ms": round(ms, 3), "cpu": sched[3] if sched else None}
        if t0 and t1:
            row["ticks"] = dict(zip(KINDS, (b - a for a, b in zip(t0, t1))))
        rows.append(row)
        time.sleep(pause_s)
    return rows


def summary(rows: list[dict], slow_ms: float) -> dict:
    ms = sorted(r["probe_ms"] for r in rows)
    out = {**summary_of(ms), "min": ms[0], "max": ms[-1],
           "slow_share": sum(m >= slow_ms for m in ms) / len(ms), "cpus": sorted({r["cpu"] for r in rows} - {None})}
    ticks = [r["ticks"] for r in rows if "ticks" in r]
    if ticks:
        out["ticks"] = {k: sum(t[k] for t in ticks) for k in KINDS}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes", type=int, default=400)
    ap.add_argument("--pause-ms", type=float, default=50.0)
    ap.add_argument("--slow-ms", type=float, default=1.4, help="'slow': at least this many times the fastest probe")
    ap.add_argument("--out", default="host_speed.json")
    args = ap.parse_args()
    rows = sample(args.probes, args.pause_ms / 1e3)
    s = summary(rows, args.slow_ms * min(r["probe_ms"] for r in rows))
    print(f"host probe over {s['n']} runs: min {s['min']:.1f} ms, median {s['median']:.1f}, p90 {s['p90']:.1f}, "
          f"max {s['max']:.1f}; {s['slow_share']:.0%} at >= {args.slow_ms}x the fastest; CPUs {s['cpus']}")
    if "ticks" in s:
        print("machine CPU ticks during the probes: " + ", ".join(f"{k} {v}" for k, v in s["ticks"].items()))
    Path(args.out).write_text(json.dumps({"summary": s, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
