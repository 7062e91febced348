"""`dense`: keep every block. A head given this estimator runs vLLM's dense attention."""

from __future__ import annotations

import torch

from vllm_sparse.estimators.registry import EstimatorParams, register_estimator


class DenseParams(EstimatorParams):
    pass


@register_estimator("dense", DenseParams, "keep every block (the head runs dense)", keeps_all=True)
def score_dense(chunk, params: DenseParams):
    shape = (chunk.q.shape[1], chunk.num_query_blocks, chunk.num_kv_blocks)
    return chunk.mask_noncausal(torch.zeros(shape, device=chunk.q.device))
