"""An fp8 KV cache through the sparse paths (issue 29, item 3), the cases `test_engine_fp8_gpu.py` leaves out:
scales vLLM computes from the data (`calculate_kv_scales`: k, v and q scales other than 1.0, so FA3's descales and
the sparse path's folded scales are checked end to end, not only by the kernel tests), and the fp8 decode path
captured in CUDA graphs. Each against the stock backend in the same mode (GPU only: the CPU backend has no fp8
cache; its kernels' CPU twins are in tests/test_fp8_path.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.engines import run_each
from tests.test_engine_cpu import LENGTHS, _max_logprob_diff, _prompts
from tests.test_engine_cpu import _config as prefill_config
from tests.test_engine_decode import MAX_TOKENS
from tests.test_engine_decode import _config as decode_config
from tests.test_engine_decode_gpu import assert_decode_plan_selects_for_long_contexts_only
from tests.test_engine_fp8_gpu import ENGINE, assert_same_within_fp8
from tests.test_engine_gpu import _mean_diff

pytestmark = [pytest.mark.engine, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _computes_kv_scales() -> bool:
    """Whether this vLLM takes `calculate_kv_scales` (0.26 does; later releases removed the setting)."""
    from vllm.engine.arg_utils import EngineArgs

    return "calculate_kv_scales" in {f.name for f in dataclasses.fields(EngineArgs)}


@pytest.fixture(scope="module")
def runs(model_cache, tmp_path_factory):
    from tests.fixtures.tiny_llama import build_tiny_llama

    model = build_tiny_llama(model_cache, head_dim=64)
    tmp = tmp_path_factory.mktemp("configs")
    base = {"model": str(model), "prompts": _prompts(model), "max_tokens": MAX_TOKENS, "logprobs": True,
            "ignore_eos": True, "sequential": True}  # (one request at a time: see test_engine_fp8_gpu.py)
    graphs = {**ENGINE, "enforce_eager": False}
    specs = {
        "stock_graphs": {"engine": graphs},
        "decode_graphs": {"engine": graphs, "backend": "sparse", "config": decode_config(tmp, "decode", {
            "top_k_tokens": 64, "sink_blocks": 1, "local_blocks": 1})},
    }
    if _computes_kv_scales():
        scales = {**ENGINE, "calculate_kv_scales": True}
        specs["stock_scales"] = {"engine": scales}
        specs["keep_all_scales"] = {"engine": scales, "backend": "sparse", "config": prefill_config(
            tmp, "keep_all", {"estimator": {"name": "sink_local", "sink_blocks": 1, "local_blocks": 2},
                              "budget": {"keep_ratio": 1.0}})}
    return {name: result for name, (result, _) in run_each({k: {**base, **v} for k, v in specs.items()},
                                                             one_process=False).items()}


def test_keep_all_prefill_with_scales_vllm_computes_equals_dense(runs):
    """k / v / q scales from the data: the sparse chunks' FA3 call takes vLLM's descales, the estimators the
    dequantized queries and keys; with every block kept the answers are stock's."""
    if "stock_scales" not in runs:
        pytest.skip("this vLLM has no calculate_kv_scales setting")
    stock, keep_all = runs["stock_scales"]["results"], runs["keep_all_scales"]["results"]
    assert [r["prompt_tokens"] for r in stock] == list(LENGTHS)
    for i in range(len(LENGTHS)):
        print(f"computed scales, prompt {i}, mean / max |logprob diff| from stock: "
              f"{_mean_diff(stock[i], keep_all[i]):.3e} / {_max_logprob_diff(stock[i], keep_all[i]):.3e}")
    assert_same_within_fp8(stock, keep_all)
    assert keep_all[2]["prompt_logprobs"] == stock[2]["prompt_logprobs"]  # 40 tokens: dense, the same FA3 call


def test_fp8_sparse_decode_in_cuda_graphs_selects_pages_for_long_contexts_only(runs):
    """The fp8 decode path captured and replayed: stock's prefill exactly (a decode plan's graphs are stock's),
    finite decode log-probs, pages selected on the long prompt only."""
    assert_decode_plan_selects_for_long_contexts_only(runs["stock_graphs"]["results"],
                                                      runs["decode_graphs"]["results"])
