"""Time to first token, dense vs SPARSE, in vLLM on one GPU or several (same run, same vLLM).

A Llama-3.1-8B-shaped model (or Qwen2.5-7B's, --shape) with dummy weights (config written here; a
small locally trained tokenizer), one request per prompt length, chunked prefill of 16384 tokens, enforce_eager unless
--graphs. The sparse plan is the shipped `configs/llama-3.yaml` unless --config names another;
--extra-config adds plans to the same run. Each engine runs in its own process (vLLM engines do
not share one well); prompts are random token ids, the same for all. After the timed runs each
sparse engine prefills every prompt once more with the density counters on (host syncs, not timed)
and reports the share of causal KV blocks it attended after union: with dummy weights attention
is near uniform, so an adaptive budget (top_p) keeps far more than on a real model. Table last;
JSON to --out.

    python benchmarks/e2e.py --out $OUT/e2e.json --lengths 32768,65536,131072 [--graphs]

Also decode tokens/s for a batch of 32 requests at 8K tokens of context (--decode-batch 0 skips it), or
for each of --decode-cases BATCHxCONTEXT,... (e.g. 2x131072,16x32768,32x8192): pure decode steps, no
detokenizing, best of --repeats (at least 2). A case ending in `s` (e.g. 4x1048448s) is one document
read by every request: the prompts share all but their last 64 tokens (each request's own question),
so the document is prefilled once and the rest come from the prefix cache; its decode still reads the
whole context for every request. Engines without TTFT runs (--lengths "") have prefix caching on (the
profiled decode and shared documents reuse prefills); with TTFT runs it is off, since they repeat one
prompt; with a plan that selects pages at decode, the table
gives the share of each context's blocks a decode step reads (the plan's kept blocks over the
context's, per KV head: the kernels read exactly that many). --lengths "" skips the TTFT runs.

--profile-decode BATCHxCONTEXT (one of the decode cases) also profiles that case's decode steps in every
engine (torch profiler, host and GPU): the tables go beside --out (.decode-profile-<engine>.txt), and
each engine's result gets the host time its attention metadata builder spends per step
(`builder_ms_per_step`), so a gap between dense and sparse decode can be split into GPU and host work.

--profile LENGTHS (comma-separated) also runs each of those prompts once more under the torch profiler,
in every engine: its GPU kernel time by stage (estimation, selection and tables, attention, linear
layers, the rest; `STAGES`) goes to the JSON (`stages_ms`) and a table printed last, the op tables
beside --out (.profile-<engine>-<length>.txt).

--tensor-parallel-size N runs every engine at tensor_parallel_size N (N GPUs; default 1). The
engine core stays in this process, but at N > 1 vLLM's workers are processes of their own, so the
peak GPU memory is read from each rank's torch allocator (`peak_gib_per_rank`; `peak_gib` is their
maximum) and the kept density from each rank's counters (`kept[n]["ranks"]`; `union_mean` is the
mean over ranks, each rank counting its own heads).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK = "E2E_RESULT "

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 132096, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "hidden_act": "silu",
}

# Qwen2.5-7B-Instruct's public shape (config.json on the hub), its 128K context without YaRN (dummy weights).
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "max_position_embeddings": 132096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "use_sliding_window": False,
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "hidden_act": "silu", "attention_dropout": 0.0,
}
# Qwen2.5-7B-Instruct-1M's public shape: Qwen2.5-7B's layers with rope_theta 1e7. Its config says 1,010,000
# positions and dual-chunk attention, which vLLM V1 no longer has; a dummy-weight model needs neither, so the
# positions here are 2^20, the `--max-model-len 1048576` a user asks for, with room for the 64 tokens e2e adds and
# the tokens a decode case generates (vLLM refuses a max_model_len past the model's positions).
ROOM_1M = 1024
QWEN25_7B_1M = {**QWEN25_7B, "rope_theta": 10000000.0, "max_position_embeddings": 1048576 + ROOM_1M}
# Llama-3-8B's shape with a 1M context (as the 1M-context fine-tunes of it, e.g. Gradient's, ship it): 128 KiB of
# bf16 KV per token, so a 1M-token request fits one H200 only with an fp8 KV cache (--kv-cache-dtype fp8).
LLAMA_8B_1M = {**LLAMA_8B, "rope_theta": 3580165449.0, "max_position_embeddings": 1048576 + ROOM_1M}
LLAMA_8B_1M.pop("rope_scaling", None)
# --shape: the model directory's name (an imported plan matches by name) and its config.
SHAPES = {"llama-3.1-8b": ("Llama-3.1-8B-Instruct-shape-dummy", LLAMA_8B),
          "qwen2.5-7b": ("Qwen2.5-7B-Instruct-shape-dummy", QWEN25_7B),
          "qwen2.5-7b-1m": ("Qwen2.5-7B-Instruct-1M-shape-dummy", QWEN25_7B_1M),
          "llama-3-8b-1m": ("Llama-3-8B-Instruct-1M-shape-dummy", LLAMA_8B_1M)}


def build_model(root: Path, shape: str = "llama-3.1-8b") -> Path:
    sys.path.insert(0, str(REPO))
    from tests.fixtures.tiny_llama import _train_tokenizer

    name, config = SHAPES[shape]
    model = root / name
    model.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(model, 512)
    (model / "config.json").write_text(json.dumps(config, indent=1))
    (model / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return model


def worker(spec: dict) -> dict:
    import os

    # The engine in this process, so torch sees its memory and the profiler its kernels.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import LLM, SamplingParams

    cases = decode_cases(spec)
    build_clock = time_builders() if spec.get("profile_decode") else None
    longest = max([*spec["lengths"], *(c + spec["decode_tokens"] for _, c, _ in cases)])
    kw = dict(model=spec["model"], load_format="dummy", dtype="bfloat16", seed=0, enforce_eager=spec["eager"],
              max_model_len=longest + 64, max_num_batched_tokens=spec["chunk"],
              enable_chunked_prefill=True,
              # TTFT runs repeat one prompt, which a prefix cache would answer; decode-only engines reuse prefills.
              enable_prefix_caching=not spec["lengths"],
              gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.85),
              max_num_seqs=max([8, *(b for b, _, _ in cases)]))
    if spec.get("kv_cache_dtype"):
        kw["kv_cache_dtype"] = spec["kv_cache_dtype"]
    if spec.get("flash_attn_version"):  # vLLM's FlashAttention version, dense engines and SPARSE's dense work alike
        kw["attention_config"] = {"flash_attn_version": spec["flash_attn_version"]}
    tp = spec.get("tensor_parallel_size", 1)
    if tp > 1:  # the workers become processes of their own (collective_rpc pickles the functions below)
        kw["tensor_parallel_size"] = tp
    if spec["config"]:
        kw.update(attention_backend="sparse", additional_config={"sparse": {"config": spec["config"]}})
    t0 = time.perf_counter()
    llm = LLM(**kw)
    startup = time.perf_counter() - t0
    kv_tokens = kv_cache_tokens(llm)
    print(f"kv_cache_tokens {kv_tokens}", flush=True)  # (run() reads it back)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    llm.generate([{"prompt_token_ids": torch.randint(3, 500, (4096,), generator=g).tolist()}], params,
                 use_tqdm=False)  # warm-up
    ttft, runs, stages = {}, {}, {}
    for n in spec["lengths"]:
        ids = torch_randint(n)
        times = []
        for _ in range(spec["repeats"]):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        ttft[n], runs[n] = min(times), times  # the first run of a length would show any compile wait
        print(f"{'sparse' if spec['config'] else 'dense'} {n}: {times}", flush=True)  # (run() reads it back)
        if n in spec.get("profile", ()):
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
                wall = time.perf_counter() - t0
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=60)
            label = engine_label(spec)
            Path(f"{spec['profile_base']}.profile-{label}-{n}.txt").write_text(table)
            stages[n] = {"wall_ms": wall * 1e3, **gpu_time_by_stage(prof)}
            print(f"stages {n}: {json.dumps(stages[n])}", flush=True)
    result = {"startup_s": startup, "ttft_s": ttft, "ttft_runs_s": runs, "tensor_parallel_size": tp,
              "kv_cache_tokens": kv_tokens}
    if stages:
        result["stages_ms"] = stages
    if tp == 1:  # the workers run in this process: its allocator saw everything
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:  # each rank is a process of its own: ask each allocator
        result["peak_gib_per_rank"] = [b / 2**30 for b in llm.collective_rpc(_peak_bytes)]
        result["peak_gib"] = max(result["peak_gib_per_rank"])
    if spec["config"] and spec["lengths"] and not spec.get("no_kept"):
        result["kept"] = kept_density(llm, spec["lengths"], params)
    result["decode"] = {}
    for batch, context, shared in cases:
        name = case_name(batch, context, shared)
        tok_s = decode_throughput(llm, batch, context, spec["decode_tokens"],
                                  spec.get("decode_repeats") or max(spec["repeats"], 2), shared)
        result["decode"][name] = tok_s
        print(f"{'sparse' if spec['config'] else 'dense'} decode {name}: {tok_s:.1f} tok/s", flush=True)
        if spec.get("profile_decode") == name:
            label = engine_label(spec)
            out = f"{spec['decode_profile_base']}.decode-profile-{label}.txt"
            result["decode_profile"] = profile_decode(llm, batch, context, out, build_clock, shared)
            print(f"decode profile {name}: {json.dumps(result['decode_profile'])}", flush=True)
    if spec.get("decode_batch") and not spec.get("decode_cases"):
        result["decode_tok_s"] = result["decode"][f"{spec['decode_batch']}x{spec['decode_context']}"]
    return result


def kv_cache_tokens(llm) -> int | None:
    """Tokens of KV cache the engine allocated after its memory profile (blocks x block size): with the
    same model and memory share, dense minus sparse is what the plugin's reservations cost in context."""
    cache = llm.llm_engine.vllm_config.cache_config
    blocks = getattr(cache, "num_gpu_blocks", None)
    return int(blocks) * int(cache.block_size) if blocks else None


