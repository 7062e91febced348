"""Decode attention over each (row, KV head)'s selected blocks, read in place from the paged cache.

Split-K (flash-decoding): program (row, KV head, split) walks its share of the selected blocks in
sub-tiles of up to 64 tokens for the whole GQA group at once, keeping an online softmax; a second
kernel merges the splits into the output row. A KV head marked dense walks every block of the
context instead. Rows that are not sparse decode rows are left alone (the dense backend wrote
them). Grid and workspace depend only on the batch's row count and the budget, so both kernels
capture in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_sparse.decode.select import _row_is_sparse_decode
from vllm_sparse.kernels.paged import PagedKV


def reference_decode_attention(q: torch.Tensor, paged: PagedKV, pages: torch.Tensor, seq_len: int,
                               blocks: list[torch.Tensor | None], block_tokens: int, scale: float) -> torch.Tensor:
    """One row. q [q_heads, D]; pages: the row's physical pages in order; blocks: per KV head the
    selected logical blocks, or None for every block. -> [q_heads, D] float32."""
    kv_heads = paged.num_kv_heads
    group = q.shape[0] // kv_heads
    k, v = paged.gather(pages, seq_len)  # [seq_len, kv_heads, D]
    out = q.new_empty(q.shape, dtype=torch.float32)
    for h in range(kv_heads):
        if blocks[h] is None:
            tok = torch.arange(seq_len, device=q.device)
        else:
            start = blocks[h].to(q.device)[:, None] * block_tokens
            tok = (start + torch.arange(block_tokens, device=q.device)).flatten()
            tok = tok[tok < seq_len]
        qh = q[h * group:(h + 1) * group].float()
        s = qh @ k[tok, h].float().T * scale
        out[h * group:(h + 1) * group] = torch.softmax(s, -1) @ v[tok, h].float()
    return out


@triton.jit
def _decode_split_kernel(
    q_ptr, sq_t, sq_h, k_ptr, v_ptr, sk_p, sk_h, sk_t, sv_p, sv_h, sv_t, bt_ptr, s_bt, qsl_ptr, seq_ptr,
    sel_ptr, ssel_b, ssel_h, cnt_ptr, dense_ptr, po_ptr, spo_b, spo_h, spo_s, pml_ptr, spml_b, spml_h,
    sc_ptr, ssc_b, ssc_h, sink_ptr, local_ptr, scale, v_scale, dense_below,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, BT: tl.constexpr, TT: tl.constexpr,
    U: tl.constexpr, SPLITS: tl.constexpr, HKV: tl.constexpr, SCORE: tl.constexpr,
):
    """Program (row, KV head, split). With SCORE (a tidal selector: every head reads every block) it
    also writes each block's exact score, the largest scaled q.k of the group's q heads over the
    block's keys (+inf for the sink and local blocks), into sc [rows, kv heads, blocks]; a split then
    covers whole blocks, so no block's maximum is shared between programs."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    sparse, seq = _row_is_sparse_decode(qsl_ptr, seq_ptr, b, dense_below)
    if sparse:
        dense_h = tl.load(dense_ptr + h)
        nb = tl.cdiv(seq, BT)
        n_blocks = tl.where(dense_h != 0, nb, tl.load(cnt_ptr + b * HKV + h))
        # A tile of TT tokens is PIECES pieces of U tokens; a block is SUB pieces.
        SUB: tl.constexpr = BT // U
        PIECES: tl.constexpr = TT // U
        n_pieces = n_blocks * SUB
        total = tl.cdiv(n_pieces, PIECES)
        per = tl.cdiv(total, SPLITS)
        if SCORE:
            per = tl.cdiv(per, SUB) * SUB  # (a tile holds whole blocks, or 1/SUB of one)
        start = s * per
        end = tl.minimum(start + per, total)
        q0 = tl.load(qsl_ptr + b)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        gmask = g < G
        q = tl.load(q_ptr + q0 * sq_t + (h * G + g)[:, None] * sq_h + d[None, :], mask=gmask[:, None], other=0.0)
        m_i = tl.full((GP,), -1.0e30, tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, D), tl.float32)
        lane = tl.arange(0, TT)
        if SCORE:
            sink = tl.load(sink_ptr + h)
            local = tl.load(local_ptr + h)
            run = tl.full((PIECES,), float("-inf"), tl.float32)  # a block's maximum over its tiles (SUB > 1)
        for it in range(start, end):
            piece = it * PIECES + lane // U
            pval = piece < n_pieces
            slot_i = piece // SUB
            from_sel = pval & (tl.zeros((TT,), tl.int32) == dense_h)  # (a dense head reads blocks in order)
            j = tl.load(sel_ptr + b * ssel_b + h * ssel_h + slot_i, mask=from_sel, other=0)
            j = tl.where(dense_h != 0, slot_i, j)
            tok = j * BT + (piece % SUB) * U + lane % U
            tval = pval & (tok < seq)
            phys = tl.load(bt_ptr + b * s_bt + tok // PS, mask=tval, other=0).to(tl.int64)
            slot = tok % PS
            k = tl.load(k_ptr + (phys * sk_p + h * sk_h + slot * sk_t)[:, None] + d[None, :], mask=tval[:, None],
                        other=0.0)
            v = tl.load(v_ptr + (phys * sv_p + h * sv_h + slot * sv_t)[:, None] + d[None, :], mask=tval[:, None],
                        other=0.0)
            k, v = k.to(q.dtype), v.to(q.dtype)  # (an fp8 cache: exact; its scales are in scale and v_scale)
            qk = tl.dot(q, tl.trans(k)) * scale
            qk = tl.where(tval[None, :], qk, float("-inf"))
            if SCORE:
                top = tl.max(tl.reshape(tl.max(tl.where(gmask[:, None], qk, float("-inf")), 0), (PIECES, U)), 1)
                if SUB == 1:  # the tile's pieces are whole blocks
                    blk = it * PIECES + tl.arange(0, PIECES)
                    done = blk < nb
                else:  # the tile is piece it % SUB of block it // SUB
                    run = tl.where(it % SUB == 0, top, tl.maximum(run, top))
                    top = run
                    blk = it // SUB + tl.arange(0, PIECES)
                    done = ((it + 1) % SUB == 0) | (it + 1 == end)
                top = tl.where((blk < sink) | (blk >= nb - local), float("inf"), top)
                tl.store(sc_ptr + b * ssc_b + h * ssc_h + blk, top, mask=done)
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp(qk - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        qh = h * G + g
        tl.store(po_ptr + b * spo_b + qh[:, None] * spo_h + s * spo_s + d[None, :], acc * v_scale,
                 mask=gmask[:, None])
        tl.store(pml_ptr + b * spml_b + qh * spml_h + s * 2, m_i, mask=gmask)
        tl.store(pml_ptr + b * spml_b + qh * spml_h + s * 2 + 1, l_i, mask=gmask)


@triton.jit
def _decode_merge_kernel(
    out_ptr, so_t, so_h, qsl_ptr, seq_ptr, po_ptr, spo_b, spo_h, spo_s, pml_ptr, spml_b, spml_h, dense_below,
    D: tl.constexpr, SPLITS: tl.constexpr,
):
    """Program per (row, q head): the splits' partial outputs, weighted by their softmax sums, MERGE
    splits at a time (a [SPLITS, D] tile in registers would spill past 64 splits)."""
    b = tl.program_id(0)
    qh = tl.program_id(1)
    sparse, seq = _row_is_sparse_decode(qsl_ptr, seq_ptr, b, dense_below)
    if sparse:
        MERGE: tl.constexpr = SPLITS if SPLITS < 64 else 64
        d = tl.arange(0, D)
        q0 = tl.load(qsl_ptr + b)
        ml = pml_ptr + b * spml_b + qh * spml_h
        m_max = tl.max(tl.load(ml + tl.arange(0, MERGE) * 2), 0)
        for c in range(MERGE, SPLITS, MERGE):
            m_max = tl.maximum(m_max, tl.max(tl.load(ml + (c + tl.arange(0, MERGE)) * 2), 0))
        acc = tl.zeros((D,), tl.float32)
        den = tl.sum(tl.zeros((MERGE,), tl.float32), 0)
        for c in range(0, SPLITS, MERGE):
            sp = c + tl.arange(0, MERGE)
            w = tl.exp(tl.load(ml + sp * 2) - m_max)
            o = tl.load(po_ptr + b * spo_b + qh * spo_h + sp[:, None] * spo_s + d[None, :])
            acc += tl.sum(w[:, None] * o, 0)
            den += tl.sum(w * tl.load(ml + sp * 2 + 1), 0)
        tl.store(out_ptr + q0 * so_t + qh * so_h + d, (acc / den).to(out_ptr.dtype.element_ty))


# Tokens per attention tile: several small blocks, or a piece of a large one. Each width is its block size's
# measured best on an H200 (benchmarks/decode_kernels.py sweeps): 64 with 16-token pages (32 within 6%), 128 with
# 64-token blocks (a TidalDecode selector's full pass over 1M tokens 628 -> 514 us, FA3's decode 503 us).
TILE_TOKENS = 64
WIDE_TILE_TOKENS = 128  # blocks of 64 tokens or more
SPLIT_PROGRAMS = 1024  # split-K programs per step at most (fewer splits per row for large batches)
MAX_SPLITS = 64  # splits per (row, KV head) at most (the merge reads 64 at a time)
SPLIT_WARPS = 4
SPLIT_STAGES = None  # software-pipelining stages of the split kernel's loop (None: Triton's default)


def split_slots(max_rows: int, kv_heads: int) -> int:
    """Split slots per q head in the workspace: the most any batch of up to `max_rows` rows takes (rows x
    `split_count`'s splits without a room limit), so the room never lowers a batch's splits. At most
    SPLIT_PROGRAMS // kv_heads while splits fall as rows grow, then one a row: at vLLM's 1024-row limit
    1024 slots, where 16 a row held 16,384 (~210 MiB more than any batch used at the Qwen 1M shape)."""
    return max(r * min(MAX_SPLITS, pow2_floor(SPLIT_PROGRAMS // (r * kv_heads))) for r in range(1, max_rows + 1))


def tile_tokens(block_tokens: int) -> int:
    return WIDE_TILE_TOKENS if block_tokens >= 64 else TILE_TOKENS


def pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def split_count(rows: int, kv_heads: int, room: int) -> int:
    """Splits per (row, KV head): up to MAX_SPLITS and SPLIT_PROGRAMS programs in all, as many as `room` (split
    slots per (row, q head) in the workspace) holds; powers of two."""
    return min(MAX_SPLITS, pow2_floor(SPLIT_PROGRAMS // (rows * kv_heads)), pow2_floor(room))


def attention_splits(rows: int, q_heads: int, kv_heads: int, head_size: int, partial_out: torch.Tensor,
                     partial_ml: torch.Tensor) -> int:
    """Splits per (row, KV head) for a batch of `rows`: as many as the split workspace holds for it (a
    constexpr of the split kernel: the engine-start warm-up compiles one variant per value)."""
    room = min(partial_ml.numel() // 2, partial_out.numel() // head_size) // (rows * q_heads)
    assert room >= 1, "the decode workspace holds no split for this batch"
    return split_count(rows, kv_heads, room)


def decode_attention(query, paged: PagedKV, block_table, query_start_loc, seq_lens, heads, selected, counts,
                     partial_out, partial_ml, output, *, block_tokens: int, scale: float, dense_below: int,
                     scores: torch.Tensor | None = None, score_heads=None) -> None:
    """Attention of every sparse decode row into `output` [tokens, q_heads, D]. partial_out and
    partial_ml (float32, contiguous, any shape) are the split workspace: the splits per row are as
    many as it holds for this batch's rows (up to MAX_SPLITS and SPLIT_PROGRAMS programs in all), so
    a small batch spreads each row over more programs. With `scores` [rows, kv_heads, >= blocks]
    (float32) every head must be dense; each block's exact score is written there as well, with
    `score_heads`' sink and local blocks at +inf (a tidal selector layer)."""
    rows = seq_lens.shape[0]
    kv_heads = paged.num_kv_heads
    q_heads, d = query.shape[1], query.shape[2]
    group = q_heads // kv_heads
    splits = attention_splits(rows, q_heads, kv_heads, d, partial_out, partial_ml)
    po = partial_out.view(-1)[: rows * q_heads * splits * d].view(rows, q_heads, splits, d)
    pml = partial_ml.view(-1)[: rows * q_heads * splits * 2].view(rows, q_heads, splits, 2)
    key, value = paged.key, paged.value
    assert key.stride(-1) == 1 and value.stride(-1) == 1, "the KV cache's head_dim must be contiguous"
    score = scores is not None
    sc = scores if score else po  # (unread without SCORE)
    sh = score_heads if score else heads
    tile = tile_tokens(block_tokens)
    _decode_split_kernel[(rows, kv_heads, splits)](
        query, query.stride(0), query.stride(1), key, value, key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), block_table, block_table.stride(0), query_start_loc,
        seq_lens, selected, selected.stride(0), selected.stride(1), counts, heads.dense, po, po.stride(0),
        po.stride(1), po.stride(2), pml, pml.stride(0), pml.stride(1), sc, sc.stride(0), sc.stride(1), sh.sink,
        sh.local, scale * paged.k_scale, paged.v_scale, dense_below,
        G=group, GP=max(16, triton.next_power_of_2(group)), D=d, PS=paged.page_size, BT=block_tokens,
        TT=tile, U=min(block_tokens, tile), SPLITS=splits, HKV=kv_heads, SCORE=score,
        num_warps=SPLIT_WARPS, **({} if SPLIT_STAGES is None else {"num_stages": SPLIT_STAGES}),
    )
    _decode_merge_kernel[(rows, q_heads)](
        output, output.stride(0), output.stride(1), query_start_loc, seq_lens, po, po.stride(0), po.stride(1),
        po.stride(2), pml, pml.stride(0), pml.stride(1), dense_below, D=d, SPLITS=splits,
    )
