"""Attention over one chunk's kept blocks: the GPU kernels in one launch, or the exact torch reference.

Both take the chunk's kept-block mask (a row per q head, or per KV head when a GQA group selected
together; where tensor parallelism splits a GQA group, a row per q head of the whole group) and its
union tiles: each tile's union over its rows and over the q heads of a KV head is
the page list the tile's queries attend to. Without the union over heads (`union_heads: false`), each
q head's union over the tile's rows is its own page list: the work follows each head's kept blocks.

A plan that keeps key columns token by token (`vertical_slash` with `blocks: columns`) adds a second pass
(`kernels/column_attention.py`): each page list's columns (its q heads' union), less those its tile's kept
blocks hold, joined to the block pass by log-sum-exp.
"""

from __future__ import annotations

import torch

from vllm_sparse.backend.batch import SparseChunk, TileGeometry, dense_tail_views
from vllm_sparse.estimators.base import COLUMN_PAD, ChunkContext
from vllm_sparse.kernels.column_attention import column_attention, column_attention_ref, merge_attention
from vllm_sparse.kernels.flash_compact import (
    FLASH_VERSIONS,
    default_num_splits,
    dense_flash,
    list_packing,
    sparse_attention_flash,
)
from vllm_sparse.kernels.reference import sparse_paged_attention_ref
from vllm_sparse.kernels.sparse_attention import sparse_paged_attention
from vllm_sparse.selection.pages import block_mask_to_page_csr
from vllm_sparse.selection.tile_tables import (
    chunk_causal_pages,
    chunk_dense_tail,
    tile_seq_lens,
    tile_tables_triton,
    tile_unions,
)
from vllm_sparse.selection.union import blocks_to_pages, union_blocks


