"""`antidiagonal`: XAttention's strided antidiagonal block scoring (Xu et al., 2025).

Within every stride x stride tile of the attention matrix, the sum along an antidiagonal touches
each of the tile's rows and columns once, so it is a cheap, unbiased probe of the tile. With the
queries of a stride group taken in reverse order and the keys in order, one matrix product of the
flattened groups gives all those sums. Softmax over the (scaled) sums, summed into blocks and
averaged over a block's query groups, estimates each block's attention mass; the budget's top_p
then keeps, per row, the smallest set of blocks reaching that mass (XAttention's threshold tau).

With `bits: 8` the strided rows and key columns are quantized symmetrically (one scale per row or
column of S x head_dim values, as `lowbit` does per token) and multiplied as integers: half the
bytes per product and the int8 tensor cores, for scores that differ from the bf16 product by the
rounding of the operands.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from vllm_sparse.estimators.base import ChunkContext
from vllm_sparse.estimators.quant import lowbit_logits
from vllm_sparse.estimators.registry import EstimatorParams, register_estimator
from vllm_sparse.estimators.row_scores import ScoredRows, row_block_scores


class AntidiagonalParams(EstimatorParams):
    stride: int = Field(8, ge=1, le=64, description="antidiagonal stride S; the block size must be a multiple")
    bits: Literal[4, 8] | None = Field(None, description="quantize the strided rows and key columns to this many "
                                                          "bits (int8 products); none: the queries' dtype")

    @field_validator("bits")
    @classmethod
    def _power_of_two_stride(cls, bits, info):
        stride = info.data.get("stride", 8)
        if bits is not None and (stride < 2 or stride & (stride - 1)):
            raise ValueError(f"bits needs a power-of-two stride of 2 or more, not {stride}")
        return bits


def _strided(x: torch.Tensor, first_pos: int, n_groups: int, stride: int, reverse: bool) -> torch.Tensor:
    """x [h, n, d] rows at positions first_pos.. -> [h, n_groups, stride*d], groups aligned to
    absolute positions (missing rows are zero); within a group rows reversed if asked."""
    h, n, d = x.shape
    start = (first_pos // stride) * stride
    padded = torch.zeros(h, n_groups * stride, d, device=x.device, dtype=x.dtype)
    padded[:, first_pos - start: first_pos - start + n] = x
    g = padded.view(h, n_groups, stride, d)
    if reverse:
        g = g.flip(2)
    return g.reshape(h, n_groups, stride * d)


@register_estimator("antidiagonal", AntidiagonalParams, "strided antidiagonal sums per block (XAttention)",
                    workspace_rows=lambda p, tokens: tokens // p.stride + 2)
def score_antidiagonal(chunk: ChunkContext, params: AntidiagonalParams) -> torch.Tensor:
    s = params.stride
    if chunk.block_size % s:
        raise ValueError(f"antidiagonal stride {s} must divide the block size {chunk.block_size}")
    if chunk.use_kernels:
        q_first = chunk.context_len // s  # stride groups aligned to absolute positions
        rows = ScoredRows(first=q_first * s, step=s, count=(chunk.seq_len - 1) // s + 1 - q_first, stride=s)
        return row_block_scores(chunk, rows, chunk.scale / s, bits=params.bits)  # mean logit along each antidiagonal
    return score_antidiagonal_ref(chunk, params)


def score_antidiagonal_ref(chunk: ChunkContext, params: AntidiagonalParams) -> torch.Tensor:
    """The torch path: every strided row's logits against every key group, [heads, rows, seq / S]."""
    s = params.stride
    q_first = chunk.context_len // s
    n_q = (chunk.seq_len - 1) // s + 1 - q_first
    n_k = (chunk.seq_len - 1) // s + 1
    q = _strided(chunk.q.float().permute(1, 0, 2), chunk.context_len, n_q, s, reverse=True)
    k = _strided(chunk.kv_keys, 0, n_k, s, reverse=False)  # per KV head
    if params.bits:  # each strided row and key column quantized on its own
        logits = lowbit_logits(q, k, params.bits, chunk.scale / s, chunk)
    else:
        logits = chunk.by_kv_head(q, k) * (chunk.scale / s)  # mean logit along each antidiagonal
    q_end = torch.clamp((torch.arange(n_q, device=chunk.q.device) + q_first + 1) * s - 1, max=chunk.seq_len - 1)
    return chunk.token_logits_to_block_scores(logits, q_end, key_stride=s)
