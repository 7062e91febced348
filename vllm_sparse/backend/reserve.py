"""What the sparse path holds at engine start, and how the rest of its memory is counted.

Two kinds of device memory grow with the chunk and the context:
- the fused estimators' workspace (a float per scored row and KV block between their two kernels):
  reserved once while vLLM builds the model, counted with the weights, capped at
  VLLM_SPARSE_WORKSPACE_MIB; a larger chunk is scored in slabs;
- each sparse chunk-layer's temporaries: block scores and the kept-block mask ([q heads, query blocks,
  KV blocks]), the per-token line sums of `vertical_slash`, the FA3 page tables ([page lists, union
  tiles, context pages]), quantized `antidiagonal`'s int8 copies of the chunk's queries and of one KV
  head's keys at the longest context (at shorter ones, of as many heads as that covers). They live for
  one layer and are freed before the next. At 1M tokens they reach hundreds of MiB
  (benchmarks/RESULTS.md, "Temporaries of a sparse chunk-layer at 128K-1M tokens"), so they are counted
  in vLLM's memory profile: during vLLM's profiling forward (no attention metadata) every sparse layer
  allocates their bound for the largest chunk at max_model_len and frees it, so the KV cache is sized
  around them and a long request cannot run the engine out of memory.
"""

from __future__ import annotations

import torch

from vllm_sparse.backend.split_groups import split_group
from vllm_sparse.config.plan import SparsePlan
from vllm_sparse.estimators.registry import get_estimator
from vllm_sparse.estimators.row_scores import key_column_floats
from vllm_sparse.kernels import flash_compact
from vllm_sparse.kernels.workspace import WORKSPACE
from vllm_sparse.log import logger

# Upper bounds per element, from what the path allocates (checked against torch.cuda's peak on an H200 up
# to 1M tokens by benchmarks/estimators.py, whose table prints this bound beside the measured peak):
# per (q head, query block, KV block): the scores (fp32), up to four fp32 intermediates of the estimators
# and of a GQA group's mean, the kept mask (bool), rounded up;
SCORE_ELEMENT_BYTES = 24
# per (q head, context token): `vertical_slash`'s column and diagonal sums, their top-k copies, prefix sums;
LINE_ELEMENT_BYTES = 32
# per (page list, union tile, context page): the FA3 page table (int32) and the tile's union (bool, by block).
TABLE_ELEMENT_BYTES = 4
# the same for the Triton kernel's page lists (`selection.pages.block_mask_to_page_csr`): the kept pages (bool),
# their destinations (int64, twice while they are masked), the page ids they scatter (int32) and the output (int32);
# tests/test_reserve_measured.py measures its peak on CPU.
CSR_ELEMENT_BYTES = 25
# per (q head, KV block, head dim) of an estimator that scores pooled keys (`pooled`, `lowbit` with rows: pooled):
# the block means (fp32, per KV head), their copy per q head (fp32), the low-bit copies and scales; measured up
# to 11.7 on CPU (tests/test_reserve_measured.py).
POOLED_ELEMENT_BYTES = 16
# per (q head, kept column) of a plan that reads columns token by token: the positions (int32), their union per
# KV head sorted twice, and the top-k's indices (int64).
COLUMN_ELEMENT_BYTES = 24


# A follow-up turn's few thousand new tokens: the chunks whose step the host sets (`flash_compact.list_packing`).
SHORT_CHUNK_TOKENS = 4096


