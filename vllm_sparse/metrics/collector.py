"""The API server side: a Prometheus collector on vLLM's registry that sums the workers' snapshots.

vLLM serves `prometheus_client.REGISTRY` on /metrics when one API server runs (the default). The
workers are other processes, so their counters reach it as the JSON snapshots `worker.py` writes;
reading them at scrape time costs the engine nothing.
"""

from __future__ import annotations

import glob
import json
import os

from vllm_sparse.metrics.paths import DENSITY_BUCKETS, ESTIMATION_BUCKETS

_DOC = {
    "prefill_tokens": "Prefill tokens by attention path: sparse (the chunk went through the sparse path) or dense",
    "decode_tokens": "Decode tokens by attention path: sparse (the step selected pages: a decode plan and a context "
                     "at its dense_below) or dense",
    "sparse_chunks": "Prefill chunks (one request's tokens in one step) that went through the sparse path",
    "kept_density": "Share of the causal KV pages each sparse chunk-layer read, after the block union, by layer "
                    "group",
    "estimation_seconds": "Time to estimate and select blocks, per sparse chunk and layer",
}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def read_snapshots(directory: str) -> list[dict]:
    """The live workers' latest snapshots."""
    snaps = []
    for path in sorted(glob.glob(os.path.join(directory, "worker-*.json"))):
        try:
            with open(path) as f:
                snap = json.load(f)
        except (OSError, ValueError):
            continue
        if _alive(snap.get("pid", -1)):
            snaps.append(snap)
    return snaps


def totals(snaps: list[dict]) -> dict:
    """Sum snapshots by rank: {(metric, labels...): value or (bucket counts, sum)}."""
    out: dict = {}

    def add(key, value):
        out[key] = out.get(key, 0) + value

    def add_hist(key, counts, total):
        old = out.get(key, ([0] * len(counts), 0.0))
        out[key] = ([a + b for a, b in zip(old[0], counts)], old[1] + total)

    for s in snaps:
        rank = str(s["rank"])
        for path, n in s["prefill_tokens"].items():
            add(("prefill_tokens", path, rank), n)
        for path, n in s.get("decode_tokens", {}).items():
            add(("decode_tokens", path, rank), n)
        add(("sparse_chunks", rank), s["sparse_chunks"])
        for layers, h in s["kept_density"].items():
            add_hist(("kept_density", layers, rank), h["counts"], h["sum"])
        e = s["estimation_seconds"]
        add_hist(("estimation_seconds", rank), e["counts"], e["sum"])
    return out


def _buckets(bounds, counts):
    cum, out = 0, []
    for bound, n in zip([*map(str, bounds), "+Inf"], counts):
        cum += n
        out.append((bound, cum))
    return out


class SparseMetricsCollector:
    def __init__(self, directory: str):
        self.directory = directory

    def describe(self):
        return []  # families are made at scrape time; nothing to check at registration

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        t = totals(read_snapshots(self.directory))
        tokens = CounterMetricFamily("vllm_sparse:prefill_tokens", _DOC["prefill_tokens"], labels=["path", "rank"])
        decode = CounterMetricFamily("vllm_sparse:decode_tokens", _DOC["decode_tokens"], labels=["path", "rank"])
        chunks = CounterMetricFamily("vllm_sparse:sparse_chunks", _DOC["sparse_chunks"], labels=["rank"])
        density = HistogramMetricFamily("vllm_sparse:kept_density", _DOC["kept_density"], labels=["layers", "rank"])
        est = HistogramMetricFamily("vllm_sparse:estimation_seconds", _DOC["estimation_seconds"], labels=["rank"])
        for key, v in sorted(t.items()):
            name, labels = key[0], list(key[1:])
            if name == "prefill_tokens":
                tokens.add_metric(labels, v)
            elif name == "decode_tokens":
                decode.add_metric(labels, v)
            elif name == "sparse_chunks":
                chunks.add_metric(labels, v)
            elif name == "kept_density":
                density.add_metric(labels, _buckets(DENSITY_BUCKETS, v[0]), v[1])
            else:
                est.add_metric(labels, _buckets(ESTIMATION_BUCKETS, v[0]), v[1])
        yield from (tokens, decode, chunks, density, est)


_registered = False


def register_collector(directory: str) -> None:
    """Once per process, on the registry vLLM serves with one API server."""
    global _registered
    if _registered:
        return
    from prometheus_client import REGISTRY

    REGISTRY.register(SparseMetricsCollector(directory))
    _registered = True
