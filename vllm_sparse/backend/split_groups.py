"""GQA groups spread over tensor-parallel ranks: every rank attends to its whole group's block union.

With fewer KV heads than ranks vLLM gives each rank one KV head (replicated) and a slice of that
head's query heads. One device unions the blocks kept by all q heads of a KV head; so that each
rank reads that same union, the ranks holding one KV head (`HeadShard.group_ranks`) exchange, per
sparse chunk, either
- their kept-block masks, when every selection of the layer reads only its own head's scores, or
- their queries, when some selection reads other heads of the group (a `share: group` budget, an
  estimator that pools over the group): each rank then scores and selects for the whole group
  exactly as one device does (the estimation is repeated on each rank of the group).

The exchange is an all-gather over the whole tensor-parallel group, so every rank must call it for
every sparse chunk of the layer, in the same order and with the same shapes: whether a layer
exchanges, and what, is decided from the layer's unsharded plan, never from a rank's own heads. A
rank whose heads are all dense still joins; its dense heads keep every causal block, as they do on
one device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_sparse.config.plan import HeadPlan, LayerPlan
from vllm_sparse.config.sharding import HeadShard
from vllm_sparse.estimators.base import ChunkContext
from vllm_sparse.estimators.registry import get_estimator

# (tensor, dim) -> every tensor-parallel rank's tensor, concatenated along dim in rank order.
AllGather = Callable[[torch.Tensor, int], torch.Tensor]


def tp_all_gather(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """vLLM's tensor-parallel all-gather (NCCL on GPUs, the shared-memory communicator on CPUs)."""
    from vllm.distributed import get_tp_group

    return get_tp_group().all_gather(tensor.contiguous(), dim)


def reads_group(plan: HeadPlan) -> bool:
    """The plan's selection for a head depends on other q heads of its GQA group."""
    return plan.budget.share == "group" or get_estimator(plan.estimator).reads_group(plan.params)


@dataclass(frozen=True)
class SplitGroup:
    """One rank's part in its GQA group's block union when the group spans several ranks."""

    shard: HeadShard
    plans: tuple[HeadPlan | None, ...]  # the group's q heads (shard.group_q_heads), None = dense
    share_queries: bool  # exchange queries (some selection of the layer reads the group), else masks
    all_gather: AllGather = tp_all_gather

    def _group_slice(self, per_rank: int) -> slice:
        """Where the group's ranks' rows lie among all ranks' rows gathered, `per_rank` rows each."""
        ranks = self.shard.group_ranks
        return slice(ranks.start * per_rank, ranks.stop * per_rank)

    def group_context(self, ctx: ChunkContext) -> ChunkContext:
        """The chunk seen with the queries of every q head of the group (one KV head, held here)."""
        q = self.all_gather(ctx.q, 1)[:, self._group_slice(ctx.q.shape[1])].contiguous()
        n = q.shape[1]
        return ChunkContext(q, torch.zeros(n, dtype=torch.long, device=q.device), ctx.kv, ctx.block_table,
                            ctx.context_len, ctx.block_size, ctx.scale, (0,) * n, ctx.kernels)

    def gather_masks(self, mask: torch.Tensor, local_q_heads: int) -> torch.Tensor:
        """This rank's kept-block mask (a row per local q head, or one for its KV head) -> the
        group's, a row per q head of the group."""
        mask = per_q_head(mask, local_q_heads)
        # Every rank sends the same shape and a dtype each communicator reduces (CPU: float types only).
        gathered = self.all_gather(mask.to(torch.float16), 0)
        return gathered[self._group_slice(local_q_heads)] > 0


def per_q_head(mask: torch.Tensor, q_heads: int) -> torch.Tensor:
    """A kept-block mask with a row per KV head (the group selected together) -> a row per q head."""
    return mask if mask.shape[0] == q_heads else mask.repeat_interleave(q_heads // mask.shape[0], dim=0)


def split_group(layer: LayerPlan, shard: HeadShard, all_gather: AllGather = tp_all_gather) -> SplitGroup | None:
    """The rank's exchange for a layer, or None when it needs none (groups stay whole, or the layer
    is dense on every rank). The same on every rank, up to the rank's own group."""
    if not shard.splits_groups or not layer.is_sparse:
        return None
    share_queries = any(reads_group(p) for p in layer.heads if p is not None)
    group = shard.group_q_heads
    return SplitGroup(shard, layer.heads[group.start:group.stop], share_queries, all_gather)


def rank_layer(layer: LayerPlan, shard: HeadShard, all_gather: AllGather = tp_all_gather
               ) -> tuple[list[HeadPlan | None] | None, SplitGroup | None]:
    """(this rank's head plans for the layer, or None when the rank runs it dense; its exchange).

    A rank whose own heads are all dense still takes the sparse path when its group spans ranks and
    the layer is sparse anywhere: the other ranks' all-gathers wait for it."""
    heads = list(layer.heads_for(shard))
    split = split_group(layer, shard, all_gather)
    if split is None and all(h is None for h in heads):
        return None, None
    return heads, split
