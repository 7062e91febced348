"""Which config file applies to a model: explicit, environment, shipped, or none (dense)."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from vllm_sparse.config.errors import SparseConfigError
from vllm_sparse.config.loader import load_config
from vllm_sparse.config.plan import match_entry

ENV_VAR = "VLLM_SPARSE_CONFIG"


def shipped_configs() -> list[Path]:
    root = resources.files("vllm_sparse.configs")
    return sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml"))


def find_config(additional_config: dict | None, shape) -> tuple[Path | None, str]:
    """-> (path or None, how it was found). Order: --additional-config, env var, shipped by architecture."""
    sparse = (additional_config or {}).get("sparse") or {}
    if not isinstance(sparse, dict):
        raise SparseConfigError("--additional-config", [("sparse", 'expected {"config": PATH}')])
    if sparse.get("config"):
        return Path(sparse["config"]), "--additional-config"
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]), ENV_VAR
    for path in shipped_configs():
        cfg = load_config(path)
        if match_entry(cfg, shape) is not None:
            return path, "shipped config"
    return None, "none"
