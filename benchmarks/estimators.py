"""Estimation + selection + union + FA3 tables per layer on one GPU, torch path vs kernels.

One 16K-query prefill chunk at the end of a 128K context, Llama-3.1-8B heads (32 q / 8 kv, d=128; --heads 28/4
for Qwen2.5-7B's),
bf16 paged cache (vLLM 0.26 FlashAttention layout, page 16, pages shuffled), selection block 128,
one union per query block. Each estimator runs two ways:
- "torch": the estimator's torch path (per-row scorers build [heads, rows, context] logits), the
  torch selection (`select_blocks`) and tables (`tile_tables_ref`);
- "kernels": what the backend runs on GPUs: the fused row scorers (`estimators/row_scores.py`),
  `select_blocks_triton`, `tile_tables_triton`.
Per path: median ms of the whole step, ms of the scoring alone, peak GPU memory above the inputs
(`torch.cuda.max_memory_allocated`) beside the bound the engine counts for it in vLLM's memory profile
(`backend/reserve.py`; "bound"), the kept share of causal pages after union, and whether any
host sync happened (CUDA's sync check armed over one run). `--sweep` also times the fused scorer's
tile configurations. Table last; JSON to --out.

    python benchmarks/estimators.py --out $OUT/estimators.json [--budget top_p:0.9] [--sweep]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_sparse.backend.reserve import chunk_temporaries_bytes  # noqa: E402
from vllm_sparse.backend.sparse_path import plan_scores  # noqa: E402
from vllm_sparse.config.plan import HeadPlan  # noqa: E402
from vllm_sparse.estimators import row_scores  # noqa: E402
from vllm_sparse.estimators.base import ChunkContext  # noqa: E402
from vllm_sparse.estimators.registry import get_estimator  # noqa: E402
from vllm_sparse.kernels.paged import PagedKV  # noqa: E402
from vllm_sparse.kernels.workspace import WORKSPACE  # noqa: E402
from vllm_sparse.selection.budget import Budget, select_blocks  # noqa: E402
from vllm_sparse.selection.select_kernel import select_blocks_triton  # noqa: E402
from vllm_sparse.selection.tile_tables import tile_seq_lens, tile_tables_ref, tile_tables_triton  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
DEV = "cuda"

ESTIMATORS = {
    "sink_local": ("sink_local", {"sink_blocks": 1, "local_blocks": 2}),
    "pooled": ("pooled", {"share": "group"}),
    "lowbit_pooled": ("lowbit", {"bits": 8, "rows": "pooled"}),
    "antidiagonal_s8": ("antidiagonal", {"stride": 8}),
    "antidiagonal_s8_int8": ("antidiagonal", {"stride": 8, "bits": 8}),
    "antidiagonal_s16": ("antidiagonal", {"stride": 16}),
    "antidiagonal_s16_int8": ("antidiagonal", {"stride": 16, "bits": 8}),
    "antidiagonal_s32_int8": ("antidiagonal", {"stride": 32, "bits": 8}),
    "lowbit_s16": ("lowbit", {"bits": 8, "rows": "sampled", "sample_stride": 16}),
    "lowbit_s64": ("lowbit", {"bits": 8, "rows": "sampled", "sample_stride": 64}),
    "vertical_slash": ("vertical_slash", {"last_q": 64, "vertical_size": 1024, "slash_size": 2048}),
}
FUSED = {"antidiagonal", "vertical_slash", "lowbit"}

# A quantized estimator's kept blocks beside those of the estimator it approximates (same run).
BASELINE = {"antidiagonal_s8_int8": "antidiagonal_s8", "antidiagonal_s16": "antidiagonal_s8",
            "antidiagonal_s16_int8": "antidiagonal_s8", "antidiagonal_s32_int8": "antidiagonal_s8"}

# (rows per head in a tile, key columns per tile, num_warps, num_stages, reduction step); with 4 q heads
# per KV head a tile packs rows x 4 query rows
SWEEP = {
    "antidiagonal_s8_int8": [(32, 256, 8, 3, 128), (32, 256, 8, 2, 128), (32, 256, 8, 4, 128), (32, 256, 8, 3, 256),
                             (32, 256, 8, 2, 256), (64, 128, 8, 3, 128), (32, 128, 4, 3, 128), (16, 256, 8, 3, 128)],
    "antidiagonal_s16_int8": [(32, 128, 4, 3, 128), (64, 128, 8, 3, 128), (32, 256, 8, 3, 128), (64, 128, 8, 2, 256),
                              (32, 128, 4, 2, 256), (32, 128, 4, 4, 128), (64, 64, 4, 3, 128), (64, 128, 8, 4, 64),
                              (16, 256, 8, 3, 128), (64, 256, 8, 2, 128)],
    "antidiagonal": [(32, 256, 8, 2, 128), (64, 128, 8, 3, 128), (32, 128, 8, 3, 128), (16, 64, 4, 3, 128),
                     (32, 256, 8, 4, 64), (64, 128, 8, 4, 64)],
    "lowbit": [(16, 128, 4, 4, 128), (16, 128, 4, 3, 128), (32, 128, 4, 3, 128), (8, 128, 4, 2, 128)],
}


def parse_budget(text: str, share: str) -> Budget:
    rule, value = text.split(":")
    kw = {"top_p": float(value)} if rule == "top_p" else {"keep_ratio": float(value)}
    return Budget(**kw, sink_blocks=1, local_blocks=2, share=share)


def step(ctx: ChunkContext, name: str, params, budget: Budget, path: str):
    """Scores -> kept mask -> one union per query block -> FA3 block tables (as the backend's FA3 path)."""
    kernels = path == "kernels"
    ctx = dataclasses.replace(ctx, kernels=kernels)
    scores = plan_scores(ctx, HeadPlan(name, params, budget))  # per head, or per GQA group when shared
    mask = (select_blocks_triton if kernels else select_blocks)(scores, budget, ctx.first_query_block)
    _, seq_lens = tile_seq_lens(ctx.first_query_block, mask.shape[1], 1, ctx.block_size, ctx.context_len, ctx.q_len,
                                ctx.q.device)
    tables = tile_tables_triton if kernels else tile_tables_ref
    return tables(mask, HKV, 1, seq_lens, ctx.block_size, PAGE, ctx.block_table, -(-ctx.seq_len // PAGE)), mask


def peak_above(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def kernel_times(fn, repeats: int = 5) -> dict[str, float]:
    """GPU microseconds per call of each kernel `fn` launches (torch profiler, mean of `repeats` calls)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.name[:60]] = times.get(e.name[:60], 0.0) + e.device_time / repeats
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def sync_free(fn) -> bool | str:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True
    except RuntimeError as e:
        return f"syncs: {str(e)[:160]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def main() -> None:
    global HQ, HKV  # (--heads sets the layout every helper reads)
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=131072)
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--budget", default="keep:0.1", help="keep:R (share of causal blocks) or top_p:P")
    ap.add_argument("--share", default="head", choices=["head", "group"], help="select per q head or per GQA group")
    ap.add_argument("--only", default="")
    ap.add_argument("--skip-torch", default="", help="estimators whose torch path is not run (too slow/large)")
    ap.add_argument("--sweep", action="store_true", help="also time the fused scorer's tile configurations")
    ap.add_argument("--kernel-times", action="store_true", help="also each kernel's GPU time per call (profiler)")
    ap.add_argument("--heads", default=f"{HQ}/{HKV}", help="Q/KV heads (28/4: Qwen2.5-7B's 7 q heads per KV head)")
    ap.add_argument("--out", default="estimators.json")
    args = ap.parse_args()
    HQ, HKV = (int(x) for x in args.heads.split("/"))
    gen = torch.Generator(device=DEV).manual_seed(0)
    pages = args.ctx // PAGE
    packed = torch.randn(pages, PAGE, HKV, 2 * D, generator=gen, device=DEV, dtype=torch.bfloat16)
    kv = PagedKV.from_flash_cache(packed.permute(0, 2, 1, 3))
    table = torch.randperm(pages, generator=gen, device=DEV).to(torch.int32)
    q = torch.randn(args.chunk, HQ, D, generator=gen, device=DEV, dtype=torch.bfloat16)
    ctx = ChunkContext(q, torch.arange(HQ, device=DEV) // (HQ // HKV), kv, table, args.ctx - args.chunk,
                       args.block, D**-0.5, tuple(h // (HQ // HKV) for h in range(HQ)))
    WORKSPACE.reserve(1 << 40, torch.device(DEV))  # the cap (VLLM_SPARSE_WORKSPACE_MIB), as an engine reserves
    WORKSPACE.count_key_columns(args.ctx, torch.device(DEV))  # int8 key columns: as an engine of this context
    budget = parse_budget(args.budget, args.share)
    total_pages = float(((ctx.query_block_ids() + 1) * args.block // PAGE).sum() * HKV)
    rows, kernel_masks = [], {}
    for label, (name, raw) in ESTIMATORS.items():
        if args.only and label not in args.only.split(","):
            continue
        params = get_estimator(name).params.model_validate(raw)
        row = dict(estimator=label, params=raw, error=None)
        masks = {}
        for path in ("kernels", "torch"):
            if path == "torch" and label in args.skip_torch.split(","):
                continue
            run = lambda path=path, name=name, params=params: step(ctx, name, params, budget, path)  # noqa: E731
            try:
                (tables, counts, *_), masks[path] = run()
                row[f"{path}_kept_after_union"] = float(counts.sum()) / total_pages
                row[f"{path}_ms"] = triton.testing.do_bench(run, warmup=2, rep=20, return_mode="median")
                c = dataclasses.replace(ctx, kernels=path == "kernels")
                row[f"{path}_score_ms"] = triton.testing.do_bench(
                    lambda c=c, name=name, params=params: get_estimator(name).score(c, params), warmup=2, rep=20,
                    return_mode="median")
                row[f"{path}_peak_gib"] = peak_above(run)
                # What the engine counts in vLLM's memory profile for this chunk (`backend/reserve.py`): one
                # union per query block, a page list per KV head, as `step` builds.
                row["bound_gib"] = chunk_temporaries_bytes(
                    HQ, HKV, args.chunk, args.ctx, args.block, PAGE, 1, True, name == "vertical_slash",
                    quantized_head_dim=D if name == "antidiagonal" and raw.get("bits") else 0) / 2**30
                row[f"{path}_sync_free"] = sync_free(run)
                if path == "kernels" and args.kernel_times:
                    row["kernel_us"] = kernel_times(run)
            except torch.OutOfMemoryError as e:
                row[f"{path}_ms"], row["error"] = None, f"{path} OOM: {str(e)[:120]}"
            torch.cuda.empty_cache()
        if len(masks) == 2:  # scores differ by float rounding: compare the kept blocks
            row["mask_agreement"] = float((masks["kernels"] == masks["torch"]).float().mean())
        if "kernels" in masks:
            kernel_masks[label] = masks["kernels"]
        base = kernel_masks.get(BASELINE.get(label))
        if base is not None:  # what quantizing changed: the same blocks, and how many of the baseline's are kept
            mine = kernel_masks[label]
            row["baseline"] = BASELINE[label]
            row["baseline_agreement"] = float((mine == base).float().mean())
            row["baseline_kept_recall"] = float((mine & base).sum() / base.sum().clamp_min(1))
        configs = SWEEP.get(label, SWEEP.get(name))  # a variant's own tiles, else its estimator's
        if args.sweep and configs:
            row["sweep"] = {}
            original = row_scores._tile_config
            c = dataclasses.replace(ctx, kernels=True)
            for cfg in configs:
                row_scores._tile_config = lambda group_pad, bits, head_dim, strided=False, cfg=cfg: cfg
                try:
                    row["sweep"][str(cfg)] = triton.testing.do_bench(
                        lambda c=c, name=name, params=params: get_estimator(name).score(c, params), warmup=2,
                        rep=20, return_mode="median")
                except Exception as e:  # a config the compiler refuses (shared memory, registers)
                    row["sweep"][str(cfg)] = f"{type(e).__name__}: {str(e)[:80]}"
            row_scores._tile_config = original
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__, argv=sys.argv,
                workspace_mib=WORKSPACE.reserved(torch.device(DEV)) / 2**20)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"\nestimation+selection+union per layer: ctx {args.ctx}, chunk {args.chunk}, block {args.block}, "
          f"{args.budget} per {args.share}  ({meta['device']}, workspace {meta['workspace_mib']:.0f} MiB)")
    print(f"{'estimator':>17} {'torch ms':>9} {'(score)':>8} {'GiB':>6} {'kernels ms':>11} {'(score)':>8} {'GiB':>6} "
          f"{'bound':>6} {'kept':>6} {'agree':>6} sync-free")
    fmt = lambda v, f: format(v, f) if isinstance(v, float) else "-"  # noqa: E731
    for r in rows:
        sync = all(r.get(f"{p}_sync_free", True) is True for p in ("torch", "kernels"))
        print(f"{r['estimator']:>17} {fmt(r.get('torch_ms'), '9.2f')} {fmt(r.get('torch_score_ms'), '8.2f')} "
              f"{fmt(r.get('torch_peak_gib'), '6.2f')} {fmt(r.get('kernels_ms'), '11.2f')} "
              f"{fmt(r.get('kernels_score_ms'), '8.2f')} {fmt(r.get('kernels_peak_gib'), '6.2f')} "
              f"{fmt(r.get('bound_gib'), '6.2f')} "
              f"{fmt(r.get('kernels_kept_after_union'), '6.3f')} {fmt(r.get('mask_agreement'), '6.3f')} "
              f"{'yes' if sync else 'NO'}  {r['error'] or ''}")
        if "baseline" in r:
            print(f"{'':>17}   vs {r['baseline']}: {r['baseline_agreement']:.4f} of the blocks agree, "
                  f"{r['baseline_kept_recall']:.4f} of its kept blocks kept")
        for kernel, us in list(r.get("kernel_us", {}).items())[:8]:
            print(f"{'':>17}   {kernel}: {us:.1f} us")
        for cfg, ms in r.get("sweep", {}).items():
            print(f"{'':>17}   tiles {cfg}: {ms if isinstance(ms, str) else f'{ms:.2f} ms'}")


if __name__ == "__main__":
    main()
