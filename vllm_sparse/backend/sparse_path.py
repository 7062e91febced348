"""estimate -> select -> union -> attend, for the sparse prefill chunks of one layer."""

from __future__ import annotations

from collections import defaultdict

import torch

from vllm_sparse.backend.batch import SparseChunk
from vllm_sparse.config.plan import HeadPlan
from vllm_sparse.estimators.base import ChunkContext
from vllm_sparse.estimators.registry import get_estimator
from vllm_sparse.kernels.paged import PagedKV
from vllm_sparse.kernels.reference import sparse_paged_attention_ref
from vllm_sparse.selection.budget import select_blocks
from vllm_sparse.selection.stats import STATS
from vllm_sparse.selection.union import blocks_to_pages, union_blocks


def chunk_block_mask(chunk: ChunkContext, head_plans: list[HeadPlan | None]) -> torch.Tensor:
    """Kept-block mask [q_heads, query_blocks, kv_blocks] for every q head of the chunk.

    Heads sharing one plan are scored together; a dense head (None) keeps every causal block.
    """
    heads_of: dict[HeadPlan | None, list[int]] = defaultdict(list)
    for h, plan in enumerate(head_plans):
        heads_of[plan].append(h)
    causal = chunk.causal_block_mask()
    mask = causal[None].repeat(len(head_plans), 1, 1)
    for plan, heads in heads_of.items():
        if plan is None:
            continue
        idx = torch.tensor(heads, device=chunk.q.device)
        kv_ids = tuple(chunk.kv_head_ids[h] for h in heads) if chunk.kv_head_ids is not None else None
        sub = ChunkContext(chunk.q[:, idx], chunk.kv_head_of[idx], chunk.kv, chunk.block_table,
                           chunk.context_len, chunk.block_size, chunk.scale, kv_ids)
        scores = get_estimator(plan.estimator).score(sub, plan.params)
        mask[idx] = select_blocks(scores, plan.budget, chunk.first_query_block)
    return mask


def attend_sparse_chunks(
    query: torch.Tensor,  # [num_tokens, q_heads, D] whole batch
    output: torch.Tensor,  # [num_tokens, q_heads, Dv] written for the chunks' tokens
    kv: PagedKV,
    block_table: torch.Tensor,  # [num_reqs, max_pages]
    chunks: tuple[SparseChunk, ...],
    head_plans: list[HeadPlan | None],  # per local q head
    block_size: int,
    scale: float,
    union_tile: int | None = None,  # query blocks per union; None: one union for the whole chunk
    layer: int = -1,  # for the stats only
) -> None:
    num_q, num_kv = query.shape[1], kv.num_kv_heads
    kv_head_of = torch.arange(num_q, device=query.device) // (num_q // num_kv)
    kv_head_ids = tuple(h // (num_q // num_kv) for h in range(num_q))
    for c in chunks:
        ctx = ChunkContext(query[c.q_start:c.q_end], kv_head_of, kv, block_table[c.req], c.context_len,
                           block_size, scale, kv_head_ids)
        mask = chunk_block_mask(ctx, head_plans)
        tile = union_tile or ctx.num_query_blocks
        for r0 in range(0, ctx.num_query_blocks, tile):
            rows = slice(r0, min(r0 + tile, ctx.num_query_blocks))
            union = union_blocks(mask[:, rows], kv_head_of, num_kv)
            # The tile's query tokens: its rows' positions that lie in this chunk.
            t0 = max((ctx.first_query_block + rows.start) * block_size - c.context_len, 0)
            t1 = min((ctx.first_query_block + rows.stop) * block_size - c.context_len, c.q_end - c.q_start)
            tokens = slice(c.q_start + t0, c.q_start + t1)
            seq_len = c.context_len + t1
            page_lists = [blocks_to_pages(torch.nonzero(union[h]).flatten(), block_size, kv.page_size, seq_len)
                          for h in range(num_kv)]
            indptr = torch.tensor([0] + [len(p) for p in page_lists]).cumsum(0)
            args = (kv, block_table[c.req: c.req + 1], torch.tensor([0, t1 - t0]), torch.tensor([seq_len]))
            _, lse = sparse_paged_attention_ref(query[tokens], *args, indptr, torch.cat(page_lists), scale,
                                                out=output[tokens], return_lse=True)
            if STATS.enabled:
                _record(layer, ctx, mask[:, rows], union, rows, query[tokens], output[tokens], lse, args, scale)


def _record(layer, ctx, mask, union, rows, q, out, lse, args, scale) -> None:
    """Count kept cells before and after union; with audit, compare against dense attention."""
    st = STATS.layers[layer]
    causal = ctx.causal_block_mask()[rows]  # [rows, kv_blocks]
    st.unions += 1
    st.requested_kept += int(mask.sum())
    st.requested_total += int(causal.sum()) * mask.shape[0]
    st.union_kept += int((union[:, None, :] & causal[None]).sum())
    st.union_total += int(causal.sum()) * union.shape[0]
    if STATS.audit:
        n_pages = (int(args[3][0]) - 1) // ctx.kv.page_size + 1
        all_pages = torch.arange(n_pages).repeat(union.shape[0])
        indptr = torch.arange(union.shape[0] + 1) * n_pages
        dense, dense_lse = sparse_paged_attention_ref(q, *args, indptr, all_pages, scale, return_lse=True)
        rel = float((out.float() - dense.float()).norm() / dense.float().norm().clamp_min(1e-30))
        kept_mass = float(torch.exp(lse - dense_lse).mean())
        st.audit.append((rel, kept_mass))
