"""Sparse paged attention kernel vs FA3 dense (and FlashInfer block-sparse where installed), one GPU.

Llama-3.1-8B attention (32 q / 8 kv heads, d=128), bf16, vLLM 0.26's FlashAttention KV layout
(K|V packed per page; pages of 16 tokens, `--page`). For each context (32K, 128K) and mode (the last 16K-query chunk,
the whole prompt), queries are split into union tiles (segments of `--tile` queries, one page
list per segment and KV head, as the backend's union_tile gives); each list keeps the sink
block, the tile's diagonal blocks and random other blocks (64 tokens, `--block`) up to the density asked.
FLOPs count only the (query, key) pairs the kernel must compute, so TFLOP/s compare with FA3's
dense causal figure directly. Table last; JSON to --out.

    python benchmarks/kernels.py --out $OUT/kernels.json
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimators import peak_above  # noqa: E402  (GiB above what was allocated before the call)

from vllm_sparse.kernels.paged import PagedKV  # noqa: E402
from vllm_sparse.kernels.sparse_attention import sparse_paged_attention  # noqa: E402
from vllm_sparse.selection.pages import block_mask_to_page_csr  # noqa: E402
from vllm_sparse.selection.tile_tables import packed_tables  # noqa: E402

HQ, HKV, D, PAGE, BLOCK = 32, 8, 128, 16, 64


def make_cache(ctx: int, gen: torch.Generator):
    pages = ctx // PAGE + 8
    packed = torch.randn(pages, PAGE, HKV, 2 * D, generator=gen, device="cuda", dtype=torch.bfloat16)
    kv = PagedKV.from_flash_cache(packed.permute(0, 2, 1, 3))  # logical [pages, heads, page, 2D]
    table = torch.randperm(pages, generator=gen, device="cuda")[: ctx // PAGE].to(torch.int32)[None]
    return packed, kv, table


def make_segments(ctx: int, q_len: int, tile: int, density: float, gen: torch.Generator, lists: int | None = None):
    """Union tiles of the last q_len queries; per (tile, list) a kept-block mask (a list per KV head, or
    per q head with lists=HQ)."""
    n_seg, lists = q_len // tile, lists or HKV
    seg_end = ctx - q_len + tile * torch.arange(1, n_seg + 1, device="cuda")  # exclusive
    seg_start = seg_end - tile
    n_blocks = ctx // BLOCK
    blk = torch.arange(n_blocks, device="cuda")
    causal = blk[None, :] * BLOCK < seg_end[:, None]  # [seg, blocks]
    forced = (blk[None, :] == 0) | (blk[None, :] >= seg_start[:, None] // BLOCK)  # sink + diagonal
    forced &= causal
    score = torch.rand(n_seg, lists, n_blocks, generator=gen, device="cuda")
    score = torch.where(forced[:, None], 2.0, torch.where(causal[:, None], score, -1.0))
    want = torch.clamp((density * causal.sum(1)).ceil(), min=1)  # blocks per row
    want = torch.maximum(want, forced.sum(1).to(want.dtype))[:, None, None]
    rank = score.argsort(-1, descending=True).argsort(-1)
    mask = (rank < want) & causal[:, None]
    indptr, indices = mask_csr(mask, seg_end)
    qsl = (torch.arange(n_seg + 1, device="cuda") * tile).to(torch.int32)
    return mask, causal, indptr, indices, qsl, seg_end.to(torch.int32)


def mask_csr(mask, seg_end):
    """[seg, lists, blocks] kept-block mask -> CSR page lists per (segment, list)."""
    n_seg, lists, n_blocks = mask.shape
    num_pages = ((seg_end + PAGE - 1) // PAGE).repeat_interleave(lists)
    return block_mask_to_page_csr(mask.reshape(n_seg * lists, n_blocks), BLOCK, PAGE, num_pages)


def pair_count(mask, seg_end, tile) -> tuple[float, float]:
    """(query, key) pairs computed over kept blocks, and over all causal blocks (per kv head, summed)."""
    k = torch.arange(BLOCK, device="cuda")
    blk = torch.arange(mask.shape[-1], device="cuda")
    keys = blk[:, None] * BLOCK + k[None, :]  # [blocks, BLOCK]
    lo, hi = (seg_end - tile)[:, None, None], seg_end[:, None, None]
    pairs = (hi - torch.maximum(lo, keys[None])).clamp(min=0).sum(-1).double()  # [seg, blocks]
    kept = (mask.double() * pairs[:, None]).sum().item()
    return kept, pairs.sum().item() * mask.shape[1]


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def peak_mib(fn) -> float:
    """MiB the call allocates above what is allocated before it (its temporaries, e.g. FA3's split-KV partials)."""
    return peak_above(fn) * 1024


def packed_call(q, k_cache, v_cache, tables, counts, qsl, seg_end, tile):
    """FA3 over the compacted tables in one call for every list (`flash_compact.ListPacking`), the packed queries and
    output in a workspace reserved for them, as the backend's packed call runs (whatever `list_packing`'s rule would
    say of this chunk). Returns (the call, with `.out` its output, and its two copies alone), or (None, why)."""
    from vllm_sparse.kernels import flash_compact
    from vllm_sparse.kernels.workspace import WORKSPACE

    if PAGE > flash_compact.MAX_PACKED_PAGE:  # (the backend does not pack them: FA3 may read them through TMA)
        return None, f"pages of {PAGE} tokens: the backend packs pages up to {flash_compact.MAX_PACKED_PAGE} only"
    out = torch.full_like(q, float("nan"))
    need = flash_compact.packed_bytes(q, out)
    if WORKSPACE.reserve(need, q.device) < need:
        return None, f"{need / 2**20:.0f} MiB of packed queries and output over VLLM_SPARSE_WORKSPACE_MIB"
    # (the tables and query starts as the backend's packed call reads them: one list per KV head)
    packing = flash_compact.ListPacking(k_cache.stride(0) // k_cache.stride(2), 1, qsl, q.shape[0])
    ids, packed_qsl = packed_tables(tables, counts, packing)
    run = functools.partial(flash_compact.sparse_attention_flash, q, k_cache, v_cache, ids,
                            flash_compact.used_tokens(counts, seg_end, PAGE), qsl, seg_end, tile, D**-0.5, out,
                            packed_qsl=packed_qsl)
    run.out = out
    # The call's two copies alone (queries to head-major, output back), the same shapes, in buffers of their own.
    n, pack = tables.shape[0], q.shape[1] // tables.shape[0]
    q_heads_major = torch.empty(n, q.shape[0], pack, D, dtype=q.dtype, device=q.device)
    out_heads_major = torch.empty_like(q_heads_major)

    def copies():
        q_heads_major.copy_(q.view(q.shape[0], n, pack, D).transpose(0, 1))
        out.view(q.shape[0], n, pack, D).copy_(out_heads_major.transpose(0, 1))
    return run, copies


def fa3_dense(q, k_cache, v_cache, table, ctx, q_len, fa_version=3):
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    cu_q = torch.tensor([0, q_len], dtype=torch.int32, device="cuda")
    seqused = torch.tensor([ctx], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)

    def run():
        flash_attn_varlen_func(q, k_cache, v_cache, max_seqlen_q=q_len, cu_seqlens_q=cu_q, max_seqlen_k=ctx,
                               seqused_k=seqused, softmax_scale=D**-0.5, causal=True, block_table=table,
                               out=out, fa_version=fa_version)
    return run, out


def flashinfer_block_sparse(q, packed, table, mask, tile):
    """FlashInfer's VariableBlockSparseAttentionWrapper on the same kept blocks (dense K/V copy, not timed).

    Returns (run, plan_ms): its plan() runs on the host once per mask."""
    import time

    import flashinfer

    ctx = mask.shape[-1] * BLOCK
    keys = packed[table[0].long()].reshape(ctx, HKV, 2 * D)
    k = keys[..., :D].transpose(0, 1).contiguous()
    v = keys[..., D:].transpose(0, 1).contiguous()
    qh = q.transpose(0, 1).contiguous()
    n_rows = mask.shape[0]
    wrapper = flashinfer.VariableBlockSparseAttentionWrapper(
        torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device="cuda"))
    row_sz = torch.full((HKV, n_rows), tile, dtype=torch.int32, device="cuda")
    col_sz = torch.full((HKV, mask.shape[-1]), BLOCK, dtype=torch.int32, device="cuda")
    t0 = time.perf_counter()
    wrapper.plan(mask.transpose(0, 1).contiguous(), row_sz, col_sz, HQ, HKV, D, causal=True,
                 q_data_type=torch.bfloat16, sm_scale=D**-0.5)
    torch.cuda.synchronize()
    plan_ms = (time.perf_counter() - t0) * 1e3
    return (lambda: wrapper.run(qh, k, v)), plan_ms


def head_lists(q, kv, k_cache, v_cache, table, ctx, q_len, tile, density, gen, fa_version=3) -> dict:
    """Issue 26's per-q-head target: the four q heads of each KV head keep *different* random blocks
    (`union_heads: false`: a page list per q head) vs the *same* blocks (one list per KV head): FA3 over
    compacted tables and the Triton kernel, with the union of the different lists beside them (what
    `union_heads: true` reads). Per-head time / same time is the cost of heads disagreeing."""
    from vllm_sparse.kernels.flash_compact import compact_block_tables, sparse_attention_flash, used_tokens

    group = HQ // HKV
    same, causal, *_, qsl, seg_end = make_segments(ctx, q_len, tile, density, gen)  # [seg, HKV, blocks]
    own = make_segments(ctx, q_len, tile, density, gen, lists=HQ)[0]  # [seg, HQ, blocks]
    union = own.view(own.shape[0], HKV, group, -1).any(2)
    rows_bt = torch.zeros(qsl.numel() - 1, dtype=torch.int32, device="cuda")
    cases = {"same": (same, False), "own": (own, True), "union": (union, False)}
    row = dict(ctx=ctx, q_len=q_len, density=density, tile=tile)
    outs = {}
    for name, (mask, per_head) in cases.items():
        kept_pairs, all_pairs = pair_count(mask, seg_end, tile)
        row[f"{name}_kept_pairs_share"] = kept_pairs / all_pairs
        indptr, indices = mask_csr(mask, seg_end)
        tables, counts = compact_block_tables(table, rows_bt, indptr, indices, mask.shape[1], ctx // PAGE)
        fa_out = torch.full_like(q, float("nan"))
        run_fa = functools.partial(sparse_attention_flash, q, k_cache, v_cache, tables,
                                   used_tokens(counts, seg_end, PAGE), qsl, seg_end, tile, D**-0.5, fa_out,
                                   fa_version=fa_version)
        tri_out = torch.full_like(q, float("nan"))
        run_tri = functools.partial(sparse_paged_attention, q, kv, table, qsl, seg_end, indptr, indices, D**-0.5,
                                    out=tri_out, max_query_len=tile, block_table_rows=rows_bt,
                                    lists_per_q_head=per_head)
        run_fa()
        run_tri()
        row[f"{name}_unwritten"] = bool(fa_out.isnan().any() or tri_out.isnan().any())
        row[f"{name}_fa3_vs_triton_err"] = float((fa_out.float() - tri_out.float()).norm() / tri_out.float().norm())
        row[f"{name}_fa3_ms"], row[f"{name}_triton_ms"] = bench(run_fa), bench(run_tri)
        outs[name] = fa_out
    row["own_vs_union_output_diff"] = float((outs["own"].float() - outs["union"].float()).norm()
                                           / outs["union"].float().norm())
    for k in ("fa3", "triton"):
        row[f"{k}_own_over_same"] = row[f"own_{k}_ms"] / row[f"same_{k}_ms"]
        row[f"{k}_union_over_same"] = row[f"union_{k}_ms"] / row[f"same_{k}_ms"]
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    global HQ, HKV, BLOCK, PAGE  # (--heads, --block and --page set the layout every helper reads)
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--chunk", type=int, default=16384, help="query tokens of the 'chunk' mode")
    ap.add_argument("--densities", default="0.05,0.1,0.2,0.5,1.0")
    ap.add_argument("--tile", type=int, default=128, help="queries per union tile (segment)")
    ap.add_argument("--block", type=int, default=BLOCK, help="tokens per kept block (the plans' block_size)")
    ap.add_argument("--page", type=int, default=PAGE, help="tokens per KV cache page (vLLM's --block-size; 16 on CUDA "
                    "in 0.26-0.33): FA3 reads pages under its key tile without TMA")
    ap.add_argument("--packed", action="store_true",
                    help="also time FlashAttention over the compacted tables in one call for every list (the "
                         "packed call, its query and output copies included), whatever list_packing's rule says")
    ap.add_argument("--modes", default="chunk,prompt")
    ap.add_argument("--out", default="kernels.json")
    ap.add_argument("--configs", default="", help="BLOCK_M:BLOCK_N:warps:stages;... to sweep")
    ap.add_argument("--flashinfer", default="", help="densities at which to time FlashInfer (whole prompt)")
    ap.add_argument("--head-lists", default="", help="densities at which to compare a page list per q head "
                    "(different blocks per head) with one per KV head (same blocks): issue 26's target")
    ap.add_argument("--heads", default=f"{HQ}/{HKV}", help="Q/KV heads (28/4: Qwen2.5-7B's 7 q heads per KV head)")
    ap.add_argument("--fa-version", type=int, default=3, choices=(2, 3),
                    help="FlashAttention version of the dense baseline and of the compacted-table path (2: what "
                         "GPUs without FA3 run; the 'fa3_*' fields then hold FA2's times)")
    args = ap.parse_args()
    HQ, HKV = (int(x) for x in args.heads.split("/"))
    BLOCK, PAGE = args.block, args.page
    if BLOCK % PAGE:
        raise SystemExit(f"--block {BLOCK} is not a multiple of --page {PAGE}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    try:
        import vllm  # noqa: F401
        have_fa3 = True
    except ImportError:
        have_fa3 = False
    sweep = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(";") if c] or [None]
    rows, head_rows = [], []
    for ctx in (int(c) for c in args.contexts.split(",")):
        packed, kv, table = make_cache(ctx, gen)
        k_cache = packed[..., :D].contiguous()  # FA3 reads separate K and V caches [pages, page, heads, D]
        v_cache = packed[..., D:].contiguous()
        for mode in args.modes.split(","):
            q_len = args.chunk if mode == "chunk" else ctx
            q = torch.randn(q_len, HQ, D, generator=gen, device="cuda", dtype=torch.bfloat16)
            dense_ms = dense_tflops = None
            causal_pairs = q_len * (ctx - q_len) + q_len * (q_len + 1) / 2
            if have_fa3:
                run, fa_out = fa3_dense(q, k_cache, v_cache, table, ctx, q_len, args.fa_version)
                dense_ms = bench(run)
                dense_tflops = 4 * D * HQ * causal_pairs / dense_ms / 1e9
            for density in (float(x) for x in args.densities.split(",") if x):
                mask, causal, indptr, indices, qsl, seg_end = make_segments(ctx, q_len, args.tile, density, gen)
                kept_pairs, all_pairs = pair_count(mask, seg_end, args.tile)
                kept_blocks = float((mask.sum() / (causal.sum() * HKV)).item())
                n_seg = qsl.numel() - 1
                rows_bt = torch.zeros(n_seg, dtype=torch.int32, device="cuda")
                out = torch.full_like(q, float("nan"))
                for cfg in sweep:
                    kw = {} if cfg is None else dict(block_m=cfg[0], block_n=cfg[1], num_warps=cfg[2],
                                                     num_stages=cfg[3])
                    run_sparse = functools.partial(sparse_paged_attention, q, kv, table, qsl, seg_end, indptr,
                                                   indices, D**-0.5, out=out, max_query_len=args.tile,
                                                   block_table_rows=rows_bt, **kw)
                    out.fill_(float("nan"))
                    run_sparse()
                    unwritten = bool(out.isnan().any())
                    err = None
                    if density >= 1.0 and have_fa3:
                        run()
                        err = float((out.float() - fa_out.float()).norm() / fa_out.float().norm())
                    ms = bench(run_sparse)
                    tflops = 4 * D * kept_pairs * (HQ // HKV) / ms / 1e9
                    rows.append(dict(ctx=ctx, mode=mode, q_len=q_len, density=density, kept_blocks=kept_blocks,
                                     kept_pairs_share=kept_pairs / all_pairs, cfg=cfg, sparse_ms=ms,
                                     sparse_tflops=tflops, fa3_ms=dense_ms, fa3_tflops=dense_tflops,
                                     rel_err_vs_fa3=err, unwritten=unwritten,
                                     speedup=(dense_ms / ms) if dense_ms else None))
                    print(json.dumps(rows[-1]), flush=True)
                if have_fa3:
                    # The same lists through FA3's paged kernel over compacted block tables.
                    from vllm_sparse.kernels import flash_compact
                    from vllm_sparse.kernels.flash_compact import (
                        compact_block_tables,
                        sparse_attention_flash,
                        used_tokens,
                    )
                    tri_out = out.clone()
                    compact = functools.partial(compact_block_tables, table, rows_bt, indptr, indices, HKV,
                                                ctx // PAGE)
                    tables, counts = compact()
                    fa_sparse_out = torch.full_like(q, float("nan"))
                    run_fc = functools.partial(sparse_attention_flash, q, k_cache, v_cache, tables,
                                               used_tokens(counts, seg_end, PAGE), qsl, seg_end, args.tile, D**-0.5,
                                               fa_sparse_out, fa_version=args.fa_version)
                    run_fc()
                    fc_err = float((fa_sparse_out.float() - tri_out.float()).norm() / tri_out.float().norm())
                    fc_ms, compact_ms = bench(run_fc), bench(compact)
                    rows[-1].update(flash_compact_ms=fc_ms, flash_compact_tables_ms=compact_ms,
                                    flash_compact_err_vs_ours=fc_err,
                                    flash_compact_tflops=4 * D * kept_pairs * (HQ // HKV) / fc_ms / 1e9,
                                    flash_compact_splits=flash_compact.default_num_splits(
                                        args.fa_version, n_seg, args.tile, HQ // HKV, q.device),
                                    flash_compact_peak_mib=peak_mib(run_fc))
                    # FA3: the same call under its own split-KV heuristic (num_splits=0), and with the split count
                    # capped at 2 x SMs / query tiles (a candidate bound for short chunks' temporaries). FA2: 0 (the
                    # path's, as vLLM's FA2 call) and 1, which picks FA2's other key tile (it never splits a paged
                    # call's keys by either).
                    tiles = flash_compact.fa3_query_tiles(n_seg, args.tile, HQ // HKV)
                    cap = -(-2 * flash_compact.num_sms(q.device) // tiles) if args.fa_version == 3 else 1
                    for name, splits in (("heuristic", 0), ("capped", cap)):
                        run = functools.partial(run_fc, num_splits=splits)
                        rows[-1].update({f"flash_compact_{name}_ms": bench(run),
                                         f"flash_compact_{name}_peak_mib": peak_mib(run)})
                    rows[-1]["flash_compact_cap"] = cap
                    if args.packed and args.fa_version == 3:
                        run_packed, copies = packed_call(q, k_cache, v_cache, tables, counts, qsl, seg_end, args.tile)
                        if run_packed is None:
                            rows[-1]["flash_compact_packed_skipped"] = copies
                        else:
                            run_packed()
                            rows[-1]["flash_compact_packed_err_vs_ours"] = float(
                                (run_packed.out.float() - tri_out.float()).norm() / tri_out.float().norm())
                            rows[-1]["flash_compact_packed_ms"] = bench(run_packed)
                            rows[-1]["flash_compact_packed_copies_ms"] = bench(copies)
                            rows[-1]["flash_compact_packed_splits"] = flash_compact.default_num_splits(
                                3, n_seg * HKV, args.tile, HQ // HKV, q.device)
                        run_packed = copies = None
                    print(json.dumps({k: v for k, v in rows[-1].items() if k.startswith("flash_compact")}), flush=True)
                    tables = counts = fa_sparse_out = tri_out = None
                if mode == "prompt" and str(density) in args.flashinfer.split(","):
                    try:
                        run_fi, plan_ms = flashinfer_block_sparse(q, packed, table, mask, args.tile)
                        run_fi()
                        fi_ms = bench(run_fi)
                        rows[-1].update(flashinfer_ms=fi_ms, flashinfer_plan_ms=plan_ms)
                    except Exception as e:  # reported, not fatal: the baseline is optional
                        rows[-1].update(flashinfer_error=repr(e)[:300])
                    print(json.dumps({k: v for k, v in rows[-1].items() if k.startswith("flashinfer")}), flush=True)
            for density in (float(x) for x in args.head_lists.split(",") if x and have_fa3):
                head_rows.append(head_lists(q, kv, k_cache, v_cache, table, ctx, q_len, args.tile, density, gen,
                                            args.fa_version))
        packed = kv = k_cache = v_cache = q = None
        torch.cuda.empty_cache()
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                argv=sys.argv, tile=args.tile, fa_version=args.fa_version, page=PAGE, block=BLOCK)
    if have_fa3:
        import vllm
        meta["vllm"] = vllm.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows, head_lists=head_rows), indent=1))
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  vllm {meta.get('vllm')}  "
          f"pages of {PAGE}, blocks of {BLOCK}")
    print(f"{'ctx':>7} {'mode':>6} {'dens':>5} {'kept':>6} {'cfg':>14} {'ours ms':>8} {'TF/s':>6} "
          f"{'dense ms':>8} {'TF/s':>8} {'x dense':>7} {'err':>8} bad   (dense: FA{args.fa_version})")
    for r in rows:
        cfg = "auto" if r["cfg"] is None else ":".join(map(str, r["cfg"]))
        fa = f"{r['fa3_ms']:8.2f} {r['fa3_tflops']:8.0f} {r['speedup']:7.2f}" if r["fa3_ms"] else f"{'-':>8} " * 3
        err = f"{r['rel_err_vs_fa3']:.1e}" if r["rel_err_vs_fa3"] is not None else "-"
        print(f"{r['ctx']:>7} {r['mode']:>6} {r['density']:>5.2f} {r['kept_blocks']:>6.3f} {cfg:>14} "
              f"{r['sparse_ms']:8.2f} {r['sparse_tflops']:6.0f} {fa} {err:>8} {int(r['unwritten'])}")
        if "flash_compact_ms" in r:
            fa = f"FA{args.fa_version}"
            print(f"{'':>21} {fa} over compacted tables: {r['flash_compact_ms']:.2f} ms "
                  f"({r['flash_compact_tflops']:.0f} TF/s, x {fa} dense {r['fa3_ms'] / r['flash_compact_ms']:.2f}; "
                  f"tables {r['flash_compact_tables_ms']:.2f} ms; err vs ours {r['flash_compact_err_vs_ours']:.1e})")
            print(f"{'':>21} num_splits {r['flash_compact_splits']} (rule): {r['flash_compact_ms']:.2f} ms, "
                  f"{r['flash_compact_peak_mib']:.0f} MiB temporaries; {fa}'s heuristic (0): "
                  f"{r['flash_compact_heuristic_ms']:.2f} ms, {r['flash_compact_heuristic_peak_mib']:.0f} MiB; "
                  f"{'capped at' if args.fa_version == 3 else 'num_splits'} "
                  f"{r['flash_compact_cap']}: {r['flash_compact_capped_ms']:.2f} ms, "
                  f"{r['flash_compact_capped_peak_mib']:.0f} MiB")
            if "flash_compact_packed_ms" in r:
                print(f"{'':>21} one call for every list (packed, copies included): {r['flash_compact_packed_ms']:.2f}"
                      f" ms (x per-list calls {r['flash_compact_ms'] / r['flash_compact_packed_ms']:.2f}, splits "
                      f"{r['flash_compact_packed_splits']}; its two copies alone "
                      f"{r['flash_compact_packed_copies_ms']:.2f} ms; err vs ours "
                      f"{r['flash_compact_packed_err_vs_ours']:.1e})")
            if "flash_compact_packed_skipped" in r:
                print(f"{'':>21} one call for every list: not timed ({r['flash_compact_packed_skipped']})")
        if "flashinfer_ms" in r:
            print(f"{'':>21} FlashInfer block-sparse: {r['flashinfer_ms']:.2f} ms"
                  f" (+ plan {r['flashinfer_plan_ms']:.0f} ms on the host)")

    if head_rows:
        print("\npage list per q head (4 q heads per KV head keep different blocks) vs per KV head (same blocks); "
              "ms, and the ratio to 'same'")
        print(f"{'ctx':>7} {'q_len':>7} {'dens':>5} {'union kept':>10} {'kernel':>7} {'same':>8} {'own':>8} "
              f"{'union':>8} {'own/same':>8} {'union/same':>10} {'err':>8}")
        for r in head_rows:
            for k in ("fa3", "triton"):
                print(f"{r['ctx']:>7} {r['q_len']:>7} {r['density']:>5.2f} {r['union_kept_pairs_share']:>10.3f} "
                      f"{k:>7} {r[f'same_{k}_ms']:8.2f} {r[f'own_{k}_ms']:8.2f} {r[f'union_{k}_ms']:8.2f} "
                      f"{r[f'{k}_own_over_same']:8.2f} {r[f'{k}_union_over_same']:10.2f} "
                      f"{r['own_fa3_vs_triton_err']:8.1e}")


if __name__ == "__main__":
    main()
