"""estimate -> select -> union -> attend, for the sparse prefill chunks of one layer."""

from __future__ import annotations

import functools
import math
import os
from collections import defaultdict

import torch

from vllm_sparse.backend.batch import SparseChunk
from vllm_sparse.config.plan import HeadPlan
from vllm_sparse.estimators.base import ChunkContext
from vllm_sparse.estimators.registry import get_estimator
from vllm_sparse.kernels.fa3_compact import sparse_attention_fa3
from vllm_sparse.kernels.paged import PagedKV
from vllm_sparse.kernels.reference import sparse_paged_attention_ref
from vllm_sparse.kernels.sparse_attention import sparse_paged_attention
from vllm_sparse.selection.budget import select_blocks
from vllm_sparse.selection.pages import block_mask_to_page_csr
from vllm_sparse.selection.select_kernel import select_blocks_triton
from vllm_sparse.selection.stats import STATS
from vllm_sparse.selection.tile_tables import tile_seq_lens, tile_tables_triton, tile_unions
from vllm_sparse.selection.union import blocks_to_pages, union_blocks


def plan_scores(chunk: ChunkContext, plan: HeadPlan) -> torch.Tensor:
    """Block scores of every head of the chunk under one plan: [q_heads, rows, kv_blocks], or
    [kv_heads, rows, kv_blocks] (one row per GQA group) when the group selects together: the
    estimator gives every head of a group the same scores (a strided view), or the budget says
    `share: group` (the group's mean block mass). Selection then sorts each group's rows once."""
    estimator = get_estimator(plan.estimator)
    scores = estimator.score(chunk, plan.params)
    group = chunk.kv_group_size
    if group is None or group == 1:
        return scores
    if estimator.same_in_group(plan.params):
        return scores[::group]
    if plan.budget.share == "group":
        return group_mean_scores(scores, group)
    return scores