def mask_kv_heads(mask: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """KV head of each row of a kept-block mask: its rows come in equal consecutive groups per KV head
    (a row per q head of this rank, per q head of a group that spans ranks, or per KV head)."""
    rows = mask.shape[0]
    return torch.arange(rows, device=mask.device) // (rows // num_kv_heads)


def page_lists_per_q_head(mask: torch.Tensor, q_heads: int, union_heads: bool) -> bool:
    """Whether each q head attends to its own page list: the plan asks it (`union_heads: false`) and the
    mask has a row per q head of this rank (a group that selected together has one list anyway)."""
    return not union_heads and mask.shape[0] == q_heads


def column_lists(columns: torch.Tensor, lists: int) -> torch.Tensor:
    """Kept columns [q_heads, K] (sorted, COLUMN_PAD-padded) -> one sorted list per page list [lists, K']: a
    q head's own, or the union of a KV head's q heads (duplicates become padding). No host sync."""
    per = columns.shape[0] // lists
    if per == 1:
        return columns
    merged = columns.reshape(lists, per * columns.shape[1]).sort(-1).values
    dup = torch.zeros_like(merged, dtype=torch.bool)
    dup[:, 1:] = merged[:, 1:] == merged[:, :-1]
    return merged.masked_fill(dup, COLUMN_PAD).sort(-1).values


def shared_column_ranges(lists: int, width: int, segments: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, ends) per (segment, list) into `column_lists(...).flatten()`: every segment reads its list's row."""
    starts = (torch.arange(lists, device=device, dtype=torch.int32) * width).repeat(segments)
    return starts, starts + width


def chunk_tile_geometry(ctx: ChunkContext, tile: int, dense_tail: int) -> TileGeometry:
    """The chunk's `TileGeometry` built now on the device (where no builder made the step's: `batch.tile_geometry`)."""
    n_tiles = -(-ctx.num_query_blocks // tile)
    bounds, seq_lens = tile_seq_lens(ctx.first_query_block, n_tiles, tile, ctx.block_size, ctx.context_len, ctx.q_len,
                                     ctx.q.device)
    split = chunk_dense_tail(ctx.context_len, ctx.q_len, ctx.block_size, tile, dense_tail)
    n = split[0] if split else 0
    tail = dense_tail_views(bounds, seq_lens, split, bounds[n::n_tiles - n] - bounds[n],
                            bounds.clamp(max=split[1])) if split else None
    return TileGeometry(bounds, seq_lens, tail, (ctx.block_size, tile, dense_tail))


def attend_chunk_with_kernel(ctx: ChunkContext, mask: torch.Tensor, tile: int, c: SparseChunk,
                             output: torch.Tensor, block_table: torch.Tensor, kernel: str, layer: int,
                             union_heads: bool = True, observer=None,
                             tiles: TileGeometry | None = None,
                             fa3_query: tuple[torch.Tensor, torch.Tensor] | None = None,
                             dense_tail: int = 0,
                             ) -> tuple[torch.Tensor, int]:
    """All union tiles of one chunk in one kernel launch (FlashAttention: a call per page list), no host sync.
    Returns (KV pages read: device counts to sum, causal KV pages: a host number) over the tiles and page
    lists.

    Tile t's union of rows and of the q heads of each KV head becomes segment t's page list; the
    tile's query tokens attend to it, causally. Every tile's list ends with the tile's own blocks
    (each row keeps its diagonal block), which the FlashAttention path relies on.

    `fa3_query`: (fp8 queries, their 0-dim scale tensor) where vLLM quantized them for an fp8 cache: FA3 takes fp8
    queries with fp8 pages only, and reads them as vLLM's dense FA3 call does; `ctx.q` holds them dequantized.

    `tiles`: the chunk's geometry made by the builder for the step (`batch.tile_geometry`, with the plan's
    `dense_tail`; `attend_sparse_chunks` checks it was made for this call's settings), or None: made now.
    `dense_tail`: the plan's (the mask keeps every causal block in the rows holding the chunk's last that many
    tokens). FlashAttention attends those rows' tiles in one dense call of their own (`TileGeometry.tail`); the page
    counts stay the tables'.
    """
    dev, bs, kv = ctx.q.device, ctx.block_size, ctx.kv
    num_kv, rows, nkb = kv.num_kv_heads, ctx.num_query_blocks, ctx.num_kv_blocks
    columns = ctx.extras.get("columns")
    if columns is not None and kernel in FLASH_VERSIONS:
        kernel = "triton"  # the column pass joins the block pass by its log-sum-exp, which the Triton kernel writes
    n_tiles = -(-rows // tile)
    per_head = page_lists_per_q_head(mask, ctx.q.shape[1], union_heads)
    lists = mask.shape[0] if per_head else num_kv
    # The tiles' query ranges and lengths: the builder's, made once per step (`batch.tile_geometry`), or now (the
    # dense tail's split only where FlashAttention reads it).
    bounds, seq_lens, tail, _ = tiles or chunk_tile_geometry(ctx, tile, dense_tail if kernel in FLASH_VERSIONS else 0)
    union = tile_unions(mask, tile, lists) if observer is not None or kernel not in FLASH_VERSIONS else None
    if observer is not None:  # eval counters (`instrumented.py`)
        observer.chunk(layer, ctx, mask, union, tile, n_tiles)
    q, out = ctx.q, output[c.q_start:c.q_end]
    max_q = min(tile * bs, ctx.q_len)
    causal = chunk_causal_pages(ctx.context_len, ctx.q_len, bs, tile, kv.page_size) * lists
    if kernel in FLASH_VERSIONS:
        max_pages = -(-ctx.seq_len // kv.page_size)  # no list is longer than the chunk's pages
        k_cache, v_cache = kv.key.transpose(1, 2), kv.value.transpose(1, 2)  # [pages, page_size, kv_heads, D]
        descales = None
        if kv.quantized:
            if fa3_query is None:
                raise ValueError("FA3 reads an fp8 cache with fp8 queries only: pass them (vLLM quantizes them)")
            q, descales = fa3_query[0], (fa3_query[1], kv.k_descale, kv.v_descale)
        # The tiles before a dense tail (all of them without one), and their queries and output: the sparse call's.
        n, t0 = (n_tiles, ctx.q_len) if tail is None else (tail.sparse_tiles, tail.first_token)
        q_sparse, out_sparse = (q, out) if tail is None else (q[:t0], out[:t0])
        # One FlashAttention call for every list where a list's call would leave the GPU idle (host rule,
        # `list_packing`): over every tile, a dense tail's as sequences without queries
        # (`DenseTail.packed_query_start_loc`); its rule and split count take the n tiles with queries.
        pack, version = q.shape[1] // lists, FLASH_VERSIONS[kernel]
        packing = list_packing(lists, pack, bounds if tail is None else tail.packed_query_start_loc, max_q, q_sparse,
                               out_sparse, k_cache, v_cache, n) if n else None
        tables, counts, used, packed_qsl = tile_tables_triton(mask, lists, tile, seq_lens, bs, kv.page_size,
                                                              block_table[c.req], max_pages, packing)
        if tail is None or packed_qsl is not None:
            splits = None if packed_qsl is None else default_num_splits(version, lists * n, max_q, pack, q.device)
            sparse_attention_flash(q_sparse, k_cache, v_cache, tables, used, bounds, seq_lens, max_q, ctx.scale,
                                   out_sparse, num_splits=splits, descales=descales, fa_version=version,
                                   packed_qsl=packed_qsl)
            if tail is None:
                return counts, causal
        elif n:
            sparse_attention_flash(q_sparse, k_cache, v_cache, tables[:, :n], used[:, :n], tail.sparse_query_start_loc,
                                   tail.sparse_seq_lens, max_q, ctx.scale, out_sparse, descales=descales,
                                   fa_version=version)
        # The trailing tiles as one sequence: their queries see the request's pages up to the chunk's end, causally.
        dense_flash(q[t0:], k_cache, v_cache, block_table[c.req:c.req + 1], tail.query_start_loc, tail.seq_len,
                    ctx.q_len - t0, ctx.seq_len, ctx.scale, out[t0:], descales=descales, fa_version=version)
        return counts, causal
    num_pages = ((seq_lens + kv.page_size - 1) // kv.page_size).repeat_interleave(lists)
    indptr, indices = block_mask_to_page_csr(union.transpose(0, 1).reshape(n_tiles * lists, nkb), bs,
                                             kv.page_size, num_pages)
    rows_bt = torch.full((n_tiles,), c.req, dtype=torch.int32, device=dev)
    attended = sparse_paged_attention(q, kv, block_table, bounds, seq_lens, indptr, indices, ctx.scale, out=out,
                                      max_query_len=max_q, block_table_rows=rows_bt, lists_per_q_head=per_head,
                                      return_lse=columns is not None)
    if columns is not None:  # the kept columns outside each tile's kept blocks, joined in place
        cols = column_lists(columns, lists)
        column_attention(q, kv, block_table, bounds, seq_lens, shared_column_ranges(lists, cols.shape[1], n_tiles, dev),
                         cols.flatten(), ctx.scale, max_q, out=out, lse=attended[1], lists_per_q_head=per_head,
                         block_table_rows=rows_bt, exclude=union.view(torch.uint8), exclude_block=bs, merge=True)
    return indptr[-1:], causal


def attend_chunk_reference(ctx: ChunkContext, mask: torch.Tensor, tile: int, c: SparseChunk,
                           output: torch.Tensor, block_table: torch.Tensor, layer: int,
                           selected_rows: slice, union_heads: bool = True, observer=None
                           ) -> tuple[int, int]:
    """The exact torch path, one union tile at a time (CPU, and the dense audit, which counts the rows the plan
    selects for, `selected_rows`: those past dense_below and before the dense tail, per head). Returns
    (KV pages read, causal KV pages) summed over the tiles and page lists."""
    kv, block_size, scale = ctx.kv, ctx.block_size, ctx.scale
    per_head = page_lists_per_q_head(mask, ctx.q.shape[1], union_heads)
    lists = mask.shape[0] if per_head else kv.num_kv_heads
    list_of_row = mask_kv_heads(mask, lists)
    columns = ctx.extras.get("columns")
    cols = column_lists(columns, lists) if columns is not None else None
    kept = causal = 0
    for r0 in range(0, ctx.num_query_blocks, tile):
        rows = slice(r0, min(r0 + tile, ctx.num_query_blocks))
        union = union_blocks(mask[:, rows], list_of_row, lists)
        # The tile's query tokens: its rows' positions that lie in this chunk.
        t0 = max((ctx.first_query_block + rows.start) * block_size - c.context_len, 0)
        t1 = min((ctx.first_query_block + rows.stop) * block_size - c.context_len, c.q_end - c.q_start)
        tokens = slice(c.q_start + t0, c.q_start + t1)
        seq_len = c.context_len + t1
        page_lists = [blocks_to_pages(torch.nonzero(union[h]).flatten(), block_size, kv.page_size, seq_len)
                      for h in range(lists)]
        indptr = torch.tensor([0] + [len(p) for p in page_lists]).cumsum(0)
        kept += int(indptr[-1])
        causal += lists * -(-seq_len // kv.page_size)
        args = (kv, block_table[c.req: c.req + 1], torch.tensor([0, t1 - t0]), torch.tensor([seq_len]))
        _, lse = sparse_paged_attention_ref(ctx.q[t0:t1], *args, indptr, torch.cat(page_lists), scale,
                                            out=output[tokens], return_lse=True, lists_per_q_head=per_head)
        if cols is not None:  # the kept columns outside this tile's kept blocks, joined by log-sum-exp
            ranges = shared_column_ranges(lists, cols.shape[1], 1, cols.device)
            oc, lse_c = column_attention_ref(ctx.q[t0:t1], *args, ranges, cols.flatten(), scale, per_head,
                                             exclude=union[:, None, :], exclude_block=block_size)
            merge_attention(output[tokens], lse, oc, lse_c, out=output[tokens])
        if observer is not None:  # eval counters and the dense audit (`instrumented.py`)
            observer.tile(layer, ctx, mask[:, rows], union, rows, slice(t0, t1), output[tokens], selected_rows,
                          torch.arange(lists, device=mask.device) if per_head else None)
    return kept, causal
