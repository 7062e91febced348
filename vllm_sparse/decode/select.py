"""Quest block selection for decode rows: score every block of a row's context by the upper bound
of q.k its page summaries allow, then keep per KV head the top blocks plus the sink and local ones.

Score of a page for one q head: sum_c max(q_c * min_c, q_c * max_c) (an upper bound of q.k over
the page's keys). A block (`block_tokens`, whole pages) takes its pages' maximum, and a KV head its
q heads' maximum, so one block list serves the whole GQA group. Sink and local blocks score +inf,
blocks past the context -inf. Ties go to the later block: both implementations order by the pair
(score, block index) (the reference packs it into one int64 key; the kernels find the threshold
score by a radix select, then take the later of the blocks tied at it). The kernels select in two
stages, so a long row is spread over many programs: each SELECT_SEGMENT-block segment keeps its own
top blocks, then one program per (row, KV head) selects among those candidates.

A decode row is a request with one query token whose context reaches `dense_below`; every other row
is skipped here (its attention is the dense backend's). The Triton kernels read the row facts from
device tensors, so the same launches serve every step of a captured CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROW_BLOCKS = 16384  # blocks of context a decode row may have (the scores workspace and the selection grow with it)
SCORE_PROGRAMS = 1024  # programs of the scoring kernel per step (they loop over a row's tiles)
SCORE_TILE_PAGES = 16  # pages a scoring program reads at a time
SCORE_WARPS = 2
SELECT_CHUNK = 1024  # candidates the second stage reads at a time
SELECT_SEGMENT = 2048  # blocks per first-stage selection program
SELECT_PROGRAMS = 512  # first-stage programs per step at most
SELECT_WARPS = 8


def sortable_keys(scores: torch.Tensor) -> torch.Tensor:
    """float32 scores [..., n] -> int64 keys ordered like (score, index)."""
    bits = scores.float().contiguous().view(torch.int32)
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    idx = torch.arange(scores.shape[-1], device=scores.device)
    return (key << 32) | idx


def reference_block_scores(q: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor, seq_len: int, page_size: int,
                           block_tokens: int, sink: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """One row. q [q_heads, D]; mins/maxs [pages, kv_heads, D] of the row's logical pages (at least the
    written ones); sink/local [kv_heads]. -> [kv_heads, blocks] float32 scores."""
    kv_heads = mins.shape[1]
    group = q.shape[0] // kv_heads
    n_pages = -(-seq_len // page_size)
    ppb = block_tokens // page_size
    nb = -(-seq_len // block_tokens)
    qf = q.float().view(kv_heads, group, 1, -1)  # [kv, g, 1, D]
    mn = mins[:n_pages].float().permute(1, 0, 2).unsqueeze(1)  # [kv, 1, pages, D]
    mx = maxs[:n_pages].float().permute(1, 0, 2).unsqueeze(1)
    bound = torch.maximum(qf * mn, qf * mx).sum(-1).amax(1)  # [kv, pages]
    padded = bound.new_full((kv_heads, nb * ppb), float("-inf"))
    padded[:, :n_pages] = bound
    scores = padded.view(kv_heads, nb, ppb).amax(-1)
    j = torch.arange(nb, device=q.device)
    forced = (j[None, :] < sink[:, None].to(q.device)) | (j[None, :] >= nb - local[:, None].to(q.device))
    return torch.where(forced, torch.full_like(scores, float("inf")), scores)


def reference_select(scores: torch.Tensor, kept: torch.Tensor) -> list[torch.Tensor]:
    """scores [kv_heads, blocks] (one row); kept [kv_heads] blocks to keep. -> per KV head, the kept
    block indices in ascending order."""
    keys = sortable_keys(scores)
    out = []
    for h in range(scores.shape[0]):
        kk = min(int(kept[h]), scores.shape[1])
        out.append(torch.topk(keys[h], kk).indices.sort().values)
    return out


@triton.jit
def _row_is_sparse_decode(qsl_ptr, seq_ptr, b, dense_below):
    q_len = tl.load(qsl_ptr + b + 1) - tl.load(qsl_ptr + b)
    seq = tl.load(seq_ptr + b)
    return (q_len == 1) & (seq >= dense_below), seq


@triton.jit
def _quest_scores_kernel(
    q_ptr, sq_t, sq_h, mins_ptr, maxs_ptr, ss_p, ss_h, bt_ptr, s_bt, qsl_ptr, seq_ptr, sink_ptr, local_ptr,
    dense_ptr, scores_ptr, ssc_b, ssc_h, dense_below,
    G: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, PPB: tl.constexpr, TILE_B: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    sparse, seq = _row_is_sparse_decode(qsl_ptr, seq_ptr, b, dense_below)
    if sparse & (tl.load(dense_ptr + h) == 0):
        nb = tl.cdiv(seq, PS * PPB)
        q0 = tl.load(qsl_ptr + b)
        d = tl.arange(0, D)
        sink = tl.load(sink_ptr + h)
        local = tl.load(local_ptr + h)
        for t in range(tl.program_id(2), tl.cdiv(nb, TILE_B), tl.num_programs(2)):
            blocks = t * TILE_B + tl.arange(0, TILE_B)
            pages = tl.reshape(blocks[:, None] * PPB + tl.arange(0, PPB)[None, :], (TILE_B * PPB,))
            pvalid = pages < tl.cdiv(seq, PS)
            phys = tl.load(bt_ptr + b * s_bt + pages, mask=pvalid, other=0).to(tl.int64)
            off = phys[:, None] * ss_p + h * ss_h + d[None, :]
            mn = tl.load(mins_ptr + off, mask=pvalid[:, None], other=0.0).to(tl.float32)
            mx = tl.load(maxs_ptr + off, mask=pvalid[:, None], other=0.0).to(tl.float32)
            best = tl.full((TILE_B * PPB,), float("-inf"), tl.float32)
            for g in tl.static_range(G):
                qg = tl.load(q_ptr + q0 * sq_t + (h * G + g) * sq_h + d).to(tl.float32)
                ub = tl.sum(tl.maximum(qg[None, :] * mn, qg[None, :] * mx), axis=1)
                best = tl.maximum(best, ub)
            best = tl.where(pvalid, best, float("-inf"))
            blk = tl.max(tl.reshape(best, (TILE_B, PPB)), axis=1)
            blk = tl.where((blocks < sink) | (blocks >= nb - local), float("inf"), blk)
            tl.store(scores_ptr + b * ssc_b + h * ssc_h + blocks, blk, mask=blocks < nb)


@triton.jit
def _keys_at(row_ptr, cidx_ptr, ckey_ptr, first, i, valid, FROM_CANDIDATES: tl.constexpr):
    """Elements i -> (int32 key ordered like the score, block): a row's blocks first + i, or candidates."""
    if FROM_CANDIDATES:
        blk = tl.load(cidx_ptr + i, mask=valid, other=0)
        key = tl.load(ckey_ptr + i, mask=valid, other=0)
    else:
        blk = first + i
        bits = tl.load(row_ptr + blk, mask=valid, other=0.0).to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return key, blk


