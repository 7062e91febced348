"""Evaluation and calibration instrumentation around the sparse path.

`vllm-sparse eval` (VLLM_SPARSE_STATS, VLLM_SPARSE_AUDIT) counts densities and compares the sparse output
with dense attention; `vllm-sparse calibrate` (VLLM_SPARSE_CALIBRATE) attends densely and measures
candidate plans. Both sync with the host. The serving path (`sparse_path.attend_sparse_chunks`) knows
none of it: it takes an observer, None while serving, and calls its hooks where there is one.
`attend_observed` is what the backend calls: the serving path with the observer the process's
settings ask for (`STATS`, which the eval and calibration tools switch at run time).
"""

from __future__ import annotations

import torch

from vllm_sparse.backend.calibration import calibrate_chunk
from vllm_sparse.backend.sparse_path import attend_sparse_chunks
from vllm_sparse.backend.stats_record import record_density, record_with_audit
from vllm_sparse.estimators.base import ChunkContext
from vllm_sparse.selection.stats import STATS
from vllm_sparse.selection.tile_tables import tile_unions_per_row


class StatsObserver:
    """The hooks `attend_sparse_chunks` calls when eval or calibration is on."""

    def kernel(self, kernel: str) -> str:
        """The dense audit compares against the exact reference path; density counts work on either."""
        return "reference" if STATS.audit else kernel

    def calibrating(self) -> bool:
        return STATS.candidates is not None

    def calibrate(self, ctx: ChunkContext, out: torch.Tensor, layer: int, dense_below: int, tile: int) -> None:
        """Attend densely into `out` and measure the candidates (`calibration.calibrate_chunk`)."""
        calibrate_chunk(ctx, out, layer, dense_below, tile)

    def chunk(self, layer: int, ctx: ChunkContext, mask: torch.Tensor, union: torch.Tensor, tile: int,
              n_tiles: int) -> None:
        """A chunk attended in one launch: every tile's union counted, repeated for each of its rows."""
        rows = ctx.num_query_blocks
        record_density(layer, ctx, mask, tile_unions_per_row(union, tile, rows), slice(0, rows), n_tiles)

    def tile(self, layer: int, ctx: ChunkContext, mask: torch.Tensor, union: torch.Tensor, rows: slice, tokens: slice,
             out: torch.Tensor, selected_rows: slice, list_of_head: torch.Tensor | None) -> None:
        """One union tile of the reference path: densities, and with the audit its distance from dense."""
        record_with_audit(layer, ctx, mask, union, rows, tokens, out, selected_rows, list_of_head)


OBSERVER = StatsObserver()


def active_observer() -> StatsObserver | None:
    return OBSERVER if STATS.enabled or STATS.candidates is not None else None


def attend_observed(*args, **kwargs) -> None:
    """`attend_sparse_chunks` with the observer eval or calibration asks for (none while serving)."""
    attend_sparse_chunks(*args, observer=active_observer(), **kwargs)
