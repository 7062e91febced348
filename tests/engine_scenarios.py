"""Scheduling scenarios for the SPARSE backend in one engine process (run by tests/test_engine_scheduling.py).

    python -m tests.engine_scenarios '{"model": ..., "config": PATH, "engine": {...}, "prompts": {...},
                                       "scenarios": ["alone", "batch", "prefix", "abort"]}'

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the scenario can step it by
hand, abort a request between steps, and count the scheduler's preemptions. Prints one JSON line
marked SCENARIO_RESULT: per scenario (each after the last with an empty prefix cache when the spec asks
"fresh_prefix_cache"), each request's generated token ids (and prompt log-probs where
prefix caching does not skip them), the sparse path's counters (which layers ran sparse, how much
they kept) and each preemption (which request, after how many generated tokens).
"""

from __future__ import annotations

import json
import os
import sys

RESULT_MARK = "SCENARIO_RESULT "
PREEMPTED: list[tuple[str, int]] = []  # (request id, tokens it had generated) at each preemption


def _record_preemptions() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    original = Scheduler._preempt_request

    def recorded(self, request, *args, **kwargs):
        PREEMPTED.append((request.request_id, len(request.output_token_ids)))
        return original(self, request, *args, **kwargs)

    Scheduler._preempt_request = recorded


def _result(out) -> dict:
    lp = None
    if out.prompt_logprobs is not None:
        lp = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])]
    return {"token_ids": list(out.outputs[0].token_ids), "prompt_logprobs": lp,
            "cached_tokens": out.num_cached_tokens or 0}


def _stats() -> dict:
    from vllm_sparse.eval.harness import read_stats

    return {layer: {"unions": s["unions"], "union_density": s["union_density"]}
            for layer, s in read_stats(None).items()}


def main(spec: dict) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_SPARSE_STATS"] = "1"
    from vllm import LLM, SamplingParams

    from vllm_sparse.selection.stats import STATS

    _record_preemptions()
    llm = LLM(model=spec["model"], seed=0, enforce_eager=True, attention_backend="sparse",
              additional_config={"sparse": {"config": spec["config"]}}, **spec["engine"])
    # Every request generates exactly max_tokens (no early end of sequence), so KV-cache use is as planned.
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 6), prompt_logprobs=0, ignore_eos=True)
    # vLLM reads no prefix cache for a request that asks for prompt log-probs: the cache scenarios don't.
    cached = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 6), ignore_eos=True)
    prompts = {name: {"prompt_token_ids": ids} for name, ids in spec["prompts"].items()}

    def generate(names: list[str], sampling=params) -> dict:
        outs = llm.generate([prompts[n] for n in names], sampling, use_tqdm=False)
        # Request ids in the preemption record (the engine's, "<id>-<suffix>") -> prompt names.
        by_id = dict(zip([o.request_id for o in outs], names))
        PREEMPTED[:] = [(by_id.get(r.rsplit("-", 1)[0], r), k) for r, k in PREEMPTED]
        return {n: _result(o) for n, o in zip(names, outs)}

    result = {}
    for i, scenario in enumerate(spec["scenarios"]):
        if i and spec.get("fresh_prefix_cache"):  # as in an engine of its own: nothing cached by the last scenario
            assert llm.reset_prefix_cache(), "the prefix cache could not be reset"
        STATS.reset()
        PREEMPTED.clear()
        if scenario == "alone":  # every request on its own
            runs = {}
            for name in prompts:
                runs.update(generate([name]))
        elif scenario == "batch":  # everything at once: long prefills' chunks share steps with decodes
            runs = generate(list(prompts))
        elif scenario == "prefix":  # a cached prompt, then the same prompt with a short and a long suffix
            runs, per_call = {}, {}
            for name in ("long_a", "long_a_short_suffix", "long_a_long_suffix"):
                runs.update(generate([name], cached))
                per_call[name] = _stats()  # what each request's own prefill ran sparse
        elif scenario == "abort":  # a long prompt aborted after its first chunk, beside another request
            engine = llm.llm_engine
            engine.add_request("doomed", prompts["long_b"], cached)
            engine.add_request("kept", prompts["long_a"], cached)
            engine.step()  # the first chunk of each
            engine.abort_request(["doomed"])
            done = {}
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = _result(out)
            assert "doomed" not in done, "an aborted request produced output"
            runs = {"long_a": done["kept"], **generate(["long_b"], cached)}  # and the engine still serves long_b
        else:
            raise ValueError(f"unknown scenario {scenario}")
        result[scenario] = {"runs": runs, "stats": per_call if scenario == "prefix" else _stats(),
                            "preempted": PREEMPTED.copy()}
    return result


if __name__ == "__main__":
    print(RESULT_MARK + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
