"""Per-layer counters of what the sparse path kept, for `vllm-sparse eval` and debugging.

Off unless enabled (VLLM_SPARSE_STATS=1, or `enable()`): counting needs host syncs. With
VLLM_SPARSE_AUDIT=1 the sparse path also computes dense attention for every sparse chunk and
records how far the sparse output is from it and how much attention mass the kept blocks hold, per
layer and per q head. With VLLM_SPARSE_CALIBRATE set (a JSON list of candidate estimators and budgets,
`vllm-sparse calibrate`), the sparse layers attend densely and count, for every candidate, the dense
attention mass and the KV blocks its selection would read.

Each process counts its own chunks. With tensor parallelism a rank counts the q heads that read its
KV heads: its own, or, where a GQA group spans ranks, the whole group's (every rank of the group
selects for, and unions over, all of them), so a rank's densities are one device's for its KV heads.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from vllm_sparse import envs


@dataclass
class LayerStats:
    unions: int = 0  # block unions formed (one per chunk, or per union_tile query blocks)
    requested_kept: int = 0  # (q head, query block row, kv block) cells the budgets kept (q heads: see above)
    requested_total: int = 0  # causal cells
    union_kept: int = 0  # (kv head, query block row, kv block) cells attended after union, causal only
    union_total: int = 0
    audit: list[tuple[float, float]] = field(default_factory=list)  # (relative error, kept mass) per union
    # Audit, per head, over the query blocks past dense_below (`backend/attention_mass.py`):
    head_mass: list[float] = field(default_factory=list)  # per q head: dense mass in the blocks read, summed
    head_tokens: int = 0  # queries counted (per q head)
    kv_read: list[int] = field(default_factory=list)  # per KV head: causal cells read after union
    kv_causal: int = 0  # causal cells (per KV head)

    def add_heads(self, mass: list[float], tokens: int, read: list[int], causal: int) -> None:
        self.head_mass = [a + b for a, b in zip(self.head_mass, mass)] if self.head_mass else list(mass)
        self.kv_read = [a + b for a, b in zip(self.kv_read, read)] if self.kv_read else list(read)
        self.head_tokens += tokens
        self.kv_causal += causal

    @property
    def head_recall(self) -> list[float]:
        return [m / max(1, self.head_tokens) for m in self.head_mass]

    @property
    def kv_density(self) -> list[float]:
        return [r / max(1, self.kv_causal) for r in self.kv_read]

    @property
    def requested_density(self) -> float:
        return self.requested_kept / max(1, self.requested_total)

    @property
    def union_density(self) -> float:
        return self.union_kept / max(1, self.union_total)


@dataclass
class CalibrationStats:
    """One layer's sums for every candidate: dense mass read per q head, cells read per KV head, and per
    q head the queries by the recall of their query block row (a histogram, for row quantiles). Apart,
    each chunk's final query block by the chunk's end: at the prompt's end, the rows that produce the
    answer (`--answer-rows`)."""

    mass: torch.Tensor  # [candidates, q_heads] fp64
    read: torch.Tensor  # [candidates, kv_heads] int64
    rows: torch.Tensor  # [candidates, q_heads, RECALL_BINS] fp64
    tokens: int = 0
    causal: int = 0
    # chunk end (seq_len) -> (mass read [candidates, q_heads], the block's queries [q_heads]), fp64
    final_block: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def add_final_block(self, end: int, mass: torch.Tensor, queries: torch.Tensor) -> None:
        have = self.final_block.get(end)
        self.final_block[end] = (mass, queries) if have is None else (have[0] + mass, have[1] + queries)

    def raw(self) -> dict:
        return {"mass": self.mass.tolist(), "read": self.read.tolist(), "rows": self.rows.tolist(),
                "tokens": self.tokens, "causal": self.causal,
                "final_block": {end: {"mass": m.tolist(), "queries": q.tolist()}
                                for end, (m, q) in self.final_block.items()}}


class SparseStats:
    def __init__(self):
        self.enabled = envs.flag("VLLM_SPARSE_STATS")
        self.audit = envs.flag("VLLM_SPARSE_AUDIT")
        self.layers: dict[int, LayerStats] = defaultdict(LayerStats)
        # [{"estimator": {"name": ..., params}, "budget": {...}}, ...] while calibrating, else None
        raw = envs.get("VLLM_SPARSE_CALIBRATE") or "null"
        try:
            self.candidates: list[dict] | None = json.loads(raw)
        except json.JSONDecodeError as e:  # (set by `vllm-sparse calibrate`; by hand, a clear error at start)
            raise ValueError(f"VLLM_SPARSE_CALIBRATE is not JSON ({e}): {raw[:80]!r}") from None
        self.calibration: dict[int, CalibrationStats] = {}

    def enable(self, audit: bool = False) -> None:
        self.enabled, self.audit = True, audit

    def calibrate(self, candidates: list[dict] | None) -> None:
        """Measure these candidates (None: stop) instead of attending sparsely."""
        self.candidates = candidates
        self.calibration.clear()

    def reset(self) -> None:
        self.layers.clear()
        self.calibration.clear()

    def snapshot(self) -> dict[int, LayerStats]:
        return dict(sorted(self.layers.items()))


STATS = SparseStats()
