"""Block-sparse chunked-prefill attention over vLLM's paged KV cache, in place (Triton).

Same contract as `reference.sparse_paged_attention_ref`: varlen queries, pages read through
the block table, per (segment, KV head) a sorted CSR list of logical pages (or per (segment, q
head) with `lists_per_q_head`), causal inside the chunk. A segment is a sequence's chunk, or a
tile of it when selection is unioned per query tile: `block_table_rows` maps segments to
block-table rows.

One program = BLOCK_M x PACK_PAD (token, q head) rows of one page list: all q heads of a KV head (GQA
packing: the tile's rows are token-major, head-minor, unpadded, so a group of 7 fills a tile as a group of
8 would and its tiles cover 8/7 as many tokens), so every selected page is read once per group; or, with a
list per q head, that one head, so its work follows its own pages. Two binary searches
over the page list split it into pages every row sees (no mask) and pages that cross the
diagonal (causal mask); pages past the tile's last query are never visited. Nothing here syncs
with the host when `max_query_len` is given.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from vllm_sparse.kernels.launch import needs_small_tiles
from vllm_sparse.kernels.paged import PagedKV

_LOG2E = 1.4426950408889634


@triton.jit
def _lower_bound(IDX, lo, hi, target, iters):
    """First position in the sorted IDX[lo:hi] whose value is >= target (branch-free; `iters` a runtime bound, so
    that longer page lists reuse the compiled kernel instead of compiling one per power of two mid-request)."""
    for _ in range(iters):
        live = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(IDX + mid, mask=live, other=0)
        right = live & (v < target)
        left = live & (v >= target)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(left, mid, hi)
    return lo


@triton.jit
def _block_table_row(BT, BT_ROWS, seg, stride_bt, HAS_BT_ROWS: tl.constexpr):
    """The block-table row a segment reads: its own, or the one BT_ROWS names (union tiles of one chunk)."""
    if HAS_BT_ROWS:
        return BT + tl.load(BT_ROWS + seg).to(tl.int64) * stride_bt
    return BT + seg.to(tl.int64) * stride_bt


@triton.jit
def _query_tile(Q, stride_qt, stride_qh, q0, q_len, context, m_tile, lst, PACK: tl.constexpr, PACK_PAD: tl.constexpr,
                BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr):
    """A program's queries: tile m_tile of the (token, q head) pairs of page list `lst`'s PACK q heads, numbered
    token-major, head-minor, BLOCK_M x PACK_PAD a tile. -> (q, token in segment, q head, row valid, absolute
    position, head-dim range)."""
    f = m_tile * (BLOCK_M * PACK_PAD) + tl.arange(0, BLOCK_M * PACK_PAD)
    tok = f // PACK
    head = lst * PACK + f % PACK
    row_ok = tok < q_len
    d = tl.arange(0, HEAD_D)
    q_off = (q0 + tok).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(Q + q_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    return q, tok, head, row_ok, context + tok, d


@triton.jit
def _softmax_step(acc, m_i, l_i, s, v):
    """One step of the online softmax: logits s (log2 units, -inf where unseen) against values v."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _softmax_finish(acc, m_i, l_i, v_scale):
    """(output, natural-log lse) of the rows; a row that saw no key: output 0, lse -inf (as the references)."""
    empty = l_i == 0.0
    out = acc * (v_scale / tl.where(empty, 1.0, l_i))[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    return out, lse


@triton.jit
def _attend_step(acc, m_i, l_i, q, K, V, INDICES, BT_ROW, lo, start, n_tok, kv_head, q_pos,
                 stride_kp, stride_kh, stride_kt, stride_vp, stride_vh, stride_vt, qk_scale,
                 PAGE: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    j = start + tl.arange(0, BLOCK_N)
    in_list = j < n_tok
    if MASKED:
        logical = tl.load(INDICES + lo + j // PAGE, mask=in_list, other=0)
    else:
        logical = tl.load(INDICES + lo + j // PAGE)
    phys = tl.load(BT_ROW + logical).to(tl.int64)
    within = j % PAGE
    d = tl.arange(0, HEAD_D)
    # (an fp8 cache converts exactly to the queries' 16-bit type; its scales are in qk_scale and v_scale)
    k = tl.load(K + phys[:, None] * stride_kp + kv_head * stride_kh + within[:, None] * stride_kt + d[None, :])
    v = tl.load(V + phys[:, None] * stride_vp + kv_head * stride_vh + within[:, None] * stride_vt + d[None, :])
    k, v = k.to(q.dtype), v.to(q.dtype)
    s = tl.dot(q, tl.trans(k)) * qk_scale  # log2 units
    if MASKED:
        k_pos = logical * PAGE + within
        ok = in_list[None, :] & (k_pos[None, :] <= q_pos[:, None])
        s = tl.where(ok, s, float("-inf"))
    return _softmax_step(acc, m_i, l_i, s, v)


# The block table's row stride is the engine's (vLLM's width of max_model_len), not the model's: not specialised,
# so the engine-start warm-up's dummy table compiles the variant serving launches.
@triton.jit(do_not_specialize=["search_iters", "stride_bt"])
def _sparse_paged_attention_kernel(
    Q, K, V, OUT, LSE, BT, BT_ROWS, QSL, SEQ_LENS, INDPTR, INDICES, qk_scale, v_scale, search_iters,
    stride_qt, stride_qh, stride_kp, stride_kh, stride_kt, stride_vp, stride_vh, stride_vt,
    stride_ot, stride_oh, stride_bt,
    NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, PACK: tl.constexpr, PACK_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BT_ROWS: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    # Later segments (union tiles of one chunk) see more pages: start them first.
    seg = tl.num_programs(1) - 1 - tl.program_id(1)
    # Page list of this program: per KV head (PACK = GROUP q heads read it) or per q head (PACK = 1).
    lst = tl.program_id(2)
    kv_head = lst * PACK // GROUP
    q0 = tl.load(QSL + seg)
    q_len = tl.load(QSL + seg + 1) - q0
    # Tiles run last-first: the ones near the diagonal see the most pages, start them early.
    m_tile = tl.cdiv(q_len * PACK, BLOCK_M * PACK_PAD) - 1 - pid_m
    if m_tile < 0:
        return
    seq_len = tl.load(SEQ_LENS + seg)
    context = seq_len - q_len
    bt_row = _block_table_row(BT, BT_ROWS, seg, stride_bt, HAS_BT_ROWS)
    q, tok, head, row_ok, q_pos, d = _query_tile(Q, stride_qt, stride_qh, q0, q_len, context, m_tile, lst, PACK,
                                                 PACK_PAD, BLOCK_M, HEAD_D)

    lo = tl.load(INDPTR + seg * tl.num_programs(2) + lst)
    hi = tl.load(INDPTR + seg * tl.num_programs(2) + lst + 1)
    q_min = context + m_tile * (BLOCK_M * PACK_PAD) // PACK  # the tile's first and last tokens
    q_max = tl.minimum(context + ((m_tile + 1) * (BLOCK_M * PACK_PAD) - 1) // PACK, seq_len - 1)
    # Pages [lo, full) end at or before q_min: every row sees all of them.
    full = _lower_bound(INDICES, lo, hi, (q_min + 1) // PAGE, search_iters)
    # Pages [full, seen) start at or before q_max: some row sees part of them.
    seen = _lower_bound(INDICES, full, hi, q_max // PAGE + 1, search_iters)
    n_full = (full - lo) * PAGE
    n_seen = (seen - lo) * PAGE
    n_unmasked = (n_full // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M * PACK_PAD], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M * PACK_PAD], tl.float32)
    acc = tl.zeros([BLOCK_M * PACK_PAD, HEAD_D], tl.float32)
    for start in range(0, n_unmasked, BLOCK_N):
        acc, m_i, l_i = _attend_step(acc, m_i, l_i, q, K, V, INDICES, bt_row, lo, start, n_seen, kv_head,
                                     q_pos, stride_kp, stride_kh, stride_kt, stride_vp, stride_vh, stride_vt,
                                     qk_scale, PAGE, HEAD_D, BLOCK_N, False)
    for start in range(n_unmasked, n_seen, BLOCK_N):
        acc, m_i, l_i = _attend_step(acc, m_i, l_i, q, K, V, INDICES, bt_row, lo, start, n_seen, kv_head,
                                     q_pos, stride_kp, stride_kh, stride_kt, stride_vp, stride_vh, stride_vt,
                                     qk_scale, PAGE, HEAD_D, BLOCK_N, True)

    out, lse = _softmax_finish(acc, m_i, l_i, v_scale)
    o_off = (q0 + tok).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(OUT + o_off[:, None] + d[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    if WRITE_LSE:
        tl.store(LSE + (q0 + tok).to(tl.int64) * NUM_Q_HEADS + head, lse, mask=row_ok)


def _tile_config(group_pad: int, head_dim: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M tokens, BLOCK_N keys, num_warps, num_stages) by GQA group, head size and the device's shared memory."""
    # Measured on H100 (benchmarks/RESULTS.md): 256 packed rows, 64 keys per step, 16 warps, 3 stages
    # is the fastest tried at d=128; d=256 halves the rows to keep the accumulator in registers. GPUs with 99 KiB
    # of shared memory per block cannot hold 128 rows of d=256 in 3 or 2 stages (sm_89, Triton 3.6: 106,752 and
    # 106,624 bytes; one stage fits, spilling 2.9 KB): 64 rows, 8 warps, 2 stages there (the shipped Gemma plan's:
    # 69,760 bytes, no spills; compiled, not timed).
    if needs_small_tiles(head_dim, device):
        return max(64 // group_pad, 1), 32, 8, 2
    rows = 128 if head_dim > 128 else 256
    block_m = max(rows // group_pad, 16 // group_pad, 1)
    block_n = 32 if head_dim > 128 else 64
    return block_m, block_n, 16 if block_m * group_pad * head_dim >= 256 * 128 else 8, 3


def sparse_paged_attention(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
    kv: PagedKV,
    block_table: torch.Tensor,  # [rows, max_pages] physical page ids (int32)
    query_start_loc: torch.Tensor,  # [num_segments + 1] int32
    seq_lens: torch.Tensor,  # [num_segments] tokens in the cache up to each segment's last query
    page_indptr: torch.Tensor,  # [num_segments * num_kv_heads + 1] ([.. * num_q_heads + 1] per q head)
    page_indices: torch.Tensor,  # logical page ids, sorted per (segment, list)
    scale: float,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    max_query_len: int | None = None,  # host int (vLLM's max_query_len); None costs one sync
    block_table_rows: torch.Tensor | None = None,  # [num_segments] block-table row per segment
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    lists_per_q_head: bool = False,  # a page list per q head (each attends to its own), not per KV head
):
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, page = kv.num_kv_heads, kv.page_size
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} q heads do not split into {num_kv_heads} KV heads")
    if head_dim & (head_dim - 1) or kv.value.shape[-1] != head_dim:
        raise ValueError(f"head_dim {head_dim} (value {kv.value.shape[-1]}): equal powers of two only")
    if page & (page - 1):
        raise ValueError(f"page size {page} is not a power of two")
    for name, t in (("q", q), ("key", kv.key), ("value", kv.value)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("sparse_paged_attention on CPU tensors needs Triton's interpreter: "
                           "set TRITON_INTERPRET=1 before triton is imported")
    group = num_q_heads // num_kv_heads
    pack = 1 if lists_per_q_head else group
    pack_pad = triton.next_power_of_2(pack)
    lists = num_q_heads if lists_per_q_head else num_kv_heads
    if page_indptr.numel() != seq_lens.shape[0] * lists + 1:
        raise ValueError(f"page_indptr has {page_indptr.numel()} entries; {seq_lens.shape[0]} segments x {lists} "
                         f"lists + 1 expected")
    cfg_m, cfg_n, cfg_w, cfg_s = _tile_config(pack_pad, head_dim, q.device)
    # A program's rows beyond the longest segment would idle (a q head's own list packs no group).
    cfg_m = max(min(cfg_m, triton.next_power_of_2(max_query_len or 1)), 16 // pack_pad, 1)
    block_m, block_n = block_m or cfg_m, block_n or cfg_n
    num_warps, num_stages = num_warps or cfg_w, num_stages or cfg_s
    if out is None:
        out = torch.empty_like(q)
    if out.stride(-1) != 1:
        raise ValueError("out must be contiguous in head_dim")
    lse = torch.empty(num_tokens, num_q_heads, dtype=torch.float32, device=q.device) if return_lse else out
    num_segments = seq_lens.shape[0]
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if num_segments else 0
    if num_segments == 0 or max_query_len == 0:
        return (out, lse) if return_lse else out
    search_iters = max(1, math.ceil(math.log2(page_indices.numel() + 1)))
    grid = (triton.cdiv(max_query_len * pack, block_m * pack_pad), num_segments, lists)
    _sparse_paged_attention_kernel[grid](
        q, kv.key, kv.value, out, lse, block_table,
        block_table_rows if block_table_rows is not None else query_start_loc,
        query_start_loc, seq_lens, page_indptr, page_indices, scale * kv.k_scale * _LOG2E, kv.v_scale, search_iters,
        q.stride(0), q.stride(1), kv.key.stride(0), kv.key.stride(1), kv.key.stride(2),
        kv.value.stride(0), kv.value.stride(1), kv.value.stride(2),
        out.stride(0), out.stride(1), block_table.stride(0),
        NUM_Q_HEADS=num_q_heads, GROUP=group, PACK=pack, PACK_PAD=pack_pad, PAGE=page, HEAD_D=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_BT_ROWS=block_table_rows is not None, WRITE_LSE=return_lse,
        num_warps=num_warps, num_stages=num_stages,
    )
    return (out, lse) if return_lse else out
