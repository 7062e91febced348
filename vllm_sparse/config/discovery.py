"""Which config file applies to a model: explicit, environment, shipped, or none (dense)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from vllm_sparse import envs
from vllm_sparse.config.errors import SparseConfigError
from vllm_sparse.config.loader import load_config
from vllm_sparse.config.plan import match_entry
from vllm_sparse.config.schema import AUTO_APPLIED
from vllm_sparse.log import logger

ENV_VAR = "VLLM_SPARSE_CONFIG"


def shipped_configs() -> list[Path]:
    # Run from a source checkout (e.g. on PYTHONPATH beside another editable install), the checkout's
    # own configs/; installed, the package data vllm_sparse.configs (the same files in an editable install).
    checkout = Path(__file__).resolve().parents[2] / "configs"
    if (checkout / "schema.json").is_file() and (checkout.parent / "vllm_sparse" / "config").is_dir():
        root = checkout
    else:
        root = Path(str(resources.files("vllm_sparse.configs")))
    return sorted(p for p in root.iterdir() if p.name.endswith(".yaml"))


def find_config(additional_config: dict | None, shape) -> tuple[Path | None, str]:
    """-> (path or None, how it was found). Order: --additional-config, env var, a shipped plan that names
    the model (a name glob; `plan.match_entry(by_name=True)`).

    A shipped config applies on its own only where its matching entry's provenance is measured or
    published; one that matches but is calibrated (or says nothing of what backs it) is skipped with one
    log line: such a plan is applied only when named by path."""
    sparse = (additional_config or {}).get("sparse")
    if sparse is not None:  # an explicit setting: refused when it cannot be read, never passed over for discovery
        problems = []
        if not isinstance(sparse, dict):
            problems.append(("sparse", f'expected {{"config": PATH}}, got {type(sparse).__name__}'))
        else:
            problems += [(f"sparse.{k}", f"unknown key {k!r}; the only key is 'config' (a plan's path)")
                         for k in sparse if k != "config"]
            path = sparse.get("config")
            if not isinstance(path, str) or not path.strip():
                problems.append(("sparse.config", f"expected the path of a plan (YAML), got {path!r}"))
        if problems:
            raise SparseConfigError("--additional-config", problems)
        return Path(sparse["config"]), "--additional-config"
    if envs.get(ENV_VAR):
        return Path(envs.get(ENV_VAR)), ENV_VAR
    for path in shipped_configs():
        cfg = load_config(path)
        idx = match_entry(cfg, shape, by_name=True)  # the families a shipped plan names, not its architecture
        if idx is None:
            continue
        provenance = cfg.models[idx].provenance
        if provenance is not None and provenance.kind in AUTO_APPLIED:
            return path, "shipped config"
        logger.info("vllm-sparse: %s has a plan for %s that is %s, so it is not applied on its own; name it to use "
                    "it: --additional-config '{\"sparse\": {\"config\": \"%s\"}}'", path, shape.name,
                    f"{provenance.kind}" if provenance else "backed by nothing it names (no provenance)", path)
    return None, "none"


def warn_unused_config(vllm_config) -> None:
    """A plan given to an engine that does not attend on SPARSE (no `--attention-backend sparse`) does nothing: said
    once, as the engine starts (`compat.on_engine_start`), so a forgotten flag is not a silent dense run."""
    from vllm_sparse import compat

    if compat.attends_on_sparse(vllm_config):
        return
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    additional = getattr(vllm_config, "additional_config", None)  # (a dict, or another plugin's hashable object)
    if isinstance(additional, dict) and additional.get("sparse") is not None:
        given = "--additional-config's sparse.config"
    elif envs.get(ENV_VAR):
        given = ENV_VAR
    else:
        return
    logger.warning("vllm-sparse: a sparse plan is given (%s), but this engine attends on %s, not SPARSE: the plan is "
                   "not used. Start it with --attention-backend sparse (LLM(..., attention_backend=\"sparse\"))",
                   given, getattr(backend, "name", None) or "vLLM's default backend")
