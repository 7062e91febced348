"""Kept-block masks of one chunk -> per (KV head, union tile) compacted block tables for FA3.

Tile t's rows and the q heads of each KV head are unioned into one block list; its pages, in
order, become the tile's block table (physical page ids) and its page count. The torch path
(`tile_tables_ref`: union, CSR page lists, compaction) takes about fifteen launches of
[rows, pages]-sized temporaries; `tile_tables_triton` is one launch, one program per
(KV head, tile), which ORs the tile's mask rows, prefix-sums the kept blocks and writes each
kept block's pages at its position. Both need the heads sorted by KV head in equal groups (as
the backend lays them out) and every row's diagonal block kept (the budget forces it).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vllm_sparse.kernels.flash_compact import ListPacking, compact_block_tables, used_tokens
from vllm_sparse.kernels.launch import row_bucket, storage_base
from vllm_sparse.selection.pages import block_mask_to_page_csr


def tile_unions(mask: torch.Tensor, tile: int, num_kv_heads: int) -> torch.Tensor:
    """mask [q_heads, rows, kv_blocks] -> [num_kv_heads, n_tiles, kv_blocks]: kept by any row or head."""
    heads, rows, nkb = mask.shape
    n_tiles = -(-rows // tile)
    padded = torch.nn.functional.pad(mask, (0, 0, 0, n_tiles * tile - rows))
    per_head = padded.view(heads, n_tiles, tile, nkb).any(2)
    return per_head.view(num_kv_heads, heads // num_kv_heads, n_tiles, nkb).any(1)


def tile_unions_per_row(unions: torch.Tensor, tile: int, rows: int) -> torch.Tensor:
    """`tile_unions`' [kv_heads, n_tiles, kv_blocks] -> [kv_heads, rows, kv_blocks]: each row's tile union."""
    return unions.repeat_interleave(tile, dim=1)[:, :rows]


def tile_seq_lens(first_query_block: int, n_tiles: int, tile: int, block_size: int, context_len: int,
                  q_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(query_start_loc [n_tiles + 1] of the tiles inside the chunk, seq_lens [n_tiles]: tokens up to
    each tile's last query), int32, built on the device."""
    starts = (first_query_block + torch.arange(n_tiles + 1, device=device) * tile) * block_size - context_len
    bounds = starts.clamp(0, q_len).to(torch.int32)
    return bounds, (context_len + bounds[1:]).to(torch.int32)


def _chunk_tiles(context_len: int, q_len: int, block_size: int, union_tile: int | None) -> tuple[int, int, int]:
    """(the chunk's first query block, its query blocks, the union tile in blocks: the whole chunk where None)."""
    first = context_len // block_size
    n_blocks = (context_len + q_len - 1) // block_size + 1 - first
    return first, n_blocks, union_tile or n_blocks


