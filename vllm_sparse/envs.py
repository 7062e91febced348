"""Every environment variable vllm-sparse reads, declared in one place (as vLLM's own `envs.py`):
its name, default and what it does. Modules read them through `get` / `flag`, which refuse a name
not declared here, so a typo fails at once; `vllm-sparse env` lists them with their values."""

from __future__ import annotations

import contextlib
import os

VARIABLES: dict[str, tuple[str, str]] = {
    # name: (default, what it does)
    "VLLM_SPARSE_CONFIG": ("", "the sparse-attention config file for engines given none in --additional-config"),
    "VLLM_SPARSE_KERNEL": ("", "force the sparse chunks' attention kernel: fa3, fa2, triton or reference (checked at "
                               "engine start; default: by device)"),
    "VLLM_SPARSE_WORKSPACE_MIB": ("512", "cap on the estimators' workspace reserved at start, MiB; a chunk that "
                                         "needs more is scored in slabs"),
    "VLLM_SPARSE_METRICS": ("1", "0 turns off the workers' /metrics counters"),
    "VLLM_SPARSE_METRICS_INTERVAL_S": ("1", "seconds between a worker's metrics snapshots"),
    "VLLM_SPARSE_METRICS_DIR": ("", "where workers write metrics snapshots (set by the process that serves them)"),
    "VLLM_SPARSE_FA_PACK_LISTS": ("1", "0: a short sparse chunk takes a FlashAttention call per page list instead of "
                                  "one for all of them (more host calls; docs/kernels.md)"),
    "VLLM_SPARSE_LOG_STEPS": ("0", "1 logs every step that takes the sparse path (debug)"),
    "VLLM_SPARSE_LOG_COMPILES": ("0", "1 logs every Triton kernel a process compiles or loads, with its "
                                      "specialisation: which variant a request waited for (debug)"),
    "VLLM_SPARSE_CHECK_SUMMARIES": ("0", "1 checks decode page summaries against the cache on the CPU path (debug)"),
    "VLLM_SPARSE_STATS": ("0", "1: `vllm-sparse eval` counters (densities; host syncs) in the workers"),
    "VLLM_SPARSE_AUDIT": ("0", "1: with STATS, the eval's dense audit (the sparse chunks run the torch reference)"),
    "VLLM_SPARSE_CALIBRATE": ("", "JSON list of candidate plans `vllm-sparse calibrate` measures (attends densely)"),
}


def get(name: str) -> str:
    """The variable's value, or its declared default."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not a declared vllm-sparse environment variable (vllm_sparse/envs.py)")
    return os.environ.get(name) or VARIABLES[name][0]


@contextlib.contextmanager
def set_for(vllm: dict[str, str] | None = None, **values: str):
    """Declared variables set while the block runs (the engines it starts read them in their workers), then as they
    were: an eval or a calibration in a process must not leave its counters on for the engines served after it.
    `vllm`: vLLM's own variables the block needs, restored the same way."""
    for name in values:
        get(name)  # declared, or a KeyError naming it
    values = {**(vllm or {}), **values}
    if not all(isinstance(v, str) for v in values.values()):
        raise TypeError(f"environment values are strings: {values}")
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def flag(name: str) -> bool:
    """A 0/1 variable; anything else is an error naming it (a setting read as off would be ignored silently)."""
    value = get(name)
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: give 0 or 1")
    return value == "1"


def positive_float(name: str) -> float:
    """A number of seconds (or the like) above zero and finite; anything else is an error naming the variable
    (a negative or NaN interval would stop the thread that sleeps on it, silently)."""
    value = get(name)
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: give a number above 0") from None
    if not 0 < number < float("inf"):
        raise ValueError(f"{name}={value!r}: give a finite number above 0")
    return number
