"""The engine-start decode warm-up launches every decode kernel variant serving can launch (CPU twin of
`test_warmup_gpu.py::test_no_decode_kernel_compiles_after_warm_up`).

Triton compiles a kernel once per key (`compile_keys.py`); here the kernels are recorders of it: the warm-up's keys
must include those of decode steps at every batch size up to the row limit, over a block table as wide as
vLLM's, and those of page-summary updates at any token count. A second test runs the warm-up's launches
through the real kernels in Triton's interpreter.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.compile_keys import launch_key
from vllm_sparse.backend import warmup
from vllm_sparse.config.loader import load_config
from vllm_sparse.config.plan import ModelShape, resolve_plan
from vllm_sparse.config.sharding import head_shard
from vllm_sparse.decode import attention, memory, select, step, summaries
from vllm_sparse.decode.memory import decode_workspace
from vllm_sparse.kernels.paged import PagedKV

ROOT = Path(__file__).parents[1]
KERNELS = [(attention, "_decode_split_kernel"), (attention, "_decode_merge_kernel"), (select, "_quest_scores_kernel"),
           (select, "_segment_select_kernel"), (select, "_merge_select_kernel"), (summaries, "_update_kernel")]
ORIGINAL = {name: getattr(module, name) for module, name in KERNELS}


class Recorder:
    def __init__(self, name, seen):
        self.name, self.seen = name, seen

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.seen.add(launch_key(ORIGINAL[self.name], self.name, args, kwargs)[0])


class KernelPathLayer(step.DecodeLayer):
    """A DecodeLayer that takes its CUDA path on CPU tensors (its kernels: recorders, or the real ones in Triton's
    interpreter)."""

    def __init__(self, plans, summ, block_tokens, dense_below, max_rows, max_model_len, q_heads, head_size, device,
                 *args, **kwargs):
        super().__init__(plans, summ, block_tokens, dense_below, max_rows, max_model_len, q_heads, head_size, device,
                         *args, **kwargs)
        kept = max((p.kept_blocks for p in plans if p), default=1)
        self.workspace = decode_workspace(max_rows, q_heads, len(plans), head_size,
                                          step.row_blocks(max_model_len, block_tokens), kept, device)

    def attend(self, *args):
        self._attend_kernels(*args)


def engine(max_model_len, max_num_seqs, capture, fp8, q_heads=32, kv_heads=8, d=128):
    page = 16
    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(max_model_len=max_model_len, dtype=torch.float16,
                                     get_num_attention_heads=lambda parallel: q_heads),
        parallel_config=None, scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
        compilation_config=SimpleNamespace(max_cudagraph_capture_size=capture))
    # (vLLM's spec of an fp8 cache says bytes)
    spec = SimpleNamespace(num_kv_heads=kv_heads, head_size=d, block_size=page,
                           dtype=torch.uint8 if fp8 else torch.float16)
    return vllm_config, spec


@pytest.mark.parametrize("cache_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("config", ["llama-3-8b-decode-quest-4k", "llama-3-8b-decode-tidal-4k"])
@pytest.mark.parametrize("max_model_len", [131072, 131072 + 48], ids=["width-of-16s", "odd-width"])
def test_decode_warm_up_launches_what_serving_launches(monkeypatch, config, max_model_len, cache_dtype):
    """Block tables as vLLM 0.26 makes them (a column per page: both stride classes over the two lengths); an fp8
    cache as the attention layer reads it (fp8 pages with the layer's scales, queries dequantized to the model's
    dtype); the decode workspace made as the engine makes it, once for the plan, before either side runs."""
    fp8 = cache_dtype == "fp8"
    shape = ModelShape("meta-llama/Llama-3.1-8B", ("LlamaForCausalLM",), num_layers=32, num_q_heads=32,
                       num_kv_heads=8)
    plan = resolve_plan(load_config(ROOT / f"benchmarks/configs/{config}.yaml"), shape, "test", explicit=True)
    vllm_config, spec = engine(max_model_len, max_num_seqs=80, capture=0, fp8=fp8)
    monkeypatch.setattr(memory, "_workspace", {})  # (this engine's, as reserved at load)
    step.plan_workspace(vllm_config, plan, 32, spec.num_kv_heads, spec.head_size, torch.device("cpu"))
    warmed, served = set(), set()
    monkeypatch.setattr(step, "DecodeLayer", KernelPathLayer)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    for module, name in KERNELS:
        monkeypatch.setattr(module, name, Recorder(name, warmed))
    names = [f"model.layers.{i}.self_attn.attn" for i in range(shape.num_layers)]
    cpu = torch.device("cpu")
    warmup.warm_up_decode(plan, names, spec, vllm_config, cpu, cache_dtype)
    assert any(k[0] == "_decode_split_kernel" for k in warmed)

    for module, name in KERNELS:
        monkeypatch.setattr(module, name, Recorder(name, served))
    shard = head_shard(32, 8, 0, 1, "llama")
    kv_heads, d, page, dtype = spec.num_kv_heads, spec.head_size, spec.block_size, torch.float16
    kv = PagedKV.from_flash_cache(torch.randn(2, 4, page, kv_heads, d).to(torch.float8_e4m3fn if fp8 else dtype))
    if fp8:
        scale = torch.full((), 0.5)
        kv = PagedKV(kv.key, kv.value, 0.5, 0.5, scale, scale)
    width = -(-max_model_len // page)  # vLLM 0.26's block table: a row per request, a column per page
    summ = summaries.PageSummaries(64, kv_heads, d, page, dtype, cpu)  # (in the model's dtype: keys before fp8)
    for i in range(len(names)):  # every layer, as serving runs them
        lp = plan.layer(i)
        layer = KernelPathLayer(lp.decode_for(shard), summ if lp.needs_summaries else None, plan.decode_block_tokens,
                                plan.decode_dense_below, 80, max_model_len, 32, d, cpu, i, plan.tidal_selector_of(i))
        for rows in range(1, 81):
            q = torch.randn(rows, 32, d, dtype=dtype)
            qsl = torch.arange(rows + 1, dtype=torch.int32)
            seq_lens = torch.full((rows,), max_model_len - 5, dtype=torch.int32)
            block_table = torch.zeros(rows, width, dtype=torch.int32)
            layer.attend(q, torch.empty_like(q), kv, block_table[:rows], step.DecodeRows(qsl, seq_lens, rows),
                         d**-0.5)
        if layer.summaries is not None:
            for n in (1, 2, 7, 16, 17, 32, 100, 4096):  # decode batches and prefill chunks
                summ.update_kernel(torch.randn(n, kv_heads, d, dtype=dtype), torch.arange(n) % 1024)
    assert served, "the serving steps launched no decode kernel"
    assert served <= warmed, f"launched in serving, not at start: {sorted(served - warmed)}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU twin; on a GPU test_warmup_gpu.py runs them compiled")
@pytest.mark.parametrize("cache_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("config", ["llama-3-8b-decode-quest-4k", "llama-3-8b-decode-tidal-4k"])
def test_decode_warm_up_runs_its_kernels(monkeypatch, config, cache_dtype):
    """The warm-up's own launches (arguments, dummy cache, workspace slices, fp8 scales) execute: the real decode
    kernels in Triton's interpreter, at a small head geometry (the compile-key test above replaces them)."""
    q_heads, kv_heads, d = 8, 2, 32
    shape = ModelShape("meta-llama/Llama-3.1-8B", ("LlamaForCausalLM",), num_layers=32, num_q_heads=q_heads,
                       num_kv_heads=kv_heads)
    plan = resolve_plan(load_config(ROOT / f"benchmarks/configs/{config}.yaml"), shape, "test", explicit=True)
    vllm_config, spec = engine(32768, max_num_seqs=3, capture=0, fp8=cache_dtype == "fp8", q_heads=q_heads,
                               kv_heads=kv_heads, d=d)
    monkeypatch.setattr(memory, "_workspace", {})
    monkeypatch.setattr(step, "DecodeLayer", KernelPathLayer)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    launched = set()
    for module, name in KERNELS:  # (count the launches, then run the kernel)
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, Counted(kernel, name, launched))
    names = [f"model.layers.{i}.self_attn.attn" for i in range(shape.num_layers)]
    warmup.warm_up_decode(plan, names, spec, vllm_config, torch.device("cpu"), cache_dtype)
    quest = "quest" in config
    assert {"_decode_split_kernel", "_decode_merge_kernel", "_segment_select_kernel",
            "_merge_select_kernel"} <= launched
    assert ({"_quest_scores_kernel", "_update_kernel"} <= launched) == quest