def decode_cases(spec: dict) -> list[tuple[int, int, bool]]:
    """[(batch, context, shared)] of the decode runs: --decode-cases, else --decode-batch at --decode-context."""
    if spec.get("decode_cases"):
        return [parse_case(c) for c in spec["decode_cases"].split(",")]
    return [(spec["decode_batch"], spec["decode_context"], False)] if spec.get("decode_batch") else []


def parse_case(text: str) -> tuple[int, int, bool]:
    """"4x1048448" -> (4, 1048448, False); a trailing "s" (one shared document) -> True."""
    m = re.fullmatch(r"(\d+)x(\d+)(s?)", text.strip())
    if not m:
        raise SystemExit(f"decode case {text!r}: expected BATCHxCONTEXT, or BATCHxCONTEXTs for one shared document")
    batch, context = int(m.group(1)), int(m.group(2))
    if m.group(3) and context <= SHARED_SUFFIX:
        raise SystemExit(f"decode case {text!r}: a shared document needs more than {SHARED_SUFFIX} tokens of context")
    return batch, context, bool(m.group(3))


def case_name(batch: int, context: int, shared: bool) -> str:
    return f"{batch}x{context}{'s' if shared else ''}"


def model_shape(shape: str):
    """What a plan sees of the dummy model of `shape` (SHAPES): a `ModelShape` of its directory's name and config."""
    sys.path.insert(0, str(REPO))
    from vllm_sparse.config.plan import ModelShape

    name, hf = SHAPES[shape]
    return ModelShape(name, tuple(hf["architectures"]), hf["num_hidden_layers"], hf["num_attention_heads"],
                      hf["num_key_value_heads"])


