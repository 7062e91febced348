"""Compile and load everything the sparse path runs at engine start, so no request waits for it.

Each selection kernel variant (budget rule, row bucket, GQA group, page and block sizes, head
dim) is launched once on tiny inputs; Triton caches the binaries on disk, so later starts only
load them. Then one tiny sparse step per distinct head plan runs the whole path (estimator ops,
selection, tables, attention kernel), which loads the CUDA modules and library handles its
first request would otherwise wait for (0.2-0.3 s measured at 32K on an H100).
"""

from __future__ import annotations

import functools
import time

import torch
import triton

from vllm_sparse import compat
from vllm_sparse.config.plan import SparsePlan
from vllm_sparse.estimators.block_means import block_key_means_triton
from vllm_sparse.kernels.flash_compact import FLASH_VERSIONS
from vllm_sparse.kernels.launch import MIN_ROW_BUCKET, row_buckets
from vllm_sparse.kernels.page_count import add_page_count
from vllm_sparse.kernels.paged import PagedKV
from vllm_sparse.log import logger
from vllm_sparse.metrics.density_kernel import record_density_kernel
from vllm_sparse.metrics.paths import DENSITY_BUCKETS
from vllm_sparse.selection.budget import Budget
from vllm_sparse.selection.select_kernel import select_blocks_triton
from vllm_sparse.selection.tile_tables import tile_tables_triton


