"""Block-sparse prefill through FlashAttention's paged kernel, over compacted block tables.

A selected page list is itself a block table: give FlashAttention, per (segment, KV head), the physical
pages of the list in order and the list's token count as the sequence length, and it attends
to exactly those pages, at FlashAttention's speed. Causality survives the compaction when the list ends
with every page from the segment's first query to its last (the selection always keeps the
local/diagonal blocks, so it does): FlashAttention aligns causal masks bottom-right, and bottom-right in
the compacted list is the segment's own tail. Pages before that tail are wholly in the past.

FA3 on Hopper; FA2 (opt-in, `VLLM_SPARSE_KERNEL=fa2`) on GPUs of compute capability 8.0 and up, the kernel vLLM's
FlashAttention backend attends densely with on Ampere and Ada, so a sparse chunk runs the dense kernel over fewer
pages.
FlashAttention takes one block table for all heads of a sequence, so this runs one call per page list, each
on a strided view of the list's q heads, K/V pages and output (no copies): a list per KV head
(its q heads attend to their union), or a list per q head (each attends only to its own pages,
so the work follows each head's kept blocks, not their union).

A short chunk's call per list leaves the GPU idle (a 2K-token follow-up: 64 query tiles of a list's 4 q heads
on 132 SMs) and costs the host a call each (8 a layer for Llama's KV heads). So such a chunk takes one call for
every list (`ListPacking`; `VLLM_SPARSE_FA_PACK_LISTS=0` turns it off): each list's queries become sequences of
their own (copied head-major into the reserved workspace, the output copied back), and each list reads its KV head
through one view of the cache that makes every (page, KV head) a page of one head (`heads_as_pages`), so one
block table row per (list, tile) addresses any head. Under a plan's dense tail the call takes the tiles before it,
the tail's tiles as sequences without queries (`batch.DenseTail.packed_query_start_loc`), and the tail keeps its
dense call. On by default since 2026-12-07: 2,048 new tokens after 32K cached took 75.3 instead of 78.0 ms (a
host-bound turn), no other turn of the workload moved by more than its noise (H100, docs/kernels.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from vllm_sparse import envs
from vllm_sparse.kernels.workspace import WORKSPACE

FA3_BLOCK_M = 128  # FA3's query tile for head dims up to 128 (Hopper)
FLASH_VERSIONS = {"fa2": 2, "fa3": 3}  # the kernels of `backend.kernel_choice` that run through this module
PACK_LISTS = envs.flag("VLLM_SPARSE_FA_PACK_LISTS")
_ALIGN = 256  # bytes: where the packed output starts in the workspace, after the packed queries
MAX_PACKED_PAGE = 32  # tokens: the page sizes the packed call was checked with (vLLM's default is 16)


@dataclass(frozen=True, eq=False)
class ListPacking:
    """One FlashAttention call for every page list of a chunk (module docstring): what the table kernel needs to
    write the packed call's tables and query starts (`selection.tile_tables`)."""

    page_ratio: int  # ids of the heads-as-pages view per physical page (`heads_as_pages`)
    lists_per_kv_head: int  # 1: a list per KV head; the GQA group: a list per q head
    query_start_loc: torch.Tensor  # [tiles + 1] int32: the chunk's tiles' query starts
    q_tokens: int  # the chunk's query tokens


