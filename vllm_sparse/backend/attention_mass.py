"""Dense attention of a chunk with its attention mass per KV block, and the share of that mass a set of
blocks holds: the one measure behind the eval's operator check (the blocks a plan reads) and
`vllm-sparse calibrate` (the blocks every candidate estimator and budget would read).

Recall of a q head: the dense attention mass its queries put on the blocks read for them (after the
union over rows and over the q heads of its KV head), averaged over its queries. Kept density of a KV
head: the share of the causal (query block, KV block) cells its union reads. Both are counted over the
query blocks past `dense_below` (the rows a plan can make sparse; the rows before attend densely).
"""

from __future__ import annotations

import torch

from vllm_sparse.estimators.base import ChunkContext, _sum_last_dim_in_blocks

# Logit elements per slab of queries (fp32): bounds the temporaries at 128K context and many heads.
MAX_SLAB_ELEMENTS = 1 << 27


def dense_attention_mass(ctx: ChunkContext, tokens: slice | None = None, max_elements: int = MAX_SLAB_ELEMENTS
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact causal attention of the chunk's queries `tokens` (chunk-local offsets; all by default).

    Returns (out [T, q_heads, Dv] fp32, mass [q_heads, query_blocks, kv_blocks] fp32): mass[h, r, b] is
    the dense attention of head h's queries in query block row r on KV block b, summed over those
    queries (each query's row sums to 1), so `mass.sum(-1)` counts each row's queries.
    """
    t0, t1 = (0, ctx.q_len) if tokens is None else (tokens.start, tokens.stop)
    keys, values = ctx.keys_values  # [seq_len, kv_heads, D], in position order
    dev, bs, nkb, seq = ctx.q.device, ctx.block_size, ctx.num_kv_blocks, ctx.seq_len
    heads = ctx.q.shape[1]
    out = torch.empty(t1 - t0, heads, values.shape[-1], dtype=torch.float32, device=dev)
    mass = torch.zeros(heads, ctx.num_query_blocks, nkb, dtype=torch.float32, device=dev)
    k_pos = torch.arange(seq, device=dev)
    ids = ctx.host_kv_head_ids()
    for kv in dict.fromkeys(ids):
        hs = torch.tensor([h for h, k in enumerate(ids) if k == kv], device=dev)
        k, v = keys[:, kv].float(), values[:, kv].float()
        slab = max(1, max_elements // (len(hs) * seq))
        for s0 in range(t0, t1, slab):
            s1 = min(s0 + slab, t1)
            q_pos = torch.arange(ctx.context_len + s0, ctx.context_len + s1, device=dev)
            logits = torch.einsum("tgd,kd->gtk", ctx.q[s0:s1, hs].float(), k) * ctx.scale
            probs = torch.softmax(logits.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf")), -1)
            out[s0 - t0:s1 - t0, hs] = torch.einsum("gtk,kd->tgd", probs, v)
            rows = q_pos // bs - ctx.first_query_block
            mass[hs] = mass[hs].index_add_(1, rows, _sum_last_dim_in_blocks(probs, bs, nkb))
    return out, mass


def dense_rows(ctx: ChunkContext, dense_below: int) -> int:
    """Query block rows at the chunk's start whose tokens all lie before position `dense_below` (each sees at most
    `dense_below` tokens): the rows that attend densely."""
    return min(max(dense_below // ctx.block_size - ctx.first_query_block, 0), ctx.num_query_blocks)


def tail_rows(ctx: ChunkContext, dense_tail: int) -> int:
    """Query block rows at the chunk's end that hold its last `dense_tail` tokens (the plan's `dense_tail`): the
    rows that attend densely there. 0 when off."""
    if dense_tail <= 0:
        return 0
    return ctx.num_kv_blocks - max(ctx.seq_len - dense_tail, ctx.context_len) // ctx.block_size


def row_unions(mask: torch.Tensor, tile: int, num_kv_heads: int) -> torch.Tensor:
    """Kept-block mask [mask_heads, rows, kv_blocks] -> what each row reads per KV head,
    [kv_heads, rows, kv_blocks]: the union over its union tile's rows and its KV head's q heads."""
    from vllm_sparse.selection.tile_tables import tile_unions, tile_unions_per_row

    return tile_unions_per_row(tile_unions(mask, tile, num_kv_heads), tile, mask.shape[1])


def read_mass(mass: torch.Tensor, union: torch.Tensor, kv_head_of: torch.Tensor) -> torch.Tensor:
    """Dense mass [q_heads, rows, kv_blocks] in the blocks read, union [kv_heads, rows, kv_blocks]:
    per q head, summed over its queries, [q_heads] (fp64)."""
    return read_mass_rows(mass, union, kv_head_of).sum(1)


def read_mass_rows(mass: torch.Tensor, union: torch.Tensor, kv_head_of: torch.Tensor) -> torch.Tensor:
    """As read_mass, per query block row: [q_heads, rows] (fp64)."""
    return (mass.double() * union[kv_head_of.long()]).sum(2)


RECALL_BINS = 100  # histogram of per-row recall: bins of 0.01


def row_recall_histogram(read_rows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Mass read per row [q_heads, rows] and the row's queries (its total dense mass) [q_heads, rows] ->
    per q head, the queries in rows of each recall bin, [q_heads, RECALL_BINS] (fp64)."""
    recall = (read_rows / queries.clamp_min(1e-12)).clamp(0.0, 1.0)
    bins = (recall * RECALL_BINS).long().clamp(max=RECALL_BINS - 1)
    hist = torch.zeros(read_rows.shape[0], RECALL_BINS, dtype=torch.float64, device=read_rows.device)
    return hist.scatter_add_(1, bins, queries.double())


def read_cells(union: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """Causal cells each KV head reads, [kv_heads] (int64); union [kv, rows, kv_blocks], causal [rows, kv_blocks]."""
    return (union & causal[None]).sum((1, 2))
