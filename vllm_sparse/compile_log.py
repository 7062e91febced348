"""`VLLM_SPARSE_LOG_COMPILES=1`: one log line for every Triton kernel a process compiles or loads from
Triton's disk cache into memory, with its specialisation, so that a request that waited for a compile shows
which kernel variant the engine's start did not cover (`backend/warmup.py`, `kernels/launch.py`).

Triton calls `knobs.runtime.jit_cache_hook` on each in-memory cache miss, before it compiles; the hook
only logs (it returns None, so Triton goes on as without it). Warnings, since vLLM's workers may log
nothing below that; a debug aid, off by default."""

from __future__ import annotations

import os
import time

from vllm_sparse import envs
from vllm_sparse.log import logger

_T0 = time.monotonic()


def _log_compile(*, repr=None, fn=None, **_) -> None:  # noqa: A002 (Triton's keyword)
    name = f"{getattr(fn, 'module', '?')}.{getattr(fn, 'name', '?')}"
    logger.warning("vllm-sparse: Triton kernel %s compiled at %.1f s after the plugin loaded: %s",
                   name, time.monotonic() - _T0, repr)


def install() -> bool:
    """Log Triton compiles in this process if `VLLM_SPARSE_LOG_COMPILES` asks; True when installed."""
    if not envs.flag("VLLM_SPARSE_LOG_COMPILES"):
        return False
    try:
        from triton import knobs
    except ImportError:  # (no Triton: nothing compiles)
        return False
    knobs.runtime.jit_cache_hook = _log_compile
    # (a warning, as the lines it asks for: vLLM's workers may log nothing below that)
    logger.warning("vllm-sparse: logging every Triton compile in process %d (VLLM_SPARSE_LOG_COMPILES)", os.getpid())
    return True
