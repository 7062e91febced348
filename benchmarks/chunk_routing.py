"""Which prefill chunks of concurrent long prompts go sparse, from vLLM's own scheduler and the plan's floors (no GPU).

Drives vLLM's scheduler (as `scheduler_step.py` builds it, prefix caching on, async scheduling's order) with BATCH
distinct prompts of LENGTH tokens arriving at once, each generating --out tokens, at each chunk size, and classifies
every step's requests with the builder's own rule (`backend.batch.classify`: the plan's `dense_below`, query and work
floors on CUDA, and its tail). Counts the tokens that take the sparse path and those that run dense (decode rows
and chunks under the floors), as the workload benchmark's `paths` column counts them on a GPU.

    python benchmarks/chunk_routing.py --config benchmarks/configs/llama-3-8b-antidiagonal-7.5-s16-int8-tail.yaml \\
        --extra-config benchmarks/configs/llama-3-8b-antidiagonal-7.5-s16-int8-tail-w64m.yaml \\
        --chunks 8192,16384 --batch 12 --length 32768 --out $OUT/chunk_routing.json

Table last; JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scheduler_step import AsyncSteps, block_hasher, build, model_dir  # noqa: E402

LLAMA_8B = ("meta-llama/Llama-3.1-8B", ("LlamaForCausalLM",), 32, 32, 8)  # (name, architectures, layers, q, kv heads)


def step_meta(q_lens: list[int], seq_lens: list[int]):
    """The host fields of vLLM's CommonAttentionMetadata that `classify` reads, for one step."""
    import torch

    qsl = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0).to(torch.int32)
    return SimpleNamespace(num_reqs=len(q_lens), max_query_len=max(q_lens), query_start_loc_cpu=qsl,
                           _seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int32))


def route(plan, chunk: int, batch: int, length: int, out: int, model: str, seed: int = 0) -> dict:
    """Drive the prompts to their last output token; -> tokens sparse / dense and the chunks each way."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    from vllm_sparse.backend.batch import classify

    max_len = length + out + 64
    config, scheduler = build(model, None, max_len, blocks=batch * (max_len // 16 + 2) + 64, chunk=chunk,
                              max_seqs=max(batch, 8))
    hasher = block_hasher(config)
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=out, ignore_eos=True, temperature=0.0)
    for i in range(batch):
        ids = [rng.randrange(3, 500) for _ in range(length)]
        scheduler.add_request(Request(request_id=str(i), prompt_token_ids=ids, sampling_params=params,
                                      pooling_params=None, block_hasher=hasher))
    floors = (plan.sparse_context_floor, plan.query_token_floor("cuda"), plan.chunk_work_floor("cuda"),
              plan.dense_tail, plan.block_size, plan.dense_below)
    counts = {"sparse_tokens": 0, "dense_tokens": 0, "sparse_chunks": 0, "dense_prefill_chunks": 0, "steps": 0}
    steps = AsyncSteps(scheduler)
    while scheduler.requests and counts["steps"] < 100000:
        so, computed = steps.step()
        if not computed:  # (nothing to schedule until the last step's outputs are in)
            steps.flush()
            continue
        q_lens = [so.num_scheduled_tokens[r] for r in computed]
        chunks, _, _ = classify(step_meta(q_lens, list(computed.values())), *floors)
        sparse = sum(c.q_end - c.q_start for c in chunks)
        counts["sparse_tokens"] += sparse
        counts["dense_tokens"] += sum(q_lens) - sparse
        counts["sparse_chunks"] += len(chunks)
        counts["dense_prefill_chunks"] += sum(1 for q in q_lens if q > 1) - len(chunks)
        counts["steps"] += 1
    total = counts["sparse_tokens"] + counts["dense_tokens"]
    return {**counts, "sparse_share": counts["sparse_tokens"] / total if total else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a sparse plan")
    ap.add_argument("--extra-config", action="append", default=[], help="more plans")
    ap.add_argument("--chunks", default="8192,16384", help="max_num_batched_tokens values")
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--out-tokens", type=int, default=16)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from vllm import __version__

    from vllm_sparse.config.build import build_plan
    from vllm_sparse.config.plan import ModelShape
    from vllm_sparse.plugin import register

    register()
    model = model_dir()
    rows = []
    for config in [args.config, *args.extra_config]:
        plan = build_plan({"sparse": {"config": config}}, ModelShape(*LLAMA_8B))
        for chunk in (int(c) for c in args.chunks.split(",")):
            row = {"config": config, "chunk": chunk, "work_floor": plan.chunk_work_floor("cuda"),
                   **route(plan, chunk, args.batch, args.length, args.out_tokens, model)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"vllm": __version__, "argv": sys.argv, "rows": rows}, indent=1))
    print(f"\nvLLM {__version__}'s scheduler: {args.batch} prompts of {args.length} tokens at once, "
          f"{args.out_tokens} out each; the plans' CUDA floors")
    print(f"{'plan':<48} {'chunk':>6} {'floor':>6} {'sparse tokens':>13} {'dense tokens':>12} {'sparse':>7} "
          f"{'chunks sparse / dense':>21}")
    for r in rows:
        print(f"{Path(r['config']).stem[:48]:<48} {r['chunk']:>6} {r['work_floor'] >> 20:>5}M "
              f"{r['sparse_tokens']:>13,} {r['dense_tokens']:>12,} {100 * r['sparse_share']:>6.1f}% "
              f"{r['sparse_chunks']:>10} / {r['dense_prefill_chunks']}")


if __name__ == "__main__":
    main()
