"""Sparse decode kernels, one layer of the Llama-3.1-8B shape (8 KV heads, 32 q heads, head_dim 128,
16-token pages): time of each stage per decode step, and of the whole layer as one CUDA graph.

Cases: rows x context, all rows decoding sparsely (2x128K, 16x32K), and rows under dense_below
(32x8K: every kernel must skip them). The plan: Quest, 16-token blocks, 4096 tokens + 1 sink + 2
local blocks (benchmarks/configs/llama-3-8b-decode-quest-4k.yaml). Table last, then each kernel's
device time (torch profiler); JSON to --out. --sweep instead times kernel settings (the module
constants in SWEEP) one stage at a time.

--tidal: a TidalDecode selector layer of the Qwen2.5-7B-1M shape (4 KV heads, 28 q heads, 64-token blocks,
4,096 tokens kept) at long contexts, batch 1 by default: the selector's full pass with exact block scores, the
same kernel's full pass without scores, the selection, a reader layer over the kept blocks, and vLLM's FA3 decode
over the same pages where vLLM is importable (the dense layer it replaces) and over as many tokens as a reader
reads (a reader's floor: dense decode at the budget's length); with --sweep, the split-K settings of
the full pass and the reader (TIDAL_SWEEP). Times are of eager calls; the selection's and the reader's device time
per kernel (profiler) beside them (and FA3's over a reader's tokens), as their launches from Python outweigh their
work.

    python benchmarks/decode_kernels.py --out $OUT/decode_kernels.json
    python benchmarks/decode_kernels.py --sweep --out $OUT/decode_kernels_sweep.json
    python benchmarks/decode_kernels.py --tidal [--sweep] --cases 1x1048576,1x262144 --out $OUT/decode_tidal.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_sparse.config.plan import DecodeHeadPlan  # noqa: E402
from vllm_sparse.decode.attention import decode_attention, split_slots  # noqa: E402
from vllm_sparse.decode.select import candidate_width, quest_select  # noqa: E402
from vllm_sparse.decode.step import DecodeHeads, row_blocks  # noqa: E402
from vllm_sparse.decode.summaries import PageSummaries  # noqa: E402
from vllm_sparse.kernels.paged import PagedKV  # noqa: E402

KV, G, D, PAGE, BLOCK, BELOW = 8, 4, 128, 16, 16, 12288
PLAN = DecodeHeadPlan("quest", 256, 1, 2)
ROW_LIMIT = 32  # the engine's row limit (max_num_seqs of benchmarks/e2e.py's decode cases)


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


def kernel_times(fn, iters: int = 20) -> dict[str, float]:
    """Device time per kernel of one call of fn (mean over iters), from the profiler: what each kernel
    costs without its launch."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.count:
            out[e.key] = round(e.device_time_total / iters, 2)
    return out


