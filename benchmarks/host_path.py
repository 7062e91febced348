"""The host time of a sparse chunk-layer: the Python and launch dispatch of the CUDA path, measured on CPU.

A follow-up turn that sends one chunk sparse (a few thousand tokens after a long cached prompt) is host-bound on
the GPU: its first `step()` returns after every layer's launches are queued, and a sparse step queued ~80-100 ms
more host work than a dense one (RESULTS.md, H100, 2026-12-05). This script runs the CUDA path's host code,
`attend_sparse_chunks` as `impl.py` calls it for every sparse layer of a plan, at the serving shapes, with every
Triton kernel a recorder that runs Triton's own argument binder (the first part of a launch's dispatch) and
launches nothing, vLLM's FlashAttention wrapper over a counted stand-in for its op, and every tensor on the meta
device, so that a torch op costs its dispatch and no compute, as a launch does on a GPU host
(`tests/cuda_path_on_cpu.py`). It prints per chunk-layer: host microseconds (median and min over the repeats),
Triton launches, FlashAttention calls and torch operations (aten calls, from a separate counted pass), and writes
JSON. `--pack-lists` compares one FlashAttention call for every page list (`VLLM_SPARSE_FA_PACK_LISTS`).

What it leaves out: the GPU driver's part of each launch, Triton's dispatch after the binder (its kernel cache
lookup and launcher), CUDA's caching allocator. And the meta device runs some ops through torch's Python reference
implementations (elementwise arithmetic, `empty_like`: tens of microseconds each, a few on CUDA), so plans heavy in
torch arithmetic (pooled keys, MInference's lines) look slower here than they are. So its microseconds are not the
GPU machine's; its counts are, and two trees or settings compared on one CPU show what a change saves.
`--device cuda` runs the real kernels on a GPU instead and times the host's queueing and the GPU per chunk-layer,
sparse and dense FA3 over the same chunk.

    python benchmarks/host_path.py [--plan benchmarks/configs/llama-3-8b-antidiagonal-10-s16-int8.yaml]
        [--kernel fa3] [--cases 131072+2048,131072+8192,32768+8192,49152+16384] [--repeats 20]
        [--pack-lists 0|1|both] [--device cpu|cuda] [--out host_path.json]    # (--plan configs/llama-3.yaml: shipped)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pytest  # noqa: E402  (its MonkeyPatch: the recorders and CUDA choices are undone after each case)
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from tests.cuda_path_on_cpu import on_cuda_path, record_into  # noqa: E402
from tests.test_benchmark_configs import shape_of  # noqa: E402
from vllm_sparse.backend import attend, sparse_path  # noqa: E402
from vllm_sparse.backend.batch import SparseChunk, tile_geometry  # noqa: E402
from vllm_sparse.backend.density_guard import DensityGuard  # noqa: E402
from vllm_sparse.backend.reserve import packed_lists_itemsize, reserve_estimator_workspace  # noqa: E402
from vllm_sparse.config.loader import load_config  # noqa: E402
from vllm_sparse.config.plan import resolve_plan  # noqa: E402
from vllm_sparse.config.sharding import head_shard  # noqa: E402
from vllm_sparse.kernels import flash_compact  # noqa: E402
from vllm_sparse.kernels.paged import PagedKV  # noqa: E402
from vllm_sparse.kernels.workspace import WORKSPACE  # noqa: E402
from vllm_sparse.metrics import paths  # noqa: E402
from vllm_sparse.metrics.worker import WorkerMetrics  # noqa: E402

PAGE = 16
DEFAULT_PLAN = "benchmarks/configs/llama-3-8b-antidiagonal-10-s16-int8.yaml"
DEFAULT_CASES = "131072+2048,131072+8192,32768+8192,49152+16384"
H100_SMS = 132  # (FA3's split choice reads the GPU's SM count; CPU mode takes an H100's)
# vLLM's FA3 op as a CPU stand-in for the recorded mode: the same arguments through torch's dispatcher (what the
# real op's call costs the host before CUDA), computing nothing.
FA3_SCHEMA = ("fwd(Tensor q, Tensor k, Tensor v, Tensor? k_new, Tensor? v_new, Tensor? q_v, Tensor? out, "
              "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? cu_seqlens_k_new, Tensor? seqused_q, "
              "Tensor? seqused_k, int? max_seqlen_q, int? max_seqlen_k, Tensor? page_table, Tensor? kv_batch_idx, "
              "Tensor? leftpad_k, Tensor? rotary_cos, Tensor? rotary_sin, Tensor? seqlens_rotary, Tensor? q_descale, "
              "Tensor? k_descale, Tensor? v_descale, float? softmax_scale, bool is_causal, int window_size_left, "
              "int window_size_right, float softcap, bool is_rotary_interleaved, Tensor? scheduler_metadata, "
              "int num_splits, bool? pack_gqa, int sm_margin, Tensor? s_aux, int cp_world_size, int cp_rank, "
              "Tensor? cp_tot_seqused_k) -> (Tensor, Tensor, Tensor, Tensor)")
# The stand-in's registration and call count live in one process-wide namespace: torch's dispatcher is process-wide,
# and this script may be loaded as a module more than once (tests load it afresh), so a second load finds the first
# load's kernel registered and counts through it (registering again is an error).
_FA3 = sys.modules.setdefault("vllm_sparse_host_path_fa3_stand_in", SimpleNamespace(calls=[0], library=[]))
_FA3_CALLS = _FA3.calls


def stand_in_fa3(mp) -> None:
    """vLLM's FlashAttention interface over a CPU `torch.ops._vllm_fa3_C.fwd` that counts its calls and computes
    nothing (registered once). The installed vLLM's `vllm.vllm_flash_attn` refuses to import without its CUDA
    libraries: its interface module is loaded on its own and stands in for the package while `mp` lasts."""
    path = Path(importlib.util.find_spec("vllm").submodule_search_locations[0]) / "vllm_flash_attn"
    spec = importlib.util.spec_from_file_location("host_path_fa_interface", path / "flash_attn_interface.py")
    interface = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(interface)
    mp.setitem(sys.modules, "vllm.vllm_flash_attn",
               SimpleNamespace(flash_attn_varlen_func=interface.flash_attn_varlen_func))
    if _FA3.library:
        return
    # (vLLM's CUDA library defines the op where it is installed: a CPU kernel is added to it)
    defined = hasattr(torch.ops._vllm_fa3_C, "fwd")
    lib = torch.library.Library("_vllm_fa3_C", "IMPL" if defined else "DEF")
    if not defined:
        lib.define(FA3_SCHEMA)

    def fwd(q, *args):
        _FA3_CALLS[0] += 1
        empty = q.new_empty(0)
        return empty, empty, empty, empty

    lib.impl("fwd", fwd, "CPU")
    lib.impl("fwd", fwd, "Meta")
    _FA3.library.append(lib)


class OpCounter(TorchDispatchMode):
    """Counts the aten operations run under it, in all and by name."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.by_name: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = str(func.overloadpacket)
        self.by_name[name] = self.by_name.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


