"""Per step: which requests' prefill chunks take the sparse path, and metadata for the rest.

Built once per step by the metadata builder (host data only), shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from vllm_sparse import compat
from vllm_sparse.config.plan import chunk_work
from vllm_sparse.decode.step import DecodeRows
from vllm_sparse.selection.tile_tables import chunk_dense_tail, chunk_tile_bounds
from vllm_sparse.transfer import to_device


@dataclass(frozen=True)
class SparseChunk:
    req: int  # row in the batch (block table row)
    q_start: int  # token range of this chunk in the batch
    q_end: int
    context_len: int  # tokens of the request before this chunk

    @property
    def seq_len(self) -> int:
        return self.context_len + self.q_end - self.q_start


class DenseTail(NamedTuple):
    """A chunk's trailing union tiles, which hold its last `dense_tail` tokens' rows and so attend densely: one dense
    FlashAttention call after the sparse call over the tiles before them. Device views of the step's geometry."""
    sparse_tiles: int  # union tiles before them (host)
    first_token: int  # their first query token in the chunk (host)
    sparse_query_start_loc: torch.Tensor  # [sparse_tiles + 1]: the tiles before them
    sparse_seq_lens: torch.Tensor  # [sparse_tiles]
    query_start_loc: torch.Tensor  # [0, their query tokens]: the dense call's
    seq_len: torch.Tensor  # [1]: the chunk's end
    # [tiles + 1]: every tile's first query token, the tail's tiles' at their first (no queries): the tiles of one
    # FlashAttention call for every page list (`flash_compact.ListPacking`), which leaves them to the dense call
    packed_query_start_loc: torch.Tensor


class TileGeometry(NamedTuple):
    """One chunk's union tiles as the attention kernels take them, int32 on the device."""
    query_start_loc: torch.Tensor  # [tiles + 1], inside the chunk
    seq_lens: torch.Tensor  # [tiles]: tokens up to each tile's last query
    tail: DenseTail | None  # the plan's `dense_tail`; None where it is off
    made_for: tuple[int, int | None, int]  # (block_size, union_tile, dense_tail) it was made with


def dense_tail_views(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, split: tuple[int, int],
                     tail_query_start_loc: torch.Tensor, packed_query_start_loc: torch.Tensor) -> DenseTail:
    """A `DenseTail` over a chunk's tile geometry, the dense call's query_start_loc (`chunk_dense_tail`'s split) and the
    tiles' starts for a packed call (`query_start_loc` capped at the split's first token)."""
    n, first_token = split
    return DenseTail(n, first_token, query_start_loc[:n + 1], seq_lens[:n], tail_query_start_loc, seq_lens[-1:],
                     packed_query_start_loc)


@dataclass(frozen=True)
class SparseBatch:
    chunks: tuple[SparseChunk, ...]
    dense_tokens: torch.Tensor | None  # token indices of the dense requests (None when there are none)
    dense_metadata: object | None  # the dense backend's metadata for those requests alone
    decode: DecodeRows | None = None  # the step's rows, for layers that select pages at decode
    # Per chunk, its union tiles on the device (`tile_geometry`), built once per step for every layer; None where
    # the caller builds them per call (`attend.chunk_tile_geometry`).
    tiles: tuple[TileGeometry, ...] | None = None
    # Layers that run dense in this step although it has sparse chunks: lately they kept more than the plan's
    # `dense_above` of their blocks (`density_guard.py`).
    dense_layers: frozenset[int] = frozenset()
    guard: object | None = None  # the builder's `density_guard.DensityGuard`, which the sparse layers count into


# Each array of `tile_geometry` starts at a multiple of this many int32s (16 bytes) in the step's one device
# tensor: Triton specialises a kernel on each pointer's 16-byte alignment, so a slice at any other offset
# would compile another variant mid-request (seen: the first 32K prompt waited 0.5 s for `_tile_tables_kernel`).
_ALIGN_INT32 = 4


