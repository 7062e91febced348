"""vLLM general-plugin entry point: runs in every process vLLM starts (API server, engine, workers)."""

from __future__ import annotations


def register() -> None:
    """Register the SPARSE attention backend; idempotent."""
    from vllm_sparse import compat

    compat.register_attention_backend()
    compat.install_cpu_platform_hook()
