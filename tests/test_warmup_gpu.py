"""After the engine-start warm-up, the steps the builder shapes compile no Triton kernel (GPU only).

A compile mid-request costs 0.2-0.5 s (H200, 2026-12-03: the first 32K prompt took 1.37 s against 0.87 s
after, and the first 2,048-token follow-up on a cached 128K document 0.62 s against 0.18 s, both waiting
for `_tile_tables_kernel` variants the warm-up had not launched: its sequence lengths came as unaligned
slices of the step's geometry tensor). The CPU twin of the cause is in `test_batch.py` (every geometry
array 16-byte aligned) and `test_selection_kernels.py` (the table kernel on unaligned slices); the CPU twin of the
prefill check, by compile keys over every shipped plan and the benchmark plans' estimators with both attention
kernels, is `test_prefill_warmup.py`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton compiles kernels only on a GPU")


@pytest.mark.parametrize("kernel", ["fa3", "fa2", "triton"])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
def test_no_sparse_kernel_compiles_after_warm_up(tmp_path, monkeypatch, kv_dtype, kernel):
    """An fp8 cache (issue 29) too: fp8 pages and queries, as vLLM gives them to the sparse path. The Triton attention
    kernel (GPUs without FA3) as well as FlashAttention's tables (FA3, and the opt-in FA2). Triton's in-memory caches
    of the plugin's kernels are emptied first, so what earlier tests in the process compiled cannot stand in for the
    warm-up."""
    from triton import knobs

    from tests.compile_keys import forget_compiled
    from vllm_sparse.backend import warmup
    from vllm_sparse.backend.batch import SparseChunk, tile_geometry
    from vllm_sparse.backend.sparse_path import attend_sparse_chunks
    from vllm_sparse.config.loader import load_config
    from vllm_sparse.config.plan import ModelShape, resolve_plan
    from vllm_sparse.config.sharding import head_shard
    from vllm_sparse.kernels.paged import PagedKV
    from vllm_sparse.metrics import paths
    from vllm_sparse.metrics.worker import WorkerMetrics

    dev, dtype, page, d, q_heads, kv_heads = torch.device("cuda"), torch.bfloat16, 16, 128, 32, 8
    shape = ModelShape("meta-llama/Llama-3.1-8B", ("LlamaForCausalLM",), num_layers=2, num_q_heads=q_heads,
                       num_kv_heads=kv_heads)
    root = Path(__file__).parents[1]
    plan = resolve_plan(load_config(root / "benchmarks/configs/llama-3-8b-antidiagonal-10-s16-int8.yaml"), shape,
                        "test", explicit=True)
    context = 131072
    max_model_len = context + 16384
    fp8 = kv_dtype != dtype
    from vllm_sparse.backend.kernel_choice import flash_attention_available

    if kernel.startswith("fa") and not flash_attention_available(dev, int(kernel[2])):
        pytest.skip(f"vLLM's FlashAttention runs no {kernel} on this GPU")
    if kernel == "fa2" and fp8:
        pytest.skip("FA2 reads no fp8 cache (the engine refuses the pair at start)")
    monkeypatch.setenv("VLLM_SPARSE_KERNEL", kernel)
    forget_compiled(*(f"vllm_sparse.{m}" for m in ("kernels.sparse_attention", "kernels.column_attention",
                      "estimators.row_scores", "estimators.block_means", "selection.select_kernel",
                      "selection.tile_tables", "metrics.density_kernel")))
    warmup._compile.cache_clear()
    warmup.warm_up_selection_kernels(plan, q_heads // kv_heads, page, d, kv_dtype, max_model_len, dev,
                                     with_tables=kernel != "triton")
    warmup.run_dummy_sparse_steps(plan, head_shard(q_heads, kv_heads, 0, 1, "llama"), kv_heads, d, page, kv_dtype,
                                  dev, q_dtype=dtype)

    monkeypatch.setenv(paths.DIR_ENV, str(tmp_path))
    metrics = WorkerMetrics(dev, 2, 0)  # the kept-density record, as serving has it
    compiled = []

    def hook(*, fn=None, **_):
        if str(getattr(fn, "module", "")).startswith("vllm_sparse"):
            compiled.append(fn.name)
        return None

    before = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    try:
        pages = (max_model_len + 2 * 16384) // page
        cache = torch.randn(2, pages, page, kv_heads, d, device=dev, dtype=dtype).to(kv_dtype)
        kv = PagedKV.from_flash_cache(cache)
        scale = torch.full((1,), 0.5, device=dev)
        if fp8:  # per-tensor scales, as vLLM's layers hold them
            kv = PagedKV(kv.key, kv.value, 0.5, 0.5, scale, scale)
        heads = plan.layer(0).heads_for(head_shard(q_heads, kv_heads, 0, 1, "llama"))
        # Steps as the builder makes them: a fresh prompt's first chunk, a chunk after 112K, several chunks of
        # one step at odd offsets, a short follow-up after 128K (past the 1,024-block row bucket).
        steps = [[(0, 16384)], [(114688, 16384)], [(20000, 5000), (40000, 3000), (9000, 4100)], [(context, 2048)]]
        for step in steps:
            n_tok = sum(q for _, q in step)
            block_table = torch.stack([torch.randperm(pages, device=dev, dtype=torch.int32) for _ in step])
            chunks, at = [], 0
            for i, (ctx, q_len) in enumerate(step):
                chunks.append(SparseChunk(i, at, at + q_len, ctx))
                at += q_len
            q = torch.randn(n_tok, q_heads, d, device=dev, dtype=dtype)
            out = torch.full_like(q, float("nan"))
            attend_sparse_chunks(q.to(kv_dtype) if fp8 else q, out, kv, block_table, tuple(chunks), list(heads),
                                 plan.block_size, d**-0.5, plan.union_tile, union_heads=plan.union_heads,
                                 metrics=metrics, layer=1,
                                 tiles=tile_geometry(chunks, plan.block_size, plan.union_tile, dev),
                                 q_scale=(scale, 0.5) if fp8 else None)
            torch.cuda.synchronize()
            assert out.isfinite().all(), step
    finally:
        knobs.runtime.jit_cache_hook = before
    assert compiled == [], f"compiled after the warm-up: {compiled}"


@pytest.mark.parametrize("config", ["llama-3-8b-decode-quest-4k", "llama-3-8b-decode-tidal-4k"])
def test_no_decode_kernel_compiles_after_warm_up(monkeypatch, config):
    """Decode steps after `warm_up_decode` (the builder's, at engine start) compile nothing: batches of 1 to 80
    rows at 16K-32K contexts over vLLM 0.26's block table, every layer kind of the plan, and page-summary
    updates of decode batches and prefill chunks. Its CPU twin (`test_decode_warmup.py`) checks the same by
    compile keys, for every batch size up to the row limit."""
    from types import SimpleNamespace

    from triton import knobs

    from vllm_sparse.backend import warmup
    from vllm_sparse.config.loader import load_config
    from vllm_sparse.config.plan import ModelShape, resolve_plan
    from vllm_sparse.config.sharding import head_shard
    from vllm_sparse.decode import step
    from vllm_sparse.decode.summaries import PageSummaries
    from vllm_sparse.kernels.paged import PagedKV

    dev, dtype, page, d, q_heads, kv_heads, rows_limit = torch.device("cuda"), torch.bfloat16, 16, 128, 32, 8, 80
    max_model_len = 32768 + 48  # (a block table width that is not a multiple of 16)
    shape = ModelShape("meta-llama/Llama-3.1-8B", ("LlamaForCausalLM",), num_layers=32, num_q_heads=q_heads,
                       num_kv_heads=kv_heads)
    plan = resolve_plan(load_config(Path(__file__).parents[1] / f"benchmarks/configs/{config}.yaml"), shape, "test",
                        explicit=True)
    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(max_model_len=max_model_len, dtype=dtype,
                                     get_num_attention_heads=lambda parallel: q_heads),
        parallel_config=None, scheduler_config=SimpleNamespace(max_num_seqs=rows_limit),
        compilation_config=SimpleNamespace(max_cudagraph_capture_size=0))
    spec = SimpleNamespace(num_kv_heads=kv_heads, head_size=d, block_size=page, dtype=dtype)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(shape.num_layers)]
    from tests.compile_keys import forget_compiled
    from vllm_sparse.decode import memory

    # Forget what earlier tests in this process compiled or loaded (Triton's in-memory kernel caches), and any
    # decode workspace they made: the warm-up alone must bring every variant in, over this engine's workspace.
    forget_compiled("vllm_sparse.decode.attention", "vllm_sparse.decode.select", "vllm_sparse.decode.summaries")
    monkeypatch.setattr(memory, "_workspace", {})
    step.plan_workspace(vllm_config, plan, q_heads, kv_heads, d, dev)  # (made at load, `reserve_decode`)
    warmup.warm_up_decode(plan, names, spec, vllm_config, dev)

    compiled = []

    def hook(*, fn=None, **_):
        if str(getattr(fn, "module", "")).startswith("vllm_sparse"):
            compiled.append(fn.name)
        return None

    shard = head_shard(q_heads, kv_heads, 0, 1, "llama")
    pages = 4096
    cache = torch.randn(2, pages, page, kv_heads, d, device=dev, dtype=dtype)
    kv = PagedKV.from_flash_cache(cache)
    summ = PageSummaries(pages, kv_heads, d, page, dtype, dev)
    summ.update(cache[0].flatten(0, 1), torch.arange(pages * page, device=dev))
    width = -(-max_model_len // page)  # vLLM 0.26's block table width
    table = torch.randint(0, pages, (rows_limit, width), dtype=torch.int32, device=dev)
    before = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    try:
        layers = [step.DecodeLayer(plan.layer(i).decode_for(shard), summ if plan.layer(i).needs_summaries else None,
                                   plan.decode_block_tokens, plan.decode_dense_below, rows_limit, max_model_len,
                                   q_heads, d, dev, i, plan.tidal_selector_of(i)) for i in range(shape.num_layers)]
        for rows in (1, 2, 3, 5, 8, 13, 21, 40, 65, 80):  # (one split per row from 65 rows at 8 KV heads)
            qsl = torch.arange(rows + 1, dtype=torch.int32, device=dev)
            seq_lens = torch.randint(16384, 32768, (rows,), dtype=torch.int32, device=dev)
            decode_rows = step.DecodeRows(qsl, seq_lens, rows)
            outs = []
            for layer in layers:
                q = torch.randn(rows, q_heads, d, device=dev, dtype=dtype)
                outs.append(torch.full_like(q, float("nan")))
                layer.attend(q, outs[-1], kv, table[:rows], decode_rows, d**-0.5)
            torch.cuda.synchronize()
            assert all(bool(out.isfinite().all()) for out in outs), rows
        if plan.needs_summaries:
            for n in (1, 7, 16, 100, 16384):
                summ.update(torch.randn(n, kv_heads, d, device=dev, dtype=dtype),
                            torch.randint(0, pages * page, (n,), device=dev))
            torch.cuda.synchronize()
    finally:
        knobs.runtime.jit_cache_hook = before
    assert compiled == [], f"compiled after the decode warm-up: {compiled}"