def group_mean_scores(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Log-mass scores [heads, rows, kv_blocks] of consecutive groups of `group` heads -> the log of
    each group's mean mass, [heads // group, rows, kv_blocks] (-inf stays -inf)."""
    grouped = scores.view(scores.shape[0] // group, group, *scores.shape[1:])
    return torch.logsumexp(grouped, dim=1) - math.log(group)


def chunk_block_mask(chunk: ChunkContext, head_plans: list[HeadPlan | None]) -> torch.Tensor:
    """Kept-block mask [mask_heads, query_blocks, kv_blocks] for the chunk's q heads.

    mask_heads is q_heads, or kv_heads when one plan covers every head and its estimator scores
    per GQA group (`plan_scores`); `mask_kv_heads` maps either to KV heads. Heads sharing one
    plan are scored together; a dense head (None) keeps every causal block.
    """
    heads_of: dict[HeadPlan | None, list[int]] = defaultdict(list)
    for h, plan in enumerate(head_plans):
        heads_of[plan].append(h)
    select = select_blocks_triton if chunk.q.is_cuda else select_blocks  # same blocks; one launch on GPUs
    only = next(iter(heads_of))
    if len(heads_of) == 1 and only is not None:  # one plan for every head: score the chunk as it is
        return select(plan_scores(chunk, only), only.budget, chunk.first_query_block)
    causal = chunk.causal_block_mask()
    mask = causal[None].repeat(len(head_plans), 1, 1)
    for plan, heads in heads_of.items():
        if plan is None:
            continue
        idx = torch.tensor(heads, device=chunk.q.device)
        kv_ids = tuple(chunk.kv_head_ids[h] for h in heads) if chunk.kv_head_ids is not None else None
        sub = ChunkContext(chunk.q[:, idx], chunk.kv_head_of[idx], chunk.kv, chunk.block_table,
                           chunk.context_len, chunk.block_size, chunk.scale, kv_ids, chunk.kernels)
        scores = get_estimator(plan.estimator).score(sub, plan.params)
        groups = sub._groups  # heads of this plan in equal consecutive groups per KV head, if they are
        if plan.budget.share == "group" and groups is not None and groups[1] > 1:
            kept = select(group_mean_scores(scores, groups[1]), plan.budget, chunk.first_query_block)
            mask[idx] = kept.repeat_interleave(groups[1], dim=0)
        else:
            mask[idx] = select(scores, plan.budget, chunk.first_query_block)
    return mask


def mask_kv_heads(mask: torch.Tensor, kv_head_of: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """KV head of each row of a `chunk_block_mask` mask (one row per q head, or one per KV head)."""
    if mask.shape[0] == kv_head_of.shape[0]:
        return kv_head_of
    return torch.arange(num_kv_heads, device=kv_head_of.device)


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
    kernel: str | None = None,  # "triton" | "fa3" | "reference"; None: by device (selected_kernel)
) -> None:
    num_q, num_kv = query.shape[1], kv.num_kv_heads
    kv_head_of = torch.arange(num_q, device=query.device) // (num_q // num_kv)
    kv_head_ids = tuple(h // (num_q // num_kv) for h in range(num_q))
    kernel = kernel or selected_kernel(query.device)
    fused = kernel != "reference"  # the estimators' Triton kernels go with the attention kernel's choice
    # The dense audit compares against the exact reference path; density counts work on either.
    kernel = "reference" if STATS.audit else kernel
    for c in chunks:
        ctx = ChunkContext(query[c.q_start:c.q_end], kv_head_of, kv, block_table[c.req], c.context_len,
                           block_size, scale, kv_head_ids, fused)
        mask = chunk_block_mask(ctx, head_plans)
        tile = union_tile or ctx.num_query_blocks
        if kernel != "reference":
            _attend_chunk_with_kernel(ctx, mask, tile, c, output, block_table, kernel, layer)
            continue
        for r0 in range(0, ctx.num_query_blocks, tile):
            rows = slice(r0, min(r0 + tile, ctx.num_query_blocks))
            union = union_blocks(mask[:, rows], mask_kv_heads(mask, kv_head_of, num_kv), num_kv)
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


def selected_kernel(device: torch.device) -> str:
    """FA3 over compacted tables on Hopper with vLLM's FA3 build, the Triton kernel on other GPUs,
    the torch reference on CPU. VLLM_SPARSE_KERNEL=triton|fa3|reference overrides."""
    forced = os.environ.get("VLLM_SPARSE_KERNEL")
    if forced:
        return forced
    if device.type != "cuda":
        return "reference"
    return "fa3" if _fa3_available(device) else "triton"


@functools.cache
def _fa3_available(device: torch.device) -> bool:
    if torch.cuda.get_device_capability(device)[0] != 9:
        return False
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func  # noqa: F401
        from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported
    except ImportError:
        return False
    return is_fa_version_supported(3)


def _attend_chunk_with_kernel(ctx: ChunkContext, mask: torch.Tensor, tile: int, c: SparseChunk,
                              output: torch.Tensor, block_table: torch.Tensor, kernel: str, layer: int) -> None:
    """All union tiles of one chunk in one kernel launch (one per KV head with FA3), no host sync.

    Tile t's union of rows and of the q heads of each KV head becomes segment t's page list; the
    tile's query tokens attend to it, causally. Every tile's list ends with the tile's own blocks
    (each row keeps its diagonal block), which the FA3 path relies on.
    """
    dev, bs, kv = ctx.q.device, ctx.block_size, ctx.kv
    num_kv, rows, nkb = kv.num_kv_heads, ctx.num_query_blocks, ctx.num_kv_blocks
    n_tiles = -(-rows // tile)
    bounds, seq_lens = tile_seq_lens(ctx.first_query_block, n_tiles, tile, bs, ctx.context_len, ctx.q_len, dev)
    union = tile_unions(mask, tile, num_kv) if STATS.enabled or kernel != "fa3" else None
    if STATS.enabled:  # eval counters: host syncs are acceptable there
        # Every tile's union, repeated for each of its rows: the whole chunk counted at once.
        _record_density(layer, ctx, mask, union.repeat_interleave(tile, dim=1)[:, :rows], slice(0, rows), n_tiles)
    q, out = ctx.q, output[c.q_start:c.q_end]
    max_q = min(tile * bs, ctx.q_len)
    if kernel == "fa3":
        max_pages = -(-ctx.seq_len // kv.page_size)  # no list is longer than the chunk's pages
        tables, counts = tile_tables_triton(mask, num_kv, tile, seq_lens, bs, kv.page_size, block_table[c.req],
                                            max_pages)
        sparse_attention_fa3(q, kv.key.transpose(1, 2), kv.value.transpose(1, 2), tables, counts, bounds, seq_lens,
                             max_q, ctx.scale, out)
        return
    num_pages = ((seq_lens + kv.page_size - 1) // kv.page_size).repeat_interleave(num_kv)
    indptr, indices = block_mask_to_page_csr(union.transpose(0, 1).reshape(n_tiles * num_kv, nkb), bs,
                                             kv.page_size, num_pages)
    rows_bt = torch.full((n_tiles,), c.req, dtype=torch.int32, device=dev)
    sparse_paged_attention(q, kv, block_table, bounds, seq_lens, indptr, indices, ctx.scale, out=out,
                           max_query_len=max_q, block_table_rows=rows_bt)


def _record_density(layer, ctx, mask, union, rows, unions: int = 1) -> None:
    """Count the (head, query block, kv block) cells kept before union and after it, causal only.

    union: [kv_heads, kv_blocks] for one union over `rows`, or [kv_heads, rows, kv_blocks] (each row's
    union) when `unions` tiles are counted together."""
    st = STATS.layers[layer]
    causal = ctx.causal_block_mask()[rows]  # [rows, kv_blocks]
    st.unions += unions
    per_row = ctx.q.shape[1] // mask.shape[0]  # q heads behind each mask row (a group's, when scored per group)
    per_row_union = union if union.dim() == 3 else union[:, None, :]
    counts = torch.stack([mask.sum(), causal.sum(), (per_row_union & causal[None]).sum()]).tolist()  # one sync
    st.requested_kept += counts[0] * per_row
    st.requested_total += counts[1] * ctx.q.shape[1]
    st.union_kept += counts[2]
    st.union_total += counts[1] * union.shape[0]


def _record(layer, ctx, mask, union, rows, q, out, lse, args, scale) -> None:
    """Densities; with audit, also the distance from dense attention and the attention mass kept."""
    _record_density(layer, ctx, mask, union, rows)
    st = STATS.layers[layer]
    if STATS.audit:
        n_pages = (int(args[3][0]) - 1) // ctx.kv.page_size + 1
        all_pages = torch.arange(n_pages).repeat(union.shape[0])
        indptr = torch.arange(union.shape[0] + 1) * n_pages
        dense, dense_lse = sparse_paged_attention_ref(q, *args, indptr, all_pages, scale, return_lse=True)
        rel = float((out.float() - dense.float()).norm() / dense.float().norm().clamp_min(1e-30))
        kept_mass = float(torch.exp(lse - dense_lse).mean())
        st.audit.append((rel, kept_mass))
