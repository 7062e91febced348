"""The engine-start warm-up launches every Triton kernel variant that serving's sparse prefill launches (CPU twin
of `test_warmup_gpu.py::test_no_sparse_kernel_compiles_after_warm_up`, over every shipped plan and the benchmark
plans' distinct estimators, selections and page-list layouts).

Triton compiles a kernel once per key: its constexprs, each integer argument's class (1, a multiple of 16, another;
none where `do_not_specialize`) and width, each pointer's dtype and 16-byte alignment, and num_warps / num_stages.
Here every Triton kernel of the prefill path is a recorder of that key, as Triton's own binder computes it from the
call, and launches nothing (the interpreter would take minutes; on a GPU machine, a kernel on CPU tensors would
fail); the selection kernel's recorder keeps every block, so the steps after it see a plausible mask. The keys of
`warmup.warm_up` (the builder's call at engine start: `warm_up_selection_kernels` and `run_dummy_sparse_steps`)
must include those of serving-like steps through `attend_sparse_chunks`, as `impl.py` calls it, over vLLM's
queries, cache and block table (`serving_steps`).

On CPU the sparse path takes torch references where CUDA launches kernels: `cuda_path_on_cpu.on_cuda_path` makes
its choices as on CUDA (the metrics' density kernel and the `dense_above` count too: their `use_kernel`).
Not covered: vLLM's FA3 (not Triton), tensor-parallel ranks that split a GQA group.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from triton.runtime.jit import KernelInterface

from tests.compile_keys import binder
from tests.cuda_path_on_cpu import KERNELS, ORIGINAL, on_cuda_path, record_into
from tests.test_benchmark_configs import shape_of
from tests.test_config import GEMMA
from vllm_sparse import compat
from vllm_sparse.backend import attend, sparse_path, warmup
from vllm_sparse.backend.batch import SparseChunk, tile_geometry
from vllm_sparse.backend.density_guard import DensityGuard
from vllm_sparse.backend.reserve import packed_lists_itemsize, reserve_estimator_workspace
from vllm_sparse.config.loader import load_config
from vllm_sparse.config.plan import chunk_work, resolve_plan
from vllm_sparse.config.sharding import head_shard
from vllm_sparse.estimators.registry import get_estimator
from vllm_sparse.kernels import flash_compact
from vllm_sparse.kernels.flash_compact import list_packing
from vllm_sparse.kernels.launch import MIN_ROW_BUCKET
from vllm_sparse.kernels.paged import PagedKV
from vllm_sparse.kernels.workspace import WORKSPACE
from vllm_sparse.metrics import paths
from vllm_sparse.metrics.worker import WorkerMetrics

ROOT = Path(__file__).parents[1]
PREFILL_PACKAGES = ("vllm_sparse.kernels", "vllm_sparse.estimators", "vllm_sparse.selection", "vllm_sparse.metrics")
MAX_MODEL_LEN = 131072 + 16384  # (the GPU test's; vLLM's block table then has 9,216 columns of 16-token pages)
SERVING_CHUNK = 16384  # max_num_batched_tokens: the workspace is reserved for a chunk of it at max_model_len
ODD_MAX_MODEL_LEN = MAX_MODEL_LEN + 128  # 9,224 columns: a row stride Triton does not see as a multiple of 16
PAGE = 16
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))
# The benchmark plans whose prefill differs in what the kernels see: estimator (antidiagonal bf16 / int8 at strides
# 8, 16, 32; lowbit; pooled; sink_local; vertical_slash by mass, crossed, columns; MInference's per-head sizes),
# budget (top_p, keep_ratio, top_k, share: group), page lists per KV head or per q head, GQA groups of 1, 2, 4, 7,
# selection blocks of 64 and 128, union tiles of one block or the whole chunk, the query-token floor, a dense tail.
BENCHMARK = ["llama-3-8b-antidiagonal-10", "llama-3-8b-antidiagonal-10-int8", "llama-3-8b-antidiagonal-10-s16-int8",
             "llama-3-8b-pooled-10", "llama-3.1-8b-minference", "llama-3.1-8b-minference-columns",
             "gemma-3-antidiagonal-tau90", "gemma-3-antidiagonal-tau90-group", "gemma-3-antidiagonal-tau90-own-heads",
             "gemma-3-antidiagonal-10-s16-int8-own-heads", "gemma-3-antidiagonal-10-s32-int8-own-heads",
             "gemma-3-lowbit", "gemma-3-lowbit-top-p", "gemma-3-lowbit-13-group",
             "opcheck/gemma-3-lowbit-top-p-95-block-64", "gemma-3-pooled", "gemma-3-sparse-from-2k",
             "gemma-3-vertical_slash", "gemma-3-vertical_slash-minference",
             "qwen2.5-7b-1m-antidiagonal-10-s16-int8", "qwen2.5-7b-1m-antidiagonal-10-s16-int8-own-heads",
             "qwen2.5-7b-minference-columns", "tiny-llama-dense-routed-follow",
             "llama-3-8b-antidiagonal-10-s16-int8-tail"]
PLANS = [p.relative_to(ROOT) for p in SHIPPED] + [Path(f"benchmarks/configs/{n}.yaml") for n in BENCHMARK]


def gap(key, served_at, warmed) -> str:
    """A key serving launched and the warm-up did not: where, and how it differs from the warm-up's nearest."""
    name, spec, options = key
    names = binder(ORIGINAL[name])[1] + [k for k, _ in options]
    values = list(spec) + [v for _, v in options]
    diffs = []
    for other in warmed:
        if other[0] == name and len(other[1]) == len(spec) and [k for k, _ in other[2]] == [k for k, _ in options]:
            theirs = list(other[1]) + [v for _, v in other[2]]
            diffs.append([f"{n} {a} (warm-up: {b})" for n, a, b in zip(names, values, theirs) if a != b])
    nearest = ", ".join(min(diffs, key=len)) if diffs else "no warm-up launch of it"
    return f"{name} at {served_at}: {nearest}"


