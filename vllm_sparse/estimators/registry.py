"""Name -> estimator: its parameter model (validated from the config) and its scoring function."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_sparse.strict import StrictModel


class EstimatorParams(StrictModel):
    """Base of every estimator's parameters: unknown keys are config errors naming the allowed ones."""


@dataclass(frozen=True)
class Estimator:
    name: str
    params: type[EstimatorParams]
    # (chunk, params) -> block scores [heads, query_blocks, kv_blocks], log-domain, -inf = not causal
    score: Callable[..., torch.Tensor] | None
    summary: str
    keeps_all: bool = False  # a head given this estimator runs dense
    # params -> True when every q head of a GQA group gets the same scores: the backend then
    # selects once per group instead of once per head (same blocks, a quarter of the sorting for 4:1)
    same_in_group: Callable[[EstimatorParams], bool] = lambda params: False
    # params -> True when a head's scores depend on the other q heads of its GQA group (pooled over
    # the group): where tensor parallelism spreads a group over ranks, they then exchange queries
    reads_group: Callable[[EstimatorParams], bool] = lambda params: False
    # (params, chunk tokens) -> query rows scored per chunk through the fused row scorers, whose
    # workspace holds a float per (head, row, KV block): the backend reserves it at start
    workspace_rows: Callable[[EstimatorParams, int], int] = lambda params, chunk_tokens: 0
    # Settings that may differ between the heads of one scoring call: heads whose plans differ only there
    # are scored together by `score_heads(chunk, params per head)` (one pass over the context, not one per
    # setting: MInference's plans give every head its own sizes)
    per_head_fields: tuple[str, ...] = ()
    score_heads: Callable[..., torch.Tensor] | None = None


_REGISTRY: dict[str, Estimator] = {}


def register_estimator(name: str, params: type[EstimatorParams], summary: str, keeps_all: bool = False,
                       same_in_group: Callable[[EstimatorParams], bool] | None = None,
                       reads_group: Callable[[EstimatorParams], bool] | None = None,
                       workspace_rows: Callable[[EstimatorParams, int], int] | None = None,
                       per_head_fields: tuple[str, ...] = (), score_heads: Callable[..., torch.Tensor] | None = None):
    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"estimator {name!r} registered twice")
        extra = {k: v for k, v in (("same_in_group", same_in_group), ("reads_group", reads_group),
                                   ("workspace_rows", workspace_rows), ("per_head_fields", per_head_fields),
                                   ("score_heads", score_heads)) if v}
        _REGISTRY[name] = Estimator(name, params, fn, summary, keeps_all, **extra)
        return fn

    return wrap


def get_estimator(name: str) -> Estimator:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown estimator {name!r}; allowed: {', '.join(estimator_names())}") from None


def estimator_names() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def all_estimators() -> list[Estimator]:
    _ensure_loaded()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def _ensure_loaded() -> None:
    # Importing the package registers every built-in estimator module.
    import vllm_sparse.estimators  # noqa: F401