def heads_as_pages(cache: torch.Tensor) -> torch.Tensor:
    """A cache view [pages, page_size, kv_heads, D] (any strides, D contiguous) as [N, page_size, 1, D], whose page
    p * ratio + h (ratio = the page stride over the head stride: `ListPacking.page_ratio`) is KV head h of
    physical page p. The views' pages overlap; FlashAttention reads each through its stride. No copy."""
    sp, st, sh, _ = cache.stride()
    n = (cache.shape[0] - 1) * (sp // sh) + cache.shape[2]  # (the last page's last head ends in the storage)
    return cache.as_strided((n, cache.shape[1], 1, cache.shape[3]), (sh, st, sh, 1), cache.storage_offset())


def _query_bytes(q: torch.Tensor) -> int:
    """Workspace bytes of a packed call's head-major queries, to where its output starts."""
    return -(-q.numel() * q.element_size() // _ALIGN) * _ALIGN


def packed_bytes(q: torch.Tensor, out: torch.Tensor) -> int:
    """Workspace bytes of a packed call's head-major queries and output."""
    return _query_bytes(q) + out.numel() * out.element_size()


def list_packing(lists: int, pack: int, query_start_loc: torch.Tensor, max_query_len: int, q: torch.Tensor,
                 out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 tiles_with_queries: int | None = None) -> ListPacking | None:
    """Whether a chunk's page lists take one call (`VLLM_SPARSE_FA_PACK_LISTS`), from host data: more than one list,
    one list's call too small to fill the GPU (`fa3_query_tiles` under the SM count), the packed queries and output
    within the reserved workspace, keys and values of one layout whose page stride is a whole number of head
    strides, the view's page ids within int32, and pages under FA3's TMA tile (pages of 128 tokens or more may go
    through FA3's TMA loads, which the overlapping view was never run through). An fp8 cache packs too (FA3's
    descales per packed sequence: tests/test_fp8_path.py's `fa3-packed` case, H100, 2026-12-07). `tiles_with_queries`:
    where a dense tail's tiles are sequences without queries, the tiles before them (the GPU's work); None: every
    tile."""
    if not PACK_LISTS or lists == 1:
        return None
    segments = query_start_loc.shape[0] - 1 if tiles_with_queries is None else tiles_with_queries
    if fa3_query_tiles(segments, max_query_len, pack) >= num_sms(q.device):
        return None
    sp, sh = k_cache.stride(0), k_cache.stride(2)
    if k_cache.shape[1] > MAX_PACKED_PAGE or v_cache.stride() != k_cache.stride() or sp % sh \
            or k_cache.shape[0] * (sp // sh) >= 2**31:
        return None
    if WORKSPACE.reserved(q.device) < packed_bytes(q, out):
        return None
    return ListPacking(sp // sh, lists // k_cache.shape[2], query_start_loc, q.shape[0])


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


def default_num_splits(fa_version: int, segments: int, max_query_len: int, q_heads_per_list: int,
                       device: torch.device) -> int:
    """The num_splits `sparse_attention_flash` passes unless told: FA3's by `fa3_num_splits`; FA2's 0, as vLLM's own
    FA2 prefill call passes (FA2 never splits a paged call's keys by it: 0 or 1 picks its key tile)."""
    return fa3_num_splits(segments, max_query_len, q_heads_per_list, device) if fa_version == 3 else 0


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


def sparse_attention_flash(
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
    num_splits: int | None = None,  # None: `default_num_splits` (benchmarks pass others)
    descales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # fp8 q, k, v scales (0-dim or [1])
    fa_version: int = 3,  # 2: FA2 (no split-KV choice, no fp8), for GPUs without FA3
    packed_qsl: torch.Tensor | None = None,  # one call for every list: the tables' `ListPacking` query starts
) -> torch.Tensor:
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    _refuse_fp8_on_fa2(fa_version, descales)

    page = k_cache.shape[1]
    kv_heads = k_cache.shape[2]
    group = q.shape[1] // kv_heads
    pack = 1 if tables.shape[0] == q.shape[1] else group  # q heads per list
    if tables.shape[0] * pack != q.shape[1]:
        raise ValueError(f"{tables.shape[0]} page lists for {q.shape[1]} q heads over {kv_heads} KV heads")
    max_k = tables.shape[-1] * page
    if packed_qsl is not None:
        return _packed_call(q, k_cache, v_cache, tables, used, query_start_loc.shape[0] - 1, max_query_len, max_k,
                            scale, out, pack, fa_version, num_splits, descales, packed_qsl)
    splits = default_num_splits(fa_version, query_start_loc.shape[0] - 1, max_query_len, pack, q.device) \
        if num_splits is None else num_splits
    scale_args = _descale_args(descales, query_start_loc.shape[0] - 1)
    # Each list's views, taken by one split per tensor (a layer makes these calls for every list: Python per
    # slice adds up on the host, where a follow-up turn's sparse chunk spends its time).
    q_lists, out_lists = q.split(pack, dim=1), out.split(pack, dim=1)
    k_heads, v_heads = k_cache.split(1, dim=2), v_cache.split(1, dim=2)
    for i, (table, seqused) in enumerate(zip(tables.unbind(0), used.unbind(0), strict=True)):
        h = i * pack // group
        flash_attn_varlen_func(q_lists[i], k_heads[h], v_heads[h],
                               max_seqlen_q=max_query_len, cu_seqlens_q=query_start_loc, max_seqlen_k=max_k,
                               seqused_k=seqused, softmax_scale=scale, causal=True, block_table=table,
                               out=out_lists[i], fa_version=fa_version, num_splits=splits, **scale_args)
    return out


def dense_flash(
    q: torch.Tensor,  # [tokens, q_heads, D]: the trailing tiles' queries
    k_cache: torch.Tensor,  # [pages, page_size, kv_heads, D] (FlashAttention layout; may be a view)
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [segments, max_pages] the request's own page ids (vLLM's block table rows)
    query_start_loc: torch.Tensor,  # [segments + 1] int32
    seq_lens: torch.Tensor,  # [segments] tokens up to each segment's last query
    max_query_len: int,
    max_seqlen_k: int,
    scale: float,
    out: torch.Tensor,
    descales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # fp8 q, k, v scales (0-dim or [1])
    fa_version: int = 3,
) -> torch.Tensor:
    """Dense causal attention of a few query rows over their request's pages, in one call with every q head (the
    plan's `dense_tail`): FA3 may split these long rows' keys over the SMs, where in a chunk's call per page list each
    row's query tile would be one CTA reading the whole context after the short ones (a long pole per call)."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    _refuse_fp8_on_fa2(fa_version, descales)
    segments, kv_heads = query_start_loc.shape[0] - 1, k_cache.shape[2]
    splits = default_num_splits(fa_version, segments, max_query_len, q.shape[1] // kv_heads, q.device)
    scale_args = _descale_args(descales, segments, kv_heads)
    flash_attn_varlen_func(q, k_cache, v_cache, max_seqlen_q=max_query_len, cu_seqlens_q=query_start_loc,
                           max_seqlen_k=max_seqlen_k, seqused_k=seq_lens, softmax_scale=scale, causal=True,
                           block_table=block_table, out=out, fa_version=fa_version, num_splits=splits, **scale_args)
    return out


def _refuse_fp8_on_fa2(fa_version: int, descales) -> None:
    if fa_version == 2 and descales is not None:
        raise ValueError("FA2 reads no fp8 cache: an fp8 KV cache needs FA3 (Hopper)")


def _descale_args(descales, sequences: int, kv_heads: int = 1) -> dict:
    """fp8 (queries quantized by vLLM, fp8 pages): FA3 takes a descale per (sequence, KV head) of the call, as vLLM's
    FlashAttention backend gives it, expanded from the per-tensor scales (no copy)."""
    return {} if descales is None else dict(zip(("q_descale", "k_descale", "v_descale"),
                                                (x.expand(sequences, kv_heads) for x in descales)))


def _packed_call(q, k_cache, v_cache, tables, used, segments: int, max_query_len: int, max_k: int, scale: float, out,
                 pack: int, fa_version: int, num_splits: int | None, descales, packed_qsl) -> torch.Tensor:
    """`sparse_attention_flash` in one call for every list (`ListPacking`): sequence (list, tile) is the tile's
    queries of the list's q heads, copied head-major into the workspace, over the list's KV head's pages."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    tokens, lists, d, dv = q.shape[0], tables.shape[0], q.shape[-1], out.shape[-1]
    q_bytes = _query_bytes(q)
    room = WORKSPACE.tail(0, -(-packed_bytes(q, out) // 4), q.device).view(torch.uint8)
    q_lists = room[:q.numel() * q.element_size()].view(q.dtype).view(lists, tokens, pack, d)
    out_lists = room[q_bytes:q_bytes + out.numel() * out.element_size()].view(out.dtype).view(lists, tokens, pack, dv)
    q_lists.copy_(q.view(tokens, lists, pack, d).transpose(0, 1))
    sequences = lists * segments
    splits = default_num_splits(fa_version, sequences, max_query_len, pack, q.device) if num_splits is None \
        else num_splits
    scale_args = _descale_args(descales, sequences)
    flash_attn_varlen_func(q_lists.view(lists * tokens, pack, d), heads_as_pages(k_cache), heads_as_pages(v_cache),
                           max_seqlen_q=max_query_len, cu_seqlens_q=packed_qsl, max_seqlen_k=max_k,
                           seqused_k=used.view(sequences), softmax_scale=scale, causal=True,
                           block_table=tables.view(sequences, tables.shape[-1]),
                           out=out_lists.view(lists * tokens, pack, dv), fa_version=fa_version, num_splits=splits,
                           **scale_args)
    out.view(tokens, lists, pack, dv).copy_(out_lists.transpose(0, 1))
    return out
