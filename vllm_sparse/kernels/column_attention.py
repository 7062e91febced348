"""Attention over kept key columns, token by token, and its merge with attention over kept blocks.

MInference's vertical-slash pattern keeps up to several thousand single key columns per head (tokens every
query reads: sinks, separators). In blocks, each column costs its whole block: at 64-token blocks a head's
1,000 columns spread over a long context cover most blocks (benchmarks/RESULTS.md, "MInference's published
per-head plans, timed"). Here the columns are read one token at a time: per (segment, page list) a sorted
CSR list of token positions (`col_indptr`, `col_indices`), gathered through the block table in place, causal
(a query sees the columns at or before it). The block pass (`sparse_attention`, FA3) and this pass see
disjoint keys, the caller leaving out of a segment's column list the columns its kept blocks already hold;
`merge_attention` then joins the two by their log-sum-exps, which is exact attention over the union.

Same layout as `sparse_attention.py`: varlen queries, a segment per chunk or union tile
(`block_table_rows`), a list per KV head (the q heads of its GQA group packed in one tile) or per q head.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from vllm_sparse.kernels.paged import PagedKV
from vllm_sparse.kernels.reference import attend_visible
from vllm_sparse.kernels.sparse_attention import _block_table_row, _query_tile, _softmax_finish, _softmax_step

_LOG2E = 1.4426950408889634


def column_attention_ref(q: torch.Tensor, kv: PagedKV, block_table: torch.Tensor, query_start_loc: torch.Tensor,
                         seq_lens: torch.Tensor, col_indptr, col_indices: torch.Tensor, scale: float,
                         lists_per_q_head: bool = False, block_table_rows: torch.Tensor | None = None,
                         exclude: torch.Tensor | None = None, exclude_block: int = 1
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of each segment's queries over its lists' key columns (fp32 math).
    -> (out [tokens, q heads, D] in q's dtype, lse [tokens, q heads] fp32; 0 and -inf where no column is seen)."""
    num_q_heads = q.shape[1]
    group = num_q_heads // kv.num_kv_heads
    lists = num_q_heads if lists_per_q_head else kv.num_kv_heads
    out = torch.zeros(q.shape[0], num_q_heads, kv.value.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[0], num_q_heads), float("-inf"), dtype=torch.float32, device=q.device)
    starts, ends = col_indptr if isinstance(col_indptr, tuple) else (col_indptr[:-1], col_indptr[1:])
    qsl, lens, starts, ends = query_start_loc.tolist(), seq_lens.tolist(), starts.tolist(), ends.tolist()
    bt_rows = block_table_rows.tolist() if block_table_rows is not None else list(range(len(lens)))
    for s, seq_len in enumerate(lens):
        q0, q1 = qsl[s], qsl[s + 1]
        if q1 == q0:
            continue
        q_pos = torch.arange(seq_len - (q1 - q0), seq_len, device=q.device)
        row = block_table[bt_rows[s]].to(q.device).long()
        for i in range(lists):
            cols = col_indices[starts[s * lists + i]:ends[s * lists + i]].to(q.device, torch.long)
            cols = cols[cols < seq_len]  # (padding)
            if exclude is not None:  # held by a kept block of this segment's list
                cols = cols[~exclude[i, s].to(q.device, torch.bool)[cols // exclude_block]]
            if cols.numel() == 0:
                continue
            h = i // group if lists_per_q_head else i
            heads = slice(i, i + 1) if lists_per_q_head else slice(h * group, (h + 1) * group)
            phys, within = row[cols // kv.page_size], cols % kv.page_size
            k = kv.key[phys, h, within].float() * kv.k_scale  # [n, D]
            v = kv.value[phys, h, within].float() * kv.v_scale
            o, lse[q0:q1, heads] = attend_visible(q[q0:q1, heads], k, v, cols[None, :] <= q_pos[:, None], scale)
            out[q0:q1, heads] = o.to(q.dtype)
    return out, lse


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
                    out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over two disjoint key sets joined: each output weighted by its share of the total mass
    (exp(lse)). A side with lse -inf (no key seen) gives weight 0; both -inf: output 0, lse -inf."""
    top = torch.maximum(lse_a, lse_b)
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    wa, wb = torch.exp(lse_a - safe), torch.exp(lse_b - safe)
    total = wa + wb
    merged = (out_a.float() * wa[..., None] + out_b.float() * wb[..., None]) / total.clamp_min(1e-30)[..., None]
    lse = torch.where(total > 0, safe + torch.log(total), float("-inf"))
    if out is None:
        out = torch.empty_like(out_a)
    out.copy_(merged)
    return out, lse


# The exclusion mask's strides follow the chunk's tile count, and the block table's row stride the engine's
# max_model_len: not specialised, so a new chunk size compiles nothing, nor does a table wider than the warm-up's.
@triton.jit(do_not_specialize=["stride_el", "stride_es", "stride_bt"])
def _column_attention_kernel(
    Q, K, V, OUT, LSE, BT, BT_ROWS, QSL, SEQ_LENS, STARTS, ENDS, INDICES, EXCL, qk_scale, v_scale,
    stride_qt, stride_qh, stride_kp, stride_kh, stride_kt, stride_vp, stride_vh, stride_vt,
    stride_ot, stride_oh, stride_bt, stride_el, stride_es,
    NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, PACK: tl.constexpr, PACK_PAD: tl.constexpr, PAGE: tl.constexpr,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BT_ROWS: tl.constexpr,
    HAS_EXCL: tl.constexpr, EXCL_BLOCK: tl.constexpr, MERGE: tl.constexpr,
):
    """Program (query tile, segment, page list): the tile's rows of the list's q heads over its columns,
    BLOCK_N columns at a time (gathered through the block table), causal, fp32 online softmax. Entries
    at or past the segment's length (padding) and, with EXCL, columns in a block the segment's list keeps
    (EXCL [lists, segments, blocks] of EXCL_BLOCK tokens) are skipped. With MERGE, OUT and LSE hold the block
    pass's output and log-sum-exp and get the two joined, in place (no output-sized temporary)."""
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    lst = tl.program_id(2)
    kv_head = lst * PACK // GROUP
    q0 = tl.load(QSL + seg)
    q_len = tl.load(QSL + seg + 1) - q0
    if pid_m * BLOCK_M >= q_len:
        return
    seq_len = tl.load(SEQ_LENS + seg)
    bt_row = _block_table_row(BT, BT_ROWS, seg, stride_bt, HAS_BT_ROWS)
    q, tok, head, row_ok, q_pos, d = _query_tile(Q, stride_qt, stride_qh, q0, q_len, seq_len - q_len, pid_m, lst, PACK,
                                                 PACK_PAD, BLOCK_M, HEAD_D)

    lo = tl.load(STARTS + seg * tl.num_programs(2) + lst)
    hi = tl.load(ENDS + seg * tl.num_programs(2) + lst)
    m_i = tl.full([BLOCK_M * PACK_PAD], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M * PACK_PAD], tl.float32)
    acc = tl.zeros([BLOCK_M * PACK_PAD, HEAD_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        live = j < hi
        col = tl.load(INDICES + j, mask=live, other=0)
        live = live & (col < seq_len)
        if HAS_EXCL:  # held by a kept block: the block pass attends to it
            held = tl.load(EXCL + lst * stride_el + seg * stride_es + col // EXCL_BLOCK, mask=live, other=0)
            live = live & (held == 0)
        phys = tl.load(bt_row + col // PAGE, mask=live, other=0).to(tl.int64)
        within = col % PAGE
        k = tl.load(K + phys[:, None] * stride_kp + kv_head * stride_kh + within[:, None] * stride_kt + d[None, :],
                    mask=live[:, None], other=0.0).to(q.dtype)
        v = tl.load(V + phys[:, None] * stride_vp + kv_head * stride_vh + within[:, None] * stride_vt + d[None, :],
                    mask=live[:, None], other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # log2 units
        seen = live[None, :] & (col[None, :] <= q_pos[:, None])
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, tl.where(seen, s, float("-inf")), v)

    out, lse = _softmax_finish(acc, m_i, l_i, v_scale)
    o_off = (q0 + tok).to(tl.int64) * stride_ot + head * stride_oh
    lse_ptr = LSE + (q0 + tok).to(tl.int64) * NUM_Q_HEADS + head
    if MERGE:  # join the block pass's (output, lse): each weighted by its share of the total mass
        lse_b = tl.load(lse_ptr, mask=row_ok, other=float("-inf"))
        out_b = tl.load(OUT + o_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        top = tl.maximum(lse, lse_b)
        top = tl.where(top == float("-inf"), 0.0, top)
        w_c, w_b = tl.exp(lse - top), tl.exp(lse_b - top)
        total = w_c + w_b
        out = (out * w_c[:, None] + out_b * w_b[:, None]) / tl.where(total > 0, total, 1.0)[:, None]
        lse = tl.where(total > 0, top + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(OUT + o_off[:, None] + d[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr, lse, mask=row_ok)


def column_attention(q: torch.Tensor, kv: PagedKV, block_table: torch.Tensor, query_start_loc: torch.Tensor,
                     seq_lens: torch.Tensor, col_indptr, col_indices: torch.Tensor, scale: float,
                     max_query_len: int, out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                     lists_per_q_head: bool = False, block_table_rows: torch.Tensor | None = None,
                     exclude: torch.Tensor | None = None, exclude_block: int = 1, merge: bool = False,
                     block_m: int | None = None, block_n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """`column_attention_ref` in one Triton launch, no host sync (`max_query_len`: vLLM's, a host int).

    col_indptr: CSR offsets [segments * lists + 1], or (starts, ends) [segments * lists] each, so that
    segments can share one padded list (entries >= the segment's length are skipped). exclude: uint8/bool
    [lists, segments, blocks], a column whose `exclude_block`-token block is set there is skipped (the
    block pass holds it). merge: `out` and `lse` come holding the block pass's output and log-sum-exp (for
    these segments' rows) and leave holding the two joined (`merge_attention`), written in place."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = kv.num_kv_heads
    if num_q_heads % num_kv_heads or head_dim & (head_dim - 1) or kv.value.shape[-1] != head_dim:
        raise ValueError(f"{num_q_heads} q heads over {num_kv_heads} KV heads, head_dim {head_dim}: equal GQA "
                         "groups and a power-of-two head_dim only")
    for name, t in (("q", q), ("key", kv.key), ("value", kv.value)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("column_attention on CPU tensors needs Triton's interpreter (TRITON_INTERPRET=1)")
    group = num_q_heads // num_kv_heads
    pack = 1 if lists_per_q_head else group
    pack_pad = triton.next_power_of_2(pack)
    lists = num_q_heads if lists_per_q_head else num_kv_heads
    starts, ends = col_indptr if isinstance(col_indptr, tuple) else (col_indptr[:-1], col_indptr[1:])
    if starts.numel() != seq_lens.shape[0] * lists or ends.numel() != starts.numel():
        raise ValueError(f"column lists: {starts.numel()} starts for {seq_lens.shape[0]} segments x {lists} lists")
    block_m = block_m or max(128 // pack_pad, 16 // pack_pad, 1)
    block_m = max(min(block_m, triton.next_power_of_2(max(max_query_len, 1))), 16 // pack_pad, 1)
    if merge and (out is None or lse is None):
        raise ValueError("merge needs the block pass's out and lse")
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(num_tokens, num_q_heads, dtype=torch.float32, device=q.device) if lse is None else lse
    if lse.stride(1) != 1 or lse.stride(0) != num_q_heads:
        raise ValueError("lse must be a contiguous [tokens, q heads] tensor")
    if seq_lens.shape[0] == 0 or max_query_len == 0:
        return out, lse
    grid = (triton.cdiv(max_query_len, block_m), seq_lens.shape[0], lists)
    _column_attention_kernel[grid](
        q, kv.key, kv.value, out, lse, block_table,
        block_table_rows if block_table_rows is not None else query_start_loc,
        query_start_loc, seq_lens, starts, ends, col_indices, exclude if exclude is not None else starts,
        scale * kv.k_scale * _LOG2E, kv.v_scale,
        q.stride(0), q.stride(1), kv.key.stride(0), kv.key.stride(1), kv.key.stride(2),
        kv.value.stride(0), kv.value.stride(1), kv.value.stride(2), out.stride(0), out.stride(1),
        block_table.stride(0), *(exclude.stride()[:2] if exclude is not None else (0, 0)),
        NUM_Q_HEADS=num_q_heads, GROUP=group, PACK=pack, PACK_PAD=pack_pad, PAGE=kv.page_size, HEAD_D=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_BT_ROWS=block_table_rows is not None,
        HAS_EXCL=exclude is not None, EXCL_BLOCK=exclude_block, MERGE=merge,
        num_warps=4 if block_m * pack_pad <= 64 else 8, num_stages=2,
    )
    return out, lse
