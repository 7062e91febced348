"""The sparse path's counters for `vllm-sparse eval`: densities before and after union, and the audit
(sparse output against dense attention). Only while STATS is enabled; these sync with the host."""

from __future__ import annotations

import torch

from vllm_sparse.estimators.base import ChunkContext
from vllm_sparse.kernels.reference import sparse_paged_attention_ref
from vllm_sparse.selection.stats import STATS


def record_density(layer: int, ctx: ChunkContext, mask, union, rows, unions: int = 1) -> None:
    """Count the (head, query block, kv block) cells kept before union and after it, causal only: for
    the q heads the mask covers (with a GQA group split over ranks, the group's heads on every rank
    of it, so each rank counts what one device counts for its KV heads) and this rank's KV heads.

    union: [kv_heads, kv_blocks] for one union over `rows`, or [kv_heads, rows, kv_blocks] (each row's
    union) when `unions` tiles are counted together."""
    st = STATS.layers[layer]
    causal = ctx.causal_block_mask()[rows]  # [rows, kv_blocks]
    st.unions += unions
    # q heads behind each mask row: a group's when it selected together; one when the mask has a row
    # per q head, this rank's or (a GQA group split over ranks) the whole group's.
    per_row = max(ctx.q.shape[1] // mask.shape[0], 1)
    per_row_union = union if union.dim() == 3 else union[:, None, :]
    counts = torch.stack([mask.sum(), causal.sum(), (per_row_union & causal[None]).sum()]).tolist()  # one sync
    st.requested_kept += counts[0] * per_row
    st.requested_total += counts[1] * mask.shape[0] * per_row
    st.union_kept += counts[2]
    st.union_total += counts[1] * union.shape[0]


def record_with_audit(layer: int, ctx: ChunkContext, mask, union, rows, q, out, lse, args, scale) -> None:
    """Densities; with audit, also the distance from dense attention and the attention mass kept."""
    record_density(layer, ctx, mask, union, rows)
    st = STATS.layers[layer]
    if STATS.audit:
        n_pages = (int(args[3][0]) - 1) // ctx.kv.page_size + 1
        all_pages = torch.arange(n_pages).repeat(union.shape[0])
        indptr = torch.arange(union.shape[0] + 1) * n_pages
        dense, dense_lse = sparse_paged_attention_ref(q, *args, indptr, all_pages, scale, return_lse=True)
        rel = float((out.float() - dense.float()).norm() / dense.float().norm().clamp_min(1e-30))
        kept_mass = float(torch.exp(lse - dense_lse).mean())
        st.audit.append((rel, kept_mass))
