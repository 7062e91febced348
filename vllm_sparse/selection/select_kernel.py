"""`select_blocks` as one Triton launch: one program per (head, query-block row).

The torch reference (`budget.select_blocks`) ranks a row's blocks with an argsort and scatters
the ranks back: about twenty launches of [heads, rows, kv_blocks] temporaries per layer. Here
each program loads its row of scores, packs every block into one int64 key (the score's bits
made order-preserving, above the block id), sorts the keys in registers and keeps the keys at
or above the count-th: the same order as the reference (forced blocks first, then by score,
ties to the later block), so the same blocks. Padding past the row's last block sorts below
every real block. No host sync; output shape fixed by the input's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_sparse.kernels.launch import row_bucket, storage_base
from vllm_sparse.selection.budget import Budget, rule_counts

_INT64_MIN: tl.constexpr = tl.constexpr(-(2**63))
_INT64_MAX: tl.constexpr = tl.constexpr(2**63 - 1)


@triton.jit
def _order_key(s, kb):
    """Float score + block id -> int64 key whose signed order is (score, block id)."""
    bits = (s + 0.0).to(tl.int32, bitcast=True).to(tl.int64)  # + 0.0: -0 becomes +0, as equal as in torch
    ordered = tl.where(bits >= 0, bits, -1 - (bits + 2147483648))  # negatives: larger magnitude, lower
    return ordered * 4294967296 + kb.to(tl.int64)


@triton.jit
def _key_score(key):
    """Inverse of `_order_key` for the score part."""
    ordered = key >> 32
    bits = tl.where(ordered >= 0, ordered, -1 - ordered - 2147483648)
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["s_offset", "stride_sh", "stride_sr", "stride_oh", "stride_or", "n_kv_blocks",
                               "first_block", "min_blocks", "max_blocks", "sink", "local"])
def _select_blocks_kernel(
    S, s_offset, stride_sh, stride_sr,  # scores [heads, rows, kv_blocks] at S + s_offset, last dim contiguous
    ROW_COUNT,  # [rows] int64: the top-k / keep-ratio count (unused for top-p)
    OUT, stride_oh, stride_or,  # bool [heads, rows, kv_blocks]
    n_kv_blocks, first_block, top_p, min_blocks, max_blocks, sink, local,
    TOP_P: tl.constexpr, HAS_MAX: tl.constexpr, BLOCK_N: tl.constexpr,
):
    h = tl.program_id(0)
    r = tl.program_id(1)
    kb = tl.arange(0, BLOCK_N)
    row_block = first_block + r
    causal = kb <= row_block  # row_block < n_kv_blocks, so this also bounds the load
    forced = causal & ((kb < sink) | (kb > row_block - local))
    n_causal = row_block + 1
    n_forced = tl.sum(forced.to(tl.int32), axis=0)
    s = tl.load(S + s_offset + h * stride_sh + r * stride_sr + kb, mask=causal, other=float("-inf"))
    s = s.to(tl.float32)

    key = _order_key(tl.where(forced, float("inf"), s), kb)
    key = tl.where(kb < n_kv_blocks, key, _INT64_MIN)
    ranked = tl.sort(key, descending=True)

    if TOP_P:
        # Blocks (by score) to reach top_p of the softmax mass of the free (non-forced) blocks.
        free = causal & ~forced
        m = tl.max(tl.where(free, s, float("-inf")), axis=0)
        z = tl.sum(tl.where(free & (s > float("-inf")), tl.exp(s - m), 0.0), axis=0)
        rs = _key_score(ranked)
        live = (rs > float("-inf")) & (rs < float("inf"))  # free blocks with a score (then z >= 1)
        p = tl.where(live, tl.exp(rs - m) / z, 0.0)
        p = p / tl.maximum(tl.sum(p, axis=0), 1e-30)
        before = tl.cumsum(p, axis=0) - p
        count = n_forced + tl.sum(((before < top_p) & (p > 0)).to(tl.int32), axis=0)
    else:
        count = tl.load(ROW_COUNT + r).to(tl.int32)
    count = tl.maximum(tl.maximum(count, n_forced), min_blocks)
    if HAS_MAX:
        count = tl.minimum(count, tl.maximum(n_forced, max_blocks))
    count = tl.minimum(count, n_causal)

    threshold = tl.max(tl.where(kb == count - 1, ranked, _INT64_MIN), axis=0)
    threshold = tl.where(count > 0, threshold, _INT64_MAX)  # keys never reach it: nothing kept
    kept = causal & (key >= threshold)
    tl.store(OUT + h * stride_oh + r * stride_or + kb, kept, mask=kb < n_kv_blocks)


def select_blocks_triton(scores: torch.Tensor, budget: Budget, first_query_block: int,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `budget.select_blocks`: scores [heads, rows, kv_blocks] -> bool kept mask
    (into `out`, contiguous bool of that shape, when given)."""
    heads, rows, nkb = scores.shape
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    if out is None or not out.is_contiguous():
        out = torch.empty(heads, rows, nkb, dtype=torch.bool, device=scores.device)
    if heads * rows == 0:
        return out
    top_p = budget.top_p is not None
    if top_p:
        row_count = out  # any pointer: not read
    else:
        n_causal = torch.arange(first_query_block + 1, first_query_block + rows + 1, device=scores.device)
        row_count = rule_counts(budget, n_causal)
    block_n = row_bucket(nkb, scores.device)
    base, offset = storage_base(scores)
    _select_blocks_kernel[(heads, rows)](
        base, offset, scores.stride(0), scores.stride(1), row_count, out, out.stride(0), out.stride(1),
        nkb, first_query_block, float(budget.top_p or 0.0), budget.min_blocks, budget.max_blocks or 0,
        budget.sink_blocks, budget.local_blocks,
        TOP_P=top_p, HAS_MAX=budget.max_blocks is not None, BLOCK_N=block_n,
        num_warps=max(1, min(16, block_n // 256)),
    )
    return out