@triton.jit
def _digit_histogram(key, valid, prefix, p: tl.constexpr):
    """256-bin histogram of byte p (from the top) of the keys whose higher bytes equal prefix."""
    digit = (key >> (24 - 8 * p)) & 0xFF
    if p == 0:
        digit = digit ^ 0x80  # the sign byte: unsigned order of the signed keys
    else:
        valid = valid & (((key >> (32 - 8 * p)) & ((1 << (8 * p)) - 1)) == prefix)
    return tl.histogram(digit, 256, mask=valid)


@triton.jit
def _choose_digit(hist, need, prefix, p: tl.constexpr):
    """The byte of the need-th largest matching key -> (still needed below it, keys at it, prefix)."""
    bins = tl.arange(0, 256)
    ge = tl.cumsum(hist, 0, reverse=True)  # matching keys with this byte or a larger one
    d = tl.sum((ge >= need).to(tl.int32), 0) - 1
    need -= tl.sum(tl.where(bins > d, hist, 0), 0)
    ties = tl.sum(tl.where(bins == d, hist, 0), 0)
    if p == 0:
        d = d ^ 0x80
    return need, ties, (prefix << 8) | d


@triton.jit
def _write_kept(key, blk, valid, thr, skip, written, seen, out_idx, out_key, WRITE_KEYS: tl.constexpr):
    """Keys above thr, and those equal to it past the first `skip` of them, in element order."""
    eq = valid & (key == thr)
    rank = seen + tl.cumsum(eq.to(tl.int32), 0) - 1
    keep = (valid & (key > thr)) | (eq & (rank >= skip))
    pos = written + tl.cumsum(keep.to(tl.int32), 0) - 1
    tl.store(out_idx + pos, blk, mask=keep)
    if WRITE_KEYS:
        tl.store(out_key + pos, key, mask=keep)
    return written + tl.sum(keep.to(tl.int32), 0), seen + tl.sum(eq.to(tl.int32), 0)


