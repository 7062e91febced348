"""Per step: which requests' prefill chunks take the sparse path, and metadata for the rest.

Built once per step by the metadata builder (host data only), shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_sparse import compat
from vllm_sparse.config.plan import chunk_work
from vllm_sparse.decode.step import DecodeRows
from vllm_sparse.selection.tile_tables import chunk_tile_bounds
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


@dataclass(frozen=True)
class SparseBatch:
    chunks: tuple[SparseChunk, ...]
    dense_tokens: torch.Tensor | None  # token indices of the dense requests (None when there are none)
    dense_metadata: object | None  # the dense backend's metadata for those requests alone
    decode: DecodeRows | None = None  # the step's rows, for layers that select pages at decode
    # Per chunk, its union tiles' (query_start_loc, seq_lens) on the device (`tile_geometry`), built once
    # per step for every layer; None where the caller builds them per call (`tile_seq_lens`).
    tiles: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
    # Layers that run dense in this step although it has sparse chunks: lately they kept more than the plan's
    # `dense_above` of their blocks (`density_guard.py`).
    dense_layers: frozenset[int] = frozenset()
    guard: object | None = None  # the builder's `density_guard.DensityGuard`, which the sparse layers count into


# Each array of `tile_geometry` starts at a multiple of this many int32s (16 bytes) in the step's one device
# tensor: Triton specialises a kernel on each pointer's 16-byte alignment, so a slice at any other offset
# would compile another variant mid-request (seen: the first 32K prompt waited 0.5 s for `_tile_tables_kernel`).
_ALIGN_INT32 = 4


def tile_geometry(chunks: list[SparseChunk], block_size: int, union_tile: int | None, device: torch.device
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Each chunk's union tiles as the attention kernels take them, (query_start_loc [tiles + 1], seq_lens
    [tiles]) int32, from host lengths: one copy to the device per step instead of a few launches per
    chunk and layer. Every array starts 16-byte aligned."""
    flat: list[int] = []
    spans = []
    for c in chunks:
        b = chunk_tile_bounds(c.context_len, c.q_end - c.q_start, block_size, union_tile)
        for values in (b, [c.context_len + x for x in b[1:]]):
            flat.extend([0] * (-len(flat) % _ALIGN_INT32))
            spans.append((len(flat), len(values)))
            flat.extend(values)
    dev = to_device(torch.tensor(flat, dtype=torch.int32), device)
    views = [dev[at:at + n] for at, n in spans]
    return tuple(zip(views[0::2], views[1::2]))


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