SHIPPED_SHAPES = {"llama-3.yaml": "llama-3.1-8b", "gemma-3.yaml": "gemma-3"}  # configs/: the shape each is for


def plan_shape(path: Path):
    """(the model shape a shipped or benchmark plan is written for, its head dim: Gemma 3's 256, the others' 128)."""
    name = SHIPPED_SHAPES.get(path.name, path.name)
    return shape_of(name)[0], 256 if name.startswith("gemma") else 128


def parse_cases(text: str) -> list[tuple[int, int]]:
    """"131072+2048,..." -> [(cached context, new tokens), ...]"""
    out = []
    for part in text.split(","):
        ctx, _, q = part.partition("+")
        out.append((int(ctx), int(q)))
    return out


def serving_inputs(shape, d: int, context: int, q_len: int, max_model_len: int, device: torch.device):
    """(queries as a view of the qkv projection, output, vLLM's cache of one layer, its block table): without data
    on the meta device (the recorders read none); on CUDA every page of the request, in order."""
    dtype, q_heads, kv_heads = torch.bfloat16, shape.num_q_heads, shape.num_kv_heads
    pages = -(-(context + q_len) // PAGE)
    cache = torch.randn(pages, PAGE, kv_heads, 2 * d, dtype=dtype, device=device).permute(0, 2, 1, 3)
    block_table = torch.zeros(1, -(-max_model_len // PAGE), dtype=torch.int32, device=device)
    if device.type == "cuda":
        block_table[0, :pages] = torch.arange(pages, dtype=torch.int32, device=device)
    qkv = torch.randn(q_len, (q_heads + 2 * kv_heads) * d, dtype=dtype, device=device)
    q = qkv[:, :q_heads * d].view(q_len, q_heads, d)
    return q, torch.empty(q_len, q_heads, d, dtype=dtype, device=device), cache, block_table


def measure(plan, shape, d: int, kernel: str, context: int, q_len: int, max_model_len: int, chunk_tokens: int,
            repeats: int, metrics_dir: str, device: torch.device, pack_lists: bool = False) -> dict:
    """One chunk of q_len tokens after `context` cached ones through every sparse layer of the plan, `repeats`
    times: host time and counts per chunk-layer (CUDA: the real kernels, and dense FA3 over the same chunk)."""
    launches: dict[str, int] = {}
    # Recorded: every tensor on the meta device, so torch ops cost their dispatch and no compute (on a GPU host a
    # copy of the chunk's queries is a launch, not a CPU memcpy).
    where = torch.device("meta") if device.type == "cpu" else device
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flash_compact, "PACK_LISTS", pack_lists)  # (VLLM_SPARSE_FA_PACK_LISTS)
        if device.type == "cpu":
            on_cuda_path(mp, kernel, flash_compact.sparse_attention_flash, flash_compact.dense_flash)
            record_into(mp, {}, ["serving"], launches)
            mp.setattr(flash_compact, "num_sms", lambda device: H100_SMS)
            stand_in_fa3(mp)
        # The estimators' workspace as the engine reserves it at load (`impl.py`).
        mp.setattr(WORKSPACE, "_buffers", {})
        mp.setattr(WORKSPACE, "_key_tokens", {})
        reserve_estimator_workspace(plan, shape.num_q_heads, chunk_tokens, max_model_len, where, shape.num_kv_heads, d,
                                    packed_lists_itemsize(kernel, torch.bfloat16))  # (as the engine)
        WORKSPACE.count_key_columns(max_model_len, where)
        mp.setenv(paths.DIR_ENV, metrics_dir)
        metrics = WorkerMetrics(where, shape.num_layers, 0)
        metrics.use_kernel = True  # (as on CUDA)
        # Its reader thread copies the counters to the host: meta tensors cannot be, and on CUDA its stream sync
        # would show in the sync count of whatever step is running.
        metrics._read_device = lambda: metrics._last_acc
        # The plan's `dense_above` count, as CUDA's `auto` runs it (layers counted, none routed dense here).
        above = plan.dense_above_on("cuda")
        guard = DensityGuard(where, shape.num_layers, above) if above < 1 else None
        if guard is not None:
            guard.use_kernel = True
        packed = []  # per chunk-layer: whether its page lists took one FlashAttention call

        def counted_packing(*args):
            packing = flash_compact.list_packing(*args)
            packed.append(packing is not None)
            return packing

        mp.setattr(attend, "list_packing", counted_packing)
        q, out, cache, block_table = serving_inputs(shape, d, context, q_len, max_model_len, where)
        kv = PagedKV.from_flash_cache(cache)
        chunks = (SparseChunk(0, 0, q_len, context),)
        shard = head_shard(shape.num_q_heads, shape.num_kv_heads, 0, 1, "host_path")
        layers = [(lp.index, list(lp.heads_for(shard))) for lp in plan.layers if lp.is_sparse]

        def step():
            # (the builder's once per step; the layers' loop is what the forward pays per layer)
            tiles = tile_geometry(list(chunks), plan.block_size, plan.union_tile, where, plan.dense_tail)
            for index, heads in layers:
                sparse_path.attend_sparse_chunks(
                    q, out, kv, block_table, chunks, heads, plan.block_size, d ** -0.5, plan.union_tile, index,
                    kernel=kernel, dense_below=plan.dense_below, dense_tail=plan.dense_tail, metrics=metrics,
                    union_heads=plan.union_heads,
                    tiles=tiles, guard=guard)

        row = {"context": context, "new_tokens": q_len, "layers": len(layers), "pack_lists": pack_lists}
        step()  # (first call: lazy imports, caches; CUDA: compiles)
        row["packed_share"] = sum(packed) / max(len(packed), 1)  # (FA paths only; 0 where none packed)
        if device.type == "cuda":
            row.update(cuda_times(step, len(layers), repeats, lambda: dense_step(q, out, cache, block_table, context,
                                                                                  len(layers))))
            return row
        launches.clear()
        _FA3_CALLS[0] = 0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) / len(layers))
        per_layer = len(layers) * repeats
        counted = {name: n / per_layer for name, n in sorted(launches.items())}
        flash_per_layer = _FA3_CALLS[0] / per_layer
        counter = OpCounter()
        with counter:
            step()
    row.update({"host_us": {"median": statistics.median(times) * 1e6, "min": min(times) * 1e6},
                "triton_launches": sum(counted.values()), "launches_by_kernel": counted,
                "flash_calls": flash_per_layer, "torch_ops": counter.ops / len(layers),
                "torch_ops_by_name": {k: n / len(layers)
                                      for k, n in sorted(counter.by_name.items(), key=lambda kv: -kv[1])}})
    return row


