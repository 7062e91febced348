"""vLLM general-plugin entry point: runs in every process vLLM starts (API server, engine, workers)."""

from __future__ import annotations


def register() -> None:
    """Register the SPARSE attention backend; idempotent. The first process to load the plugin
    (the API server) also serves the sparse path's metrics, which its workers write."""
    import os

    from vllm_sparse import compat, compile_log
    from vllm_sparse.metrics.paths import DIR_ENV, claim_metrics_dir

    compat.register_attention_backend()
    compat.install_cpu_platform_hook()
    compat.install_scheduler_hook()
    compat.on_engine_start(_warn_unused_config)
    compat.on_engine_config(_check_engine_config)
    compile_log.install()
    if claim_metrics_dir():
        from vllm_sparse.metrics.collector import register_collector

        register_collector(os.environ[DIR_ENV])


def _check_engine_config(vllm_config) -> None:
    # (imported only where an engine's config is made: the front end, not every process vLLM starts)
    from vllm_sparse.backend.plan_cache import check_engine_config

    check_engine_config(vllm_config)


def _warn_unused_config(vllm_config) -> None:
    # (imported as an engine starts: the plan's modules are not loaded into every process vLLM starts)
    from vllm_sparse.config.discovery import warn_unused_config

    warn_unused_config(vllm_config)
