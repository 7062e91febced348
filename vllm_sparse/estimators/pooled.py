"""`pooled`: mean-pooled Q and K per block, block scores = softmax(pooled q . pooled k).

MoBA (Lu et al., 2025) gates blocks by the query's affinity to mean-pooled keys; FlexPrefill
(Lai et al., 2025) pools queries too and keeps a top-p share of the block mass. Options:

- `share: group` scores once per GQA group (pooled queries averaged over the group's heads),
  so every head of the group ranks blocks alike and the union costs nothing extra.
- `proxy_heads: N` (ProxyAttn, 2025): N evenly spaced heads of each group score for the group,
  and each head keeps its own budget: the shared logits are rescaled by the head's own
  pooled-query norm relative to the proxies', so a sharper head concentrates its softmax on
  fewer blocks under top_p and a flatter head keeps more.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from pydantic import Field

from vllm_sparse.estimators.base import ChunkContext
from vllm_sparse.estimators.registry import EstimatorParams, register_estimator
from vllm_sparse.transfer import constant_on


class PooledParams(EstimatorParams):
    share: Literal["head", "group"] = Field("head", description="score per q head, or once per GQA group")
    proxy_heads: int | None = Field(None, ge=1, description="score each GQA group with this many heads")


def proxy_mask(chunk: ChunkContext, n: int) -> torch.Tensor:
    """Which heads are proxies: n evenly spaced heads of each KV group (all of them if fewer)."""
    return constant_on(_proxy_heads(tuple(chunk.host_kv_head_ids()), n), chunk.q.device, torch.bool)


@functools.cache
def _proxy_heads(ids: tuple[int, ...], n: int) -> tuple[bool, ...]:
    """Per head (its KV head in `ids`): a proxy or not. Worked out once per group layout, not per chunk-layer."""
    picked = set()
    for g in dict.fromkeys(ids):
        members = [h for h, k in enumerate(ids) if k == g]
        picked.update(members[i] for i in torch.linspace(0, len(members) - 1, min(n, len(members))).round().long())
    return tuple(h in picked for h in range(len(ids)))


@register_estimator("pooled", PooledParams, "mean-pooled Q.K block scores (MoBA, FlexPrefill, ProxyAttn)",
                    same_in_group=lambda p: p.share == "group" and p.proxy_heads is None,
                    reads_group=lambda p: p.share == "group" or p.proxy_heads is not None)
def score_pooled(chunk: ChunkContext, params: PooledParams) -> torch.Tensor:
    pq, pk = chunk.pooled_queries(), chunk.pooled_keys()  # [h, rows, d], [h, kv_blocks, d]
    if params.proxy_heads is not None:
        proxies = proxy_mask(chunk, params.proxy_heads)
        norms = pq.norm(dim=-1, keepdim=True)  # [h, rows, 1]
        # Mean over the proxies of each group: zero the others, then rescale the group mean.
        w = proxies.to(pq.dtype).view(-1, 1, 1)
        frac = chunk.group_mean(w)
        proxy_q = chunk.group_mean(pq * w) / frac
        proxy_norm = chunk.group_mean(norms * w) / frac
        logits = proxy_q @ pk.transpose(1, 2) * (norms / proxy_norm.clamp_min(1e-6))
    elif params.share == "group":
        logits = chunk.group_mean(pq) @ pk.transpose(1, 2)
    else:
        logits = pq @ pk.transpose(1, 2)
    return torch.log_softmax(chunk.mask_noncausal(logits * chunk.scale), dim=-1)
