"""The sparse path's counters for `vllm-sparse eval`: densities before and after union, and the audit
(sparse output against dense attention). Only while STATS is enabled; these sync with the host."""

from __future__ import annotations

import torch

from vllm_sparse.backend.attention_mass import dense_attention_mass, read_cells, read_mass
from vllm_sparse.estimators.base import ChunkContext
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


def record_with_audit(layer: int, ctx: ChunkContext, mask, union, rows: slice, tokens: slice, out,
                      selected_rows: slice, list_of_head: torch.Tensor | None = None) -> None:
    """Densities; with audit, also the distance from dense attention and the attention mass kept.

    union [lists, kv_blocks] is what the tile's `rows` (chunk-local `tokens`) read, a page list per KV
    head, or per q head where `list_of_head` maps each q head to its own; `out` their sparse output.
    Per union: relative error and mean kept mass over the tile's queries and heads. Per head: mass kept
    and cells read, over the rows the plan selects for, `selected_rows` (past dense_below, before the dense tail):
    rows that read every block by rule would count as perfect recall."""
    record_density(layer, ctx, mask, union, rows)
    st = STATS.layers[layer]
    if STATS.audit:
        dense, mass = dense_attention_mass(ctx, tokens)
        rel = float((out.float() - dense).norm() / dense.norm().clamp_min(1e-30))
        read = union[:, None, :].expand(-1, ctx.num_query_blocks, -1)
        list_of_head = ctx.kv_head_of if list_of_head is None else list_of_head
        kept = read_mass(mass, read, list_of_head)  # only the tile's rows hold mass
        st.audit.append((rel, float(kept.sum()) / max(1, (tokens.stop - tokens.start) * mass.shape[0])))
        past = slice(max(rows.start, selected_rows.start), min(rows.stop, selected_rows.stop))
        if past.start < past.stop:
            causal = ctx.causal_block_mask()[past]
            first = ctx.context_len + tokens.start, (ctx.first_query_block + past.start) * ctx.block_size
            n_tokens = min(ctx.context_len + tokens.stop, (ctx.first_query_block + past.stop) * ctx.block_size) \
                - max(first)
            st.add_heads(read_mass(mass[:, past], read[:, past], list_of_head).tolist(), n_tokens,
                         read_cells(read[:, past], causal).tolist(), int(causal.sum()))