def shortest_sparse_chunk(plan, context: int) -> int:
    """The fewest query tokens a chunk after `context` needs to go sparse on CUDA (`batch.classify`)."""
    q = max(2, plan.query_token_floor("cuda"))
    while chunk_work(q, context + q) < plan.chunk_work_floor("cuda"):
        q += 1
    return q


def serving_steps(plan) -> list[list[tuple[int, int]]]:
    """(context, query tokens) of each chunk of each step, as the GPU test's: a fresh prompt's first chunk, a chunk
    ending at 1,024 blocks (128K tokens in 128-token blocks: the first row bucket's last row), three chunks of one
    step at odd offsets, a 2,048-token follow-up after them (past that bucket), and the shortest chunk the plan sends
    sparse there on CUDA."""
    long = MIN_ROW_BUCKET * plan.block_size
    steps = [[(0, 8192)], [(long - 8192, 8192)], [(20000, 5000), (40000, 3000), (9000, 4100)], [(long, 2048)],
             [(long, shortest_sparse_chunk(plan, long))]]
    return list(dict.fromkeys(map(tuple, steps)))


def scoring_signature(heads) -> tuple:
    """What of a layer's head plans reaches the kernels: not the sizes an estimator takes per head (MInference's
    line counts, `per_head_fields`), which its heads share one scoring call with."""
    return tuple(None if p is None else (p.estimator, p.budget, p.params.model_copy(
        update={f: None for f in get_estimator(p.estimator).per_head_fields}).model_dump_json()) for p in heads)


def model_of(path: Path):
    """(the model shape the plan is written for, its head dim: Gemma 3's 256, the others' 128)."""
    shape = shape_of({"llama-3.yaml": "llama-3.1-8b"}.get(path.name, path.name))[0]
    return shape, 256 if shape is GEMMA else 128


