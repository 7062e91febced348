"""Block-sparse prefill through FlashAttention 3's paged kernel, over compacted block tables.

A selected page list is itself a block table: give FA3, per (segment, KV head), the physical
pages of the list in order and the list's token count as the sequence length, and it attends
to exactly those pages, at FA3's speed. Causality survives the compaction when the list ends
with every page from the segment's first query to its last (the selection always keeps the
local/diagonal blocks, so it does): FA3 aligns causal masks bottom-right, and bottom-right in
the compacted list is the segment's own tail. Pages before that tail are wholly in the past.

FA3 takes one block table for all heads of a sequence, so this runs one call per page list, each
on a strided view of the list's q heads, K/V pages and output (no copies): a list per KV head
(its q heads attend to their union), or a list per q head (each attends only to its own pages,
so the work follows each head's kept blocks, not their union).
"""

from __future__ import annotations

import functools

import torch

FA3_BLOCK_M = 128  # FA3's query tile for head dims up to 128 (Hopper)


@functools.lru_cache(maxsize=8)
def num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def fa3_query_tiles(segments: int, max_query_len: int, q_heads_per_list: int) -> int:
    """FA3's query tiles in one call over `segments` segments (q heads of a list packed, as FA3 packs GQA)."""
    return segments * -(-max_query_len * q_heads_per_list // FA3_BLOCK_M)


def fa3_num_splits(segments: int, max_query_len: int, q_heads_per_list: int, device: torch.device) -> int:
    """FA3's num_splits for one call over `segments` compacted segments, from host data: 1 (no split-KV)
    once the call's query tiles fill the GPU; 0 (FA3's heuristic) below that. FA3 sizes its split
    heuristic by one segment's query tiles (a varlen batch counts as one), so a 16K-token chunk in
    128-token segments looked like decode to it: split-KV, an fp32 partial output per split and a
    combine kernel per call (`benchmarks/kernels.py` times both choices and their temporaries)."""
    return 1 if fa3_query_tiles(segments, max_query_len, q_heads_per_list) >= num_sms(device) else 0


def compact_block_tables(
    block_table: torch.Tensor,  # [rows, max_pages] physical page ids
    block_table_rows: torch.Tensor,  # [segments] row of each segment
    page_indptr: torch.Tensor,  # [segments * kv_heads + 1]
    page_indices: torch.Tensor,  # logical pages, sorted per (segment, kv head)
    num_kv_heads: int,
    max_pages: int,  # host bound on any list's length (e.g. pages of the longest sequence)
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tables [kv_heads, segments, max_pages] int32 physical ids, counts [kv_heads, segments]); no sync."""
    n_seg = block_table_rows.shape[0]
    start = page_indptr[:-1].view(n_seg, num_kv_heads).T.long()  # [heads, seg]
    counts = (page_indptr[1:] - page_indptr[:-1]).view(n_seg, num_kv_heads).T.contiguous()
    pos = start[..., None] + torch.arange(max_pages, device=start.device)
    live = torch.arange(max_pages, device=start.device) < counts[..., None]
    logical = page_indices[pos.clamp(max=page_indices.numel() - 1)].long()
    phys = block_table[block_table_rows.long()[None, :, None], torch.where(live, logical, 0)]
    return torch.where(live, phys, 0).to(torch.int32), counts


def used_tokens(counts: torch.Tensor, seq_lens: torch.Tensor, page: int) -> torch.Tensor:
    """FA3's seqused_k of each compacted list [lists, segments] int32: its pages' tokens, the last page (the
    segment's own) holding only the tokens up to the segment's last query."""
    last_page_tokens = seq_lens - ((seq_lens - 1) // page) * page
    return torch.where(counts > 0, (counts - 1) * page + last_page_tokens[None, :], 0).to(torch.int32).contiguous()


def sparse_attention_fa3(
    q: torch.Tensor,  # [tokens, q_heads, D]
    k_cache: torch.Tensor,  # [pages, page_size, kv_heads, D] (FlashAttention layout; may be a view)
    v_cache: torch.Tensor,
    tables: torch.Tensor,  # [lists, segments, max_pages] from compact_block_tables; lists = KV or q heads
    used: torch.Tensor,  # [lists, segments] int32: each list's tokens (`used_tokens`)
    query_start_loc: torch.Tensor,  # [segments + 1] int32
    seq_lens: torch.Tensor,  # [segments] tokens up to each segment's last query
    max_query_len: int,
    scale: float,
    out: torch.Tensor,
    num_splits: int | None = None,  # FA3's num_splits; None: `fa3_num_splits` (benchmarks pass others)
) -> torch.Tensor:
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    page = k_cache.shape[1]
    kv_heads = k_cache.shape[2]
    group = q.shape[1] // kv_heads
    pack = 1 if tables.shape[0] == q.shape[1] else group  # q heads per list
    if tables.shape[0] * pack != q.shape[1]:
        raise ValueError(f"{tables.shape[0]} page lists for {q.shape[1]} q heads over {kv_heads} KV heads")
    max_k = tables.shape[-1] * page
    splits = fa3_num_splits(query_start_loc.shape[0] - 1, max_query_len, pack, q.device) \
        if num_splits is None else num_splits
    for i in range(tables.shape[0]):
        heads, h = slice(i * pack, (i + 1) * pack), i * pack // group
        flash_attn_varlen_func(q[:, heads], k_cache[:, :, h:h + 1], v_cache[:, :, h:h + 1],
                               max_seqlen_q=max_query_len, cu_seqlens_q=query_start_loc, max_seqlen_k=max_k,
                               seqused_k=used[i], softmax_scale=scale, causal=True, block_table=tables[i],
                               out=out[:, heads], fa_version=3, num_splits=splits)
    return out


# One call for every page list of a chunk (`VLLM_SPARSE_FA3_ONE_CALL=1`, not yet measured). FA3 takes one block
# table per sequence for all of its heads, so the lists become sequences of their own: the KV cache is viewed
# as pages of one KV head (pseudo page `page * mul + head`, no copy), the queries are permuted so that each
# list's rows are contiguous, and the output is permuted back: two copies of the chunk's queries in place of
# 2 x (lists - 1) launches (a call and FA3's scheduler kernel per list).


@functools.lru_cache(maxsize=1)
def one_call_enabled() -> bool:
    from vllm_sparse import envs

    return envs.flag("VLLM_SPARSE_FA3_ONE_CALL")


def head_page_stride(cache: torch.Tensor) -> int | None:
    """`mul` of the one-head pages of a cache viewed [pages, page_size, kv_heads, D]: with a page's start a
    multiple of the head stride, head h of page p starts at (p * mul + h) head strides. That holds for vLLM's
    layouts (heads D apart, 2D with K|V packed, or a page apart with heads outermost); None where it does not
    (or the ids would pass int32), which keeps a call per list."""
    unit = cache.stride(2)
    if cache.stride(-1) != 1 or unit < cache.shape[-1] or cache.stride(0) % unit:
        return None
    mul = cache.stride(0) // unit
    return mul if (cache.shape[0] - 1) * mul + cache.shape[2] < 2**31 else None


def one_call_pages(k_cache: torch.Tensor, v_cache: torch.Tensor) -> int | None:
    """`mul` for FA3's one call over every list when it is asked for and both caches allow it; else None (the
    call per list), said once in the log where it was asked for."""
    if not one_call_enabled():
        return None
    mul = head_page_stride(k_cache)
    if mul is None or head_page_stride(v_cache) != mul:
        _layout_refused(tuple(k_cache.stride()), tuple(v_cache.stride()))
        return None
    return mul


@functools.lru_cache(maxsize=8)
def _layout_refused(k_strides: tuple, v_strides: tuple) -> None:
    from vllm_sparse.log import logger

    logger.warning("vllm-sparse: VLLM_SPARSE_FA3_ONE_CALL=1, but this KV cache (key strides %s, value strides %s) "
                   "has no one-head page view: FA3 runs a call per page list", k_strides, v_strides)


def pages_by_head(cache: torch.Tensor, mul: int) -> torch.Tensor:
    """The cache as pages of one KV head, [n, page_size, 1, D] over the same memory: pseudo page p * mul + h is
    head h of page p (rows keep the cache's stride). Pseudo pages overlap; FA3 only reads them."""
    pages, page, heads, d = cache.shape
    unit = cache.stride(2)
    return cache.as_strided(((pages - 1) * mul + heads, page, 1, d), (unit, cache.stride(1), unit, 1),
                            cache.storage_offset())


def sparse_attention_fa3_one_call(
    q: torch.Tensor,  # [tokens, q_heads, D]
    k_pages: torch.Tensor,  # `pages_by_head` views of the key and value caches
    v_pages: torch.Tensor,
    tables: torch.Tensor,  # [lists, segments, max_pages] int32 pseudo page ids (`tile_tables_triton(page_mul=...)`)
    used: torch.Tensor,  # [lists, segments] int32 tokens of each list (`used_tokens`)
    cu_lists: torch.Tensor,  # [lists * segments + 1] int32: list i's segment t starts at row i * tokens + start_t
    max_query_len: int,
    scale: float,
    out: torch.Tensor,  # [tokens, q_heads, Dv]
    num_splits: int | None = None,
) -> torch.Tensor:
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    lists, segments = used.shape
    tokens, q_heads, d = q.shape
    pack = q_heads // lists
    q_lists = q.view(tokens, lists, pack, d).transpose(0, 1).reshape(lists * tokens, pack, d)  # one copy
    out_lists = torch.empty((lists * tokens, pack, out.shape[-1]), dtype=out.dtype, device=out.device)
    splits = fa3_num_splits(lists * segments, max_query_len, pack, q.device) if num_splits is None else num_splits
    flash_attn_varlen_func(q_lists, k_pages, v_pages, max_seqlen_q=max_query_len, cu_seqlens_q=cu_lists,
                           max_seqlen_k=tables.shape[-1] * k_pages.shape[1], seqused_k=used.view(-1),
                           softmax_scale=scale, causal=True, block_table=tables.view(lists * segments, -1),
                           out=out_lists, fa_version=3, num_splits=splits)
    out.view(tokens, lists, pack, -1).copy_(out_lists.view(lists, tokens, pack, -1).transpose(0, 1))
    return out