def dense_step(q, out, cache, block_table, context: int, layers: int):
    """vLLM's dense prefill of the chunk, per layer: one FA3 call over the request's pages."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    kv = PagedKV.from_flash_cache(cache)
    k_cache, v_cache = kv.key.transpose(1, 2), kv.value.transpose(1, 2)  # [pages, page_size, kv_heads, D]
    cu = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
    seq = torch.tensor([context + q.shape[0]], dtype=torch.int32, device=q.device)

    def step():
        for _ in range(layers):
            flash_attn_varlen_func(q, k_cache, v_cache, max_seqlen_q=q.shape[0], cu_seqlens_q=cu,
                                   max_seqlen_k=context + q.shape[0], seqused_k=seq, softmax_scale=q.shape[-1] ** -0.5,
                                   causal=True, block_table=block_table, out=out, fa_version=3)
    return step


def gpu_sleep_cycles_per_ms() -> float:
    """`torch.cuda._sleep`'s cycles per millisecond on this GPU (measured once)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def cuda_times(sparse, layers: int, repeats: int, make_dense) -> dict:
    """Per chunk-layer, sparse and dense, medians of `repeats`: the host's time to queue a step (nothing waits: a
    host-bound step's GPU idles meanwhile), the host syncs a step made (CUDA's sync debug mode warns on each: none
    is expected), and the step's GPU time with the whole step queued first (the GPU held by `torch.cuda._sleep`
    for twice the host's time, so the events time the GPU's work, not the host's pace)."""
    dense = make_dense()
    dense()
    cycles_per_ms = gpu_sleep_cycles_per_ms()
    out = {}
    for name, step in (("sparse", sparse), ("dense", dense)):
        host, gpu = [], []
        with warnings.catch_warnings(record=True) as syncs:
            warnings.simplefilter("always")
            for _ in range(repeats):
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    t0 = time.perf_counter()
                    step()
                    host.append((time.perf_counter() - t0) / layers)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        sync_count = sum("synchroniz" in str(w.message) for w in syncs)
        for _ in range(repeats):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(int(2 * max(host) * layers * 1e3 * cycles_per_ms) + 1)
            start.record()
            step()
            end.record()
            end.synchronize()
            gpu.append(start.elapsed_time(end) / 1e3 / layers)
        out[name] = {"host_us": statistics.median(host) * 1e6, "gpu_us": statistics.median(gpu) * 1e6,
                     "syncs_per_step": sync_count / repeats}
    return out