def chunk_tile_bounds(context_len: int, q_len: int, block_size: int, union_tile: int | None) -> list[int]:
    """`tile_seq_lens`'s query_start_loc of one chunk, on the host (the builder's per-step geometry)."""
    first, n_blocks, tile = _chunk_tiles(context_len, q_len, block_size, union_tile)
    n_tiles = -(-n_blocks // tile)
    return [min(max((first + i * tile) * block_size - context_len, 0), q_len) for i in range(n_tiles + 1)]


def chunk_dense_tail(context_len: int, q_len: int, block_size: int, union_tile: int | None, dense_tail: int
                     ) -> tuple[int, int] | None:
    """(union tiles before those holding the chunk's last `dense_tail` tokens, the first query token of those tiles in
    the chunk), on the host; None where `dense_tail` is off. A tile holding one of those tokens' rows reads every causal
    block (its union holds the row's), so it is dense from its first row: those tiles take one dense call."""
    if dense_tail <= 0:
        return None
    first, _, tile = _chunk_tiles(context_len, q_len, block_size, union_tile)
    sparse_tiles = (max(context_len + q_len - dense_tail, context_len) // block_size - first) // tile
    return sparse_tiles, max((first + sparse_tiles * tile) * block_size - context_len, 0)


@functools.lru_cache(maxsize=256)
def chunk_causal_pages(context_len: int, q_len: int, block_size: int, union_tile: int | None, page_size: int) -> int:
    """KV pages a chunk's union tiles would read densely, per page list: each tile's pages up to its last
    query (the density metric's denominator), on the host, once per chunk shape (every layer asks)."""
    bounds = chunk_tile_bounds(context_len, q_len, block_size, union_tile)
    return sum(-(-(context_len + b) // page_size) for b in bounds[1:])


def tile_tables_ref(mask: torch.Tensor, num_kv_heads: int, tile: int, seq_lens: torch.Tensor, block_size: int,
                    page_size: int, block_table_row: torch.Tensor, max_pages: int, packing: ListPacking | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(tables [kv_heads, n_tiles, max_pages] int32 physical ids, 0 past the count; counts [kv_heads, n_tiles];
    FA3's seqused_k of each table, `used_tokens`; None). With `packing` (`flash_compact.ListPacking`: one
    FlashAttention call for every list), the tables hold the heads-as-pages view's ids and the fourth item is the
    packed queries' start of each (list, tile) and their end, [lists * n_tiles + 1]."""
    union = tile_unions(mask, tile, num_kv_heads)  # [kv, n_tiles, nkb]
    n_tiles, nkb = union.shape[1:]
    num_pages = ((seq_lens + page_size - 1) // page_size).repeat_interleave(num_kv_heads)
    indptr, indices = block_mask_to_page_csr(union.transpose(0, 1).reshape(n_tiles * num_kv_heads, nkb),
                                             block_size, page_size, num_pages)
    rows = torch.zeros(n_tiles, dtype=torch.int32, device=mask.device)
    tables, counts = compact_block_tables(block_table_row[None], rows, indptr, indices, num_kv_heads, max_pages)
    if packing is None:
        return tables, counts, used_tokens(counts, seq_lens, page_size), None
    ids, packed_qsl = packed_tables(tables, counts, packing)
    return ids, counts, used_tokens(counts, seq_lens, page_size), packed_qsl


def packed_tables(tables: torch.Tensor, counts: torch.Tensor, packing: ListPacking
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-list tables [lists, n_tiles, max_pages] of physical ids (and their counts) as one packed call reads them
    (`flash_compact.ListPacking`): (the heads-as-pages view's ids, 0 past each count; the packed queries' start of
    each (list, tile) and their end, [lists * n_tiles + 1] int32). The torch form of what the table kernel writes."""
    lists = torch.arange(tables.shape[0], device=tables.device)
    live = torch.arange(tables.shape[-1], device=tables.device) < counts[..., None]
    ids = tables * packing.page_ratio + (lists // packing.lists_per_kv_head)[:, None, None].to(torch.int32)
    starts = packing.query_start_loc[:-1][None, :] + lists[:, None] * packing.q_tokens
    ends = torch.tensor([tables.shape[0] * packing.q_tokens], device=tables.device)
    return torch.where(live, ids, 0).to(torch.int32), torch.cat([starts.flatten(), ends]).to(torch.int32)


@triton.jit(do_not_specialize=["m_offset", "stride_mh", "stride_mr", "s_offset", "bt_offset", "rows", "n_kv_blocks",
                               "n_tiles", "tile", "max_pages", "q_offset", "packed", "page_ratio", "lists_per_kv_head",
                               "q_tokens"])
def _tile_tables_kernel(
    MASK, m_offset, stride_mh, stride_mr,  # uint8 [q_heads, rows, kv_blocks] at MASK + m_offset, rows contiguous
    SEQ_LENS, s_offset,  # [n_tiles] int32 at SEQ_LENS + s_offset
    BT, bt_offset,  # int32: the request's block table row starts at BT + bt_offset
    TABLES, COUNTS, USED,  # [kv_heads, n_tiles, max_pages], [kv_heads, n_tiles] pages and tokens
    rows, n_kv_blocks, n_tiles, tile, max_pages,
    # packed != 0: one FlashAttention call for every list (`flash_compact.ListPacking`): page ids of the
    # heads-as-pages view (physical id * page_ratio + the list's KV head) and PACKED_QSL [lists * n_tiles + 1], the
    # packed queries' start of each (list, tile), from the tiles' QSL (at QSL + q_offset) and the chunk's q_tokens.
    QSL, q_offset, PACKED_QSL, packed, page_ratio, lists_per_kv_head, q_tokens,
    GROUP: tl.constexpr, PER_BLOCK: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    kv = tl.program_id(0)
    t = tl.program_id(1)
    kb = tl.arange(0, BLOCK_N)
    MASK += m_offset
    SEQ_LENS += s_offset
    in_range = kb < n_kv_blocks
    union = tl.zeros([BLOCK_N], dtype=tl.int32)
    r_end = tl.minimum(t * tile + tile, rows)
    for r in range(t * tile, r_end):
        for g in tl.static_range(GROUP):
            row = tl.load(MASK + (kv * GROUP + g) * stride_mh + r * stride_mr + kb, mask=in_range, other=0)
            union = tl.maximum(union, row.to(tl.int32))
    seq_len = tl.load(SEQ_LENS + t)
    num_pages = (seq_len + PAGE - 1) // PAGE
    BT += bt_offset
    # Kept block i goes to positions [i * PER_BLOCK, (i + 1) * PER_BLOCK); only the last kept block (the
    # tile's diagonal) can reach past the tile's pages, so the positions stay dense.
    slot = tl.cumsum(union, axis=0) - union
    out = TABLES + (kv * n_tiles + t) * max_pages
    for j in tl.static_range(PER_BLOCK):
        page = kb * PER_BLOCK + j
        live = (union > 0) & (page < num_pages)
        phys = tl.load(BT + page, mask=live, other=0)
        if packed:
            phys = phys * page_ratio + kv // lists_per_kv_head
        tl.store(out + slot * PER_BLOCK + j, phys, mask=live)
    pages_of_block = tl.minimum(tl.maximum(num_pages - kb * PER_BLOCK, 0), PER_BLOCK)
    count = tl.sum(union * pages_of_block, axis=0)
    tl.store(COUNTS + kv * n_tiles + t, count)
    # FA3's seqused_k: whole pages, then the last (the tile's own) up to its last query.
    tl.store(USED + kv * n_tiles + t, tl.where(count > 0, (count - 1) * PAGE + seq_len - (num_pages - 1) * PAGE, 0))
    for p0 in range(0, max_pages, BLOCK_N):  # past the count: zeros (no separate launch to clear the table)
        p = p0 + kb
        tl.store(out + p, tl.zeros([BLOCK_N], dtype=tl.int32), mask=(p >= count) & (p < max_pages))
    if packed:
        tl.store(PACKED_QSL + kv * n_tiles + t, kv * q_tokens + tl.load(QSL + q_offset + t))
        if (kv == tl.num_programs(0) - 1) & (t == n_tiles - 1):
            tl.store(PACKED_QSL + tl.num_programs(0) * n_tiles, tl.num_programs(0) * q_tokens)


def tile_tables_triton(mask: torch.Tensor, num_kv_heads: int, tile: int, seq_lens: torch.Tensor, block_size: int,
                       page_size: int, block_table_row: torch.Tensor, max_pages: int,
                       packing: ListPacking | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Same contract as `tile_tables_ref`, one launch."""
    heads, rows, nkb = mask.shape
    if block_size % page_size:
        raise ValueError(f"selection block {block_size} is not a multiple of the KV page size {page_size}")
    if mask.stride(-1) != 1:
        mask = mask.contiguous()
    n_tiles = -(-rows // tile)
    tables = torch.empty(num_kv_heads, n_tiles, max_pages, dtype=torch.int32, device=mask.device)
    counts = torch.empty(num_kv_heads, n_tiles, dtype=torch.int32, device=mask.device)
    used = torch.empty_like(counts)
    packed_qsl = None if packing is None else torch.empty(num_kv_heads * n_tiles + 1, dtype=torch.int32,
                                                          device=mask.device)
    if n_tiles == 0:
        if packed_qsl is not None:  # (only the end, as the reference gives it)
            packed_qsl.fill_(num_kv_heads * packing.q_tokens)
        return tables, counts, used, packed_qsl
    block_n = row_bucket(nkb, mask.device)
    # Inputs that may be slices go as their allocation's base and an offset (`kernels/launch.py`).
    m, m_offset = storage_base(mask.view(torch.uint8))
    sl, s_offset = storage_base(seq_lens)
    bt, bt_offset = storage_base(block_table_row)
    qsl, q_offset = (sl, 0) if packing is None else storage_base(packing.query_start_loc)
    _tile_tables_kernel[(num_kv_heads, n_tiles)](
        m, m_offset, mask.stride(0), mask.stride(1), sl, s_offset, bt, bt_offset, tables, counts, used,
        rows, nkb, n_tiles, tile, max_pages,
        qsl, q_offset, used if packed_qsl is None else packed_qsl, int(packing is not None),
        packing.page_ratio if packing else 1, packing.lists_per_kv_head if packing else 1,
        packing.q_tokens if packing else 0,
        GROUP=heads // num_kv_heads, PER_BLOCK=block_size // page_size, PAGE=page_size, BLOCK_N=block_n,
        num_warps=max(1, min(8, block_n // 256)),
    )
    return tables, counts, used, packed_qsl