def warm_up_selection_kernels(plan: SparsePlan, group: int, page_size: int, head_dim: int, kv_dtype: torch.dtype,
                              max_model_len: int, device: torch.device, with_tables: bool) -> None:
    """`group`: this rank's q heads per KV head; `with_tables`: the FA3 path's table kernel too."""
    budgets = {hp.budget for lp in plan.layers for hp in lp.heads if hp is not None}
    kinds = tuple(sorted({(b.top_p is not None, b.max_blocks is not None) for b in budgets}))
    if kinds:
        max_blocks = -(-max_model_len // plan.block_size)
        _compile(kinds, group, plan.block_size, page_size, head_dim, kv_dtype, max_blocks, str(device), with_tables)


@functools.cache
def _compile(kinds, group: int, block_size: int, page_size: int, head_dim: int, kv_dtype: torch.dtype,
             max_blocks: int, device: str, with_tables: bool) -> None:
    t0 = time.perf_counter()
    dev = torch.device(device)
    block_table = torch.arange(max_blocks * (block_size // page_size), dtype=torch.int32, device=dev)
    for n in row_buckets(max_blocks):
        nkb = n // 2 + 1 if n > MIN_ROW_BUCKET else 1  # a row length that falls in bucket n
        scores = torch.randn(group, 1, nkb, device=dev)
        for top_p, has_max in kinds:
            budget = Budget(top_p=0.9 if top_p else None, keep_ratio=None if top_p else 0.5,
                            max_blocks=4 if has_max else None)
            mask = select_blocks_triton(scores, budget, nkb - 1)
        if with_tables:
            seq_lens = torch.full((1,), nkb * block_size, dtype=torch.int32, device=dev)
            for rows_per_kv_head in {group, 1}:  # a mask row per q head, or per group (`plan_scores`)
                tile_tables_triton(mask[:rows_per_kv_head], 1, 1, seq_lens, block_size, page_size, block_table,
                                   nkb * (block_size // page_size))
    cache = torch.randn(2, 1, page_size, 2 * head_dim, device=dev).to(kv_dtype)
    block_key_means_triton(PagedKV.from_flash_cache(cache), block_table, 1, block_size)
    # The kept-density metric's kernel (`metrics/density_kernel.py`), on scratch accumulators.
    record_density_kernel(block_table[:2], 4, torch.tensor(DENSITY_BUCKETS, device=dev),
                          torch.zeros(len(DENSITY_BUCKETS) + 2, dtype=torch.float64, device=dev), 0,
                          len(DENSITY_BUCKETS) + 1)
    add_page_count(block_table[:2], torch.zeros(2, dtype=torch.int64, device=dev), 1)  # (the `dense_above` count)
    torch.cuda.synchronize(dev)
    logger.info("vllm-sparse: selection kernels ready (%.1f s; compiled once, then loaded from Triton's cache)",
                time.perf_counter() - t0)


# Tokens of the Triton attention kernels' longest query tile (`sparse_attention._tile_config`): a longer chunk
# changes nothing they compile.
LONGEST_QUERY_TILE = 256


def dummy_query_lengths(plan: SparsePlan, kernel: str, device_type: str) -> list[int]:
    """Query tokens of the dummy chunks: a block where FlashAttention attends; where the Triton attention kernels
    run (every other kernel, and FlashAttention's plans that keep key columns), a chunk per power of two of their
    query tile, which they size to the call's longest union tile (`union_tile` blocks, or the whole chunk),
    shorter in a chunk as short as the plan's query floor lets go sparse (a compile mid-request for each, else);
    none shorter than that floor."""
    from vllm_sparse.backend.checks import column_layers

    bs = plan.block_size
    if kernel == "reference" or (kernel in FLASH_VERSIONS and not column_layers(plan)):
        return [bs]
    longest = min(plan.union_tile * bs, LONGEST_QUERY_TILE) if plan.union_tile else LONGEST_QUERY_TILE
    lengths, n = set(), triton.next_power_of_2(min(max(2, plan.query_token_floor(device_type)), longest))
    while n < 2 * longest:  # (the last: `longest` itself, whose power of two the kernels round it to)
        lengths.add(min(n, longest))
        n *= 2
    return sorted(lengths)


def dummy_cache(pages: int, page_size: int, num_kv_heads: int, head_dim: int, kv_dtype: torch.dtype,
                device: torch.device) -> PagedKV:
    """Random pages in vLLM's flash layout; fp8 ones with unit scales (host numbers and device tensors), as an fp8
    layer's are read."""
    kv = PagedKV.from_flash_cache(torch.randn(2, pages, page_size, num_kv_heads, head_dim, device=device).to(kv_dtype))
    if kv.quantized:
        one = torch.ones(1, dtype=torch.float32, device=device)
        kv = PagedKV(kv.key, kv.value, 1.0, 1.0, one, one)
    return kv


def engine_heads(plan: SparsePlan, kv_cache_spec, vllm_config, cache_dtype: str):
    """(this rank's q heads, its head shard (None for a dense plan), the dtype the kernels read the cache in: an fp8
    cache comes as bytes, vLLM's spec dtype uint8)."""
    from vllm_sparse.backend.checks import fp8_cache, rank_shard

    q_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
    kv_dtype = compat.fp8_dtype() if fp8_cache(cache_dtype) else kv_cache_spec.dtype
    return q_heads, rank_shard(plan, q_heads, kv_cache_spec.num_kv_heads), kv_dtype


def run_dummy_sparse_steps(plan: SparsePlan, shard, num_kv_heads: int, head_dim: int, page_size: int,
                           kv_dtype: torch.dtype, device: torch.device, q_dtype: torch.dtype | None = None) -> None:
    """A sparse chunk (two blocks of context, `dummy_query_lengths` of queries) through `attend_sparse_chunks` per
    distinct set of this rank's head plans, and, where its GQA group spans ranks, of its group's
    (whose masks, and scoring when the ranks exchange queries, cover the whole group: other kernel
    variants); without the exchange itself. Statistics (and calibration's sums)
    stay off for it. An fp8 `kv_dtype` (the model's queries in `q_dtype`) runs the fp8 path as serving does: fp8
    queries with their scale, fp8 pages with theirs."""
    from vllm_sparse.backend.batch import SparseChunk, tile_geometry
    from vllm_sparse.backend.kernel_choice import selected_kernel
    from vllm_sparse.backend.sparse_path import attend_sparse_chunks

    sparse = [lp for lp in plan.layers if lp.is_sparse]
    head_sets = [lp.heads_for(shard) for lp in sparse]
    if shard.splits_groups:
        group = shard.group_q_heads
        head_sets += [lp.heads[group.start:group.stop] for lp in sparse]
    bs = plan.block_size
    kernel = selected_kernel(device)
    lengths = dummy_query_lengths(plan, kernel, device.type)
    pages = -(-(2 * bs + max(lengths)) // page_size)
    kv = dummy_cache(pages, page_size, num_kv_heads, head_dim, kv_dtype, device)
    fp8 = kv.quantized
    if fp8 and q_dtype is None:  # (fp8 is the cache's dtype, not the model's: its queries come dequantized)
        raise ValueError("run_dummy_sparse_steps: an fp8 kv_dtype needs the model's q_dtype")
    q_dtype = q_dtype or kv_dtype
    block_table = torch.arange(pages, dtype=torch.int32, device=device)[None]
    # With a dense tail, the longest chunk once more with it: its rows' dense FlashAttention call runs at start too.
    for q_len, tail in [(n, 0) for n in lengths] + ([(max(lengths), plan.dense_tail)] if plan.dense_tail else []):
        chunks = (SparseChunk(0, 0, q_len, 2 * bs),)
        tiles = tile_geometry(list(chunks), bs, plan.union_tile, device, tail)  # (as the builder makes them for a step)
        for heads in dict.fromkeys(head_sets):  # (no observer: the eval's counters and calibration see none of it)
            q = torch.randn(q_len, len(heads), head_dim, device=device).to(q_dtype)
            out = torch.empty_like(q)
            attend_sparse_chunks(q.to(kv_dtype) if fp8 else q, out, kv, block_table, chunks, list(heads), bs,
                                 head_dim**-0.5, plan.union_tile, kernel=kernel, union_heads=plan.union_heads,
                                 dense_tail=tail, tiles=tiles, q_scale=(kv.k_descale, 1.0) if fp8 else None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_layer_kinds(plan: SparsePlan, layer_names: list[str], shard) -> dict[tuple[bool, bool, bool], int]:
    """{(Quest heads, tidal selector, tidal reader): a layer index of that kind} over a KV cache group's layers
    (each kind launches its own decode kernels; a layer with no decode heads is the kind of three Falses)."""
    from vllm_sparse.backend.checks import layer_index
    from vllm_sparse.decode.step import decode_kind

    kinds: dict[tuple[bool, bool, bool], int] = {}
    for name in layer_names:
        idx = layer_index(name)
        kinds.setdefault(decode_kind(plan.layer(idx).decode_for(shard)), idx)
    return kinds


def decode_row_counts(workspace, q_heads: int, kv_heads: int, head_size: int) -> list[int]:
    """One batch size per split count the decode attention kernel takes for batches up to the workspace's rows."""
    from vllm_sparse.decode.attention import attention_splits

    counts: dict[int, int] = {}
    for rows in range(1, workspace.rows + 1):
        counts.setdefault(attention_splits(rows, q_heads, kv_heads, head_size, workspace.partial_out,
                                           workspace.partial_ml), rows)
    return list(counts.values())


# Token counts Triton compiles apart: 1, a multiple of 16, another. (vLLM's slot mappings start 16-byte aligned;
# the V2 model runner's rows of a [groups, max_num_batched_tokens] buffer would not for an odd token budget.)
SUMMARY_TOKEN_COUNTS = (1, 16, 3)


def warm_up_decode(plan: SparsePlan, layer_names: list[str], kv_cache_spec, vllm_config, device: torch.device,
                   cache_dtype: str = "auto") -> None:
    """Compile this KV cache group's decode kernels now, not in the first long decode step. Each kind of layer
    (`decode_layer_kinds`) runs its decode path once per split count (`decode_row_counts`), on rows shorter than
    the decode `dense_below` (the kernels launch and leave them alone) and block tables of both row-stride classes
    Triton specializes by (a multiple of 16 or not: vLLM's width varies with its version, the page size and kernel
    block splits); Quest's page-summary update runs at each of SUMMARY_TOKEN_COUNTS. CUDA-graph capture launches
    most of these anyway; an eager engine (`enforce_eager`) launched none before its first long decode.
    `cache_dtype`: the group's kv_cache_dtype. (Head counts as `warm_up` takes them.)"""
    from vllm_sparse.decode.step import DecodeLayer, DecodeRows, decode_row_limit, plan_workspace
    from vllm_sparse.decode.summaries import PageSummaries

    spec, model = kv_cache_spec, vllm_config.model_config
    kv_heads, d, page = spec.num_kv_heads, spec.head_size, spec.block_size
    q_heads, shard, kv_dtype = engine_heads(plan, spec, vllm_config, cache_dtype)
    if shard is None:
        return
    t0 = time.perf_counter()
    kv = dummy_cache(2, page, kv_heads, d, kv_dtype, device)
    # The workspace serving uses (its strides are kernel arguments), not one sized for a kind's own budget.
    plan_workspace(vllm_config, plan, q_heads, kv_heads, d, device)
    for (quest, _, _), idx in decode_layer_kinds(plan, layer_names, shard).items():
        summaries = PageSummaries(2, kv_heads, d, page, model.dtype, device) if quest else None
        layer = DecodeLayer(plan.layer(idx).decode_for(shard), summaries, plan.decode_block_tokens,
                            plan.decode_dense_below, decode_row_limit(vllm_config), model.max_model_len, q_heads, d,
                            device, idx, plan.tidal_selector_of(idx))
        for rows in decode_row_counts(layer.workspace, q_heads, kv_heads, d):
            q = torch.randn(rows, q_heads, d, device=device).to(model.dtype)  # (fp8 queries come dequantized)
            qsl = torch.arange(rows + 1, dtype=torch.int32, device=device)
            seq_lens = torch.ones(rows, dtype=torch.int32, device=device)
            for width in (16, 17):  # (rows this short read no page past the first)
                block_table = torch.zeros(rows, width, dtype=torch.int32, device=device)
                layer.attend(q, torch.empty_like(q), kv, block_table, DecodeRows(qsl, seq_lens, host_sparse=rows),
                             d**-0.5)
        if summaries is not None:
            for n in SUMMARY_TOKEN_COUNTS:  # (vLLM's slot mapping is int64)
                summaries.update_kernel(torch.randn(n, kv_heads, d, device=device).to(model.dtype),
                                        torch.arange(n, dtype=torch.int64, device=device))
    torch.cuda.synchronize(device)
    logger.info("vllm-sparse: decode kernels ready (%.1f s; compiled once, then loaded from Triton's cache)",
                time.perf_counter() - t0)


def warm_up(plan: SparsePlan, kv_cache_spec, vllm_config, device: torch.device, cache_dtype: str = "auto") -> None:
    """Compile the selection kernels this engine can launch, now rather than on the first long prompt.
    `cache_dtype`: the KV-cache group's kv_cache_dtype (`checks.group_cache_dtype`)."""
    from vllm_sparse.backend.kernel_choice import selected_kernel

    kernel = selected_kernel(device)
    if kernel == "reference":
        return
    spec = kv_cache_spec
    local_q_heads, shard, kv_dtype = engine_heads(plan, spec, vllm_config, cache_dtype)
    warm_up_selection_kernels(plan, local_q_heads // spec.num_kv_heads, spec.block_size, spec.head_size, kv_dtype,
                              vllm_config.model_config.max_model_len, device, with_tables=kernel in FLASH_VERSIONS)
    if shard is not None:
        run_dummy_sparse_steps(plan, shard, spec.num_kv_heads, spec.head_size, spec.block_size, kv_dtype, device,
                               q_dtype=vllm_config.model_config.dtype)
