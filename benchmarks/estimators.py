"""Estimation + selection + union + page lists per layer on one GPU, per estimator.

One 16K-query prefill chunk at the end of a 128K context, Llama-3.1-8B heads (32 q / 8 kv, d=128),
bf16 paged cache (vLLM 0.26 FlashAttention layout, page 16), selection block 128, keep 10% per
row (plus 1 sink and 2 local blocks), one union per query block. Each estimator runs as the
estimator's scoring function, then selection, union and FA3's compacted block tables two ways:
"torch" (the references: `select_blocks`, `tile_tables_ref`, pooled keys gathered by torch) and
"kernels" (what the backend runs on GPUs: `select_blocks_triton`, `tile_tables_triton`, pooled keys
read in place by `block_key_means_triton`; estimators that score per GQA group are selected once
per group, `plan_scores`), and "kernels_per_head" (the same kernels selecting per q head, as
before group sharing). All must give the same tables. Table last; JSON to --out.

    python benchmarks/estimators.py --out $OUT/estimators.json
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_sparse.backend.sparse_path import plan_scores  # noqa: E402
from vllm_sparse.config.plan import HeadPlan  # noqa: E402
from vllm_sparse.estimators import base as estimator_base  # noqa: E402
from vllm_sparse.estimators.base import ChunkContext  # noqa: E402
from vllm_sparse.estimators.block_means import block_key_means_ref, block_key_means_triton  # noqa: E402
from vllm_sparse.estimators.registry import get_estimator  # noqa: E402
from vllm_sparse.kernels.paged import PagedKV  # noqa: E402
from vllm_sparse.selection.budget import Budget, select_blocks  # noqa: E402
from vllm_sparse.selection.select_kernel import select_blocks_triton  # noqa: E402
from vllm_sparse.selection.tile_tables import tile_seq_lens, tile_tables_ref, tile_tables_triton  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
DEV = "cuda"

ESTIMATORS = {
    "sink_local": {"sink_blocks": 1, "local_blocks": 2},
    "vertical_slash": {"last_q": 64, "vertical_size": 1024, "slash_size": 2048},
    "antidiagonal": {"stride": 16},
    "pooled": {"share": "group"},
    "lowbit_pooled": {"bits": 8, "rows": "pooled"},
    "lowbit_sampled": {"bits": 8, "rows": "sampled", "sample_stride": 64},
}


PATHS = {
    "torch": (select_blocks, tile_tables_ref, block_key_means_ref),
    "kernels": (select_blocks_triton, tile_tables_triton, block_key_means_triton),
    # The kernels selecting per q head even where the estimator scores per GQA group (before 2026-11-25 evening).
    "kernels_per_head": (select_blocks_triton, tile_tables_triton, block_key_means_triton),
}


def select_and_union(ctx: ChunkContext, name: str, params, budget: Budget, path: str):
    """Scores -> kept mask -> one union per query block -> FA3 block tables (as the backend's FA3 path)."""
    select, tables_of, key_means = PATHS[path]
    estimator_base.block_key_means_triton = key_means  # what ChunkContext.pooled_keys runs on GPUs
    if path == "kernels_per_head":
        scores = get_estimator(name).score(ctx, params)
    else:
        scores = plan_scores(ctx, HeadPlan(name, params, budget))  # per head, or per GQA group when shared
    mask = select(scores, budget, ctx.first_query_block)  # [q or kv heads, rows, kv_blocks]
    rows = mask.shape[1]
    _, seq_lens = tile_seq_lens(ctx.first_query_block, rows, 1, ctx.block_size, ctx.context_len, ctx.q_len,
                                ctx.q.device)
    max_pages = -(-ctx.seq_len // PAGE)
    return tables_of(mask, HKV, 1, seq_lens, ctx.block_size, PAGE, ctx.block_table, max_pages), mask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=131072)
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default="estimators.json")
    args = ap.parse_args()
    gen = torch.Generator(device=DEV).manual_seed(0)
    pages = args.ctx // PAGE
    packed = torch.randn(pages, PAGE, HKV, 2 * D, generator=gen, device=DEV, dtype=torch.bfloat16)
    kv = PagedKV.from_flash_cache(packed.permute(0, 2, 1, 3))
    table = torch.randperm(pages, generator=gen, device=DEV).to(torch.int32)
    q = torch.randn(args.chunk, HQ, D, generator=gen, device=DEV, dtype=torch.bfloat16)
    ctx = ChunkContext(q, torch.arange(HQ, device=DEV) // (HQ // HKV), kv, table, args.ctx - args.chunk,
                       args.block, D**-0.5, tuple(h // (HQ // HKV) for h in range(HQ)))
    budget = Budget(keep_ratio=args.keep, sink_blocks=1, local_blocks=2)
    rows = []
    total_pages = float(((ctx.query_block_ids() + 1) * args.block // PAGE).sum() * HKV)
    for label, raw in ESTIMATORS.items():
        if args.only and label not in args.only.split(","):
            continue
        name = label.split("_")[0] if label.startswith("lowbit") else label
        params = get_estimator(name).params.model_validate(raw)
        row = dict(estimator=label, params=raw, error=None)
        tables = {}
        for path in PATHS:
            def run(name=name, params=params, path=path):
                # A new context each time: the key gather is part of the cost.
                c = ChunkContext(*[getattr(ctx, f) for f in ("q", "kv_head_of", "kv", "block_table",
                                                              "context_len", "block_size", "scale", "kv_head_ids")])
                return select_and_union(c, name, params, budget, path)
            torch.cuda.reset_peak_memory_stats()
            try:
                (tables[path], counts), mask = run()
                row["kept_after_union"] = float(counts.sum()) / total_pages
                row["requested"] = float(mask.float().mean())
                row[f"{path}_ms"] = triton.testing.do_bench(run, warmup=2, rep=20, return_mode="median")
                row[f"{path}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                # One more run with CUDA's sync check armed: any host sync on the path raises here.
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    run()
                    row[f"{path}_sync_free"] = True
                except RuntimeError as e:
                    row[f"{path}_sync_free"] = f"syncs: {str(e)[:160]}"
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            except torch.OutOfMemoryError as e:
                row[f"{path}_ms"], row["error"] = None, f"{path} OOM: {str(e)[:120]}"
            torch.cuda.empty_cache()
        if len(tables) == len(PATHS):
            row["same_tables"] = all(torch.equal(tables["torch"], t) for t in tables.values())
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__, argv=sys.argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"\nestimation+selection+union per layer: ctx {args.ctx}, chunk {args.chunk}, block {args.block}, "
          f"keep {args.keep}  ({meta['device']})")
    print(f"{'estimator':>16} {'torch ms':>9} {'kernels ms':>11} {'×':>5} {'per-head sel. ms':>17} {'kept':>6} "
          f"{'same tables':>12}  no host sync")
    for r in rows:
        t, k, ph = r.get("torch_ms"), r.get("kernels_ms"), r.get("kernels_per_head_ms")
        if t is None or k is None or ph is None:
            print(f"{r['estimator']:>16} {r['error']}")
            continue
        sync = all(r.get(f"{p}_sync_free") is True for p in PATHS)
        print(f"{r['estimator']:>16} {t:9.2f} {k:11.2f} {t / k:5.2f} {ph:17.2f} {r['kept_after_union']:6.3f} "
              f"{str(r.get('same_tables')):>12}  {'yes' if sync else 'NO'}")


if __name__ == "__main__":
    main()