def packing(row: dict) -> str:
    """The row's setting and the share of its chunk-layers that packed: "on 1.00", "off 0.00"."""
    return f"{'on' if row['pack_lists'] else 'off'} {row['packed_share']:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default=DEFAULT_PLAN)
    ap.add_argument("--kernel", default="fa3", choices=["fa3", "fa2", "triton"])
    ap.add_argument("--cases", default=DEFAULT_CASES, help="cached context + new tokens, comma-separated")
    ap.add_argument("--chunk", type=int, default=16384, help="max_num_batched_tokens (the workspace's chunk)")
    ap.add_argument("--max-model-len", type=int, default=131072 + 8192 + 256, help="(workload.py's engines')")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--pack-lists", default="1", choices=["0", "1", "both"],
                    help="VLLM_SPARSE_FA_PACK_LISTS: one FlashAttention call for every page list of a short chunk")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cpu: kernels recorded, not run; cuda: the real kernels, and dense FA3 beside them")
    ap.add_argument("--out", default="host_path.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    plan_path = REPO / args.plan
    shape, head_dim = plan_shape(plan_path)
    plan = resolve_plan(load_config(plan_path), shape, str(plan_path), explicit=True)
    rows = []
    with tempfile.TemporaryDirectory() as metrics_dir:
        for context, q_len in parse_cases(args.cases):
            for pack in {"0": [False], "1": [True], "both": [False, True]}[args.pack_lists]:
                rows.append(measure(plan, shape, head_dim, args.kernel, context, q_len, args.max_model_len,
                                    args.chunk, args.repeats, metrics_dir, device, pack))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, kernels recorded"
    print(f"plan {args.plan} on {shape.name}, kernel {args.kernel}, {where}, torch {torch.__version__}; "
          f"per chunk-layer:")
    if device.type == "cuda":
        print(f"{'chunk':>16} | {'packing':>8} | {'sparse host us':>14} | {'sparse GPU us':>13} | "
              f"{'dense host us':>13} | {'dense GPU us':>12} | syncs a step (sparse / dense)")
        for r in rows:
            sp, dn = r["sparse"], r["dense"]
            print(f"{r['context']:>9} + {r['new_tokens']:<5}| {packing(r):>8} | {sp['host_us']:>14.0f} | "
                  f"{sp['gpu_us']:>13.0f} | {dn['host_us']:>13.0f} | {dn['gpu_us']:>12.0f} | "
                  f"{sp['syncs_per_step']:.1f} / {dn['syncs_per_step']:.1f}")
    else:
        print(f"{'chunk':>16} | {'packing':>8} | {'host us (median / min)':>22} | {'Triton':>6} | {'FA':>4} | "
              f"{'torch ops':>9}")
        for r in rows:
            us = r["host_us"]
            print(f"{r['context']:>9} + {r['new_tokens']:<5}| {packing(r):>8} | {us['median']:>10.0f} / "
                  f"{us['min']:<9.0f} | {r['triton_launches']:>6.1f} | {r['flash_calls']:>4.1f} | "
                  f"{r['torch_ops']:>9.1f}")
    Path(args.out).write_text(json.dumps({"plan": args.plan, "shape": shape.name, "kernel": args.kernel,
                                          "device": where, "torch": torch.__version__, "repeats": args.repeats,
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
