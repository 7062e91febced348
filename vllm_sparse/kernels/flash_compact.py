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
"""

from __future__ import annotations

import functools

import torch

FA3_BLOCK_M = 128  # FA3's query tile for head dims up to 128 (Hopper)
FLASH_VERSIONS = {"fa2": 2, "fa3": 3}  # the kernels of `backend.kernel_choice` that run through this module


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
) -> torch.Tensor:
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    if fa_version == 2 and descales is not None:
        raise ValueError("FA2 reads no fp8 cache: an fp8 KV cache needs FA3 (Hopper)")

    page = k_cache.shape[1]
    kv_heads = k_cache.shape[2]
    group = q.shape[1] // kv_heads
    pack = 1 if tables.shape[0] == q.shape[1] else group  # q heads per list
    if tables.shape[0] * pack != q.shape[1]:
        raise ValueError(f"{tables.shape[0]} page lists for {q.shape[1]} q heads over {kv_heads} KV heads")
    max_k = tables.shape[-1] * page
    splits = default_num_splits(fa_version, query_start_loc.shape[0] - 1, max_query_len, pack, q.device) \
        if num_splits is None else num_splits
    # fp8 (queries quantized by vLLM, fp8 pages): FA3 takes a descale per (sequence, KV head) of the call, as
    # vLLM's FlashAttention backend gives it, expanded from the per-tensor scales (no copy).
    scale_args = {} if descales is None else dict(zip(
        ("q_descale", "k_descale", "v_descale"), (d.expand(query_start_loc.shape[0] - 1, 1) for d in descales)))
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