@triton.jit
def _top_keys(row_ptr, cidx_ptr, ckey_ptr, first, n, kk, out_idx, out_key,
              FROM_CANDIDATES: tl.constexpr, WRITE_KEYS: tl.constexpr, CH: tl.constexpr):
    """Of n elements (`_keys_at`), write the blocks (and, if WRITE_KEYS, the keys) of the kk largest
    (key, block) pairs, in element order. A radix select: four passes, each a 256-bin histogram of one
    byte of the keys that share the bytes chosen so far, find the kk-th largest key; ties at it go to
    the later blocks; a last pass writes the kept ones. Up to CH elements stay in registers for all
    passes; more are read CH at a time in every pass."""
    c = tl.arange(0, CH)
    need = kk  # keys still to find among those matching the prefix
    prefix = tl.zeros((), tl.int32)  # the threshold key's bytes found so far (raw bits)
    ties = kk
    zero = tl.zeros((), tl.int32)
    if n <= CH:
        valid = c < n
        key, blk = _keys_at(row_ptr, cidx_ptr, ckey_ptr, first, c, valid, FROM_CANDIDATES)
        for p in tl.static_range(4):
            need, ties, prefix = _choose_digit(_digit_histogram(key, valid, prefix, p), need, prefix, p)
        _write_kept(key, blk, valid, prefix, ties - need, zero, zero, out_idx, out_key, WRITE_KEYS)
    else:
        for p in tl.static_range(4):
            hist = tl.zeros((256,), tl.int32)
            for start in range(0, n, CH):
                i = start + c
                valid = i < n
                key, blk = _keys_at(row_ptr, cidx_ptr, ckey_ptr, first, i, valid, FROM_CANDIDATES)
                hist += _digit_histogram(key, valid, prefix, p)
            need, ties, prefix = _choose_digit(hist, need, prefix, p)
        written = zero
        seen = zero
        for start in range(0, n, CH):
            i = start + c
            valid = i < n
            key, blk = _keys_at(row_ptr, cidx_ptr, ckey_ptr, first, i, valid, FROM_CANDIDATES)
            written, seen = _write_kept(key, blk, valid, prefix, ties - need, written, seen, out_idx, out_key,
                                        WRITE_KEYS)


@triton.jit
def _selection_row(qsl_ptr, seq_ptr, kept_ptr, dense_ptr, b, h, dense_below, BT: tl.constexpr):
    """(row, KV head) -> (whether it selects: a sparse decode row and a Quest head; the row's blocks;
    the blocks it keeps)."""
    sparse, seq = _row_is_sparse_decode(qsl_ptr, seq_ptr, b, dense_below)
    nb = tl.cdiv(seq, BT)
    return sparse & (tl.load(dense_ptr + h) == 0), nb, tl.minimum(tl.load(kept_ptr + h), nb)