def plan_on_shape(config: str, shape: str):
    """The plan `config` gives the dummy model of `shape` (SHAPES)."""
    sys.path.insert(0, str(REPO))
    from vllm_sparse.config.loader import load_config
    from vllm_sparse.config.plan import resolve_plan

    return resolve_plan(load_config(config), model_shape(shape), config)


def decode_read_share(config: str | None, context: int, shape: str = "llama-3.1-8b") -> float | None:
    """Share of a context's blocks one decode step reads under the plan's decode selection, mean over the
    layers (each (row, KV head) of a selecting layer reads min(kept, context blocks); a dense layer and
    a TidalDecode selector read every block); None: dense decode."""
    if not config:
        return None
    plan = plan_on_shape(config, shape)
    if not plan.is_sparse_decode or context < plan.decode_dense_below:
        return 1.0 if plan.is_sparse_decode else None
    blocks = -(-context // plan.decode_block_tokens)

    def layer_share(lp) -> float:
        reads = [1.0 if d is None or d.selector else min(1.0, d.kept_blocks / blocks) for d in lp.decode or (None,)]
        return max(reads)

    layers = [lp for lp in plan.layers if lp.full_attention]
    return sum(layer_share(lp) for lp in layers) / len(layers)


def engine_label(spec: dict) -> str:
    """The engine's name in its log lines and file names: the plan's, "dense", or for a --dense-config engine
    "dense-" and its plan's (apart from the compared plan's, which may share the name)."""
    if not spec["config"]:
        return "dense"
    return f"dense-{Path(spec['config']).stem}" if spec.get("dense_side") else Path(spec["config"]).stem


def check_decode_baseline(config: str, shape: str) -> None:
    """--dense-config stands for vLLM's decode: a plan that selects pages at decode cannot."""
    if plan_on_shape(config, shape).is_sparse_decode:
        raise SystemExit(f"--dense-config {config}: the plan has a decode section (sparse decode on {shape}); the "
                         "decode baseline needs vLLM's decode: use a plan without one")


def _peak_bytes(worker) -> int:
    import torch

    return torch.cuda.max_memory_allocated()


def _stats_on(worker) -> None:
    from vllm_sparse.selection.stats import STATS

    STATS.reset()
    STATS.enable()


def _stats_off(worker) -> dict:
    from vllm_sparse.selection.stats import STATS

    out = {str(layer): {"requested": st.requested_density, "union": st.union_density}
           for layer, st in STATS.snapshot().items()}
    STATS.enabled = False
    STATS.reset()
    return out


def kept_density(llm, lengths: list[int], params) -> dict:
    """Per length: the share of causal KV blocks kept after union (mean over sparse layers, and per layer).
    With tensor parallelism each rank counts its own heads: `layers` is rank 0's, `ranks` each rank's
    mean, and `union_mean` the mean over ranks."""
    out = {}
    for n in lengths:
        ids = torch_randint(n)
        llm.collective_rpc(_stats_on)
        llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
        per_rank = llm.collective_rpc(_stats_off)
        means = []
        for layers in per_rank:
            union = [v["union"] for v in layers.values()]
            means.append(sum(union) / len(union) if union else None)
        known = [m for m in means if m is not None]
        out[n] = {"union_mean": sum(known) / len(known) if known else None, "layers": per_rank[0]}
        if len(per_rank) > 1:
            out[n]["ranks"] = means
        print(f"kept {n}: {out[n]['union_mean']}" + (f" (ranks: {means})" if len(per_rank) > 1 else ""), flush=True)
    return out


def torch_randint(n: int) -> list[int]:
    """The benchmark's prompt of n tokens (the same ids for every engine)."""
    import torch

    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist()


SHARED_SUFFIX = 64  # each request's own tokens after a shared document (a question about it)


def decode_batch(batch: int, context: int, tokens: int, seed: int, shared: bool = False):
    """`batch` random prompts of `context` tokens and greedy sampling of 1 + `tokens` tokens, without
    detokenizing (its host work would be timed with the GPU's). `shared`: the prompts are one document of
    context - SHARED_SUFFIX tokens, each followed by its own SHARED_SUFFIX tokens."""
    import torch
    from vllm import SamplingParams

    g = torch.Generator().manual_seed(seed)
    if shared:
        doc = torch.randint(3, 500, (context - SHARED_SUFFIX,), generator=g).tolist()
        prompts = [{"prompt_token_ids": doc + torch.randint(3, 500, (SHARED_SUFFIX,), generator=g).tolist()}
                   for _ in range(batch)]
    else:
        prompts = [{"prompt_token_ids": torch.randint(3, 500, (context,), generator=g).tolist()}
                   for _ in range(batch)]
    return prompts, SamplingParams(temperature=0.0, max_tokens=1 + tokens, ignore_eos=True, detokenize=False)


def decode_throughput(llm, batch: int, context: int, tokens: int, repeats: int, shared: bool = False) -> float:
    """Decode tokens/s of `batch` requests of `context` prompt tokens, pure decode steps only: the
    engine is stepped by hand and the clock starts once every request has its first token (all
    prefills done), so no prefill chunk rides along. Best of `repeats` (each prefills its batch again)."""
    import torch

    engine = llm.llm_engine
    prompts, params = decode_batch(batch, context, tokens, seed=1, shared=shared)
    best = 0.0
    for rep in range(repeats):
        for i, p in enumerate(prompts):
            engine.add_request(f"decode-{rep}-{i}", p, params)
        produced: dict[str, int] = {}
        t0 = start_tokens = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                produced[out.request_id] = len(out.outputs[0].token_ids)
            if t0 is None and len(produced) == batch and min(produced.values()) >= 1:
                torch.cuda.synchronize()
                t0, start_tokens = time.perf_counter(), sum(produced.values())
        elapsed = time.perf_counter() - t0
        best = max(best, (sum(produced.values()) - start_tokens) / elapsed)
    return best


def time_builders() -> dict:
    """Wrap the attention metadata builders' build (SPARSE's, FlashAttention's) with a host clock:
    -> {name: [calls, seconds]}, counting only while `on` is set."""
    from vllm_sparse.backend.builder import SparseBuilderMixin

    clock: dict = {"on": False}
    targets = [("sparse", SparseBuilderMixin)]
    try:
        from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

        targets.append(("flash_attn", FlashAttentionMetadataBuilder))
    except ImportError:
        pass
    for name, cls in targets:
        clock[name] = [0, 0.0]

        def wrap(fn, name=name):
            def build(self, *args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return fn(self, *args, **kwargs)
                finally:
                    if clock["on"]:
                        clock[name][0] += 1
                        clock[name][1] += time.perf_counter() - t0
            return build

        cls.build = wrap(cls.build)
    return clock


def profile_decode(llm, batch: int, context: int, out: str, clock: dict, shared: bool = False,
                   steps: int = 32) -> dict:
    """`steps` pure decode steps of `batch` requests under the torch profiler (host and GPU) -> the
    tables to `out`, and per step: wall time, builder host time (outermost build: SPARSE's where it
    runs, else FlashAttention's), GPU kernel time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    engine = llm.llm_engine
    # The timed decode's prompts (seed 1): their prefill comes from the prefix cache, so a profile at 1M does not
    # prefill a second 1M prompt (~80 s sparse, ~380 s dense; a d1mp call was cut short by one, 2026-12-04).
    prompts, params = decode_batch(batch, context, steps, seed=1, shared=shared)
    for i, p in enumerate(prompts):
        engine.add_request(f"profile-{i}", p, params)
    produced: dict[str, int] = {}
    while len(produced) < batch or min(produced.values()) < 1:  # prefills, not profiled
        for o in engine.step():
            produced[o.request_id] = len(o.outputs[0].token_ids)
    torch.cuda.synchronize()
    for v in clock.values():
        if isinstance(v, list):
            v[:] = [0, 0.0]
    clock["on"] = True
    n = 0
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        while engine.has_unfinished_requests():
            engine.step()
            n += 1
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    clock["on"] = False
    events, waits = write_profile(prof, out)
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    # Forward passes: one graph replay each under CUDA graphs. Engine steps can outnumber them (under async
    # scheduling the last step only returns the previous forward's tokens).
    forwards = sum(e.count for e in events if e.key == "cudaGraphLaunch")
    outer = "sparse" if clock.get("sparse", [0])[0] else "flash_attn"
    calls, secs = clock.get(outer, [0, 0.0])
    return {"steps": n, "forwards": forwards, "wall_ms_per_step": 1e3 * wall / max(n, 1),
            "gpu_ms_per_step": gpu_us / 1e3 / max(n, 1),
            "gpu_ms_per_forward": gpu_us / 1e3 / forwards if forwards else None,
            "builder": outer, "builder_calls_per_step": calls / max(n, 1),
            "builder_ms_per_step": 1e3 * secs / max(n, 1), "table": out,
            "host_waits": [{k: w[k] for k in ("name", "calls", "ms")} | {"where": w["stack"][:3]} for w in waits[:4]]}


# Where a prefill's GPU time goes, by kernel name: the plugin's own Triton kernels by their function names.
STAGES = (
    ("estimation", ("_row_block_lse", "_block_mass_kernel", "_line_mass_kernel", "_block_key_means_kernel")),
    ("selection and tables", ("_select_blocks_kernel", "_tile_tables_kernel")),
    ("attention", ("flash", "fmha", "_sparse_paged_attention_kernel")),
    ("linear layers", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk")),
)


def stage_of(kernel: str) -> str:
    name = kernel.lower()
    for stage, marks in STAGES:
        if any(m.lower() in name for m in marks):
            return stage
    return "the rest"


def gpu_time_by_stage(prof) -> dict[str, float]:
    """GPU kernel time of a profile, ms per stage (`STAGES`; everything else is "the rest")."""
    from torch.autograd import DeviceType

    out = {stage: 0.0 for stage, _ in STAGES} | {"the rest": 0.0}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            out[stage_of(e.name)] += e.self_device_time_total / 1e3 if hasattr(e, "self_device_time_total") \
                else e.cuda_time_total / 1e3
    out["gpu_total"] = sum(out.values())
    return out


def write_profile(prof, out: str):
    """A profile's tables to `out` (ops by self CPU time, by self GPU time, where the host waited for the GPU, and
    the serving path's Python frames by host time) -> (the ops without Python frames, the host waits)."""
    from torch.autograd.profiler_util import EventList

    averages = prof.key_averages()
    events = EventList([e for e in averages if ".py(" not in e.key and not e.key.startswith("<built-in")])
    waits = host_waits(prof)
    Path(out).write_text(events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70)
                         + "\n\n" + events.table(sort_by="self_cuda_time_total", row_limit=40,
                                                   max_name_column_width=70)
                         + "\n\nwhere the host waits for the GPU (calls that block, by Python stack):\n"
                         + "\n\n".join(f"{w['name']}: {w['calls']} calls, {w['ms']:.1f} ms\n  "
                                       + "\n  ".join(w["stack"]) for w in waits)
                         + "\n\n" + python_frames_table(averages))
    return events, waits


# The Python frames a sparse step's host time goes through: the plugin's own, Triton's launch path, vLLM's attention
# layer and FlashAttention wrapper (the profile's op tables give a Python function's time only as the "self CPU" of
# the op around it: `vllm::unified_attention_with_output` holds the whole sparse forward).
HOST_PATH_FRAMES = ("vllm_sparse/", "triton/runtime/", "triton/backends/", "vllm_flash_attn/", "vllm/v1/attention/",
                    "vllm/attention/", "vllm/model_executor/layers/attention/")


def python_frames_table(averages, top: int = 40) -> str:
    """The serving path's Python frames (`HOST_PATH_FRAMES`; recorded where the profile ran `with_stack`) by total
    host time: calls, total and self ms, microseconds a call. A frame's total includes the frames and ops under it,
    its self time only its own Python (and what the profiler does not record: Triton's and CUDA's launch calls
    below the driver entry points are ops of their own)."""
    frames = sorted((e for e in averages if ".py(" in e.key and any(p in e.key for p in HOST_PATH_FRAMES)),
                    key=lambda e: -e.cpu_time_total)[:top]
    head = "the serving path's Python frames by host time (total ms, self ms, calls, us a call):"
    if not frames:
        return head + "\n  none recorded (a profile without with_stack, or no such frame ran)"
    return head + "\n" + "\n".join(f"  {e.cpu_time_total / 1e3:9.2f} {e.self_cpu_time_total / 1e3:9.2f} {e.count:7d} "
                                    f"{e.cpu_time_total / e.count:9.1f}  {e.key[-110:]}" for e in frames)


_BLOCKING = ("cudaMemcpyAsync", "cudaMemcpy", "cudaStreamSynchronize", "cudaEventSynchronize",
             "cudaDeviceSynchronize")
_MAY_BLOCK = ("aten::copy_", "aten::_local_scalar_dense", "aten::nonzero")


def host_waits(prof, top: int = 8) -> list[dict]:
    """The host calls that wait for the GPU (copies to or from pageable memory, synchronizations),
    grouped by the Python frames above them (profiled with_stack), longest first."""
    waits: dict[tuple, dict] = {}
    for e in prof.events():
        # A runtime call may carry no parent where the profiler links none: its aten op (a copy, an
        # .item()) counts too when it takes long (its total includes the wait).
        slow_op = e.name in _MAY_BLOCK and e.cpu_time_total > 200
        if not ((e.name in _BLOCKING and e.self_cpu_time_total > 0) or slow_op):
            continue
        frames, parent = [], e.cpu_parent
        while parent is not None and len(frames) < 10:
            if ".py(" in parent.name and not parent.name.startswith("torch/"):
                frames.append(parent.name)
            parent = parent.cpu_parent
        w = waits.setdefault((e.name, tuple(frames)), {"name": e.name, "calls": 0, "ms": 0.0, "stack": frames})
        w["calls"] += 1
        w["ms"] += (e.cpu_time_total if slow_op else e.self_cpu_time_total) / 1e3
    return sorted(waits.values(), key=lambda w: -w["ms"])[:top]


def kill_session(pid: int) -> None:
    """Every process of an engine's session: its own and any it left behind. A cold start's compile
    workers otherwise outlive the engine, and the next engine's host work ran ~35% slower beside them
    (H200, 2026-12-03: one plan's dense-routed 32K + 8 follow-ups took 29 ms as the second engine of a
    run, 21 ms as the first). Returns once none of them runs: SIGKILL is asynchronous, and an engine
    started beside a dying EngineCore found 7 of 79 GiB free (H100, 2026-12-05)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # all gone already
        return
    deadline = time.monotonic() + 60
    while _session_running(pid) and time.monotonic() < deadline:
        time.sleep(0.2)


def _session_running(sid: int) -> bool:
    """Any process of session `sid` not yet exited (a zombie has freed its memory: it does not count)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp, session, ...
        except OSError:  # exited meanwhile
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            return True
    return False


def run(spec: dict) -> dict:
    """One engine in its own process (and session: `kill_session`); its output streams through (a stall
    shows where it is)."""
    label = engine_label(spec)
    proc = subprocess.Popen([sys.executable, "-u", __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True)
    result, tail, partial = None, [], {}
    timer = threading.Timer(spec["timeout"], kill_session, (proc.pid,)) if spec.get("timeout") else None
    if timer:
        timer.start()
    try:
        for line in proc.stdout:
            if line.startswith(MARK):
                result = json.loads(line[len(MARK):])
                continue
            m = re.match(r"(dense|sparse) (\d+): (\[.*\])$", line.strip())
            if m:  # a length measured: kept if the engine is cut short later
                partial.setdefault("ttft_s", {})[m.group(2)] = min(json.loads(m.group(3)))
            if line.startswith("kv_cache_tokens "):
                partial["kv_cache_tokens"] = json.loads(line.split()[1])
            m = re.match(r"(?:dense|sparse) decode (\d+x\d+s?): ([\d.]+) tok/s$", line.strip())
            if m:  # a decode case measured: kept as well (a 1M case's prefill takes minutes)
                partial.setdefault("decode", {})[m.group(1)] = float(m.group(2))
            tail = (tail + [line])[-60:]
            quiet = line.startswith(("INFO", "DEBUG", "(EngineCore")) or (
                line.startswith("(Worker") and (" INFO " in line or " DEBUG " in line))  # TP > 1: worker processes
            # (the plugin's own INFO lines stay: its plan, reservations, warm-ups; scripts grep them)
            if not quiet or "Error" in line or "vllm-sparse:" in line:
                print(f"[{label}] {line}", end="", flush=True)
        proc.wait()
    finally:
        if timer:
            timer.cancel()
        kill_session(proc.pid)
    if result is not None:
        return result
    sys.stderr.write("".join(tail))
    if partial:  # the lengths it finished, and why the rest are missing
        return {"error": f"engine cut short ({label}), exit {proc.returncode}", **partial}
    raise SystemExit(f"engine failed ({label}), exit {proc.returncode}")


def run_meta(args) -> dict:
    import torch
    import vllm

    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": torch.cuda.get_device_name(),
            "vllm": vllm.__version__, "torch": torch.__version__, "argv": sys.argv, "config": args.config,
            "shape": args.shape, "kv_cache_dtype": args.kv_cache_dtype or "auto",
            "flash_attn_version": args.flash_attn_version, "sparse_kernel": os.environ.get("VLLM_SPARSE_KERNEL", ""),
            "gpu_memory_utilization": args.gpu_memory_utilization}
    meta["tensor_parallel_size"] = args.tensor_parallel_size
    if args.tensor_parallel_size > 1:
        meta["devices"] = [torch.cuda.get_device_name(i) for i in range(args.tensor_parallel_size)]
    return meta


def engine_line(r: dict, peak: str) -> str:
    """Start-up, peak memory and KV cache of one engine, or why it has none."""
    if "startup_s" not in r:
        return f"failed: {r.get('error')}"
    kv = r.get("kv_cache_tokens")
    return (f"start-up {r['startup_s']:.1f} s, {peak} {r['peak_gib']:.1f} GiB, KV cache "
            f"{'-' if kv is None else f'{kv:,} tokens'}" + (f" ({r['error']})" if "error" in r else ""))


def print_stages(results: dict) -> None:
    """Where each profiled prefill's GPU time went, per engine: ms per stage and its share."""
    engines = [("dense", results["dense"]), *((Path(c).stem, r) for c, r in results["sparse"].items())]
    names = [stage for stage, _ in STAGES] + ["the rest"]
    if not any(r.get("stages_ms") for _, r in engines):
        return
    print("\nwhere the prefill's GPU time goes (ms, share of GPU kernel time; wall = the profiled request)")
    print(f"{'prompt':>8} {'engine':>28} {'wall':>8} {'GPU':>8} " + " ".join(f"{n[:18]:>18}" for n in names))
    for name, r in engines:
        for n, st in sorted(r.get("stages_ms", {}).items(), key=lambda kv: int(kv[0])):
            cells = " ".join(f"{st[k]:>9.0f} ({st[k] / max(st['gpu_total'], 1e-9):>4.0%})" for k in names)
            print(f"{n:>8} {name[:28]:>28} {st['wall_ms']:>8.0f} {st['gpu_total']:>8.0f} {cells}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="32768,65536,131072")
    ap.add_argument("--config", default=str(REPO / "configs/llama-3.yaml"), help="the sparse plan (default: shipped)")
    ap.add_argument("--extra-config", action="append", default=[], help="more sparse plans for the same run")
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES),
                    help="the public model shape of the dummy-weight model")
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--graphs", action="store_true", help="CUDA graphs on (default: enforce_eager)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per engine (tensor_parallel_size)")
    ap.add_argument("--decode-batch", type=int, default=32, help="decode throughput batch (0: skip)")
    ap.add_argument("--decode-context", type=int, default=8192)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--decode-cases", help="BATCHxCONTEXT,... decode runs (instead of --decode-batch/-context)")
    ap.add_argument("--decode-repeats", type=int, help="decode runs per case, best taken (default: --repeats, at "
                    "least 2; 1 where a case's prefill takes minutes, e.g. 1M)")
    ap.add_argument("--dense-config", help="run the dense side as SPARSE with this plan instead of the stock backend: "
                    "a decode baseline whose long prefills are sparse too (a dense 1M prefill takes minutes); its "
                    "plan should have no decode section. Its TTFT is then that plan's, not dense")
    ap.add_argument("--no-kept", action="store_true", help="skip the kept-density pass (a second prefill of every "
                    "length with the counters on: minutes at 1M, where a fixed keep ratio says the density anyway)")
    ap.add_argument("--out", default="e2e.json")
    ap.add_argument("--profile", default="", help="lengths (comma-separated) whose prefill is also profiled, in "
                    "every engine: GPU time per stage in the JSON and the table, op tables beside --out")
    ap.add_argument("--only", choices=["dense", "sparse"], help="run one backend (with --profile)")
    ap.add_argument("--profile-decode", help="BATCHxCONTEXT: also profile that decode case in every engine")
    ap.add_argument("--plot", action="store_true", help="also plot TTFT vs prompt length beside --out (PNG)")
    ap.add_argument("--kv-cache-dtype", help="vLLM's kv_cache_dtype (e.g. fp8), every engine")
    ap.add_argument("--flash-attn-version", type=int, choices=(2, 3),
                    help="vLLM's FlashAttention version, every engine (2 on a Hopper GPU: what Ampere and Ada run; "
                         "pair with VLLM_SPARSE_KERNEL=fa2 for the sparse chunks)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--engine-timeout", type=float, help="seconds per engine: one cut short keeps the lengths it "
                    "finished (TTFT only) and the next engine runs")
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.dense_config and not args.worker:
        check_decode_baseline(args.dense_config, args.shape)
    if not args.worker and args.lengths and any(shared for *_, shared in decode_cases(vars(args))):
        raise SystemExit("--decode-cases: a shared document needs the prefix cache, which engines with TTFT runs keep "
                         'off: run it with --lengths ""')
    if args.worker:
        print(MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.plot:  # matplotlib (the plot extra) checked before the engines run
        from vllm_sparse.plot import require_matplotlib
        require_matplotlib()
    root = Path(tempfile.mkdtemp(prefix="e2e-"))
    model = build_model(root, args.shape)
    base = {"model": str(model), "lengths": [int(x) for x in args.lengths.split(",") if x], "chunk": args.chunk,
            "repeats": args.repeats, "eager": not args.graphs, "decode_batch": args.decode_batch,
            "decode_context": args.decode_context, "decode_tokens": args.decode_tokens,
            "decode_cases": args.decode_cases, "decode_repeats": args.decode_repeats, "no_kept": args.no_kept,
            "profile_decode": args.profile_decode,
            "decode_profile_base": str(Path(args.out).with_suffix(""))}
    if args.tensor_parallel_size > 1:
        base["tensor_parallel_size"] = args.tensor_parallel_size
    base.update(gpu_memory_utilization=args.gpu_memory_utilization, timeout=args.engine_timeout)
    if args.kv_cache_dtype:
        base["kv_cache_dtype"] = args.kv_cache_dtype
    if args.flash_attn_version:
        base["flash_attn_version"] = args.flash_attn_version
    prof = {"profile": [int(x) for x in args.profile.split(",") if x],
            "profile_base": str(Path(args.out).with_suffix(""))}
    if args.only:
        dense_side = {"config": args.dense_config, "dense_side": True}
        result = run({**base, **prof, **(dense_side if args.only == "dense" else {"config": args.config})})
        print(json.dumps(result))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": run_meta(args), args.only: result}, indent=1))
        return
    meta = run_meta(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"meta": meta}

    def save():  # after every engine: a command killed at its limit keeps what finished
        Path(args.out).write_text(json.dumps(results, indent=1))

    try:
        results["dense"] = run({**base, **prof, "config": args.dense_config, "dense_side": True})
    except SystemExit as e:  # the sparse engines still run: their figures stand alone
        results["dense"] = {"error": str(e)}
    save()
    plans = [args.config, *args.extra_config]
    results["sparse"] = {}
    for cfg in plans:
        try:
            results["sparse"][cfg] = run({**base, **prof, "config": cfg})
        except SystemExit as e:  # one plan failing leaves the others' figures
            results["sparse"][cfg] = {"error": str(e)}
        save()
    dense = results["dense"]
    tp = args.tensor_parallel_size
    for name, r in [("dense", dense), *results["sparse"].items()]:
        prof = r.get("decode_profile")
        if prof:
            print(f"decode profile {args.profile_decode}, {name}: {prof['wall_ms_per_step']:.2f} ms a step "
                  f"({prof['gpu_ms_per_step']:.2f} ms of GPU kernels), {prof['builder']} builder "
                  f"{prof['builder_ms_per_step']:.3f} ms a step ({prof['builder_calls_per_step']:.1f} calls)")
            for w in prof.get("host_waits", []):
                print(f"  host waits in {w['name']}: {w['calls']} calls, {w['ms']:.1f} ms, at {' < '.join(w['where'])}")
    print(f"\n{meta['device']}{f' x{tp}, tensor_parallel_size {tp}' if tp > 1 else ''}  vLLM {meta['vllm']}  "
          f"torch {meta['torch']}  {'CUDA graphs' if args.graphs else 'enforce_eager'}, chunk {args.chunk}")
    peak = "peak" if tp == 1 else "peak (largest rank)"
    if args.dense_config:  # (the "dense" columns below are this engine's)
        print(f"dense side: SPARSE with {args.dense_config} (its prefill sparse, its decode vLLM's)")
    print(f"dense: {engine_line(dense, peak)}")
    for cfg, sparse in results["sparse"].items():
        print(f"\n{cfg}\n  {engine_line(sparse, peak)}")
        if base["lengths"]:
            print(f"  {'prompt':>8} {'dense TTFT':>11} {'sparse TTFT':>12} {'speed-up':>9} {'kept':>6}")
        for n in base["lengths"]:
            d, s = dense.get("ttft_s", {}).get(str(n)), sparse.get("ttft_s", {}).get(str(n))
            kept = sparse.get("kept", {}).get(str(n), {}).get("union_mean")
            cell = lambda t: f"{t:>10.2f}s" if t else f"{'-':>11}"  # noqa: E731
            ratio = f"{d / s:>8.2f}x" if d and s else f"{'-':>9}"
            print(f"  {n:>8} {cell(d)} {cell(s):>12} {ratio} {'-' if kept is None else f'{kept:.1%}':>6}")
        if sparse.get("decode"):
            print(f"  {'decode':>14} {'dense tok/s':>12} {'sparse tok/s':>13} {'ratio':>7} {'read':>6}")
        for case, s in sparse.get("decode", {}).items():
            d = dense.get("decode", {}).get(case, float("nan"))
            share = decode_read_share(cfg, parse_case(case)[1], args.shape)
            sparse.setdefault("decode_read_share", {})[case] = share
            print(f"  {case:>14} {d:>12.1f} {s:>13.1f} {s / d:>6.2f}x {'-' if share is None else f'{share:.1%}':>6}")
    print_stages(results)
    save()

    if args.plot:
        from vllm_sparse.plot import plot_ttft
        print(f"\nplot: {plot_ttft(results, Path(args.out).with_suffix('.png'))}")


if __name__ == "__main__":
    main()
