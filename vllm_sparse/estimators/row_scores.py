"""Block scores of scored query rows, fused: the per-row estimators' GPU path.

`antidiagonal`, sampled-row `lowbit` and `vertical_slash` score some rows of a chunk against every
key before them: per row, the softmax of its logits summed into KV blocks, averaged over the rows
of each query block. In torch (`ChunkContext.token_logits_to_block_scores`) that is a [heads,
rows, context] tensor of logits and another of probabilities: gigabytes at 128K. Here it is two
Triton launches that hold at most a tile of logits, in registers:

1. `_row_block_lse_kernel` is a GEMM with a reducing epilogue. One program per (column tile, row
   tile, KV head) computes a [rows, columns] tile of logits (GQA-packed: the tile's rows are (row,
   q head) pairs of one KV head, unpadded, so its q heads share every key load; keys are read from
   vLLM's paged cache in place) and writes, per (row, KV block), the log-sum-exp of the block's
   logits. Tiles are independent: no row state, no second pass over the keys. Antidiagonal rows
   are S query tokens, reversed, against S consecutive keys per column, so the product reduces over
   S x head_dim; `lowbit` rows and keys are quantized to int8 (or int4 in int8) and multiplied on
   the tensor cores with int32 sums.
2. `_block_mass_kernel`, per (q head, query block): each row's log-sum-exp over its causal
   blocks (its softmax normaliser), then exp(block lse - row lse) averaged over the query block's
   rows, written as log-mass scores [heads, query blocks, kv blocks] (as the torch path).

`antidiagonal` with `bits` quantizes its strided rows and key columns first (`_quantize_rows_kernel`,
`_quantize_columns_kernel`: int8 per row / column of S x head_dim, as `quant.quantize_symmetric`), so
the first kernel's product reads half the bytes and runs on the int8 tensor cores; the keys are
quantized for as many KV heads per launch as the workspace's room beside the chunk's rows holds (short
chunks: most or all heads), else as the memory counted for one head's copy at the longest context covers
(`Workspace.key_column_heads`: all of them at short contexts, one at max_model_len).

Between them is one float per (head, row, KV block), taken from the workspace reserved at engine
start (`kernels/workspace.py`); a chunk that needs more than it holds runs in slabs of whole query
blocks. `vertical_slash` uses the first kernel for its rows' normalisers, then
`_line_mass_kernel` sums the normalised probabilities by key column and by diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vllm_sparse.estimators.quant import quantize_symmetric
from vllm_sparse.kernels.launch import needs_small_tiles, storage_base
from vllm_sparse.kernels.workspace import WORKSPACE

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@dataclass(frozen=True)
class ScoredRows:
    """The rows an estimator scores: row j's tokens start at `first + j * step`.

    With `stride` S > 1 (antidiagonal) a row is S consecutive query tokens taken in reverse and
    each key column is S consecutive keys; tokens outside the chunk count as zero vectors. A row
    sits in the query block of its last token, min(start + S - 1, seq_len - 1), and sees the key
    columns that start at or before that token.
    """

    first: int
    step: int
    count: int
    stride: int = 1

    def rows_before(self, pos: int) -> int:
        """Rows whose last token is before absolute position `pos` (rows are in position order)."""
        return min(self.count, max(0, -(-(pos - (self.stride - 1) - self.first) // self.step)))

    def last_token(self, j: int, seq_len: int) -> int:
        return min(self.first + j * self.step + self.stride - 1, seq_len - 1)


def query_block_slabs(rows: ScoredRows, chunk, max_rows: int):
    """Split the chunk's query blocks into runs [qa, qz) whose rows number at most max_rows (a run is
    one block at least) -> (qa, qz, first row, row count) each."""
    first, n_qb, bs = chunk.first_query_block, chunk.num_query_blocks, chunk.block_size
    qa = 0
    while qa < n_qb:
        r0 = rows.rows_before((first + qa) * bs)
        limit = r0 + max_rows  # the first row that does not fit
        qz = n_qb if limit >= rows.count else max(qa + 1, rows.last_token(limit, chunk.seq_len) // bs - first)
        yield qa, qz, r0, rows.rows_before((first + qz) * bs) - r0
        qa = qz


@triton.jit
def _to_int(x, inv, QMAX: tl.constexpr):
    """torch.round(x * inv).clamp(-QMAX, QMAX) in fp32, as int8. Clamped first (the bounds are integers,
    so the order does not matter), which also keeps the product out of an FMA with the rounding's add;
    then rounded to the nearest integer, ties to even, by adding and removing 1.5 * 2**23 (exact while
    |x| < 2**22): two adds where a division and a floor-based rounding took ~25 instructions an element."""
    p = tl.minimum(tl.maximum(x * inv, -QMAX), QMAX)
    return ((p + 12582912.0) - 12582912.0).to(tl.int8)


@triton.jit
def _scale_of(amax, QMAX: tl.constexpr):
    """(scale, its reciprocal) of vectors whose largest magnitude is amax, as quant.quantize_symmetric."""
    scale = tl.maximum(amax, 1e-8) * (1.0 / QMAX)
    return scale, tl.math.div_rn(1.0, scale)


@triton.jit
def _key_rows(K, stride_kp, stride_kh, stride_kt, BT, bt_offset, kv, tok, live, d, PAGE: tl.constexpr):
    """Keys at absolute positions tok [N] of one KV head from the paged cache (0 where not live)."""
    phys = tl.load(BT + bt_offset + tok // PAGE, mask=live, other=0).to(tl.int64)
    ptr = K + phys[:, None] * stride_kp + kv * stride_kh + (tok % PAGE)[:, None] * stride_kt + d[None, :]
    return tl.load(ptr, mask=live[:, None], other=0.0)


@triton.jit
def _quantize(x, QMAX: tl.constexpr):
    """Rows of x (fp32) -> (int8 values, per-row scales), exactly as quant.quantize_symmetric."""
    scale, inv = _scale_of(tl.max(tl.abs(x), axis=1), QMAX)
    return _to_int(x, inv[:, None], QMAX), scale


@triton.jit
def _logit_tile(Q, stride_qt, stride_qh, qi, q_scale, K, stride_kp, stride_kh, stride_kt,
                BT, bt_offset, kv, head, row_ok, row_pos, q_end, context_len, seq_len, n_cols, c0, logit_scale,
                S: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                QMAX: tl.constexpr, IN_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Logits (log2 units) of the program's rows against key columns c0.., -inf where not causal."""
    c = c0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_D)
    if QMAX > 0:
        # lowbit: each key quantized on its own (per token, per KV head), as quantize_symmetric.
        live = c < seq_len
        k = _key_rows(K, stride_kp, stride_kh, stride_kt, BT, bt_offset, kv, c, live, d, PAGE)
        ki, k_scale = _quantize(k.to(tl.float32), QMAX)
        acc = tl.dot(qi, tl.trans(ki), out_dtype=tl.int32)
        s = acc.to(tl.float32) * q_scale[:, None] * k_scale[None, :]  # q_scale holds the logit scale
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        q_len = seq_len - context_len
        dd = tl.arange(0, BLOCK_D)
        for it in range(S * (HEAD_D // BLOCK_D)):  # the reduction over S x head_dim, BLOCK_D at a time
            i = it // (HEAD_D // BLOCK_D)
            d0 = (it % (HEAD_D // BLOCK_D)) * BLOCK_D
            # Query token S-1-i of each row meets key i of each column: one antidiagonal per tile.
            qt = row_pos + (S - 1 - i) - context_len
            q_ok = row_ok & (qt >= 0) & (qt < q_len)
            q = tl.load(Q + qt[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + (d0 + dd)[None, :],
                        mask=q_ok[:, None], other=0.0)
            kt = c * S + i
            k = _key_rows(K + d0, stride_kp, stride_kh, stride_kt, BT, bt_offset, kv, kt, kt < seq_len, dd, PAGE)
            acc = tl.dot(q, tl.trans(k.to(q.dtype)), acc, input_precision=IN_PREC)  # (fp8 caches: exact)
        s = acc * logit_scale
    causal = (c[None, :] * S <= q_end[:, None]) & (c[None, :] < n_cols)
    return tl.where(causal, s, float("-inf"))


@triton.jit
def _quantized_logit_tile(QI, stride_qt, stride_qh, qrow, head, row_ok, q_scale, KI, stride_kc, KS, q_end, n_cols, c0,
                          S: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """Logits (log2 units) of pre-quantized strided rows against one KV head's pre-quantized key columns
    c0..: int8 products over S x head_dim with int32 sums, -inf where not causal."""
    c = c0 + tl.arange(0, BLOCK_N)
    col_ok = c < n_cols
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, S * HEAD_D, BLOCK_D):
        q = tl.load(QI + qrow[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + (k0 + dd)[None, :],
                    mask=row_ok[:, None], other=0)
        k = tl.load(KI + c[:, None].to(tl.int64) * stride_kc + (k0 + dd)[None, :], mask=col_ok[:, None], other=0)
        acc = tl.dot(q, tl.trans(k), acc, out_dtype=tl.int32)
    k_scale = tl.load(KS + c, mask=col_ok, other=0.0)
    s = acc.to(tl.float32) * q_scale[:, None] * k_scale[None, :]  # q_scale holds the logit scale
    causal = (c[None, :] * S <= q_end[:, None]) & col_ok[None, :]
    return tl.where(causal, s, float("-inf"))


@triton.jit(do_not_specialize=["context_len", "seq_len", "row_first", "n_rows"])
def _quantize_rows_kernel(
    Q, stride_qt, stride_qh,  # the chunk's queries [q_len, q_heads, D]
    QI, stride_ir, stride_ih,  # out: [rows, q_heads, S * D] int8, row j = tokens row_first + j*S .., reversed
    QS, stride_sr,  # out: [rows, q_heads] fp32 scales times the logit scale
    context_len, seq_len, row_first, n_rows, logit_scale,
    S: tl.constexpr, HEAD_D: tl.constexpr, ROWS: tl.constexpr, QMAX: tl.constexpr,
):
    """Strided antidiagonal rows (tokens outside the chunk are zero), quantized per row as quantize_symmetric."""
    j = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    h = tl.program_id(1)
    e = tl.arange(0, S * HEAD_D)
    tok = row_first + j[:, None] * S + (S - 1 - e // HEAD_D)[None, :]
    live = (j < n_rows)[:, None] & (tok >= context_len) & (tok < seq_len)
    x = tl.load(Q + (tok - context_len).to(tl.int64) * stride_qt + h * stride_qh + (e % HEAD_D)[None, :],
                mask=live, other=0.0).to(tl.float32)
    qi, scale = _quantize(x, QMAX)
    ok = j < n_rows
    tl.store(QI + j[:, None].to(tl.int64) * stride_ir + h * stride_ih + e[None, :], qi, mask=ok[:, None])
    tl.store(QS + j * stride_sr + h, scale * logit_scale, mask=ok)


@triton.jit(do_not_specialize=["bt_offset", "kv0", "seq_len", "n_cols"])
def _quantize_columns_kernel(
    K, stride_kp, stride_kh, stride_kt, BT, bt_offset, kv0,  # KV heads kv0 + program_id(1) of the paged cache
    KI, stride_kh_out, stride_kc,  # out: [heads, n_cols, S * D] int8, column c = keys c*S .. c*S + S - 1
    KS, stride_ks,  # out: [heads, n_cols] fp32 scales (rows padded to 16 floats: one compiled variant)
    seq_len, n_cols,
    S: tl.constexpr, HEAD_D: tl.constexpr, COLS: tl.constexpr, PAGE: tl.constexpr, QMAX: tl.constexpr,
):
    """Key columns of S consecutive keys (past the end: zero), quantized per column as quantize_symmetric.
    Held as [COLS, S, D]: one block-table lookup per key, and each key's head_dim read as vectors."""
    c = tl.program_id(0) * COLS + tl.arange(0, COLS)
    kv = kv0 + tl.program_id(1)
    KI += tl.program_id(1).to(tl.int64) * stride_kh_out
    KS += tl.program_id(1) * stride_ks
    i = tl.arange(0, S)
    d = tl.arange(0, HEAD_D)
    tok = c[:, None] * S + i[None, :]  # [COLS, S]
    live = tok < seq_len
    phys = tl.load(BT + bt_offset + tok // PAGE, mask=live, other=0).to(tl.int64)
    key = K + phys * stride_kp + kv * stride_kh + (tok % PAGE) * stride_kt
    x = tl.load(key[:, :, None] + d[None, None, :], mask=live[:, :, None], other=0.0).to(tl.float32)
    scale, inv = _scale_of(tl.max(tl.max(tl.abs(x), axis=2), axis=1), QMAX)
    ki = _to_int(x, inv[:, None, None], QMAX)
    ok = c < n_cols
    elem = (i * HEAD_D)[None, :, None] + d[None, None, :]
    tl.store(KI + c[:, None, None].to(tl.int64) * stride_kc + elem, ki, mask=ok[:, None, None])
    tl.store(KS + c, scale, mask=ok)


@triton.jit
def _store_block_lse(s, out_rows, row_ok, ct, n_cols, BLOCK_M: tl.constexpr, BPT: tl.constexpr, CPB: tl.constexpr):
    """A tile of logits [BLOCK_M, BPT * CPB] (log2 units) -> each row's log2-sum-exp2 of each of its BPT blocks."""
    s3 = tl.reshape(s, [BLOCK_M, BPT, CPB])
    bm = tl.max(s3, axis=2)
    bm = tl.where(bm == float("-inf"), 0.0, bm)
    blse = bm + tl.log2(tl.sum(tl.exp2(s3 - bm[:, :, None]), axis=2))  # log2(0) = -inf: nothing causal
    kb = ct * BPT + tl.arange(0, BPT)
    tl.store(out_rows + kb[None, :], blse, mask=row_ok[:, None] & (kb[None, :] * CPB < n_cols))


# Strides are left to Triton's specialisation (fixed by the model; a multiple of 16 lets loads
# vectorise; the int8 key columns' head strides change with the context but are multiples of 16 by
# construction: S x head_dim bytes a column, scale rows padded to 16), and Q and K come as tensors
# (16-byte aligned whatever the chunk); quantities that change with the chunk or the request are not
# specialised, so no request compiles a variant.
@triton.jit(do_not_specialize=["stride_qsr", "bt_offset", "stride_oh", "stride_or", "context_len", "seq_len",
                               "row_first", "row_step", "row0", "n_rows", "n_cols", "head0", "out_head0"])
def _row_block_lse_kernel(
    Q, stride_qt, stride_qh,  # float: the chunk's queries [q_len, q_heads, D]; int: quantized rows
    QS, stride_qsr,  # int: per-row scales [rows, q_heads] fp32 (unused for float)
    K, stride_kp, stride_kh, stride_kt,  # keys [pages, kv_heads, page, D], D contiguous (PRE: int8 key columns
    # [launch's KV heads, n_cols, S * D]: stride_kp the column's, stride_kh the head's, stride_kt the scales' head)
    KS,  # PRE: the key columns' scales [launch's KV heads, n_cols] (else unused)
    BT, bt_offset,  # the request's block table row (int32)
    KV_OF,  # [groups] KV head of each group of GROUP consecutive q heads (PRE: unused, group z reads columns z)
    OUT, stride_oh, stride_or,  # [q_heads from out_head0, slab rows, kv_blocks] fp32: log2-sum-exp2 of each block
    context_len, seq_len, row_first, row_step, row0, n_rows, n_cols, logit_scale, head0, out_head0,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, ROWS: tl.constexpr, S: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_N: tl.constexpr, CPB: tl.constexpr, SUB_TILES: tl.constexpr, PAGE: tl.constexpr, QMAX: tl.constexpr,
    IN_PREC: tl.constexpr, BLOCK_D: tl.constexpr, PRE: tl.constexpr,
):
    BLOCK_M: tl.constexpr = ROWS * GROUP_PAD
    COLS: tl.constexpr = BLOCK_N * SUB_TILES
    ct = tl.program_id(0)
    if PRE:
        kv = 0
        K += tl.program_id(2).to(tl.int64) * stride_kh
        KS += tl.program_id(2) * stride_kt
    else:
        kv = tl.load(KV_OF + tl.program_id(2))
    r = tl.arange(0, BLOCK_M)
    # The group's (row, q head) pairs numbered row-major, head-minor, without padding: a tile holds BLOCK_M of
    # them, so a group of 7 q heads does 7/8 of the products and key loads that padding it to 8 did (a tile's
    # rows need not be whole: every pair is scored and stored on its own).
    f = tl.program_id(1) * BLOCK_M + r
    j = f // GROUP  # row within the slab
    slot = f % GROUP
    head = head0 + tl.program_id(2) * GROUP + slot
    row_ok = j < n_rows
    row_pos = row_first + (row0 + j) * row_step
    q_end = tl.minimum(row_pos + S - 1, seq_len - 1)
    c0 = ct * COLS
    if c0 * S > tl.max(tl.where(row_ok, q_end, -1), axis=0):
        return  # above every row's diagonal: nothing causal (the mass kernel never reads it)

    d = tl.arange(0, HEAD_D)
    if PRE:  # quantized strided rows: their scales here, their values tile by tile
        qi = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.int8)
        q_scale = tl.load(QS + (row0 + j) * stride_qsr + head, mask=row_ok, other=0.0)
    elif QMAX > 0:
        qi = tl.load(Q + (row0 + j)[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
                     mask=row_ok[:, None], other=0)
        q_scale = tl.load(QS + (row0 + j) * stride_qsr + head, mask=row_ok, other=0.0)
    else:
        qi = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.int8)
        q_scale = tl.zeros([BLOCK_M], dtype=tl.float32)

    out_rows = OUT + (head - out_head0)[:, None].to(tl.int64) * stride_oh + j[:, None] * stride_or
    if SUB_TILES == 1:
        # The tile holds COLS // CPB whole blocks: reduce each to its log-sum-exp.
        if PRE:
            s = _quantized_logit_tile(Q, stride_qt, stride_qh, row0 + j, head, row_ok, q_scale, K, stride_kp, KS,
                                      q_end, n_cols, c0, S, HEAD_D, BLOCK_N, BLOCK_M, BLOCK_D)
        else:
            s = _logit_tile(Q, stride_qt, stride_qh, qi, q_scale, K, stride_kp, stride_kh, stride_kt, BT, bt_offset,
                            kv, head, row_ok, row_pos, q_end, context_len, seq_len, n_cols, c0, logit_scale, S,
                            HEAD_D, BLOCK_N, PAGE, QMAX, IN_PREC, BLOCK_M, BLOCK_D)
        _store_block_lse(s, out_rows, row_ok, ct, n_cols, BLOCK_M, BLOCK_N // CPB, CPB)
    else:
        # A block spans SUB_TILES tiles: merge their sums online.
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        acc = tl.zeros([BLOCK_M], tl.float32)
        for t in range(SUB_TILES):
            if PRE:
                s = _quantized_logit_tile(Q, stride_qt, stride_qh, row0 + j, head, row_ok, q_scale, K, stride_kp, KS,
                                          q_end, n_cols, c0 + t * BLOCK_N, S, HEAD_D, BLOCK_N, BLOCK_M, BLOCK_D)
            else:
                s = _logit_tile(Q, stride_qt, stride_qh, qi, q_scale, K, stride_kp, stride_kh, stride_kt, BT,
                                bt_offset, kv, head, row_ok, row_pos, q_end, context_len, seq_len, n_cols,
                                c0 + t * BLOCK_N, logit_scale, S, HEAD_D, BLOCK_N, PAGE, QMAX, IN_PREC, BLOCK_M,
                                BLOCK_D)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc = acc * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
            m = m_new
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        tl.store(out_rows + ct, (m_safe + tl.log2(acc))[:, None], mask=row_ok[:, None])


@triton.jit(do_not_specialize=["stride_qsr", "bt_offset", "stride_oh", "stride_or", "seq_len", "row_first",
                               "row_step", "row0", "n_rows"])
def _row_block_lse_int_kernel(
    QI, stride_qt, stride_qh,  # quantized rows [rows, q_heads, D] int8
    QS, stride_qsr,  # their scales [rows, q_heads] fp32, times the logit scale
    K, stride_kp, stride_kh, stride_kt, BT, bt_offset, KV_OF,
    OUT, stride_oh, stride_or,  # as _row_block_lse_kernel
    seq_len, row_first, row_step, row0, n_rows,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, ROWS: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_N: tl.constexpr, CPB: tl.constexpr, PAGE: tl.constexpr, QMAX: tl.constexpr,
):
    """`_row_block_lse_kernel` for quantized single-token rows, keys stationary: one program per (column
    tile, GQA group) reads and quantizes its keys once, then walks every row tile that sees them."""
    BLOCK_M: tl.constexpr = ROWS * GROUP_PAD
    ct = tl.program_id(0)
    kv = tl.load(KV_OF + tl.program_id(1))
    c = ct * BLOCK_N + tl.arange(0, BLOCK_N)
    live = c < seq_len
    d = tl.arange(0, HEAD_D)
    k = _key_rows(K, stride_kp, stride_kh, stride_kt, BT, bt_offset, kv, c, live, d, PAGE).to(tl.float32)
    ki, k_scale = _quantize(k, QMAX)  # per key, as quantize_symmetric
    kt = tl.trans(ki)
    c_last = tl.minimum(ct * BLOCK_N + BLOCK_N, seq_len) - 1
    r = tl.arange(0, BLOCK_M)
    # Rows (in position order) before the first that sees column c0 need not be visited.
    first = tl.maximum((ct * BLOCK_N - row_first + row_step - 1) // row_step - row0, 0)
    for rt in range(first * GROUP // BLOCK_M, tl.cdiv(n_rows * GROUP, BLOCK_M)):
        f = rt * BLOCK_M + r  # (row, q head) pairs without padding, as in _row_block_lse_kernel
        j = f // GROUP
        head = tl.program_id(1) * GROUP + f % GROUP
        row_ok = j < n_rows
        q_end = tl.minimum(row_first + (row0 + j) * row_step, seq_len - 1)
        qi = tl.load(QI + (row0 + j)[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
                     mask=row_ok[:, None], other=0)
        q_scale = tl.load(QS + (row0 + j) * stride_qsr + head, mask=row_ok, other=0.0)
        acc = tl.dot(qi, kt, out_dtype=tl.int32)
        s = acc.to(tl.float32) * q_scale[:, None] * k_scale[None, :]
        if (c_last < ct * BLOCK_N + BLOCK_N - 1) or (c_last > tl.min(tl.where(row_ok, q_end, seq_len))):
            # keys past the end, or a row that does not see them all: mask (rows are in position order,
            # so after a few tiles every row sees every column)
            s = tl.where((c[None, :] <= q_end[:, None]) & live[None, :], s, float("-inf"))
        out_rows = OUT + head[:, None].to(tl.int64) * stride_oh + j[:, None] * stride_or
        _store_block_lse(s, out_rows, row_ok, ct, seq_len, BLOCK_M, BLOCK_N // CPB, CPB)


@triton.jit
def _rows_before(pos, row_first, row_step, n_total, S: tl.constexpr):
    """`ScoredRows.rows_before` in the kernel."""
    num = pos - (S - 1) - row_first
    return tl.minimum(tl.maximum((num + row_step - 1) // row_step, 0), n_total)


@triton.jit(do_not_specialize=["stride_bh", "stride_br", "stride_oh", "stride_or", "seq_len", "row_first",
                               "row_step", "row0", "n_total", "n_kv_blocks", "first_query_block", "qb0",
                               "block_size", "out_head0"])
def _block_mass_kernel(
    BLSE, stride_bh, stride_br,  # [run's q heads, slab rows, kv_blocks] log2 units (from _row_block_lse_kernel)
    OUT, stride_oh, stride_or,  # [q_heads, query blocks, kv_blocks] fp32 log-mass, -inf past the diagonal
    seq_len, row_first, row_step, row0, n_total, n_kv_blocks, first_query_block, qb0, block_size,
    out_head0,  # the run's first q head in OUT (OUT itself stays the tensor's base: an offset view would
    # change the pointer's alignment, which Triton specialises on, and compile a variant mid-request)
    S: tl.constexpr, ROWS_PAD: tl.constexpr, BLOCK_KB: tl.constexpr,
):
    qb = qb0 + tl.program_id(0)  # query block row of the chunk
    h = tl.program_id(1)
    qb_abs = first_query_block + qb
    j_lo = _rows_before(qb_abs * block_size, row_first, row_step, n_total, S)
    j_hi = _rows_before((qb_abs + 1) * block_size, row_first, row_step, n_total, S)
    r = tl.arange(0, ROWS_PAD)
    live = r < j_hi - j_lo
    rows = BLSE + h.to(tl.int64) * stride_bh + (j_lo - row0 + r)[:, None] * stride_br
    # Pass 1: each row's normaliser over the blocks it sees (every one up to this query block).
    m = tl.full([ROWS_PAD], float("-inf"), tl.float32)
    acc = tl.zeros([ROWS_PAD], tl.float32)
    for kb0 in range(0, qb_abs + 1, BLOCK_KB):
        kb = kb0 + tl.arange(0, BLOCK_KB)
        x = tl.load(rows + kb[None, :], mask=live[:, None] & (kb[None, :] <= qb_abs), other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp2(m - m_safe) + tl.sum(tl.exp2(x - m_safe[:, None]), axis=1)
        m = m_new
    lse = tl.where(m == float("-inf"), 0.0, m) + tl.log2(tl.where(live, acc, 1.0))
    # Pass 2: the mean over rows of each block's share of its row's mass.
    n = tl.maximum(j_hi - j_lo, 1).to(tl.float32)
    out = OUT + (out_head0 + h).to(tl.int64) * stride_oh + qb * stride_or
    for kb0 in range(0, n_kv_blocks, BLOCK_KB):
        kb = kb0 + tl.arange(0, BLOCK_KB)
        causal = kb <= qb_abs
        x = tl.load(rows + kb[None, :], mask=live[:, None] & causal[None, :], other=float("-inf"))
        mass = tl.sum(tl.exp2(x - lse[:, None]), axis=0) / n
        score = tl.where(causal, tl.log(tl.maximum(mass, 1e-30)), float("-inf"))
        tl.store(out + kb, score, mask=kb < n_kv_blocks)


def _tile_config(group_pad: int, bits: int | None, head_dim: int, strided: bool = False
                 ) -> tuple[int, int, int, int, int]:
    """(rows per head in a tile, key columns per tile, num_warps, num_stages, reduction step).

    Picked by `benchmarks/estimators.py --sweep` on an H100 at 128K (benchmarks/RESULTS.md): antidiagonal
    tiles of 128 packed rows x 256 key columns, two stages, a head-dim step of up to 128; quantized rows
    in tiles of 64 packed rows x 128 keys, four warps, four stages. Quantized antidiagonal rows (int8
    operands over S x head_dim): 128 packed rows x 128 key columns, four warps, three stages, 128-byte
    reduction steps (H200 sweep: 2.96 ms per 16K chunk-layer at 128K against 3.28-4.05 ms for the others).
    """
    if bits and strided:
        return max(1, 128 // group_pad), 128, 4, 3, 128
    if bits:  # a head_dim past 128 holds twice the quantized keys in registers: twice the warps
        return max(1, 64 // group_pad), 128, 4 if head_dim <= 128 else 8, 4 if head_dim <= 128 else 2, head_dim
    return max(1, 128 // group_pad), 256, 8, 2, min(head_dim, 128)


def _kv_block_tile(n_kv_blocks: int, device: torch.device) -> int:
    """KV blocks per step of the mass kernel: fixed on GPUs (no compile for a new context length);
    the row's size in Triton's interpreter, which pays per step."""
    return triton.next_power_of_2(n_kv_blocks) if device.type == "cpu" else 256


def key_column_floats(n_cols: int, stride: int, head_dim: int) -> tuple[int, int]:
    """Workspace floats of one KV head's int8 key columns (`n_cols` of stride x head_dim values) and of their scale
    row, padded to a multiple of 16 floats: its stride reaches the kernels, which Triton specialises on divisibility
    by 16 (an unpadded stride would compile a variant mid-request)."""
    return n_cols * stride * head_dim // 4, -(-n_cols // 16) * 16


class _RowLse:
    """Launches `_row_block_lse_kernel` for slabs of one chunk's scored rows."""

    def __init__(self, chunk, rows: ScoredRows, logit_scale: float, bits: int | None):
        q, kv = chunk.q, chunk.kv
        self.heads, d = q.shape[1], q.shape[2]
        # GQA packing: each program's rows are one KV head's q heads (consecutive, as the backend orders
        # them); heads in any other order are scored one per group.
        self.group = chunk._groups[1] if chunk._groups is not None else 1
        if kv.key.stride(-1) != 1 or q.stride(-1) != 1:
            raise ValueError("the fused estimators need head_dim contiguous in the queries and the cache")
        if chunk.block_size % rows.stride:
            raise ValueError(f"stride {rows.stride} must divide the block size {chunk.block_size}")
        # Quantized strided rows (antidiagonal with bits): rows and key columns quantized before the product.
        self.pre = bits is not None and rows.stride > 1
        if self.pre and (rows.step != rows.stride or rows.stride & (rows.stride - 1)):
            raise ValueError(f"quantized strided rows need a power-of-two stride equal to the row step, not "
                             f"stride {rows.stride}, step {rows.step}")
        if d & (d - 1) or d < 16:
            raise ValueError(f"the fused estimators need a power-of-two head_dim >= 16, not {d}")
        self.chunk, self.rows, self.bits = chunk, rows, bits
        self.n_cols = (chunk.seq_len - 1) // rows.stride + 1
        self.group_pad = triton.next_power_of_2(self.group)
        self.tile_rows, self.block_n, self.warps, self.stages, self.block_d = _tile_config(
            self.group_pad, bits, d, strided=self.pre)
        if self.pre:  # the reduction runs over S x head_dim: its step must not pass a row's end
            self.block_d = min(self.block_d, rows.stride * d)
        self.cpb = chunk.block_size // rows.stride  # key columns per KV block (powers of two)
        self.sub_tiles = max(1, self.cpb // self.block_n)  # a block wider than a tile spans several
        self.logit_scale = logit_scale * _LOG2E * kv.k_scale  # log2 units; an fp8 cache's key scale
        self.qmax = 2 ** (bits - 1) - 1 if bits else 0
        # The block table row as an aligned base and an offset (the offset changes with the request).
        self.bt = storage_base(chunk.block_table)
        # Floats the rows' slabs may take from the workspace (less where key columns take its tail).
        self.slab_floats = WORKSPACE.capacity(q.device)
        if self.pre:
            self._quantize_rows(q)
            self._place_key_columns(chunk, d)
            return
        self.kv_of = chunk.kv_head_of[::self.group].contiguous()
        if bits:
            idx = rows.first - chunk.context_len + torch.arange(rows.count, device=q.device) * rows.step
            qi, qs = quantize_symmetric(q[idx].float(), bits)  # [rows, heads, D], [rows, heads, 1]
            self.q_in, self.q_scale = qi.to(torch.int8), (qs[..., 0] * self.logit_scale).contiguous()
            self.logit_scale = 1.0  # folded into the rows' scales
        else:
            self.q_in, self.q_scale = q, torch.empty(1, 1, device=q.device)  # scale unused

    def _place_key_columns(self, chunk, d: int) -> None:
        """The passes over quantized key columns and the int8 copy [pass's KV heads, n_cols, S * D] (with its
        scales) that holds one pass at a time. Where the chunk's rows of every head fit the reserved workspace
        with room to spare (short chunks: a follow-up turn's 2K tokens take 17 MB of a 128K engine's 137 MiB),
        the copy lives in that room, for as many KV heads as it holds; else it is allocated for as many as vLLM's
        memory profile counted (`Workspace.key_column_heads`: one at max_model_len). Fewer passes, fewer launches:
        the scores are the same whatever a pass holds."""
        kv_ids = chunk._groups[0] if chunk._groups is not None else chunk.host_kv_head_ids()
        in_order = kv_ids == list(range(len(kv_ids)))
        counted = WORKSPACE.key_column_heads(len(kv_ids), chunk.seq_len, d + 4, chunk.q.device) if in_order else 1
        col_floats, scale_floats = key_column_floats(self.n_cols, self.rows.stride, d)
        rows_end = -(-max(self.rows.count, 1) * self.heads * self.chunk.num_kv_blocks // 64) * 64  # 256 B aligned
        room = self.slab_floats - rows_end - 64
        n = min(len(kv_ids), room // (col_floats + scale_floats)) if in_order and room > 0 else 0
        scales_at = rows_end + -(-n * col_floats // 64) * 64
        k_in = WORKSPACE.tail(rows_end, n * col_floats, chunk.q.device) if n > counted else None
        if k_in is not None:  # (the scales end within the room: see `room`)
            self.k_in = k_in.view(torch.int8).view(n, self.n_cols, self.rows.stride * d)
            self.k_scale = WORKSPACE.tail(scales_at, n * scale_floats, chunk.q.device).view(n, scale_floats)
            self.slab_floats = rows_end  # the rows' slabs stop where the key columns start
        else:
            n = counted
            self.k_in = torch.empty(n, self.n_cols, self.rows.stride * d, dtype=torch.int8, device=chunk.q.device)
            self.k_scale = torch.empty(n, scale_floats, dtype=torch.float32, device=chunk.q.device)
        # (first group, groups, first KV head) of each launch; heads in another order: one group a launch.
        self.passes = ([(g, min(n, len(kv_ids) - g), g) for g in range(0, len(kv_ids), n)] if in_order
                       else [(g, 1, kv) for g, kv in enumerate(kv_ids)])
        self._quantized = None  # the (first KV head, heads) whose columns k_in holds

    def _quantize_rows(self, q: torch.Tensor) -> None:
        """Every scored strided row of the chunk, int8 [rows, heads, S * D], scales [rows, heads] (log2 units)."""
        c, rows, d = self.chunk, self.rows, q.shape[-1]
        self.q_in = torch.empty(rows.count, self.heads, rows.stride * d, dtype=torch.int8, device=q.device)
        self.q_scale = torch.empty(rows.count, self.heads, dtype=torch.float32, device=q.device)
        tile = 4
        _quantize_rows_kernel[(triton.cdiv(rows.count, tile), self.heads)](
            q, q.stride(0), q.stride(1), self.q_in, self.q_in.stride(0), self.q_in.stride(1),
            self.q_scale, self.q_scale.stride(0), c.context_len, c.seq_len, rows.first, rows.count, self.logit_scale,
            S=rows.stride, HEAD_D=d, ROWS=tile, QMAX=self.qmax, num_warps=4,
        )
        self.logit_scale = 1.0  # folded into the rows' scales

    def _quantize_columns(self, kv0: int, heads: int) -> None:
        c, key, tile = self.chunk, self.chunk.kv.key, 4
        _quantize_columns_kernel[(triton.cdiv(self.n_cols, tile), heads)](
            key, key.stride(0), key.stride(1), key.stride(2), *self.bt, kv0,
            self.k_in, self.k_in.stride(0), self.k_in.stride(1), self.k_scale, self.k_scale.stride(0), c.seq_len,
            self.n_cols,
            S=self.rows.stride, HEAD_D=c.q.shape[-1], COLS=tile, PAGE=c.kv.page_size, QMAX=self.qmax, num_warps=4,
        )

    def head_runs(self, slab_floats: int) -> list[tuple[int, int]]:
        """[first q head, end) of the runs scored one after another through every slab. With quantized key
        columns, consecutive passes join one run while its heads' rows of the whole chunk fit one slab of
        `slab_floats`: its passes fill the slab in turn and one mass launch reads them all (a mass launch per pass
        holds one GQA group's heads: too few programs to fill a GPU). A pass whose rows need several slabs is a
        run of its own, so its keys are quantized once, not once a slab. Float rows: one run of every head."""
        if not self.pre:
            return [(0, self.heads)]
        per_head = self.rows.count * self.chunk.num_kv_blocks
        runs: list[tuple[int, int]] = []
        for g0, n, _ in self.passes:
            h0, h1 = g0 * self.group, (g0 + n) * self.group
            if runs and runs[-1][1] == h0 and (h1 - runs[-1][0]) * per_head <= slab_floats:
                runs[-1] = (runs[-1][0], h1)
            else:
                runs.append((h0, h1))
        return runs

    def _pair_tiles(self, n_rows: int) -> int:
        """Row tiles of the product kernel: its tiles hold tile_rows x group_pad (row, q head) pairs, unpadded."""
        return triton.cdiv(n_rows * self.group, self.tile_rows * self.group_pad)

    def launch(self, r0: int, n_rows: int, ws: torch.Tensor, run: tuple[int, int]) -> None:
        """Rows [r0, r0 + n_rows) of the q heads [h0, h1) of `run`, one of `head_runs` -> ws [h1 - h0, n_rows,
        kv_blocks]: log2-sum-exp2 of each causal block."""
        c, rows, key = self.chunk, self.rows, self.chunk.kv.key
        if self.pre:
            self._launch_quantized(r0, n_rows, ws, run)
            return
        assert run == (0, self.heads), "head runs are passes over quantized key columns"
        if self.bits and self.sub_tiles == 1:
            _row_block_lse_int_kernel[(triton.cdiv(self.n_cols, self.block_n), self.kv_of.shape[0])](
                self.q_in, self.q_in.stride(0), self.q_in.stride(1), self.q_scale, self.q_scale.stride(0),
                key, key.stride(0), key.stride(1), key.stride(2), *self.bt,
                self.kv_of, ws, ws.stride(0), ws.stride(1),
                c.seq_len, rows.first, rows.step, r0, n_rows,
                GROUP=self.group, GROUP_PAD=self.group_pad, ROWS=self.tile_rows, HEAD_D=c.q.shape[-1],
                BLOCK_N=self.block_n, CPB=self.cpb, PAGE=c.kv.page_size, QMAX=2 ** (self.bits - 1) - 1,
                num_warps=self.warps, num_stages=self.stages,
            )
            return
        grid = (triton.cdiv(self.n_cols, self.block_n * self.sub_tiles), self._pair_tiles(n_rows),
                self.kv_of.shape[0])
        _row_block_lse_kernel[grid](
            self.q_in, self.q_in.stride(0), self.q_in.stride(1), self.q_scale, self.q_scale.stride(0),
            key, key.stride(0), key.stride(1), key.stride(2), self.q_scale, *self.bt,
            self.kv_of, ws, ws.stride(0), ws.stride(1),
            c.context_len, c.seq_len, rows.first, rows.step, r0, n_rows, self.n_cols, self.logit_scale, 0, 0,
            GROUP=self.group, GROUP_PAD=self.group_pad, ROWS=self.tile_rows, S=rows.stride, HEAD_D=c.q.shape[-1],
            BLOCK_N=self.block_n, CPB=self.cpb, SUB_TILES=self.sub_tiles, PAGE=c.kv.page_size, QMAX=self.qmax,
            IN_PREC="ieee" if c.q.dtype == torch.float32 else "tf32", BLOCK_D=self.block_d, PRE=False,
            num_warps=self.warps, num_stages=self.stages,
        )

    def _launch_quantized(self, r0: int, n_rows: int, ws: torch.Tensor, run: tuple[int, int]) -> None:
        """One launch per pass (`_place_key_columns`) of the run's q heads over its KV heads' quantized key columns
        (quantized here, or kept from the last pass when both read the same heads)."""
        c, rows, k = self.chunk, self.rows, self.k_in
        for g0, heads, kv0 in self.passes:
            if not run[0] <= g0 * self.group < run[1]:
                continue
            if (kv0, heads) != self._quantized:
                self._quantize_columns(kv0, heads)
                self._quantized = (kv0, heads)
            grid = (triton.cdiv(self.n_cols, self.block_n * self.sub_tiles), self._pair_tiles(n_rows), heads)
            _row_block_lse_kernel[grid](
                self.q_in, self.q_in.stride(0), self.q_in.stride(1), self.q_scale, self.q_scale.stride(0),
                k, k.stride(1), k.stride(0), self.k_scale.stride(0), self.k_scale, *self.bt,
                self.k_scale, ws, ws.stride(0), ws.stride(1),
                c.context_len, c.seq_len, rows.first, rows.step, r0, n_rows, self.n_cols, 1.0, g0 * self.group,
                run[0], GROUP=self.group, GROUP_PAD=self.group_pad, ROWS=self.tile_rows, S=rows.stride,
                HEAD_D=c.q.shape[-1], BLOCK_N=self.block_n, CPB=self.cpb, SUB_TILES=self.sub_tiles,
                PAGE=c.kv.page_size, QMAX=self.qmax, IN_PREC="ieee", BLOCK_D=self.block_d, PRE=True,
                num_warps=self.warps, num_stages=self.stages,
            )


def row_block_scores(chunk, rows: ScoredRows, logit_scale: float, bits: int | None = None) -> torch.Tensor:
    """Log-mass block scores [q heads, query blocks, kv blocks] of `rows`: what
    `chunk.token_logits_to_block_scores` gives for the rows' logits times `logit_scale` (with `bits`,
    the quantized product of `quant.lowbit_logits`), without a [heads, rows, context] tensor. On CUDA
    tensors, or on CPU ones in Triton's interpreter."""
    lse = _RowLse(chunk, rows, logit_scale, bits)
    nkb, n_qb, bs = chunk.num_kv_blocks, chunk.num_query_blocks, chunk.block_size
    out = torch.empty(lse.heads, n_qb, nkb, dtype=torch.float32, device=chunk.q.device)
    rows_per_qb = -(-bs // rows.step)
    # Per run of heads (every head, or passes over quantized key columns as `head_runs` joins them), slabs of whole
    # query blocks whose rows' workspace fits: a pass's keys are quantized once, and its slabs hold only its run's
    # heads' rows.
    for h0, h1 in lse.head_runs(lse.slab_floats):
        heads = h1 - h0
        for qa, qz, r0, n_rows in query_block_slabs(rows, chunk, lse.slab_floats // (heads * nkb)):
            ws = WORKSPACE.floats(heads * max(n_rows, 1) * nkb, chunk.q.device).view(heads, max(n_rows, 1), nkb)
            if n_rows:
                lse.launch(r0, n_rows, ws, (h0, h1))
            _block_mass_kernel[(qz - qa, heads)](
                ws, ws.stride(0), ws.stride(1), out, out.stride(0), out.stride(1),
                chunk.seq_len, rows.first, rows.step, r0, rows.count, nkb, chunk.first_query_block, qa, bs, h0,
                S=rows.stride, ROWS_PAD=triton.next_power_of_2(rows_per_qb),
                BLOCK_KB=_kv_block_tile(nkb, out.device), num_warps=4,
            )
    return out


def row_log_normalisers(chunk, rows: ScoredRows, logit_scale: float) -> torch.Tensor:
    """[q heads, rows] log2-sum-exp2 of each row's causal logits (times `logit_scale`, log2 units)."""
    lse = _RowLse(chunk, rows, logit_scale, None)
    heads, nkb = lse.heads, chunk.num_kv_blocks
    out = torch.empty(heads, rows.count, dtype=torch.float32, device=chunk.q.device)
    per_slab = max(1, WORKSPACE.capacity(chunk.q.device) // (heads * nkb))
    kb = torch.arange(nkb, device=chunk.q.device)
    for r0 in range(0, rows.count, per_slab):
        n = min(per_slab, rows.count - r0)
        ws = WORKSPACE.floats(heads * n * nkb, chunk.q.device).view(heads, n, nkb)
        lse.launch(r0, n, ws, (0, heads))  # (float rows: one run of every head)
        ends = torch.clamp(rows.first + (r0 + torch.arange(n, device=kb.device)) * rows.step + rows.stride - 1,
                           max=chunk.seq_len - 1)
        seen = kb[None, :] <= (ends // chunk.block_size)[:, None]
        out[:, r0:r0 + n] = torch.logsumexp(ws.masked_fill(~seen[None], float("-inf")) * _LN2, dim=-1) / _LN2
    return out


@triton.jit(do_not_specialize=["bt_offset", "stride_lh", "stride_line", "context_len", "seq_len", "n_rows"])
def _line_mass_kernel(
    Q, stride_qt, stride_qh,  # the chunk's queries [q_len, q_heads, D]
    K, stride_kp, stride_kh, stride_kt, BT, bt_offset, KV_OF,  # KV_OF: [q_heads] each one's KV head
    LSE, stride_lh,  # [q_heads, n_rows] log2 normaliser of each of the chunk's last n_rows queries
    VERT, SLASH, stride_line,  # [q_heads, seq_len] fp32: VERT written here, SLASH (zeroed) accumulated
    context_len, seq_len, n_rows, logit_scale,
    HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, PAGE: tl.constexpr, IN_PREC: tl.constexpr,
):
    """Per key column, the probability mass the last n_rows queries give it (vertical); per
    diagonal (query - key), the same summed along it (slash, by atomic adds)."""
    h = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = c < seq_len
    d = tl.arange(0, HEAD_D)
    k = _key_rows(K, stride_kp, stride_kh, stride_kt, BT, bt_offset, tl.load(KV_OF + h), c, live, d, PAGE)
    k = k.to(Q.dtype.element_ty)  # (fp8 caches: exact; their scale is in logit_scale)
    vert = tl.zeros([BLOCK_N], tl.float32)
    first = seq_len - n_rows
    for i0 in range(0, n_rows, ROWS):
        i = i0 + tl.arange(0, ROWS)
        ok = i < n_rows
        pos = first + i
        q = tl.load(Q + (pos - context_len)[:, None].to(tl.int64) * stride_qt + h * stride_qh + d[None, :],
                    mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=IN_PREC) * logit_scale
        norm = tl.load(LSE + h * stride_lh + i, mask=ok, other=0.0)
        causal = ok[:, None] & live[None, :] & (c[None, :] <= pos[:, None])
        p = tl.where(causal, tl.exp2(s - norm[:, None]), 0.0)
        vert += tl.sum(p, axis=0)
        tl.atomic_add(SLASH + h * stride_line + (pos[:, None] - c[None, :]), p, mask=causal, sem="relaxed")
    tl.store(VERT + h * stride_line + c, vert, mask=live)


def line_masses(chunk, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's last n queries' softmax mass summed by key column and by diagonal (query - key):
    ([q heads, seq_len], [q heads, seq_len]) fp32, as `vertical_slash`'s torch path sums its probabilities."""
    q, kv = chunk.q, chunk.kv
    rows = ScoredRows(first=chunk.seq_len - n, step=1, count=n)
    norms = row_log_normalisers(chunk, rows, chunk.scale)
    heads, seq = q.shape[1], chunk.seq_len
    vert = torch.empty(heads, seq, dtype=torch.float32, device=q.device)
    slash = torch.zeros(heads, seq, dtype=torch.float32, device=q.device)
    bt_base, bt_off = storage_base(chunk.block_table)
    block_n = 64
    _line_mass_kernel[(triton.cdiv(seq, block_n), heads)](
        q, q.stride(0), q.stride(1), kv.key, kv.key.stride(0), kv.key.stride(1), kv.key.stride(2),
        bt_base, bt_off, chunk.kv_head_of, norms, norms.stride(0), vert, slash, vert.stride(0),
        chunk.context_len, seq, n, chunk.scale * kv.k_scale * _LOG2E,
        HEAD_D=q.shape[-1], BLOCK_N=block_n, ROWS=64, PAGE=kv.page_size,
        IN_PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4,
        # (three stages of d=256 need 114,688 bytes; sm_89 has 101,376: two there)
        num_stages=2 if needs_small_tiles(q.shape[-1], q.device) else 3,
    )
    return vert, slash