def warmed_and_served(monkeypatch, tmp_path, path: Path, kernel: str, max_model_len: int, fp8: bool):
    """({key: "warm-up"} of the engine start, {key: the first serving step that launched it})."""
    shape, d = model_of(path)
    plan = resolve_plan(load_config(ROOT / path), shape, str(path), explicit=True)
    q_heads, kv_heads, dtype = shape.num_q_heads, shape.num_kv_heads, torch.bfloat16
    cpu = torch.device("cpu")
    on_cuda_path(monkeypatch, kernel)
    # The estimators' workspace as the engine reserves it while loading the model, before its warm-up: short chunks
    # then place their int8 key columns in its room, long ones allocate them; both paths must launch what the
    # warm-up compiled.
    monkeypatch.setattr(WORKSPACE, "_buffers", {})
    monkeypatch.setattr(WORKSPACE, "_key_tokens", {})
    reserve_estimator_workspace(plan, q_heads, SERVING_CHUNK, max_model_len, cpu, kv_heads, d,
                                packed_lists_itemsize(kernel, dtype))
    WORKSPACE.count_key_columns(max_model_len, cpu)
    warmed, served, where = {}, {}, ["warm-up"]
    record_into(monkeypatch, warmed, where)
    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(max_model_len=max_model_len, dtype=dtype,
                                     get_num_attention_heads=lambda parallel: q_heads), parallel_config=None)
    spec = SimpleNamespace(num_kv_heads=kv_heads, head_size=d, block_size=PAGE, dtype=torch.uint8 if fp8 else dtype)
    warmup.warm_up(plan, spec, vllm_config, cpu, "fp8" if fp8 else "auto")

    record_into(monkeypatch, served, where)
    monkeypatch.setenv(paths.DIR_ENV, str(tmp_path))
    metrics = WorkerMetrics(cpu, shape.num_layers, 0)
    metrics.use_kernel = True  # (as on CUDA)
    guard = DensityGuard(cpu, shape.num_layers, 0.8)  # the `dense_above` count, as CUDA's `auto` runs it
    guard.use_kernel = True
    kv_dtype = compat.fp8_dtype() if fp8 else dtype
    # vLLM's cache ([pages, kv heads, page, 2 x head dim], stored page-major) and block table (a row per request, a
    # column per page of max_model_len): the recorders read no page, so a few pages serve every row.
    cache = torch.randn(8, PAGE, kv_heads, 2 * d, dtype=dtype).to(kv_dtype).permute(0, 2, 1, 3)
    kv = PagedKV.from_flash_cache(cache)
    scale = torch.full((1,), 0.5)
    if fp8:  # per-tensor scales, as vLLM's layers hold them
        kv = PagedKV(kv.key, kv.value, 0.5, 0.5, scale, scale)
    width = -(-max_model_len // PAGE)  # (vLLM 0.26's width; 0.32 rounds it to 128 tokens: the same class here)
    shard = head_shard(q_heads, kv_heads, 0, 1, "test")
    layers = {}  # a layer of each distinct `scoring_signature`: the others launch the same
    for lp in plan.layers:
        if lp.is_sparse:
            layers.setdefault(scoring_signature(lp.heads_for(shard)), lp)
    for step in serving_steps(plan):
        block_table = torch.zeros(len(step), width, dtype=torch.int32)
        chunks, at = [], 0
        for i, (ctx, q_len) in enumerate(step):
            chunks.append(SparseChunk(i, at, at + q_len, ctx))
            at += q_len
        tiles = tile_geometry(chunks, plan.block_size, plan.union_tile, cpu, plan.dense_tail)
        # vLLM's queries: a view of the step's qkv projection, or (fp8 cache) quantized for FA3 into their own tensor.
        qkv = torch.zeros(at, (q_heads + 2 * kv_heads) * d, dtype=dtype)
        q = qkv[:, :q_heads * d].view(at, q_heads, d)
        q = q.to(kv_dtype) if fp8 else q
        out = torch.empty(at, q_heads, d, dtype=dtype)
        for lp in layers.values():
            where[0] = f"layer {lp.index}, chunks (context, tokens) {list(step)}"
            sparse_path.attend_sparse_chunks(
                q, out, kv, block_table, tuple(chunks), list(lp.heads_for(shard)), plan.block_size, d**-0.5,
                plan.union_tile, lp.index, kernel=kernel, dense_below=plan.dense_below, dense_tail=plan.dense_tail,
                metrics=metrics, union_heads=plan.union_heads, tiles=tiles, q_scale=(scale, 0.5) if fp8 else None,
                guard=guard)
    return warmed, served


def check(warmed, served):
    assert served, "the serving steps launched no Triton kernel"
    gaps = [gap(key, at, warmed) for key, at in served.items() if key not in warmed]
    assert not gaps, "launched in serving, not at engine start:\n" + "\n".join(gaps)


@pytest.mark.parametrize("kernel", ["fa3", "fa2", "triton"])
@pytest.mark.parametrize("path", PLANS, ids=[str(p.with_suffix("")).removeprefix("benchmarks/configs/")
                                             for p in PLANS])
def test_prefill_warm_up_launches_what_serving_launches(monkeypatch, tmp_path, path, kernel):
    check(*warmed_and_served(monkeypatch, tmp_path, path, kernel, MAX_MODEL_LEN, fp8=False))


@pytest.mark.parametrize("kernel", ["fa3", "triton"])
@pytest.mark.parametrize("max_model_len, fp8", [(ODD_MAX_MODEL_LEN, False), (MAX_MODEL_LEN, True)],
                         ids=["odd-width", "fp8"])
@pytest.mark.parametrize("path", [Path("configs/llama-3.yaml"),
                                  Path("benchmarks/configs/llama-3.1-8b-minference-columns.yaml")],
                         ids=["llama-3", "minference-columns"])
def test_prefill_warm_up_at_other_engine_settings(monkeypatch, tmp_path, path, kernel, max_model_len, fp8):
    """An engine whose block table's row stride is not a multiple of 16, and one with an fp8 cache."""
    check(*warmed_and_served(monkeypatch, tmp_path, path, kernel, max_model_len, fp8))


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "call-per-list"])
@pytest.mark.parametrize("kernel", ["fa3", "fa2"])
@pytest.mark.parametrize("path", [Path("configs/llama-3.yaml"),
                                  Path("benchmarks/configs/llama-3-8b-antidiagonal-7.5-s16-int8-tail.yaml")],
                         ids=["llama-3", "dense-tail"])
