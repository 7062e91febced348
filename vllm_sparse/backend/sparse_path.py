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
        sub = ChunkContext(chunk.q[:, idx], chunk.kv_head_of[idx], chunk.kv, chunk.block_table,
                           chunk.context_len, chunk.block_size, chunk.scale)
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
) -> None:
    num_q, num_kv = query.shape[1], kv.num_kv_heads
    kv_head_of = torch.arange(num_q, device=query.device) // (num_q // num_kv)
    for c in chunks:
        ctx = ChunkContext(query[c.q_start:c.q_end], kv_head_of, kv, block_table[c.req], c.context_len,
                           block_size, scale)
        union = union_blocks(chunk_block_mask(ctx, head_plans), kv_head_of, num_kv)
        page_lists = [blocks_to_pages(torch.nonzero(union[h]).flatten(), block_size, kv.page_size, c.seq_len)
                      for h in range(num_kv)]
        indptr = torch.tensor([0] + [len(p) for p in page_lists]).cumsum(0)
        sparse_paged_attention_ref(
            query[c.q_start:c.q_end], kv, block_table[c.req : c.req + 1],
            torch.tensor([0, c.q_end - c.q_start]), torch.tensor([c.seq_len]),
            indptr, torch.cat(page_lists), scale, out=output[c.q_start:c.q_end],
        )