def estimator_workspace_bytes(plan: SparsePlan, local_q_heads: int, max_chunk_tokens: int, max_model_len: int,
                              local_kv_heads: int = 0, head_dim: int = 0) -> int:
    """Bytes the largest chunk (`max_chunk_tokens` queries at `max_model_len`) needs between the fused
    scorer's two kernels: a float per (q head, scored row, KV block), for the plan's most demanding
    estimator; at least one query block's rows (the smallest slab). With the KV heads and head dim given, also
    room for a short chunk's rows (`SHORT_CHUNK_TOKENS`) beside every KV head's int8 key columns at
    `max_model_len` where the plan quantizes strided rows (`row_scores._RowLse._place_key_columns`): such a chunk
    then quantizes and scores every head in one pass (a 2K-token follow-up at 128K held 7 of Llama's 8 heads in
    the rows' room: two passes, four launches)."""
    kv_blocks = -(-max_model_len // plan.block_size)
    need = 0
    for hp in _head_plans(plan):
        est = get_estimator(hp.estimator)
        rows = est.workspace_rows(hp.params, max_chunk_tokens)
        if rows:
            one_block = est.workspace_rows(hp.params, plan.block_size) + 1
            need = max(need, local_q_heads * max(rows, one_block) * kv_blocks * 4)
        stride = getattr(hp.params, "stride", 1)
        if rows and local_kv_heads and head_dim and getattr(hp.params, "bits", None) and stride > 1:
            short_rows = est.workspace_rows(hp.params, min(SHORT_CHUNK_TOKENS, max_chunk_tokens)) + 1
            columns = local_kv_heads * sum(key_column_floats(-(-max_model_len // stride), stride, head_dim)) * 4
            need = max(need, local_q_heads * short_rows * kv_blocks * 4 + columns + 4096)  # (alignment)
    return need


def step_temporaries_bytes(plan: SparsePlan, local_q_heads: int, local_kv_heads: int, max_chunk_tokens: int,
                           max_model_len: int, page_size: int, head_dim: int = 0, query_itemsize: int = 0,
                           page_csr: bool = False) -> int:
    """An upper bound on one sparse chunk-layer's temporaries (outside the workspace) for the largest chunk
    at `max_model_len`: what vLLM's memory profile must leave room for. `query_itemsize`: with an fp8 cache
    (fp8 queries), the bytes of a dequantized query element (the model's dtype), else 0. `page_csr`: chunks go
    through the Triton kernel's page lists (no FlashAttention, or layers that keep columns), not its tables."""
    head_plans = _head_plans(plan)
    if not head_plans:
        return 0
    dequantized = local_q_heads * max_chunk_tokens * head_dim * query_itemsize  # `sparse_path.dequantize_queries`
    quantized = any(hp.estimator == "antidiagonal" and hp.params.bits for hp in head_plans)
    pooled = any(hp.estimator == "pooled" or (hp.estimator == "lowbit" and hp.params.rows == "pooled")
                 for hp in head_plans)
    columns = max((hp.params.vertical_size for hp in head_plans if hp.reads_columns), default=0)
    return dequantized + chunk_temporaries_bytes(
        local_q_heads, local_kv_heads, max_chunk_tokens, max_model_len, plan.block_size, page_size, plan.union_tile,
        plan.union_heads, any(hp.estimator == "vertical_slash" for hp in head_plans),
        quantized_head_dim=head_dim if quantized else 0, kept_columns=columns, page_csr=page_csr,
        pooled_head_dim=head_dim if pooled else 0)


def chunk_temporaries_bytes(q_heads: int, kv_heads: int, chunk_tokens: int, seq_len: int, block_size: int,
                            page_size: int, union_tile: int | None, union_heads: bool, line_sums: bool,
                            quantized_head_dim: int = 0, kept_columns: int = 0, page_csr: bool = False,
                            pooled_head_dim: int = 0) -> int:
    """The bound of `step_temporaries_bytes` for one chunk of `chunk_tokens` queries ending at `seq_len`
    (`quantized_head_dim`: the head size where an estimator quantizes strided rows, else 0; `kept_columns`:
    the most columns a head keeps token by token, else 0; `pooled_head_dim`: the head size where an estimator
    scores pooled keys, else 0)."""
    query_blocks = -(-chunk_tokens // block_size) + 1  # a chunk that starts mid-block spans one more
    kv_blocks = -(-seq_len // block_size)
    tiles = -(-query_blocks // (union_tile or query_blocks))
    lists = kv_heads if union_heads else q_heads
    pages = -(-seq_len // page_size)
    # int8 rows of S tokens x head_dim (with a stride group begun before the chunk and one past its end) and one
    # KV head's key columns, a fp32 scale each (at most one per token)
    quantized = (q_heads * (chunk_tokens + 2 * block_size) + seq_len + block_size) * (quantized_head_dim + 4)
    # columns read token by token: their lists, and the block pass's log-sum-exp the column pass joins (fp32)
    columns = q_heads * (min(kept_columns, seq_len) * COLUMN_ELEMENT_BYTES + chunk_tokens * 4) if kept_columns else 0
    return (columns + q_heads * query_blocks * kv_blocks * SCORE_ELEMENT_BYTES
            + (q_heads * seq_len * LINE_ELEMENT_BYTES if line_sums else 0)
            + lists * tiles * (pages * (CSR_ELEMENT_BYTES if page_csr else TABLE_ELEMENT_BYTES) + kv_blocks)
            + (quantized if quantized_head_dim else 0)
            + q_heads * kv_blocks * pooled_head_dim * POOLED_ELEMENT_BYTES)


def layer_temporaries_bytes(plan: SparsePlan, local_q_heads: int, local_kv_heads: int, max_step_tokens: int,
                            max_model_len: int, page_size: int, head_dim: int, itemsize: int,
                            fp8_queries: bool = False, page_csr: bool = False, shard=None) -> int:
    """What one sparse layer's forward may hold at once outside the workspace, the most of: a sparse
    chunk-layer's temporaries (`step_temporaries_bytes`; with a GQA group spread over ranks, its exchange and the
    group's scored heads: `split_group_bytes`) and the step's dense requests' copies (`dense_token_bytes`, freed
    before the sparse chunks run). `itemsize`: the model dtype's."""
    scored, exchange = (split_group_bytes(plan, shard, max_step_tokens, max_model_len, head_dim, itemsize)
                        if shard is not None else (local_q_heads, 0))
    sparse = exchange + step_temporaries_bytes(plan, scored, local_kv_heads, max_step_tokens, max_model_len,
                                               page_size, head_dim, itemsize if fp8_queries else 0, page_csr)
    return max(sparse, dense_token_bytes(max_step_tokens, local_q_heads, local_kv_heads, head_dim, itemsize))


def dense_token_bytes(max_step_tokens: int, local_q_heads: int, local_kv_heads: int, head_dim: int,
                      itemsize: int) -> int:
    """A sparse step's dense requests run on copies of their tokens' queries, keys, values and output
    (`impl._forward_dense_tokens`): at most a step's tokens, freed before the sparse chunks' temporaries."""
    return max_step_tokens * 2 * (local_q_heads + local_kv_heads) * head_dim * itemsize


def split_group_bytes(plan: SparsePlan, shard, max_chunk_tokens: int, max_model_len: int, head_dim: int,
                      query_itemsize: int) -> tuple[int, int]:
    """Where a GQA group spans tensor-parallel ranks (`split_groups.py`): (the q heads a rank scores for a
    chunk, the bytes its exchange adds to the chunk-layer's temporaries). A layer that exchanges queries
    gathers every rank's (the all-gather is over the whole tensor-parallel group), keeps its group's copy and
    scores the group's q heads; one that exchanges masks gathers every rank's fp16 kept-block mask and keeps
    its group's as bool. Neither: (the rank's q heads, 0)."""
    local = len(shard.q_heads)
    splits = [s for s in (split_group(lp, shard) for lp in plan.layers) if s is not None]
    if not splits:
        return local, 0
    group, ranks = len(shard.group_q_heads), shard.tp_size
    query_blocks = -(-max_chunk_tokens // plan.block_size) + 1
    kv_blocks = -(-max_model_len // plan.block_size)
    queries = (ranks * local + group) * max_chunk_tokens * head_dim * query_itemsize
    masks = (local * 2 + ranks * local * 2 + group) * query_blocks * kv_blocks  # fp16 sent, gathered; bool kept
    share = any(s.share_queries for s in splits)  # some layer exchanges queries
    gathers_masks = not all(s.share_queries for s in splits)  # some layer exchanges masks
    return (group if share else local), (queries if share else 0) + (masks if gathers_masks else 0)


def _head_plans(plan: SparsePlan):
    return {hp for lp in plan.layers for hp in lp.heads if hp is not None}


def packed_lists_itemsize(kernel: str | None, dtype: torch.dtype) -> int:
    """The `packed_lists_itemsize` the engine reserves with: the model dtype's bytes where a short chunk's page lists
    are packed (`VLLM_SPARSE_FA_PACK_LISTS`, FlashAttention's kernels), else 0."""
    return dtype.itemsize if flash_compact.PACK_LISTS and kernel in flash_compact.FLASH_VERSIONS else 0


def packed_lists_bytes(local_q_heads: int, max_chunk_tokens: int, head_dim: int, itemsize: int) -> int:
    """Room for a short chunk's queries and output, head-major, where `VLLM_SPARSE_FA_PACK_LISTS` (on by default)
    packs its page lists into one FlashAttention call (`flash_compact.list_packing`; with the alignment between
    them)."""
    return 2 * min(SHORT_CHUNK_TOKENS, max_chunk_tokens) * local_q_heads * head_dim * itemsize + 256


def estimator_reservation_bytes(plan: SparsePlan, local_q_heads: int, max_chunk_tokens: int, max_model_len: int,
                                local_kv_heads: int = 0, head_dim: int = 0, packed_lists_itemsize: int = 0) -> int:
    """What the engine asks to reserve for the estimators' workspace, before the cap (`reserve_estimator_workspace`;
    `benchmarks/memory_table.py` counts it the same way). `packed_lists_itemsize`: the model dtype's, where page lists
    are packed (the setting on, FlashAttention's path): a short chunk's packed copies fit even a plan whose estimators
    use no workspace."""
    need = estimator_workspace_bytes(plan, local_q_heads, max_chunk_tokens, max_model_len, local_kv_heads, head_dim)
    if packed_lists_itemsize and _head_plans(plan):
        need = max(need, packed_lists_bytes(local_q_heads, max_chunk_tokens, head_dim, packed_lists_itemsize))
    return need


def reserve_estimator_workspace(plan: SparsePlan, local_q_heads: int, max_chunk_tokens: int, max_model_len: int,
                                device: torch.device, local_kv_heads: int = 0, head_dim: int = 0,
                                packed_lists_itemsize: int = 0) -> int:
    """Reserve it on `device` (capped by VLLM_SPARSE_WORKSPACE_MIB; larger chunks run in slabs). -> bytes held."""
    need = estimator_reservation_bytes(plan, local_q_heads, max_chunk_tokens, max_model_len, local_kv_heads, head_dim,
                                       packed_lists_itemsize)
    return WORKSPACE.reserve(need, device) if need else 0


_TOUCHED: set[int] = set()  # sizes already logged in this process


def touch_step_temporaries(nbytes: int, device: torch.device) -> None:
    """Allocate and free `nbytes` on `device`: called from vLLM's profiling forward, whose peak of torch
    allocations sizes the KV cache (so that peak includes the sparse path's temporaries)."""
    if not nbytes:
        return
    torch.empty(nbytes, dtype=torch.uint8, device=device)  # freed at once: only the peak matters
    if nbytes not in _TOUCHED:  # once per process, not once per layer
        _TOUCHED.add(nbytes)
        logger.info("vllm-sparse: %.1f MiB of sparse-chunk temporaries (the largest chunk at max_model_len) "
                    "counted in vLLM's memory profile", nbytes / 2**20)