@triton.jit
def _segment_select_kernel(
    scores_ptr, ssc_b, ssc_h, qsl_ptr, seq_ptr, kept_ptr, dense_ptr, cidx_ptr, ckey_ptr, sca_b, sca_h, sel_ptr,
    ssel_b, ssel_h, dense_below, BT: tl.constexpr, SEG: tl.constexpr,
):
    """First stage, programs (row, KV head, k) over segments k, k + P, ...: each SEG-block segment of a
    row keeps its own top `kept` blocks (all of them if it has no more): the row's top `kept` are among
    them, whatever the scores. They go to the candidates with their keys, segment s at
    s * min(kept, SEG), so the candidates are contiguous and in block order; a row of one segment
    writes its final selection (and its keys to the unused candidates)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    selects, nb, kk = _selection_row(qsl_ptr, seq_ptr, kept_ptr, dense_ptr, b, h, dense_below, BT)
    if selects:
        cap = tl.minimum(kk, SEG)
        row = scores_ptr + b * ssc_b + h * ssc_h
        many = nb > SEG
        for s in range(tl.program_id(2), tl.cdiv(nb, SEG), tl.num_programs(2)):
            first = s * SEG
            n = tl.minimum(SEG, nb - first)
            out_key = ckey_ptr + b * sca_b + h * sca_h + s * cap
            if many:
                out_idx = cidx_ptr + b * sca_b + h * sca_h + s * cap
            else:
                out_idx = sel_ptr + b * ssel_b + h * ssel_h
            if kk >= n:  # the whole segment
                i = tl.arange(0, SEG)
                valid = i < n
                key, blk = _keys_at(row, row, row, first, i, valid, False)
                tl.store(out_idx + i, blk, mask=valid)
                tl.store(out_key + i, key, mask=valid)
            else:
                _top_keys(row, row, row, first, n, kk, out_idx, out_key, FROM_CANDIDATES=False, WRITE_KEYS=True, CH=SEG)


@triton.jit
def _merge_select_kernel(
    scores_ptr, ssc_b, ssc_h, qsl_ptr, seq_ptr, kept_ptr, dense_ptr, cidx_ptr, ckey_ptr, sca_b, sca_h, sel_ptr,
    ssel_b, ssel_h, cnt_ptr, dense_below, HKV: tl.constexpr, BT: tl.constexpr, SEG: tl.constexpr,
    CH: tl.constexpr,
):
    """Second stage, program per (row, KV head): the top `kept` of the segments' candidates."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    selects, nb, kk = _selection_row(qsl_ptr, seq_ptr, kept_ptr, dense_ptr, b, h, dense_below, BT)
    if selects:
        if nb > SEG:
            cap = tl.minimum(kk, SEG)
            last = (tl.cdiv(nb, SEG) - 1) * SEG
            n = (last // SEG) * cap + tl.minimum(kk, nb - last)
            sel = sel_ptr + b * ssel_b + h * ssel_h
            _top_keys(scores_ptr, cidx_ptr + b * sca_b + h * sca_h, ckey_ptr + b * sca_b + h * sca_h, 0, n, kk,
                      sel, sel, FROM_CANDIDATES=True, WRITE_KEYS=False, CH=CH)
        tl.store(cnt_ptr + b * HKV + h, kk)


def quest_select(query, mins, maxs, block_table, query_start_loc, seq_lens, heads, scores, candidates, selected,
                 counts, *, page_size: int, block_tokens: int, dense_below: int) -> None:
    """Score and select for every decode row of the step, into `selected` [rows, kv_heads, max kept]
    and `counts` [rows, kv_heads] (rows that are not sparse decode rows are left as they were).
    `heads`: the layer's per-KV-head tensors (`DecodeHeads`); workspace: `scores` [rows, kv_heads, NBP]
    float32, `candidates` [2, rows, kv_heads, candidate_width(NBP, max kept)] int32."""
    rows = seq_lens.shape[0]
    kv_heads = mins.shape[1]
    group = query.shape[1] // kv_heads
    ppb = block_tokens // page_size
    tile_b = max(1, SCORE_TILE_PAGES // ppb)
    tiles = triton.cdiv(scores.shape[2], tile_b)
    grid = (rows, kv_heads, max(1, min(tiles, SCORE_PROGRAMS // (rows * kv_heads))))
    _quest_scores_kernel[grid](
        query, query.stride(0), query.stride(1), mins, maxs, mins.stride(0), mins.stride(1), block_table,
        block_table.stride(0), query_start_loc, seq_lens, heads.sink, heads.local, heads.dense, scores,
        scores.stride(0), scores.stride(1), dense_below,
        G=group, D=query.shape[2], PS=page_size, PPB=ppb, TILE_B=tile_b, num_warps=SCORE_WARPS,
    )
    select_top_blocks(scores, candidates, query_start_loc, seq_lens, heads, selected, counts,
                      block_tokens=block_tokens, dense_below=dense_below)


def candidate_width(row_blocks: int, kept_blocks: int) -> int:
    """Candidates per (row, KV head) the first selection stage may write."""
    return triton.cdiv(row_blocks, SELECT_SEGMENT) * max(1, min(kept_blocks, SELECT_SEGMENT))


def select_top_blocks(scores, candidates, query_start_loc, seq_lens, heads, selected, counts, *, block_tokens: int,
                      dense_below: int) -> None:
    """Per sparse decode row and KV head, the kept blocks of `scores` [rows, kv_heads, NBP], in two
    stages so a long row is spread over programs: per segment, then over the segments' candidates
    (`candidates` [2, rows, kv_heads, candidate_width] int32: blocks and keys)."""
    rows, kv_heads = scores.shape[0], scores.shape[1]
    segments = triton.cdiv(scores.shape[2], SELECT_SEGMENT)
    per_row = max(1, min(segments, SELECT_PROGRAMS // (rows * kv_heads)))
    cidx, ckey = candidates[0], candidates[1]
    args = (scores, scores.stride(0), scores.stride(1), query_start_loc, seq_lens, heads.kept, heads.dense,
            cidx, ckey, cidx.stride(0), cidx.stride(1), selected, selected.stride(0), selected.stride(1))
    _segment_select_kernel[(rows, kv_heads, per_row)](
        *args, dense_below, BT=block_tokens, SEG=SELECT_SEGMENT, num_warps=SELECT_WARPS,
    )
    _merge_select_kernel[(rows, kv_heads)](
        *args, counts, dense_below, HKV=kv_heads, BT=block_tokens, SEG=SELECT_SEGMENT, CH=SELECT_CHUNK,
        num_warps=SELECT_WARPS,
    )
