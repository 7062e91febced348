"""Run one vLLM engine in its own process and print what it generated as JSON (the stdout line marked ENGINE_RESULT).

Tests start engines through this so each gets a fresh process, or a list of them one after the other
in one (below), and so start-up failures are seen the way a user sees them.

    python -m tests.engine_runner '{"model": ..., "backend": "sparse"|null, "config": PATH|null,
                                    "prompts": [...], "max_tokens": 6, "engine": {...}, "stats": false,
                                    "audit": false}'

"vllm_default_block_size" stands in for another release's default KV page size while the engine starts; "stats"
reads back the sparse path's densities per layer; "audit" adds how far its output is from dense
attention (VLLM_SPARSE_AUDIT); "counters" the plugin's prefill and decode tokens by path; "kept_density" the
/metrics histogram of the chunk-layers that ran sparse (counts per density bucket, per group of 8 layers).

A JSON list of specs runs their engines one after the other in this one process (each shut down before
the next starts, as `vllm-sparse eval` runs its engines), which pays vLLM's import once: each engine's
output starts after a line `ENGINE_SPEC <i>`, and each result is printed as it is done. A spec with
"expect_error" must fail to start (last in its list: nothing runs after it): its traceback is printed
and its result is null.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

RESULT_MARK = "ENGINE_RESULT "  # vLLM logs to stdout too; the result line carries this mark
SPEC_MARK = "ENGINE_SPEC "  # before each engine of a list of specs


def main(spec: dict, close: bool = False) -> dict:
    """`close`: shut the engine down before returning (another one follows in this process)."""
    import gc
    import os

    if spec.get("stats") or spec.get("counters") or spec.get("kept_density"):  # read back from the workers
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function
    if spec.get("stats"):  # the sparse path's densities
        os.environ["VLLM_SPARSE_STATS"] = "1"
        if spec.get("audit"):
            os.environ["VLLM_SPARSE_AUDIT"] = "1"
    from vllm import LLM, SamplingParams

    kw = {"model": spec["model"], "seed": 0, "enforce_eager": True, **spec.get("engine", {})}
    if spec.get("backend"):
        kw["attention_backend"] = spec["backend"]
    if spec.get("config"):
        kw["additional_config"] = {"sparse": {"config": spec["config"]}}
    from vllm.config import CacheConfig

    default_block_size = CacheConfig.DEFAULT_BLOCK_SIZE
    if spec.get("vllm_default_block_size"):  # another release's default KV page size (vLLM 0.34's is 64 on CUDA)
        CacheConfig.DEFAULT_BLOCK_SIZE = spec["vllm_default_block_size"]
    t0 = time.perf_counter()
    try:
        llm = LLM(**kw)
    finally:
        CacheConfig.DEFAULT_BLOCK_SIZE = default_block_size
    startup = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 6),
                            prompt_logprobs=0 if spec.get("prompt_logprobs", True) else None,
                            logprobs=0 if spec.get("logprobs") else None, ignore_eos=spec.get("ignore_eos", False))
    t0 = time.perf_counter()
    if spec.get("sequential"):  # one request after the other (a later one may hit an earlier one's prefix cache)
        outs = [llm.generate([p], params, use_tqdm=False)[0] for p in spec["prompts"]]
    else:
        outs = llm.generate(spec["prompts"], params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    results = []
    for o in outs:
        lp = None
        if o.prompt_logprobs is not None:
            lp = [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])]
        gen = o.outputs[0]
        sampled = [d[t].logprob for d, t in zip(gen.logprobs, gen.token_ids)] if gen.logprobs else None
        results.append({"prompt_tokens": len(o.prompt_token_ids), "token_ids": list(gen.token_ids),
                        "text": gen.text, "prompt_logprobs": lp, "logprobs": sampled,
                        "cached_tokens": getattr(o, "num_cached_tokens", None)})
    out = {"startup_s": startup, "generate_s": elapsed, "results": results,
           # the KV page size the engine ran with (its engine core is in this process: tests/engines.py)
           "block_size": llm.llm_engine.vllm_config.cache_config.block_size}
    if spec.get("counters"):  # the plugin's token counters by path (rank 0), as /metrics exports them
        from vllm_sparse.metrics.worker import process_counts

        out["counters"] = llm.collective_rpc(process_counts)[0]
    if spec.get("kept_density"):
        out["kept_density"] = llm.collective_rpc(kept_density_counts)[0]
    if spec.get("stats"):
        from vllm_sparse.eval.harness import read_stats

        out["stats"] = llm.collective_rpc(read_stats)[0]  # layer -> unions and densities (rank 0)
    if close:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return out


def kept_density_counts(worker=None) -> dict:
    """This worker's kept-density histogram as /metrics exports it: {layer group: counts per bucket}."""
    from vllm_sparse.metrics import worker as metrics

    out = {}
    for m in list(metrics._METRICS.values()):
        for layers, d in m.snapshot()["kept_density"].items():
            out[layers] = d["counts"]
    return out


if __name__ == "__main__":
    arg = json.loads(sys.argv[1])
    if isinstance(arg, list):
        assert not any(s.get("stats") for s in arg), "stats switch on process-wide settings: one engine a process"
        # The plugin counts steps in the first sparse engine's metadata builder of a process only.
        sparse = [s for s in arg if s.get("backend") == "sparse"]
        assert not any(s.get("counters") for s in sparse[1:]), "counters: only the first sparse engine here counts"
        assert not any(s.get("expect_error") for s in arg[:-1]), "a spec that must fail comes last"
        for i, one in enumerate(arg):
            print(f"{SPEC_MARK}{i}", flush=True)
            if one.get("expect_error"):
                try:
                    main(one, close=True)
                except Exception:
                    traceback.print_exc(file=sys.stdout)
                    print(RESULT_MARK + "null", flush=True)
                    continue
                raise SystemExit(f"spec {i} was meant to fail to start, and started")
            print(RESULT_MARK + json.dumps(main(one, close=True)), flush=True)
    else:
        print(RESULT_MARK + json.dumps(main(arg)), flush=True)
