"""`sink_local`: the first N and the last M blocks of each row (A-shape; StreamingLLM, Xiao et al. 2023).

The scores rank sink and local blocks above all others, so a budget that keeps more blocks
than N + M fills up with the remaining causal blocks in position order.
"""

from __future__ import annotations

import torch
from pydantic import Field

from vllm_sparse.estimators.base import ChunkContext
from vllm_sparse.estimators.registry import EstimatorParams, register_estimator


class SinkLocalParams(EstimatorParams):
    sink_blocks: int = Field(1, ge=0, description="blocks kept from the start of the sequence")
    local_blocks: int = Field(4, ge=1, description="blocks kept ending at the query's own block")


@register_estimator("sink_local", SinkLocalParams, "first N (sink) and last M (local) blocks: A-shape / StreamingLLM",
                    same_in_group=lambda p: True)  # positions only: every head alike
def score_sink_local(chunk: ChunkContext, params: SinkLocalParams) -> torch.Tensor:
    rows = chunk.query_block_ids()[:, None]
    kb = torch.arange(chunk.num_kv_blocks, device=chunk.q.device)[None, :]
    in_shape = (kb < params.sink_blocks) | ((kb <= rows) & (kb > rows - params.local_blocks))
    scores = in_shape.float()
    return chunk.mask_noncausal(scores[None].expand(chunk.q.shape[1], -1, -1))
