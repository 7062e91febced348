"""Estimation + selection + union + page lists per layer on one GPU, per estimator.

One 16K-query prefill chunk at the end of a 128K context, Llama-3.1-8B heads (32 q / 8 kv, d=128),
bf16 paged cache (vLLM 0.26 FlashAttention layout, page 16), selection block 128, keep 10% per
row (plus 1 sink and 2 local blocks), one union per query block. Each estimator runs as the
torch function the algorithms issue wrote (the reference); the figure says how far each is from
the ≤ 6 ms per layer target and which needs a fused kernel. Table last; JSON to --out.

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
from vllm_sparse.estimators.base import ChunkContext  # noqa: E402
from vllm_sparse.estimators.registry import get_estimator  # noqa: E402
from vllm_sparse.kernels.paged import PagedKV  # noqa: E402
from vllm_sparse.selection.budget import Budget, select_blocks  # noqa: E402
from vllm_sparse.selection.pages import block_mask_to_page_csr  # noqa: E402

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


def select_and_union(ctx: ChunkContext, name: str, params, budget: Budget):
    scores = get_estimator(name).score(ctx, params)
    mask = select_blocks(scores, budget, ctx.first_query_block)  # [heads, rows, kv_blocks]
    rows = mask.shape[1]
    union = mask.view(HKV, HQ // HKV, rows, -1).any(1).transpose(0, 1)  # per (row, kv head)
    row_end = torch.clamp((ctx.query_block_ids() + 1) * ctx.block_size, max=ctx.seq_len)
    num_pages = ((row_end + PAGE - 1) // PAGE).repeat_interleave(HKV)
    return block_mask_to_page_csr(union.reshape(rows * HKV, -1), ctx.block_size, PAGE, num_pages), mask


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
    for label, raw in ESTIMATORS.items():
        if args.only and label not in args.only.split(","):
            continue
        name = label.split("_")[0] if label.startswith("lowbit") else label
        params = get_estimator(name).params.model_validate(raw)
        fresh = ChunkContext(*[getattr(ctx, f) for f in ("q", "kv_head_of", "kv", "block_table", "context_len",
                                                          "block_size", "scale", "kv_head_ids")])
        torch.cuda.reset_peak_memory_stats()
        try:
            (indptr, _), mask = select_and_union(fresh, name, params, budget)
            kept = float(indptr[-1]) / float(((ctx.query_block_ids() + 1) * args.block // PAGE).sum() * HKV)

            def run(name=name, params=params):
                # A new context each time: the key gather is part of the cost.
                c = ChunkContext(*[getattr(ctx, f) for f in ("q", "kv_head_of", "kv", "block_table",
                                                              "context_len", "block_size", "scale", "kv_head_ids")])
                select_and_union(c, name, params, budget)
            ms = triton.testing.do_bench(run, warmup=2, rep=20, return_mode="median")
            # One more run with CUDA's sync check armed: any host sync on the path raises here.
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                run()
                sync_free = True
            except RuntimeError as e:
                sync_free = f"syncs: {str(e)[:160]}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
            rows.append(dict(estimator=label, params=raw, ms=ms, kept_after_union=kept,
                             requested=float(mask.float().mean()),
                             peak_gib=torch.cuda.max_memory_allocated() / 2**30, sync_free=sync_free, error=None))
        except torch.OutOfMemoryError as e:
            rows.append(dict(estimator=label, params=raw, ms=None, error=f"OOM: {str(e)[:120]}"))
        torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__, argv=sys.argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"\nestimation+selection+union per layer: ctx {args.ctx}, chunk {args.chunk}, block {args.block}, "
          f"keep {args.keep}  ({meta['device']})")
    print(f"{'estimator':>16} {'ms':>9} {'kept':>6} {'peak GiB':>9}  no host sync")
    for r in rows:
        if r["ms"] is None:
            print(f"{r['estimator']:>16} {r['error']}")
        else:
            print(f"{r['estimator']:>16} {r['ms']:9.2f} {r['kept_after_union']:6.3f} {r['peak_gib']:9.1f}  "
                  f"{'yes' if r['sync_free'] is True else r['sync_free']}")


if __name__ == "__main__":
    main()