class Counted:
    def __init__(self, kernel, name, launched):
        self.kernel, self.name, self.launched = kernel, name, launched

    def __getitem__(self, grid):
        self.launched.add(self.name)
        return self.kernel[grid]


def test_decode_row_counts_cover_every_split_count(monkeypatch):
    monkeypatch.setattr(memory, "_workspace", {})
    ws = decode_workspace(300, 32, 8, 128, 1024, 256, torch.device("cpu"))
    counts = warmup.decode_row_counts(ws, 32, 8, 128)
    splits = {attention.attention_splits(r, 32, 8, 128, ws.partial_out, ws.partial_ml) for r in range(1, 301)}
    assert len(counts) == len(splits) > 1
    assert {attention.attention_splits(r, 32, 8, 128, ws.partial_out, ws.partial_ml) for r in counts} == splits


@pytest.mark.parametrize("max_rows, kv_heads", [(1, 8), (16, 4), (300, 8), (1024, 4), (1024, 1)])
def test_the_split_workspace_holds_every_batchs_splits_and_no_more(max_rows, kv_heads):
    """Every batch up to the row limit gets the splits `split_count` gives it without a room limit, and the
    workspace holds no slot that no batch takes (16 a row at 1024 rows held 16x what any batch used)."""
    q_heads, head_size = 4 * kv_heads, 64
    slots = attention.split_slots(max_rows, kv_heads)
    partial_out, partial_ml = torch.empty(slots * q_heads, head_size), torch.empty(slots * q_heads, 2)
    want = [attention.split_count(r, kv_heads, 2**30) for r in range(1, max_rows + 1)]
    assert [attention.attention_splits(r, q_heads, kv_heads, head_size, partial_out, partial_ml)
            for r in range(1, max_rows + 1)] == want
    assert max(r * s for r, s in enumerate(want, 1)) == slots


def test_a_workspace_kept_for_another_engine_has_room_for_its_own_row_limit(monkeypatch):
    """A process's second engine with more q heads a KV head and fewer rows does not reuse the first engine's
    workspace unless every row count up to that workspace's own (warm-up and the step guard go by it) has room."""
    monkeypatch.setattr(memory, "_workspace", {})
    first = decode_workspace(1024, 28, 4, 64, 1024, 64, torch.device("cpu"))
    second = decode_workspace(16, 32, 4, 64, 1024, 64, torch.device("cpu"))
    assert second is not first
    for r in range(1, second.rows + 1):  # (the first workspace would run out of room from 897 rows at 32 q heads)
        assert attention.attention_splits(r, 32, 4, 64, second.partial_out, second.partial_ml) >= 1
    assert decode_workspace(8, 28, 4, 64, 1024, 64, torch.device("cpu")) is second  # (a fitting one is reused)
