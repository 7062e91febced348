"""The largest context one GPU holds, with and without the plugin, per model shape and KV cache dtype.

    python benchmarks/memory_table.py [--util 0.9] [--out memory_table.json]

Computed, not run: vLLM sizes its KV cache as `util` x the GPU's memory less what its start-up profile
measured (weights, peak activation of the largest chunk, non-torch memory, CUDA graphs). Those figures are
taken from the start-up logs of engines run on an H200 (NON_KV below names each run); a KV token costs
2 x layers x KV heads x head_dim x the dtype's bytes. With the plugin, vLLM's profile also holds what the
plugin reserves at start (`backend/reserve.py`): the estimators' workspace (capped, 512 MiB by default) and
the bound on one sparse chunk-layer's temporaries at `max_model_len`, which grows with the context, so the
largest context with the plugin is the largest L whose KV plus reservations at L fit. The reservations are
counted on top of the activation peak (vLLM measures one peak; the temporaries live inside one layer of
it), so the "with plugin" column is a lower bound. One request of that length fits; shorter ones share it.
With an fp8 KV cache (e4m3, read by the sparse paths on CUDA since 2026-12-03) the temporaries also hold one
chunk's queries dequantized from the fp8 queries vLLM gives FA3 (bf16: 128 MiB for a 16K chunk of 32 q heads).

Decode plans (a second table, the shapes in DECODE_PLANS) reserve besides: the decode workspace, whose score rows
grow with `max_model_len` and with the step's row limit (max_num_seqs, or the largest CUDA graph batch: `vllm
serve` on a GPU of 70 GiB or more defaults to 1024 sequences), and for Quest the page summaries, a share of what
the weights leave (`decode/memory.py`: 1/17 of it beside a bf16 cache at 16-token pages, 1/9 beside fp8, whose
summaries stay in bf16). TidalDecode keeps no summaries.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from e2e import SHAPES, model_shape  # noqa: E402

from vllm_sparse.backend.reserve import (  # noqa: E402
    estimator_reservation_bytes,
    layer_temporaries_bytes,
    packed_lists_itemsize,
)
from vllm_sparse.config.loader import load_config  # noqa: E402
from vllm_sparse.config.plan import resolve_plan  # noqa: E402
from vllm_sparse.decode.memory import decode_workspace_bytes, summaries_share  # noqa: E402
from vllm_sparse.decode.step import plan_workspace_sizes  # noqa: E402
from vllm_sparse.kernels.workspace import cap_bytes  # noqa: E402

GIB = 2**30
H200_GIB = 139.8  # what vLLM 0.26 reports as the H200's total ("Free memory on device (139.29/139.8 GiB)")
PAGE = 16  # vLLM's KV block (tokens)
CHUNK = 16384  # max_num_batched_tokens of the measured engines
# Per shape: GiB of weights, peak activation (16K-token chunk), non-torch memory and CUDA graphs, from the
# start-up log of a dense engine on an H200 (vLLM 0.26.0), and the run it comes from.
NON_KV = {
    "qwen2.5-7b-1m": (14.53, 2.15, 0.22, 0.13, "benchmarks/results/e2e_long_qwen1m_h200.log (2026-12-02, util 0.9)"),
    "llama-3-8b-1m": (15.27, 1.78, 0.22, 0.16,
                      "benchmarks/results/workload_h200_graphs_run3.log (2026-12-02, Llama-3.1-8B)"),
}
DECODE_PLANS = {  # decode plans at 1M (issue 29, item 4), each beside the prefill plan it ships with
    "qwen2.5-7b-1m": {"Quest": "benchmarks/configs/qwen2.5-7b-1m-own-heads-decode-quest-4k.yaml",
                      "TidalDecode": "benchmarks/configs/qwen2.5-7b-1m-own-heads-decode-tidal-4k.yaml"},
}
DTYPE_BYTES = {"bf16": 2, "fp8": 1}
PLANS = {  # the plan each shape is timed with
    "qwen2.5-7b-1m": "benchmarks/configs/qwen2.5-7b-1m-antidiagonal-10-s16-int8.yaml",
    "llama-3-8b-1m": "benchmarks/configs/llama-3-8b-antidiagonal-10-int8.yaml",
}


def head_dim(hf: dict) -> int:
    return hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"])


def kv_bytes_per_token(hf: dict, dtype: str, tp: int = 1) -> int:
    """KV bytes per token on one rank."""
    return 2 * hf["num_hidden_layers"] * local_heads(hf, tp)[1] * head_dim(hf) * DTYPE_BYTES[dtype]


def local_heads(hf: dict, tp: int) -> tuple[int, int]:
    """(q heads, KV heads) on one rank at tensor parallelism tp: vLLM splits the q heads and the KV heads,
    and where there are fewer KV heads than ranks each rank holds a copy of one."""
    return hf["num_attention_heads"] // tp, max(1, hf["num_key_value_heads"] // tp)


def plugin_bytes(plan, hf: dict, max_model_len: int, tp: int = 1, dtype: str = "bf16") -> tuple[int, int]:
    """(estimator workspace as reserved, the chunk-layer temporaries' bound) at max_model_len, on one rank;
    `dtype`: the KV cache's (fp8: the chunk's queries dequantized to the model's bf16 are counted too)."""
    hq, hkv = local_heads(hf, tp)
    packed = packed_lists_itemsize("fa3", torch.bfloat16)  # (the packed page lists' copies: FA3's default path)
    ws = min(estimator_reservation_bytes(plan, hq, CHUNK, max_model_len, hkv, head_dim(hf), packed), cap_bytes())
    return ws, layer_temporaries_bytes(plan, hq, hkv, CHUNK, max_model_len, PAGE, head_dim(hf), 2,
                                       fp8_queries=dtype == "fp8")  # (groups stay whole at these TP sizes)


def decode_rows(max_num_seqs: int) -> int:
    """The decode workspace's rows (`decode_row_limit`): the sequences, or vLLM's largest CUDA graph batch
    (min(2 x max_num_seqs, 512) unless set)."""
    return max(max_num_seqs, min(2 * max_num_seqs, 512))


def decode_workspace(plan, hf: dict, max_model_len: int, rows: int, tp: int = 1) -> int:
    """The decode workspace a decode plan reserves at max_model_len (`step.plan_workspace`), on one rank."""
    return decode_workspace_bytes(*plan_workspace_sizes(plan, rows, *local_heads(hf, tp), head_dim(hf), max_model_len))


def summaries_reserved(plan, hf: dict, dtype: str, memory: int, tp: int = 1) -> int:
    """The page summaries' reservation of `memory` (what the KV cache could get once the weights are loaded:
    `decode/memory.py`); 0 for plans without Quest layers."""
    return summaries_share(plan, PAGE, local_heads(hf, tp)[1], head_dim(hf), torch.bfloat16, DTYPE_BYTES[dtype],
                           memory, explicit=False)


def largest_context(available: int, per_token: int, reserve=None) -> int:
    """The largest L (a multiple of the KV block) with L x per_token + reserve(L) <= available."""
    lo, hi = 0, available // per_token // PAGE  # in KV blocks
    while lo < hi:
        mid = (lo + hi + 1) // 2
        need = mid * PAGE * per_token + (sum(reserve(mid * PAGE)) if reserve else 0)
        lo, hi = (mid, hi) if need <= available else (lo, mid - 1)
    return lo * PAGE


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--util", type=float, default=0.9, help="gpu_memory_utilization")
    ap.add_argument("--tp", default="1", help="tensor-parallel sizes, comma-separated (past 1: on paper, see below)")
    ap.add_argument("--max-num-seqs", type=int, default=1024,
                    help="decode plans' row limit comes from it (default: `vllm serve`'s on a GPU of 70 GiB or more)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for tp, (shape, (weights, act, non_torch, graphs, source)) in (
            (int(t), item) for t in args.tp.split(",") for item in NON_KV.items()):
        _, hf = SHAPES[shape]
        plan_path = REPO / PLANS[shape]
        plan = resolve_plan(load_config(str(plan_path)), model_shape(shape), str(plan_path))
        # Past one rank the weights and the activation peak are split tp ways (on paper: vLLM replicates the
        # norms and the hidden states, so a rank holds a little more); non-torch memory and graphs per rank.
        available = int((args.util * H200_GIB - (weights + act) / tp - non_torch - graphs) * GIB)
        for dtype in DTYPE_BYTES:
            per_token = kv_bytes_per_token(hf, dtype, tp)
            dense = largest_context(available, per_token)
            sparse = largest_context(available, per_token,
                                     lambda n, p=plan, c=hf, t=tp, d=dtype: plugin_bytes(p, c, n, t, d))
            ws, temps = plugin_bytes(plan, hf, 2**20, tp, dtype)  # what a 1M max_model_len reserves
            rows.append({"shape": shape, "tp": tp, "kv_heads_per_rank": local_heads(hf, tp)[1], "kv_dtype": dtype,
                         "kv_kib_per_token": per_token / 1024,
                         "kv_gib_available": available / GIB, "dense_tokens": dense, "sparse_tokens": sparse,
                         "workspace_mib": ws / 2**20, "temporaries_mib_at_1m": temps / 2**20,
                         "fits_1m_dense": dense >= 2**20, "fits_1m_sparse": sparse >= 2**20,
                         "plan": PLANS[shape], "non_kv_source": source})
    print(f"H200 ({H200_GIB} GiB), gpu_memory_utilization {args.util}, chunk {CHUNK}: the largest context "
          "(tokens) one request can hold; computed from measured start-up profiles\n")
    print(f"{'shape':>15} {'TP':>3} {'KV heads':>8} {'KV':>5} {'KiB/token':>9} {'KV GiB':>7} {'dense':>11} "
          f"{'with plugin':>12} {'workspace':>10} {'temps at 1M':>12} {'1M fits':>8}   (per rank)")
    for r in rows:
        fits = "yes" if r["fits_1m_sparse"] else ("dense only" if r["fits_1m_dense"] else "no")
        print(f"{r['shape']:>15} {r['tp']:>3} {r['kv_heads_per_rank']:>8} {r['kv_dtype']:>5} "
              f"{r['kv_kib_per_token']:>9.0f} {r['kv_gib_available']:>7.1f} "
              f"{r['dense_tokens']:>11,} {r['sparse_tokens']:>12,} {r['workspace_mib']:>7.0f} MiB "
              f"{r['temporaries_mib_at_1m']:>8.0f} MiB {fits:>8}")
    if any(r["tp"] > 1 for r in rows):
        print("TP > 1: on paper (weights and activations split evenly; not run on several GPUs)")
    decode = decode_rows_table(args.util, decode_rows(args.max_num_seqs))
    print(f"\nDecode plans, one rank, max_num_seqs {args.max_num_seqs} (decode rows {decode_rows(args.max_num_seqs)}): "
          "the largest context, and against the same plan's prefill reservations alone")
    print(f"{'shape':>15} {'KV':>5} {'decode':>12} {'tokens':>11} {'vs prefill only':>16} {'summaries':>10} "
          f"{'workspace at 1M':>16} {'1M fits':>8}")
    for r in decode:
        print(f"{r['shape']:>15} {r['kv_dtype']:>5} {r['decode']:>12} {r['tokens']:>11,} {r['vs_prefill_only']:>16.3f} "
              f"{r['summaries_mib']:>6.0f} MiB {r['decode_workspace_mib_at_1m']:>12.0f} MiB "
              f"{'yes' if r['fits_1m'] else 'no':>8}")
    if args.out:
        Path(args.out).write_text(json.dumps({"util": args.util, "gpu_gib": H200_GIB, "rows": rows,
                                              "max_num_seqs": args.max_num_seqs, "decode_rows": decode}, indent=1))
    return 0


def decode_rows_table(util: float, rows: int, refit: bool = True) -> list[dict]:
    """Per decode plan and KV dtype (one rank): the largest context beside the plan's prefill reservations, the
    decode workspace at that context and the Quest summaries' reservation, taken as the engine takes it (a share of
    what the weights and the estimator's workspace leave; `refit=False`: as before 2026-12-06, of what the
    estimator's workspace left before the weights loaded)."""
    out = []
    for shape, plans in DECODE_PLANS.items():
        weights, act, non_torch, graphs, _ = NON_KV[shape]
        _, hf = SHAPES[shape]
        available = int((util * H200_GIB - weights - act - non_torch - graphs) * GIB)
        for dtype in DTYPE_BYTES:
            per_token = kv_bytes_per_token(hf, dtype)
            for name, path in plans.items():
                plan = resolve_plan(load_config(str(REPO / path)), model_shape(shape), path)
                # The same plan's prefill reservations alone: what its decode part costs on top.
                base = largest_context(available, per_token,
                                       lambda n, p=plan, c=hf, d=dtype: plugin_bytes(p, c, n, 1, d))
                estimator_ws = plugin_bytes(plan, hf, 2**20, 1, dtype)[0]
                at_load = int(util * H200_GIB * GIB - refit * weights * GIB - estimator_ws)
                summaries = summaries_reserved(plan, hf, dtype, at_load)
                tokens = largest_context(available - summaries, per_token, lambda n, p=plan, c=hf, d=dtype: (
                    *plugin_bytes(p, c, n, 1, d), decode_workspace(p, c, n, rows)))
                out.append({"shape": shape, "kv_dtype": dtype, "decode": name, "config": path, "tokens": tokens,
                            "prefill_only_tokens": base, "vs_prefill_only": tokens / base,
                            "summaries_mib": summaries / 2**20, "decode_rows": rows,
                            "decode_workspace_mib_at_1m": decode_workspace(plan, hf, 2**20, rows) / 2**20,
                            "fits_1m": tokens >= 2**20})
    return out


if __name__ == "__main__":
    sys.exit(main())
