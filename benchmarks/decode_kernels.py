"""Sparse decode kernels, one layer of the Llama-3.1-8B shape (8 KV heads, 32 q heads, head_dim 128,
16-token pages): time of each stage per decode step, and of the whole layer as one CUDA graph.

Cases: rows x context, all rows decoding sparsely (2x128K, 16x32K), and rows under dense_below
(32x8K: every kernel must skip them). The plan: Quest, 16-token blocks, 4096 tokens + 1 sink + 2
local blocks (benchmarks/configs/llama-3-8b-decode-quest-4k.yaml). Table last; JSON to --out.

    python benchmarks/decode_kernels.py --out $OUT/decode_kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_sparse.config.plan import DecodeHeadPlan  # noqa: E402
from vllm_sparse.decode.attention import decode_attention  # noqa: E402
from vllm_sparse.decode.select import quest_select  # noqa: E402
from vllm_sparse.decode.step import SPLITS, DecodeHeads, row_blocks  # noqa: E402
from vllm_sparse.decode.summaries import PageSummaries  # noqa: E402
from vllm_sparse.kernels.paged import PagedKV  # noqa: E402

KV, G, D, PAGE, BLOCK, BELOW = 8, 4, 128, 16, 16, 12288
PLAN = DecodeHeadPlan("quest", 256, 1, 2)


def timed(fn, iters: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters * 1000  # us


def case(rows: int, context: int, max_model_len: int) -> dict:
    dev = torch.device("cuda")
    pages_per = -(-context // PAGE)
    num_pages = rows * pages_per + 1
    cache = torch.randn(2, num_pages, PAGE, KV, D, device=dev, dtype=torch.bfloat16)
    paged = PagedKV(cache[0].transpose(1, 2), cache[1].transpose(1, 2))
    bt = torch.randperm(num_pages - 1, device=dev, dtype=torch.int32)[: rows * pages_per].view(rows, pages_per)
    table = torch.zeros(rows, -(-max_model_len // PAGE), dtype=torch.int32, device=dev)
    table[:, :pages_per] = bt
    summ = PageSummaries(num_pages, KV, D, PAGE, torch.bfloat16, dev)
    summ.mins.copy_(torch.randn_like(summ.mins))
    summ.maxs.copy_(summ.mins + torch.rand_like(summ.mins))
    seq = torch.full((rows,), context, dtype=torch.int32, device=dev)
    qsl = torch.arange(rows + 1, dtype=torch.int32, device=dev)
    q = torch.randn(rows, KV * G, D, device=dev, dtype=torch.bfloat16)
    key = torch.randn(rows, KV, D, device=dev, dtype=torch.bfloat16)
    slots = (bt[:, -1].long() * PAGE + (context - 1) % PAGE).to(torch.int64)
    heads = DecodeHeads.build((PLAN,) * KV, dev)
    nbp = row_blocks(max_model_len, BLOCK)
    scores = torch.empty(rows, KV, nbp, device=dev)
    sel = torch.zeros(rows, KV, PLAN.kept_blocks, dtype=torch.int32, device=dev)
    cnt = torch.zeros(rows, KV, dtype=torch.int32, device=dev)
    po = torch.empty(rows, KV * G, SPLITS, D, device=dev)
    pml = torch.empty(rows, KV * G, SPLITS, 2, device=dev)
    out = torch.empty_like(q)

    def update():
        summ.update(key, slots)

    def select():
        quest_select(q, summ.mins, summ.maxs, table, qsl, seq, heads, scores, sel, cnt, page_size=PAGE,
                     block_tokens=BLOCK, dense_below=BELOW)

    def attend():
        decode_attention(q, paged, table, qsl, seq, heads, sel, cnt, po, pml, out, block_tokens=BLOCK, scale=0.088,
                         dense_below=BELOW)

    def layer():
        update()
        select()
        attend()

    res = {"update_us": timed(update), "select_us": timed(select), "attend_us": timed(attend)}
    graph = torch.cuda.CUDAGraph()
    layer()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        layer()
    res["layer_graph_us"] = timed(graph.replay)
    sparse = context >= BELOW
    read = min(context, PLAN.kept_blocks * BLOCK) if sparse else 0
    kv_bytes = rows * read * KV * D * 2 * 2
    sum_bytes = rows * pages_per * KV * D * 2 * 2 if sparse else 0
    res["bytes_mb"] = (kv_bytes + sum_bytes) / 1e6
    res["gbps"] = (kv_bytes + sum_bytes) / (res["layer_graph_us"] * 1e-6) / 1e9
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="2x131072,16x32768,32x8192")
    ap.add_argument("--max-model-len", type=int, default=131072 + 256)
    ap.add_argument("--out", default="decode_kernels.json")
    args = ap.parse_args()
    results = {"device": torch.cuda.get_device_name(), "plan": "quest 16-token blocks, 256+1+2 blocks, head 128"}
    for c in args.cases.split(","):
        rows, ctx = (int(x) for x in c.split("x"))
        results[c] = case(rows, ctx, args.max_model_len)
        print(c, json.dumps(results[c]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\n{results['device']}, one layer of the Llama-3.1-8B shape, max_model_len {args.max_model_len}")
    print(f"{'case':>10} {'update':>8} {'select':>8} {'attend':>8} {'layer(graph)':>13} {'MB read':>8} {'GB/s':>6}")
    for c in args.cases.split(","):
        r = results[c]
        print(f"{c:>10} {r['update_us']:>7.1f}u {r['select_us']:>7.1f}u {r['attend_us']:>7.1f}u "
              f"{r['layer_graph_us']:>12.1f}u {r['bytes_mb']:>8.1f} {r['gbps']:>6.0f}")


if __name__ == "__main__":
    main()
