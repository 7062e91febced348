"""`lowbit`: block scores from int8 / int4 quantized Q.K (SALE, 2025).

SALE estimates which blocks matter from a low-bit QK^T, far cheaper than the bf16 product.
Here Q and K are quantized symmetrically per vector, either
- `rows: pooled`: the mean query of each query block against the mean key of each KV block, or
- `rows: sampled`: every `sample_stride`-th query row against every key, the softmax mass per
  KV block averaged over a query block's sampled rows. On GPUs this runs fused
  (`row_scores.row_block_scores`): int8 products on the tensor cores with int32 sums, keys
  quantized as they are read from the cache, no [heads, rows, context] logits.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from vllm_sparse.estimators.base import ChunkContext
from vllm_sparse.estimators.quant import lowbit_logits
from vllm_sparse.estimators.registry import EstimatorParams, register_estimator
from vllm_sparse.estimators.row_scores import ScoredRows, row_block_scores


class LowbitParams(EstimatorParams):
    bits: Literal[4, 8] = Field(8, description="integer width of the quantized Q and K")
    rows: Literal["pooled", "sampled"] = Field("sampled", description="which query rows are scored")
    sample_stride: int = Field(16, ge=1, le=1024, description="score every n-th query row (rows: sampled)")

    @model_validator(mode="after")
    def _stride_only_for_sampled_rows(self):
        if self.rows == "pooled" and "sample_stride" in self.model_fields_set:
            raise ValueError("sample_stride applies to rows: sampled; rows: pooled scores every query block's mean")
        return self


@register_estimator("lowbit", LowbitParams, "int8/int4 quantized Q.K of pooled or sampled rows (SALE)",
                    workspace_rows=lambda p, tokens: -(-tokens // p.sample_stride) if p.rows == "sampled" else 0)
def score_lowbit(chunk: ChunkContext, params: LowbitParams) -> torch.Tensor:
    if params.rows == "pooled":
        logits = lowbit_logits(chunk.pooled_queries(), chunk.pooled_keys(), params.bits, chunk.scale)
        return torch.log_softmax(chunk.mask_noncausal(logits), dim=-1)
    # Sample rows counting back from the chunk's last row, so the newest query is always scored.
    n = params.sample_stride
    if chunk.use_kernels:  # int8 (int4) products on the tensor cores, block sums in registers
        rows = ScoredRows(first=chunk.context_len + (chunk.q_len - 1) % n, step=n, count=(chunk.q_len - 1) // n + 1)
        return row_block_scores(chunk, rows, chunk.scale, bits=params.bits)
    rows = torch.arange(chunk.q_len - 1, -1, -n, device=chunk.q.device).flip(0)
    q = chunk.q[rows].float().permute(1, 0, 2)  # [h, n, d]
    logits = lowbit_logits(q, chunk.kv_keys, params.bits, chunk.scale, chunk)
    return chunk.token_logits_to_block_scores(logits, chunk.context_len + rows)
