"""Keys MInference's own kernel would read for the lines `vertical_slash` keeps, beside the blocks this project
reads for them, on a real model (issue 28: would reading the lines token by token make MInference-like budgets
sparse, where rounding them to blocks keeps nearly every block?).

    python benchmarks/minference_coverage.py --model DIR \
        --config benchmarks/configs/gemma-3-vertical_slash-minference.yaml --lengths 16384,29696 --samples 4,2 \
        --out $OUT/minference_coverage.json

The engine runs in this process (vLLM's engine, greedy passkey prompts of the eval), with the estimator wrapped
here, outside the serving code: each call records, per q head, the kept key columns and diagonal offsets. Then,
for every query block of B queries (B: the plan's block) past `dense_below`:
- token reader (MInference's kernel): the kept columns token by token, and per kept diagonal o the B-key range
  [q0 - o, q0 + B - 1 - o] (q0: the block's first position), clipped to the block's causal keys, ranges merged;
- block reader (this project, `blocks: crossed`): every B-token block a kept line crosses;
each as a share of the block's causal keys (or blocks), per q head and after the union over each KV head's q heads
(the page list this project reads by default). The engine's CPU path takes the same choices as its GPU path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch


def reader_coverage(context_len: int, seq_len: int, block: int, cols: list[torch.Tensor], offs: list[torch.Tensor],
                    kv_head_of: list[int]) -> dict[str, torch.Tensor]:
    """Per query block of one chunk ([R] rows: the blocks holding its queries) and q head ([H, R]): keys the token
    reader reads (`tok`), blocks the block reader keeps (`blk`), the same after the union over each KV head's q
    heads (`tok_union`, `blk_union`: [KV, R]), merged diagonal ranges (`ranges`), causal keys and blocks ([R])."""
    rb = torch.arange(context_len // block, (seq_len - 1) // block + 1)
    q0 = rb * block
    q_lo = q0.clamp(min=context_len)  # the block's first query in this chunk (the block reader's rule)
    q_hi = ((rb + 1) * block).clamp(max=seq_len) - 1
    keys = torch.arange(seq_len)
    nkb = (seq_len - 1) // block + 1
    kb = torch.arange(nkb)
    k_lo, k_hi = kb * block, ((kb + 1) * block).clamp(max=seq_len) - 1
    heads, rows = len(cols), len(rb)
    tok = torch.zeros(heads, rows, seq_len, dtype=torch.bool)
    blk = torch.zeros(heads, rows, nkb, dtype=torch.bool)
    ranges = torch.zeros(heads, rows)
    for h in range(heads):
        o = offs[h].long()
        start = q0[:, None] - o[None, :]  # [R, O]
        end = torch.minimum(start + block - 1, q_hi[:, None])
        live = end >= 0
        start = start.clamp(min=0)
        edges = torch.zeros(rows, seq_len + 1, dtype=torch.int32)  # +1 at each range's start, -1 past its end
        edges.scatter_add_(1, torch.where(live, start, seq_len), live.int())
        edges.scatter_add_(1, torch.where(live, end + 1, seq_len), -live.int())
        column = torch.zeros(seq_len, dtype=torch.bool)
        column[cols[h].long()] = True
        tok[h] = (edges.cumsum(1)[:, :seq_len] > 0) | (column[None, :] & (keys[None, :] <= q_hi[:, None]))
        # Ranges that overlap merge (sorted by start, a range opens a new one past the furthest end so far).
        far = seq_len + 10
        s_sorted, order = torch.where(live, start, far).sort(1)
        e_sorted = torch.where(live, end, -far).gather(1, order)
        reach = torch.cat([torch.full((rows, 1), -far), e_sorted[:, :-1]], 1).cummax(1).values
        ranges[h] = ((s_sorted < far) & (s_sorted > reach)).sum(1).float()
        # Diagonal o crosses (row, block) when the row's queries minus o meet the block's keys.
        lo, hi = q_lo[:, None, None] - o, q_hi[:, None, None] - o
        crossed = ((hi >= k_lo[None, :, None]) & (lo <= k_hi[None, :, None])).any(-1)
        col_blocks = torch.zeros(nkb, dtype=torch.bool)
        col_blocks[cols[h].long() // block] = True
        blk[h] = (crossed | col_blocks[None, :]) & (kb[None, :] <= rb[:, None])
    kv_of = torch.tensor(kv_head_of)
    groups = [kv_of == g for g in sorted(set(kv_head_of))]
    return {"tok": tok.sum(-1).float(), "blk": blk.sum(-1).float(), "ranges": ranges,
            "tok_union": torch.stack([tok[g].any(0).sum(-1).float() for g in groups]),
            "blk_union": torch.stack([blk[g].any(0).sum(-1).float() for g in groups]),
            "causal_keys": (q_hi + 1).float(), "causal_blocks": (rb + 1).float(), "row_blocks": rb}


def record_choices(records: list) -> None:
    """Wrap `vertical_slash`'s scoring so each call appends its kept lines to `records` (eval instrumentation: the
    serving code is not changed; the engine must run in this process)."""
    import inspect

    import vllm_sparse.backend.instrumented as instrumented
    import vllm_sparse.estimators.vertical_slash as vs
    from vllm_sparse.estimators.registry import get_estimator

    attend, keep_lines, score_heads = instrumented.attend_sparse_chunks, vs._keep_lines, vs.score_vertical_slash_heads
    signature = inspect.signature(attend)
    kept: list[torch.Tensor] = []
    layer_of_call: dict[str, int] = {}  # the attention call that runs the estimator names its layer

    def attend_recorded(*args, **kwargs):
        layer_of_call["layer"] = signature.bind_partial(*args, **kwargs).arguments.get("layer", -1)
        return attend(*args, **kwargs)

    def keep_lines_recorded(x, sizes, always):
        kept.append(keep_lines(x, sizes, always))
        return kept[-1]

    def score_heads_recorded(chunk, per_head):
        if per_head[0].blocks != "crossed":
            raise SystemExit("minference_coverage.py reads plans with `blocks: crossed` (kept lines, no mass)")
        kept.clear()
        scores = score_heads(chunk, per_head)
        slash, vertical = kept  # the order `score_vertical_slash_heads` keeps them in
        records.append({"layer": layer_of_call.get("layer"), "context_len": chunk.context_len,
                        "seq_len": chunk.seq_len, "block": chunk.block_size,
                        "kv_head_of": chunk.kv_head_of.tolist(),
                        "cols": [torch.nonzero(v).flatten().cpu() for v in vertical],
                        "offs": [torch.nonzero(s).flatten().cpu() for s in slash]})
        return scores

    instrumented.attend_sparse_chunks = attend_recorded
    vs._keep_lines = keep_lines_recorded
    vs.score_vertical_slash_heads = score_heads_recorded
    object.__setattr__(get_estimator("vertical_slash"), "score_heads", score_heads_recorded)


def summarize(records: list, dense_below: int) -> list[dict]:
    """One row per (prompt length, layer): the readers' shares over the query blocks past dense_below."""
    sums: dict = defaultdict(lambda: defaultdict(list))
    for rec in records:
        c = reader_coverage(rec["context_len"], rec["seq_len"], rec["block"], rec["cols"], rec["offs"],
                            rec["kv_head_of"])
        sparse_rows = (c["row_blocks"] + 1) * rec["block"] > dense_below  # rows the plan makes sparse
        key = (rec["length"], rec["layer"])
        for name in ("tok", "blk", "ranges", "tok_union", "blk_union"):
            sums[key][name].append(c[name][:, sparse_rows])
        for name in ("causal_keys", "causal_blocks"):
            sums[key][name].append(c[name][sparse_rows])
        sums[key]["offsets"].append(torch.cat(rec["offs"]).float())
        sums[key]["chunks"].append(torch.ones(1))
    table = []
    for (length, layer), parts in sorted(sums.items()):
        g = {name: torch.cat(v, -1) for name, v in parts.items()}
        keys, blocks = g["causal_keys"], g["causal_blocks"]
        table.append({
            "length": length, "layer": layer, "chunks": int(g["chunks"].numel()), "query_blocks": int(keys.numel()),
            "token_per_head": float((g["tok"] / keys).mean()),
            "token_per_head_of_keys": float(g["tok"].sum() / (keys.sum() * len(g["tok"]))),
            "token_union": float((g["tok_union"] / keys).mean()),
            "token_union_of_keys": float(g["tok_union"].sum() / (keys.sum() * len(g["tok_union"]))),
            "block_per_head": float((g["blk"] / blocks).mean()),
            "block_per_head_of_blocks": float(g["blk"].sum() / (blocks.sum() * len(g["blk"]))),
            "block_union": float((g["blk_union"] / blocks).mean()),
            "block_union_of_blocks": float(g["blk_union"].sum() / (blocks.sum() * len(g["blk_union"]))),
            "merged_diagonal_ranges": float(g["ranges"].mean()),
            "offset_p10": float(g["offsets"].quantile(0.1)), "offset_median": float(g["offsets"].median()),
            "offset_p90": float(g["offsets"].quantile(0.9)),
        })
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--config", required=True, help="a plan whose sparse layers use vertical_slash, blocks: crossed")
    p.add_argument("--lengths", default="16384,29696")
    p.add_argument("--samples", default="4,2", help="passkey prompts per length")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--chunk", type=int, default=4096, help="max_num_batched_tokens")
    p.add_argument("--out", required=True, help="JSON; the recorded lines go beside it (OUT.records.pt)")
    p.add_argument("--records", help="summarize these recorded lines (an earlier run's OUT.records.pt) instead")
    args = p.parse_args()
    if args.records:
        saved = torch.load(args.records, weights_only=False)
        write(args.out, {**saved["run"], "table": summarize(saved["records"], saved["run"]["dense_below"])})
        return
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the wrapped estimator runs in this process
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_sparse.config.loader import load_config
    from vllm_sparse.eval.tasks import TASKS

    entry = load_config(args.config).models[0]
    lengths = [int(n) for n in args.lengths.split(",")]
    samples = [int(n) for n in args.samples.split(",")]
    records: list = []
    record_choices(records)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # Pages of the plan's block: vLLM's default page (128 on CPU) would not divide a 64-token block.
    llm = LLM(model=args.model, seed=0, dtype=args.dtype, max_model_len=max(lengths) + 512, enforce_eager=True,
              max_num_batched_tokens=args.chunk, enable_prefix_caching=False, max_num_seqs=1,
              block_size=entry.block_size, attention_backend="sparse",
              additional_config={"sparse": {"config": args.config}})
    prompts = []
    for length, n in zip(lengths, samples):
        for i in range(n):
            prompt, answer = TASKS["passkey"](tokenizer, length, i, i)
            first = len(records)
            t0 = time.perf_counter()
            out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0]
            for rec in records[first:]:
                rec["length"] = length
            prompts.append({"length": length, "sample": i, "answer": answer, "completion": out.outputs[0].text,
                            "prompt_tokens": len(out.prompt_token_ids), "seconds": time.perf_counter() - t0})
            print(json.dumps(prompts[-1]), flush=True)
    llm.llm_engine.engine_core.shutdown()
    run = {"model": args.model, "config": args.config, "dtype": args.dtype, "chunk": args.chunk,
           "dense_below": entry.dense_below, "prompts": prompts, "command": " ".join(sys.argv)}
    torch.save({"run": run, "records": records}, f"{args.out}.records.pt")
    write(args.out, {**run, "table": summarize(records, entry.dense_below)})


def write(path: str, result: dict) -> None:
    table = result["table"]
    print(f"{'length':>7} {'layer':>5} {'token/head':>10} {'token union':>11} {'block/head':>10} {'block union':>11} "
          f"{'ranges':>6} {'offset p10/50/90':>18}")
    for r in table:
        print(f"{r['length']:>7} {r['layer']:>5} {r['token_per_head']:>10.1%} {r['token_union']:>11.1%} "
              f"{r['block_per_head']:>10.1%} {r['block_union']:>11.1%} {r['merged_diagonal_ranges']:>6.1f} "
              f"{r['offset_p10']:>6.0f}/{r['offset_median']:.0f}/{r['offset_p90']:.0f}")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
