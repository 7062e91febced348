"""Turn block scores into a kept-block mask under a budget.

Per (head, query-block row): the sink blocks, the local blocks (which include the row's own
diagonal block) and, for the rest, a count set by the rule — top-k blocks, the smallest
prefix reaching top-p of the softmax mass of the scores, or a ratio of the row's causal
blocks — clamped to [min_blocks, max_blocks]. Never a block past the row's diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Budget:
    top_k: int | None = None
    top_p: float | None = None
    keep_ratio: float | None = None
    min_blocks: int = 1
    max_blocks: int | None = None
    sink_blocks: int = 1
    local_blocks: int = 1
    share: str = "head"  # "group": the q heads of a KV head select once, from their mean block mass

    def describe(self) -> str:
        rule = (
            f"top_k={self.top_k}" if self.top_k is not None
            else f"top_p={self.top_p}" if self.top_p is not None
            else f"keep_ratio={self.keep_ratio}"
        )
        cap = f",max={self.max_blocks}" if self.max_blocks is not None else ""
        per = ",per=group" if self.share == "group" else ""
        return f"{rule},min={self.min_blocks}{cap},sink={self.sink_blocks},local={self.local_blocks}{per}"


def select_blocks(scores: torch.Tensor, budget: Budget, first_query_block: int) -> torch.Tensor:
    """scores [heads, rows, kv_blocks] (-inf where not causal) -> bool mask of kept blocks."""
    heads, rows, nkb = scores.shape
    device = scores.device
    row_block = torch.arange(first_query_block, first_query_block + rows, device=device)[:, None]
    kb = torch.arange(nkb, device=device)[None, :]
    causal = kb <= row_block  # [rows, nkb]
    forced = causal & ((kb < budget.sink_blocks) | (kb > row_block - budget.local_blocks))
    n_causal = causal.sum(-1)  # [rows]
    n_forced = forced.sum(-1)

    s = scores.float().masked_fill(~causal[None], float("-inf"))
    if budget.top_p is None:
        count = rule_counts(budget, n_causal)[None].expand(heads, -1)
    else:
        # Blocks needed (by score) to reach top_p of the mass, on top of the forced ones.
        probs = torch.softmax(s.masked_fill(forced[None], float("-inf")), dim=-1).nan_to_num(0.0)
        free_mass = probs.sum(-1, keepdim=True).clamp_min(1e-30)
        sorted_p = probs.sort(dim=-1, descending=True).values / free_mass
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each position
        count = n_forced[None] + (before < budget.top_p).logical_and(sorted_p > 0).sum(-1)
    count = clamp_counts(count, budget, n_forced[None], n_causal[None])

    # Rank blocks: forced first, then by score; ties go to the later (more recent) block.
    rank_key = s.masked_fill(forced[None], float("inf"))
    order = torch.argsort(rank_key.flip(-1), dim=-1, descending=True, stable=True)
    order = nkb - 1 - order
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(nkb, device=device).expand_as(order).contiguous())
    return (ranks < count[..., None]) & causal[None]



def rule_counts(budget: Budget, n_causal: torch.Tensor) -> torch.Tensor:
    """Blocks the top-k or keep-ratio rule asks for in rows with n_causal [rows] causal blocks (int64).

    The ratio is applied in float64, so the GPU kernel (which takes these counts) rounds alike.
    """
    if budget.top_k is not None:
        return torch.full_like(n_causal, budget.top_k, dtype=torch.int64)
    if budget.keep_ratio is not None:
        return torch.ceil(n_causal.double() * budget.keep_ratio).long()
    raise ValueError("top_p counts depend on the scores, not only on the row")


def clamp_counts(count: torch.Tensor, budget: Budget, n_forced: torch.Tensor, n_causal: torch.Tensor) -> torch.Tensor:
    """At least the forced blocks and min_blocks, at most max_blocks (never below forced), never past causal."""
    count = torch.maximum(count, n_forced).clamp_min(budget.min_blocks)
    if budget.max_blocks is not None:
        count = torch.minimum(count, torch.maximum(n_forced, torch.full_like(count, budget.max_blocks)))
    return torch.minimum(count, n_causal)
