"""Tensor parallelism: the SPARSE backend at TP=2 against TP=1 (issue 6), in vLLM's engine.

Each rank runs its slice of the plan (`LayerPlan.heads_for`): the tiny Llama's 4 q / 2 KV heads
split into 2 q heads and 1 KV head per rank. Greedy tokens must match TP=1 with the same plan,
the logprobs may move only by reduction-order noise (far less than the plan moves them), no
rank may fall back to dense, and the plan must act at TP=2 (long prompt changed, short prompt
as the stock backend's). On CPU the two ranks are two vLLM CPU workers, one core each; on CUDA
two GPUs. tests/test_sharding.py checks the per-rank head slices themselves.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.engines import run_engine
from tests.test_engine_cpu import LENGTHS, _config, _max_logprob_diff, _prompts
from tests.test_engine_gpu import _mean_diff

GPU = torch.cuda.is_available()
if GPU:
    from tests.test_engine_gpu import ENGINE
else:
    from tests.test_engine_cpu import ENGINE

CORES = sorted(os.sched_getaffinity(0))
pytestmark = [pytest.mark.engine,
              pytest.mark.skipif(GPU and torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
              pytest.mark.skipif(not GPU and len(CORES) < 2, reason="needs two CPU cores, one per rank")]


def _env(tp: int) -> dict[str, str]:
    # vLLM's CPU workers bind one NUMA node each by default; on a one-node machine bind a core each.
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(c) for c in CORES[:tp])} if not GPU and tp > 1 else {}


@pytest.fixture(scope="module")
def runs(model_cache, tmp_path_factory):
    from tests.fixtures.tiny_llama import build_tiny_llama

    model = build_tiny_llama(model_cache, head_dim=64) if GPU else build_tiny_llama(model_cache)
    pooled = {"estimator": {"name": "pooled"}, "budget": {"top_k": 3, "sink_blocks": 1, "local_blocks": 1}}
    specs = {"stock": {}, "sparse": {"backend": "sparse",
                                     "config": _config(tmp_path_factory.mktemp("configs"), "pooled", pooled)}}
    base = {"model": str(model), "prompts": _prompts(model), "max_tokens": 6}
    runs = {}
    for name, tp in (("sparse", 1), ("sparse", 2), ("stock", 2)):
        spec = {**base, **specs[name], "engine": {**ENGINE, "tensor_parallel_size": tp}}
        result, output = run_engine(spec, env=_env(tp))
        runs[name, tp] = dict(result, output=output)
        print(f"{name} TP={tp}: start-up {result['startup_s']:.1f} s", flush=True)  # shown with -s
    return runs


def test_tp2_sparse_gives_tp1_sparse_tokens(runs):
    stock2 = runs["stock", 2]["results"]
    sparse1, sparse2 = runs["sparse", 1]["results"], runs["sparse", 2]["results"]
    assert [r["prompt_tokens"] for r in sparse2] == list(LENGTHS)
    for a, b in zip(sparse1, sparse2):
        assert a["token_ids"] == b["token_ids"]
    # TP=2 sums the heads' outputs in another order: small next to what the plan itself moves.
    tp_diff, plan_diff = _mean_diff(sparse1[0], sparse2[0]), _mean_diff(stock2[0], sparse2[0])
    print(f"long prompt, mean |logprob diff|: sparse TP=2 vs TP=1 {tp_diff:.3e}; sparse vs stock at TP=2 "
          f"{plan_diff:.3e}")
    assert tp_diff < 5e-2 and tp_diff < 0.25 * plan_diff


def test_tp2_plan_acts_on_every_rank_and_long_prompts_only(runs):
    stock2, sparse2 = runs["stock", 2]["results"], runs["sparse", 2]["results"]
    assert "run dense" not in runs["sparse", 2]["output"] and "runs dense" not in runs["sparse", 2]["output"]
    assert _max_logprob_diff(stock2[0], sparse2[0]) > 1e-1
    assert sparse2[2]["prompt_logprobs"] == stock2[2]["prompt_logprobs"]  # 40 tokens: dense on both
