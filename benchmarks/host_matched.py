"""Host-bound turns compared at equal host speed: dense against SPARSE across `workload.py` runs.

A follow-up turn that adds a few tokens to a long cached prompt is mostly host work (hashing the prompt's
blocks, scheduling, launches), and the GPU machines' host speed is not constant: `host_speed.py` on an idle
H200 machine timed the same probe at 9.4-19.9 ms on one CPU, and two dense engines in separate processes
differed by 0.74x (RESULTS.md, thirteenth session). So the ratio of two processes' medians says more about
when each ran than about the backend. `workload.py` times a fixed host probe before every turn
(`host_probe_ms`); this script pools the steady turns (turn 1 on) of every engine in the given runs, dense
(engines named dense*) against the plans', and compares them within bins of equal probe time, and by a
straight-line fit of turn time on probe time per side.

    python benchmarks/host_matched.py RUN.json [RUN.json ...] [--classes follow:131072+8] [--bins 13,16]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def steady_points(runs: list[dict], classes: set[str] | None = None) -> dict[str, dict[str, list]]:
    """{class: {"dense": [(probe ms, TTFT ms)], "sparse": [...]}} over every run's steady follow-up turns."""
    out: dict[str, dict[str, list]] = {}
    for run in runs:
        for label, eng in run.get("engines", {}).items():
            side = "dense" if label.startswith("dense") else "sparse"
            for r in eng.get("rows", []):
                cls = r.get("class", "")
                if not cls.startswith("follow:") or r.get("turn", 0) == 0 or "host_probe_ms" not in r:
                    continue
                if classes and cls not in classes:
                    continue
                pts = out.setdefault(cls, {"dense": [], "sparse": []})[side]
                pts.append((r["host_probe_ms"], r["requests"][0]["ttft_s"] * 1e3))
    return out


def line_fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares y = a + b x -> (a, b); None for fewer than 3 points or one x."""
    if len(points) < 3:
        return None
    try:
        slope, intercept = statistics.linear_regression([p[0] for p in points], [p[1] for p in points])
    except statistics.StatisticsError:  # (every x the same)
        return None
    return intercept, slope


def compare(points: dict[str, list], bins: list[float]) -> dict:
    """Per probe bin: each side's turns and median TTFT, and dense / SPARSE; the two fits and their ratio at
    the pooled median probe time."""
    edges = [0.0, *bins, float("inf")]
    rows = []
    for lo, hi in zip(edges, edges[1:]):
        sides = {s: [t for p, t in points[s] if lo <= p < hi] for s in ("dense", "sparse")}
        row = {"probe_ms": [lo, hi if hi != float("inf") else None],
               **{f"{s}_n": len(v) for s, v in sides.items()},
               **{f"{s}_ms": statistics.median(v) if v else None for s, v in sides.items()}}
        row["ratio"] = row["dense_ms"] / row["sparse_ms"] if row["dense_ms"] and row["sparse_ms"] else None
        rows.append(row)
    fits = {s: line_fit(points[s]) for s in ("dense", "sparse")}
    probes = [p for s in ("dense", "sparse") for p, _ in points[s]]
    at = statistics.median(probes) if probes else None
    fit_ratio = None
    if at is not None and all(fits.values()):
        d, s = (fits[k][0] + fits[k][1] * at for k in ("dense", "sparse"))
        fit_ratio = d / s
    return {"bins": rows, "fits": fits, "fit_at_probe_ms": at, "fit_ratio": fit_ratio}


def table(results: dict[str, dict]) -> str:
    lines = [f"  {'class':<22} {'probe ms':>10} {'dense n':>7} {'med':>8} {'sparse n':>8} {'med':>8} {'ratio':>6}"]
    for cls, c in results.items():
        for b in c["bins"]:
            lo, hi = b["probe_ms"]
            rng = f"{lo:g}-{hi:g}" if hi is not None else f">={lo:g}"
            fmt = lambda v: f"{v:.1f}" if v is not None else "-"  # noqa: E731
            ratio = f"{b['ratio']:.2f}x" if b["ratio"] else "-"
            lines.append(f"  {cls:<22} {rng:>10} {b['dense_n']:>7} {fmt(b['dense_ms']):>8} {b['sparse_n']:>8} "
                         f"{fmt(b['sparse_ms']):>8} {ratio:>6}")
        if c["fit_ratio"] is not None:
            (da, db), (sa, sb) = c["fits"]["dense"], c["fits"]["sparse"]
            lines.append(f"  {cls:<22} fits: dense {da:.1f} + {db:.2f} x probe, sparse {sa:.1f} + {sb:.2f} x probe "
                         f"-> {c['fit_ratio']:.2f}x at the median probe {c['fit_at_probe_ms']:.1f} ms")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="workload.py JSON files")
    ap.add_argument("--classes", default="", help="comma-separated classes (default: every follow-up class)")
    ap.add_argument("--bins", default="13,16", help="probe-time bin edges, ms")
    ap.add_argument("--out", help="write the comparison as JSON")
    args = ap.parse_args()
    runs = [json.loads(Path(f).read_text()) for f in args.runs]
    points = steady_points(runs, {c for c in args.classes.split(",") if c} or None)
    bins = [float(x) for x in args.bins.split(",") if x]
    results = {cls: compare(p, bins) for cls, p in sorted(points.items())}
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": args.runs, "bins": bins, "classes": results}, indent=1))


if __name__ == "__main__":
    main()