def test_prefill_warm_up_with_lists_packed_into_one_flash_call(monkeypatch, tmp_path, kernel, path, pack):
    """`VLLM_SPARSE_FA_PACK_LISTS` (on by default): serving's short chunks take one FlashAttention call for every
    page list, whose tables the table kernel writes with the same compiled variant (its packing arguments are not
    specialised); under a dense tail too, the packed call's tile starts a view of the step's geometry. Off: a call per
    list, as every chunk took before."""
    packed = []

    def recorded(*args):
        packing = list_packing(*args)
        packed.append(packing is not None)
        return packing

    monkeypatch.setattr(flash_compact, "PACK_LISTS", pack)
    monkeypatch.setattr(attend, "list_packing", recorded)
    check(*warmed_and_served(monkeypatch, tmp_path, path, kernel, MAX_MODEL_LEN, fp8=False))
    # on: short chunks packed (the warm-up's among them), long ones not; off: none
    assert (any(packed) and not all(packed)) if pack else packed and not any(packed)


def test_every_prefill_kernel_is_recorded():
    """Every Triton kernel of the prefill path's packages is one the tests above record."""
    found = set()
    for package in PREFILL_PACKAGES:
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
            module = importlib.import_module(f"{package}.{info.name}")
            found |= {(module.__name__, name) for name, value in vars(module).items()
                      if isinstance(value, KernelInterface) and name.endswith("_kernel")}
    assert found == {(module.__name__, name) for module, name in KERNELS}
