"""What the workers and the API server agree on: where snapshots go, and the histogram buckets."""

from __future__ import annotations

import atexit
import multiprocessing
import os
import shutil
import tempfile

from vllm_sparse import envs

DIR_ENV = "VLLM_SPARSE_METRICS_DIR"
DENSITY_BUCKETS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # share of causal pages
ESTIMATION_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0)  # seconds
LAYER_GROUP = 8  # kept density is reported per group of this many consecutive layers


_claimed_by: int | None = None


def claim_metrics_dir() -> bool:
    """In a process that no multiprocessing parent started (the API server, or the script that makes
    an LLM), make a new snapshot directory; the engine and worker processes it starts inherit the
    variable. A `vllm serve` started from another such process (a script, a test) gets its own
    rather than its parent's. True when this process made it (it serves the metrics and removes
    the directory)."""
    global _claimed_by
    if _claimed_by == os.getpid() or (multiprocessing.parent_process() is not None and envs.get(DIR_ENV)):
        return False
    _claimed_by = os.getpid()
    path = tempfile.mkdtemp(prefix="vllm-sparse-metrics-")
    os.environ[DIR_ENV] = path
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    return True


def metrics_dir() -> str:
    path = envs.get(DIR_ENV) or (claim_metrics_dir() and envs.get(DIR_ENV))
    os.makedirs(path, exist_ok=True)
    return path