def tile_geometry(chunks: list[SparseChunk], block_size: int, union_tile: int | None, device: torch.device,
                  dense_tail: int = 0) -> tuple[TileGeometry, ...]:
    """Each chunk's union tiles as the attention kernels take them (`TileGeometry`), with the plan's `dense_tail`
    split (`chunk_dense_tail`), from host lengths: one copy to the device per step instead of a few launches and
    views per chunk and layer. Every array starts 16-byte aligned."""
    flat: list[int] = []
    geometry = []
    for c in chunks:
        q_len = c.q_end - c.q_start
        b = chunk_tile_bounds(c.context_len, q_len, block_size, union_tile)
        split = chunk_dense_tail(c.context_len, q_len, block_size, union_tile, dense_tail)
        arrays = [b, [c.context_len + x for x in b[1:]]]
        if split:
            arrays += [[0, q_len - split[1]], [min(x, split[1]) for x in b]]
        spans = []
        for values in arrays:
            flat.extend([0] * (-len(flat) % _ALIGN_INT32))
            spans.append((len(flat), len(values)))
            flat.extend(values)
        geometry.append((spans, split))
    dev = to_device(torch.tensor(flat, dtype=torch.int32), device)
    out = []
    for spans, split in geometry:
        views = [dev[at:at + n] for at, n in spans]
        tail = dense_tail_views(views[0], views[1], split, views[2], views[3]) if split else None
        out.append(TileGeometry(views[0], views[1], tail, (block_size, union_tile, dense_tail)))
    return tuple(out)


def selected_row_counts(q_lens: torch.Tensor, seq_lens: torch.Tensor, block_size: int, dense_below: int,
                        dense_tail: int) -> torch.Tensor:
    """Per chunk, its query blocks past those before `dense_below` and before those holding its last `dense_tail`
    tokens (`sparse_path.selected_rows`, on the host tensors of a whole step); <= 0: none."""
    context = seq_lens - q_lens
    first_row, rows_end = context // block_size, (seq_lens + block_size - 1) // block_size
    dense = (dense_below // block_size - first_row).clamp(min=0)
    tail = rows_end - torch.maximum(seq_lens - dense_tail, context) // block_size
    return rows_end - first_row - dense - tail


_NO_INDICES = torch.empty(0, dtype=torch.long)  # (read only: callers build nothing from an all-dense step's)


def classify(cm, min_context: int, min_query_len: int = 2, min_work: int = 0, dense_tail: int = 0,
             block_size: int = 0, dense_below: int = 0) -> tuple[list[SparseChunk], torch.Tensor, torch.Tensor]:
    """-> (sparse chunks, dense request indices, dense token indices), all from host data.

    A chunk goes sparse when all of these hold:
    - its request's context, this chunk included, reaches `min_context` tokens (the plan's
      `sparse_context_floor`: then some of its query blocks lie past those that attend densely);
    - it has at least `min_query_len` query tokens (the plan's `min_query_tokens`: a decode step, a
      speculative verify step or a short suffix after a prefix-cache hit reads the cache like a decode);
    - its attention work (`chunk_work`) reaches `min_work` token pairs (the plan's `min_chunk_work`):
      below it a sparse step's fixed costs exceed what it saves (a few new tokens on a cached document);
    - with a `dense_tail` (the plan's, in `block_size`-token blocks), some query block lies between the rows
      before `dense_below` and the tail's rows: a chunk whose every row attends densely would only estimate;
    - it has no multimodal tokens with bidirectional attention.
    """
    if cm.max_query_len < max(2, min_query_len):  # every decode step: no chunk qualifies (a host int, no tensor op)
        return [], _NO_INDICES, _NO_INDICES
    qsl = cm.query_start_loc_cpu[: cm.num_reqs + 1]
    seq_lens = compat.seq_lens_cpu(cm)[: cm.num_reqs]
    q_lens = qsl[1:] - qsl[:-1]
    sparse = (q_lens >= max(2, min_query_len)) & (seq_lens >= min_context)
    if min_work > 0:
        sparse &= chunk_work(q_lens.long(), seq_lens.long()) >= min_work
    if dense_tail > 0:
        sparse &= selected_row_counts(q_lens.long(), seq_lens.long(), block_size, dense_below, dense_tail) > 0
    # Requests with multimodal tokens that attend bidirectionally (PrefixLM) stay on the dense path,
    # which keeps their ranges; the sparse path is causal only.
    for r in compat.bidirectional_ranges(cm):
        if r < len(sparse):
            sparse[r] = False
    if not bool(sparse.any()):  # short prompts, short follow-ups: nothing more to build
        return [], _NO_INDICES, _NO_INDICES
    chunks = [
        SparseChunk(r, int(qsl[r]), int(qsl[r + 1]), int(seq_lens[r] - q_lens[r]))
        for r in torch.nonzero(sparse).flatten().tolist()
    ]
    dense_reqs = torch.nonzero(~sparse).flatten()
    dense_tokens = torch.cat([torch.arange(int(qsl[r]), int(qsl[r + 1])) for r in dense_reqs.tolist()]) \
        if len(dense_reqs) else torch.empty(0, dtype=torch.long)
    return chunks, dense_reqs, dense_tokens
