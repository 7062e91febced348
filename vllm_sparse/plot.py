"""PNG figures for `vllm-sparse calibrate --plot`, `vllm-sparse eval --plot` and `benchmarks/e2e.py --plot`.

matplotlib is an optional extra (`pip install 'vllm-sparse[plot]'`); without it these raise MissingExtra,
whose message names the extra. Each function takes the command's JSON result and returns the path written.
"""

from __future__ import annotations

from pathlib import Path

EXTRA_HINT = "pip install 'vllm-sparse[plot]'  (or: pip install matplotlib)"


class MissingExtra(RuntimeError):
    """An optional dependency is not installed; the message says which extra brings it."""


def require_matplotlib():
    """matplotlib.pyplot on the Agg backend (no display), or MissingExtra naming the `plot` extra."""
    try:
        import matplotlib
    except ImportError:
        raise MissingExtra(f"--plot needs matplotlib, which is not installed: {EXTRA_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _heatmap(ax, plt, grid, rows, cols, title, vmin, vmax, cmap, fmt):
    im = ax.imshow(grid, aspect="auto", vmin=vmin, vmax=vmax, cmap=cmap, interpolation="nearest")
    ax.set_title(title)
    ax.set_xlabel("q head")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    step = max(1, len(cols) // 16)
    ax.set_xticks(range(0, len(cols), step), [str(c) for c in cols[::step]])
    if len(rows) * len(cols) <= 400:
        for i in range(len(rows)):
            for j in range(len(cols)):
                ax.text(j, i, fmt(grid[i][j]), ha="center", va="center", fontsize=7,
                        color="white" if grid[i][j] < (vmin + vmax) / 2 else "black")
    plt.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def plot_calibration(result: dict, path: str | Path) -> Path:
    """Kept density (of each q head's KV head, after union) and recall per layer x q head, for the chosen
    plan: the verified figures where the plan was run, else the calibration's."""
    plt = require_matplotlib()
    h, kv = result["num_q_heads"], result["num_kv_heads"]
    per = h // kv
    verified = result.get("verified") or {}
    rows, recall, density = [], [], []
    for c in result["choices"]:
        v = verified.get(str(c["layer"]))
        rows.append(c["layer"])
        if v is not None:
            recall.append(v["recall"][0])
            density.append([v["density"][0][q // per] for q in range(h)])
        else:
            recall.append(list(c["recall"]))
            density.append([c["groups"][q // per]["density"] for q in range(h)])
    source = "the plan's verified run" if verified else "calibration (dense attention in every layer)"
    fig, axes = plt.subplots(1, 2, figsize=(min(max(10, 3 + 1.0 * h), 24), 2.2 + 0.4 * len(rows)), squeeze=False)
    _heatmap(axes[0][0], plt, density, rows, list(range(h)), "kept density after union", 0.0, 1.0,
             "viridis", lambda x: f"{x:.0%}")
    _heatmap(axes[0][1], plt, recall, rows, list(range(h)),
             f"recall (target {result['spec']['target']:g})", min(0.5, min(min(r) for r in recall)), 1.0,
             "magma", lambda x: f"{x:.2f}")
    fig.suptitle(f"{Path(str(result['spec']['model']).rstrip('/')).name}: calibrated plan, "
                 f"lengths {', '.join(map(str, result['spec']['lengths']))}; figures from {source}", fontsize=10)
    return _save(fig, plt, path)


def plot_eval(result: dict, path: str | Path) -> Path:
    """Accuracy vs prompt length per task, dense (solid) and sparse (dashed), kept density annotated."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tasks = list(dict.fromkeys(r["task"] for r in result["rows"]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, task in enumerate(tasks):
        rows = sorted((r for r in result["rows"] if r["task"] == task), key=lambda r: r["length"])
        x = [r["length"] for r in rows]
        color = colors[i % len(colors)]
        # Hollow dense markers around filled sparse ones: where they agree, both stay visible.
        ax.plot(x, [r["dense_acc"] for r in rows], "-o", color=color, markersize=10, markerfacecolor="none",
                linewidth=2.5, alpha=0.6, label=f"{task} dense")
        ax.plot(x, [r["sparse_acc"] for r in rows], "--s", color=color, markersize=4, label=f"{task} sparse")
    kept = {r["length"]: r["kept_union"] for r in result["rows"] if r["kept_union"] is not None}
    for n, k in sorted(kept.items()):
        ax.annotate(f"kept {k:.0%}", (n, 0.02), ha="center", fontsize=8, color="gray")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["length"] for r in result["rows"]}), [str(n) for n in sorted(
        {r["length"] for r in result["rows"]})])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{Path(str(result['model']).rstrip('/')).name}: dense vs {Path(str(result['config'])).name}")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def plot_ttft(results: dict, path: str | Path) -> Path:
    """benchmarks/e2e.py: time to first token vs prompt length, dense and each sparse plan."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = results.get("dense") or {}
    series = [("dense", dense)] + [(Path(cfg).stem, r) for cfg, r in (results.get("sparse") or {}).items()]
    lengths = set()
    for name, r in series:
        ttft = r.get("ttft_s") if isinstance(r, dict) else None
        if not ttft:
            continue
        pts = sorted((int(n), t) for n, t in ttft.items())
        lengths.update(n for n, _ in pts)
        ax.plot([n for n, _ in pts], [t for _, t in pts], "-o" if name == "dense" else "--s", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(lengths), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in sorted(lengths)])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("time to first token (s)")
    meta = results.get("meta", {})
    ax.set_title(f"TTFT, dense vs sparse ({meta.get('device', '?')}, vLLM {meta.get('vllm', '?')})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)
