"""Per-layer counters of what the sparse path kept, for `vllm-sparse eval` and debugging.

Off unless enabled (VLLM_SPARSE_STATS=1, or `enable()`): counting needs host syncs. With
VLLM_SPARSE_AUDIT=1 the sparse path also computes dense attention for every sparse chunk and
records how far the sparse output is from it and how much attention mass the kept blocks hold.

Each process counts its own chunks. With tensor parallelism a rank counts the q heads that read its
KV heads: its own, or, where a GQA group spans ranks, the whole group's (every rank of the group
selects for, and unions over, all of them), so a rank's densities are one device's for its KV heads.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class LayerStats:
    unions: int = 0  # block unions formed (one per chunk, or per union_tile query blocks)
    requested_kept: int = 0  # (q head, query block row, kv block) cells the budgets kept (q heads: see above)
    requested_total: int = 0  # causal cells
    union_kept: int = 0  # (kv head, query block row, kv block) cells attended after union, causal only
    union_total: int = 0
    audit: list[tuple[float, float]] = field(default_factory=list)  # (relative error, kept mass) per union

    @property
    def requested_density(self) -> float:
        return self.requested_kept / max(1, self.requested_total)

    @property
    def union_density(self) -> float:
        return self.union_kept / max(1, self.union_total)


class SparseStats:
    def __init__(self):
        self.enabled = os.environ.get("VLLM_SPARSE_STATS", "0") == "1"
        self.audit = os.environ.get("VLLM_SPARSE_AUDIT", "0") == "1"
        self.layers: dict[int, LayerStats] = defaultdict(LayerStats)

    def enable(self, audit: bool = False) -> None:
        self.enabled, self.audit = True, audit

    def reset(self) -> None:
        self.layers.clear()

    def snapshot(self) -> dict[int, LayerStats]:
        return dict(sorted(self.layers.items()))


STATS = SparseStats()