def decode_rows(rows: int, context: int, max_model_len: int, kv: int, group: int, dev) -> tuple:
    """`rows` decode rows of `context` tokens in a random paged cache (pages in random order) ->
    (cache [2, pages, PAGE, kv, D], paged view, block table, seq_lens, query_start_loc, queries)."""
    pages_per = -(-context // PAGE)
    num_pages = rows * pages_per + 1
    cache = torch.randn(2, num_pages, PAGE, kv, D, device=dev, dtype=torch.bfloat16)
    paged = PagedKV(cache[0].transpose(1, 2), cache[1].transpose(1, 2))
    bt = torch.randperm(num_pages - 1, device=dev, dtype=torch.int32)[: rows * pages_per].view(rows, pages_per)
    table = torch.zeros(rows, -(-max_model_len // PAGE), dtype=torch.int32, device=dev)
    table[:, :pages_per] = bt
    seq = torch.full((rows,), context, dtype=torch.int32, device=dev)
    qsl = torch.arange(rows + 1, dtype=torch.int32, device=dev)
    q = torch.randn(rows, kv * group, D, device=dev, dtype=torch.bfloat16)
    return cache, paged, table, seq, qsl, q


def stages(rows: int, context: int, max_model_len: int) -> dict:
    """One layer's inputs (random pages and summaries) -> the stages as closures: update, select, attend."""
    dev = torch.device("cuda")
    cache, paged, table, seq, qsl, q = decode_rows(rows, context, max_model_len, KV, G, dev)
    bt = table[:, : -(-context // PAGE)]
    summ = PageSummaries(cache.shape[1], KV, D, PAGE, torch.bfloat16, dev)
    summ.mins.copy_(torch.randn_like(summ.mins))
    summ.maxs.copy_(summ.mins + torch.rand_like(summ.mins))
    key = torch.randn(rows, KV, D, device=dev, dtype=torch.bfloat16)
    slots = (bt[:, -1].long() * PAGE + (context - 1) % PAGE).to(torch.int64)
    heads = DecodeHeads.build((PLAN,) * KV, dev)
    nbp = row_blocks(max_model_len, BLOCK)
    scores = torch.empty(rows, KV, nbp, device=dev)
    sel = torch.zeros(rows, KV, PLAN.kept_blocks, dtype=torch.int32, device=dev)
    cand = torch.zeros(2, rows, KV, candidate_width(nbp, PLAN.kept_blocks), dtype=torch.int32, device=dev)
    cnt = torch.zeros(rows, KV, dtype=torch.int32, device=dev)
    ws_slots = sweep_split_slots(KV, SWEEP["attend"]) * KV * G  # as an engine of ROW_LIMIT rows holds
    po = torch.empty(ws_slots, D, device=dev)
    pml = torch.empty(ws_slots, 2, device=dev)
    out = torch.empty_like(q)

    def update():
        summ.update(key, slots)

    def select():
        quest_select(q, summ.mins, summ.maxs, table, qsl, seq, heads, scores, cand, sel, cnt, page_size=PAGE,
                     block_tokens=BLOCK, dense_below=BELOW)

    def attend():
        decode_attention(q, paged, table, qsl, seq, heads, sel, cnt, po, pml, out, block_tokens=BLOCK, scale=0.088,
                         dense_below=BELOW)

    return {"update": update, "select": select, "attend": attend}


def case(rows: int, context: int, max_model_len: int) -> dict:
    st = stages(rows, context, max_model_len)
    update, select, attend = st["update"], st["select"], st["attend"]

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
    res["kernels_us"] = kernel_times(layer)
    res.update(layer_bytes(rows, context))
    res["gbps"] = res["bytes_mb"] * 1e6 / (res["layer_graph_us"] * 1e-6) / 1e9
    return res


def layer_bytes(rows: int, context: int) -> dict:
    sparse = context >= BELOW
    pages_per = -(-context // PAGE)
    read = min(context, PLAN.kept_blocks * BLOCK) if sparse else 0
    kv_bytes = rows * read * KV * D * 2 * 2
    sum_bytes = rows * pages_per * KV * D * 2 * 2 if sparse else 0
    return {"bytes_mb": (kv_bytes + sum_bytes) / 1e6, "summary_mb": sum_bytes / 1e6, "kv_mb": kv_bytes / 1e6}


# --sweep: kernel settings (module constants) tried per stage; device time per kernel
def _grid(**knobs) -> list[dict]:
    import itertools

    return [dict(zip(knobs, v)) for v in itertools.product(*knobs.values())]


SWEEP = {
    "select": _grid(SELECT_SEGMENT=(512, 1024, 2048), SELECT_CHUNK=(1024, 2048, 4096), SELECT_WARPS=(4, 8)),
    "attend": _grid(SPLIT_PROGRAMS=(1024, 2048), TILE_TOKENS=(32, 64), SPLIT_WARPS=(2, 4)),
}


def sweep_split_slots(kv_heads: int, settings: list[dict]) -> int:
    """Split slots an engine of ROW_LIMIT rows holds, at the widest of a sweep's settings: the workspace is built
    once, before each setting is applied, and an engine's is sized by its own settings."""
    import vllm_sparse.decode.attention as attention_mod

    split_knobs = ("SPLIT_PROGRAMS", "MAX_SPLITS")
    return max(with_knobs(attention_mod, {k: v for k, v in knobs.items() if k in split_knobs}, split_slots,
                          ROW_LIMIT, kv_heads) for knobs in [{}, *settings])


def with_knobs(mod, knobs: dict, fn, *args):
    """fn(*args) with the module constants `knobs` set on `mod`, restored after; {"error": ...} where a setting
    fails (one the compiler rejects, e.g. out of shared memory)."""
    base = {k: getattr(mod, k) for k in knobs}
    for k, v in knobs.items():
        setattr(mod, k, v)
    try:
        return fn(*args)
    except Exception as e:
        return {"error": str(e)[-200:]}
    finally:
        for k, v in base.items():
            setattr(mod, k, v)


def parse_cases(text: str) -> list[tuple[int, int]]:
    """"ROWSxCONTEXT,..." -> [(rows, context)]."""
    return [tuple(int(x) for x in c.split("x")) for c in text.split(",")]


def sweep(cases: list[tuple[int, int]], max_model_len: int) -> list[dict]:
    import vllm_sparse.decode.attention as attention_mod
    import vllm_sparse.decode.select as select_mod

    modules = {"select": select_mod, "attend": attention_mod}
    rows_out = []
    for rows, ctx in cases:
        st = stages(rows, ctx, max_model_len)
        for stage, settings in SWEEP.items():
            mod = modules[stage]
            for knobs in settings:
                t = with_knobs(mod, knobs, kernel_times, st[stage])
                row = {"case": f"{rows}x{ctx}", "stage": stage, "knobs": knobs, "kernels_us": t}
                rows_out.append(row)
                print(json.dumps(row), flush=True)
    return rows_out


# --tidal: the Qwen2.5-7B-1M layout and the 1M decode plan's budget (qwen2.5-7b-1m-own-heads-decode-tidal-4k.yaml)
T_KV, T_G, T_BLOCK = 4, 7, 64
T_PLAN = DecodeHeadPlan("tidal", 4096 // T_BLOCK, 1, 2, selector=True)


def tidal_stages(rows: int, context: int) -> dict:
    """One tidal selector layer's inputs at `context` tokens per row -> closures: the selector's pass (attention and
    exact block scores), the same pass without scores, the selection, a reader over the kept blocks, FA3's decode."""
    from vllm_sparse.decode.select import select_top_blocks

    dev = torch.device("cuda")
    max_model_len = context + 256
    cache, paged, table, seq, qsl, q = decode_rows(rows, context, max_model_len, T_KV, T_G, dev)
    score_heads = DecodeHeads.build((T_PLAN,) * T_KV, dev)
    dense_heads = DecodeHeads.build((None,) * T_KV, dev)
    readers = DecodeHeads.build((DecodeHeadPlan("tidal", T_PLAN.top_k_blocks, 1, 2),) * T_KV, dev)
    nbp = row_blocks(max_model_len, T_BLOCK)
    scores = torch.empty(rows, T_KV, nbp, device=dev)
    sel = torch.zeros(rows, T_KV, T_PLAN.kept_blocks, dtype=torch.int32, device=dev)
    cand = torch.zeros(2, rows, T_KV, candidate_width(nbp, T_PLAN.kept_blocks), dtype=torch.int32, device=dev)
    cnt = torch.zeros(rows, T_KV, dtype=torch.int32, device=dev)
    ws_slots = sweep_split_slots(T_KV, TIDAL_SWEEP) * T_KV * T_G
    po = torch.empty(ws_slots, D, device=dev)
    pml = torch.empty(ws_slots, 2, device=dev)
    out = torch.empty_like(q)
    unused = torch.zeros(rows, T_KV, 1, dtype=torch.int32, device=dev)
    scale = D ** -0.5

    def selector():
        decode_attention(q, paged, table, qsl, seq, dense_heads, unused, unused[..., 0], po, pml, out,
                         block_tokens=T_BLOCK, scale=scale, dense_below=BELOW, scores=scores, score_heads=score_heads)

    def full_pass():
        decode_attention(q, paged, table, qsl, seq, dense_heads, unused, unused[..., 0], po, pml, out,
                         block_tokens=T_BLOCK, scale=scale, dense_below=BELOW)

    def select():
        select_top_blocks(scores, cand, qsl, seq, score_heads, sel, cnt, block_tokens=T_BLOCK, dense_below=BELOW)

    def reader():
        decode_attention(q, paged, table, qsl, seq, readers, sel, cnt, po, pml, out, block_tokens=T_BLOCK,
                         scale=scale, dense_below=BELOW)

    st = {"selector": selector, "full_pass": full_pass, "select": select, "reader": reader}
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError:  # (the bare GPU image: no vLLM staged)
        return st
    fa_out = torch.empty_like(q)

    def fa3_over(tokens: int):
        """FA3's decode over each row's first `tokens` tokens of the same pages."""
        lens = torch.full_like(seq, tokens)
        return lambda: flash_attn_varlen_func(q, cache[0], cache[1], max_seqlen_q=1, cu_seqlens_q=qsl,
                                              max_seqlen_k=tokens, seqused_k=lens, softmax_scale=scale, causal=True,
                                              block_table=table, out=fa_out, fa_version=3)

    st["fa3"] = fa3_over(context)
    st["fa3_kept"] = fa3_over(T_PLAN.kept_blocks * T_BLOCK)  # (a reader's tokens: dense decode over as many)
    return st


def time_passes(st: dict) -> dict:
    """us per call of the passes the split-K settings move: the selector's, the plain full pass, a reader's."""
    return {f"{n}_us": timed(st[n]) for n in ("selector", "full_pass", "reader")}


TIDAL_SWEEP = _grid(MAX_SPLITS=(64, 128, 256), WIDE_TILE_TOKENS=(64, 128), SPLIT_WARPS=(4, 8),
                    SPLIT_STAGES=(None, 2, 4))


def tidal_main(args) -> None:
    import vllm_sparse.decode.attention as attention_mod

    results = {"device": torch.cuda.get_device_name(), "plan": "tidal, 64-token blocks, 64+1+2 kept, 4 KV x 7 q heads",
               "cases": {}, "sweep": []}
    for i, (rows, ctx) in enumerate(parse_cases(args.cases)):
        st = tidal_stages(rows, ctx)
        st["selector"]()  # (the selection reads a selector's scores)
        key = f"{rows}x{ctx}"
        results["cases"][key] = {name: timed(fn) for name, fn in st.items()}
        results["cases"][key]["kv_gb_per_layer"] = rows * ctx * T_KV * D * 2 * 2 / 1e9
        # (timed() is eager: the selection's and a reader's few microseconds of work sit under their launches from
        # Python, which an engine's CUDA graph does not pay; their device time, kernel by kernel, from the profiler)
        results["cases"][key]["device_us"] = {name: kernel_times(st[name]) for name in ("select", "reader", "fa3_kept")
                                              if name in st}
        print(key, json.dumps(results["cases"][key]), flush=True)
        if not args.sweep or i:  # (the sweep at the first case only: ~36 compiles)
            continue
        for knobs in TIDAL_SWEEP:
            row = {"case": key, "knobs": knobs, **with_knobs(attention_mod, knobs, time_passes, st)}
            results["sweep"].append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\n{results['device']}, one tidal selector layer (Qwen2.5-7B-1M layout), us per call")
    names = ["selector", "full_pass", "select", "reader", "fa3", "fa3_kept"]
    print(f"{'case':>12} " + " ".join(f"{n:>10}" for n in names) + f" {'KV GB':>6} {'sel GB/s':>8}")
    for key, r in results["cases"].items():
        cells = " ".join(f"{r[n]:>10.1f}" if n in r else f"{'-':>10}" for n in names)
        print(f"{key:>12} {cells} {r['kv_gb_per_layer']:>6.2f} {r['kv_gb_per_layer'] * 1e6 / r['selector']:>8.0f}")
        for name, kernels in r["device_us"].items():
            print(f"{'':>12} {name} device time: {sum(kernels.values()):.1f} us (" +
                  ", ".join(f"{k.strip('_').replace('_kernel', '')} {v}" for k, v in kernels.items()) + ")")
    for row in results["sweep"]:
        knobs = " ".join(f"{k}={v}" for k, v in row["knobs"].items())
        cell = row.get("error") or (f"selector {row['selector_us']:.1f} us, full pass {row['full_pass_us']:.1f} us, "
                                    f"reader {row['reader_us']:.1f} us")
        print(f"{row['case']:>12} {knobs:<44} {cell}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="2x131072,16x32768,32x8192")
    ap.add_argument("--max-model-len", type=int, default=131072 + 256)
    ap.add_argument("--out", default="decode_kernels.json")
    ap.add_argument("--sweep", action="store_true", help="time kernel settings one at a time (per-kernel device time)")
    ap.add_argument("--tidal", action="store_true", help="a TidalDecode selector layer at long contexts (batch 1)")
    args = ap.parse_args()
    if args.tidal:
        if args.cases == ap.get_default("cases"):
            args.cases = "1x1048576,1x262144"
        tidal_main(args)
        return
    if args.sweep:
        res = sweep(parse_cases(args.cases), args.max_model_len)
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(f"\n{torch.cuda.get_device_name()}: device time per kernel (us), one setting changed at a time")
        for r in res:
            t = r["kernels_us"]
            knobs = " ".join(f"{k}={v}" for k, v in r["knobs"].items())
            print(f"{r['case']:>10} {knobs:<52} " + "  ".join(
                f"{k.strip('_').replace('_kernel', '')}={v}" for k, v in t.items()))
        return
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
    print("\ndevice time per kernel (us per layer, profiler):")
    for c in args.cases.split(","):
        print(f"{c:>10} " + "  ".join(f"{k[:28]}={v:.1f}" for k, v in results[c]["kernels_us"].items()))


if __name__ == "__main__":
    main()
