"""benchmarks/memory_table.py: the largest context per shape and KV dtype, computed from measured start-up
profiles, checked against what vLLM itself allocated on an H200 and against its own definition."""

from pathlib import Path

import pytest

from tests.benchmark_modules import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mt():
    return load_benchmark("memory_table")


def _plan(mt, shape):
    from vllm_sparse.config.loader import load_config
    from vllm_sparse.config.plan import ModelShape, resolve_plan

    name, hf = mt.SHAPES[shape]
    path = str(ROOT / mt.PLANS[shape])
    ms = ModelShape(name, tuple(hf["architectures"]), hf["num_hidden_layers"], hf["num_attention_heads"],
                    hf["num_key_value_heads"])
    return resolve_plan(load_config(path), ms, path), hf


def test_dense_capacity_matches_what_vllm_allocated(mt):
    """The Qwen2.5-7B-Instruct-1M shape at --gpu-memory-utilization 0.9 on an H200: vLLM 0.26 logged "GPU KV
    cache size: 2,039,264 tokens" (benchmarks/results/e2e_long_qwen1m_h200.log); the table's inputs give it
    within 0.5%."""
    weights, act, non_torch, graphs, _ = mt.NON_KV["qwen2.5-7b-1m"]
    _, hf = mt.SHAPES["qwen2.5-7b-1m"]
    per_token = mt.kv_bytes_per_token(hf, "bf16")
    assert per_token == 56 * 1024  # 28 layers x 4 KV heads x 128 x 2 (K, V) x 2 bytes
    available = int((0.9 * mt.H200_GIB - weights - act - non_torch - graphs) * mt.GIB)
    assert abs(mt.largest_context(available, per_token) / 2_039_264 - 1) < 0.005


@pytest.mark.parametrize("shape", ["qwen2.5-7b-1m", "llama-3-8b-1m"])
def test_largest_context_with_the_plugin_is_the_largest_that_fits(mt, shape):
    plan, hf = _plan(mt, shape)
    per_token = mt.kv_bytes_per_token(hf, "bf16")
    available = 100 * mt.GIB

    def need(n):
        return n * per_token + sum(mt.plugin_bytes(plan, hf, n))

    n = mt.largest_context(available, per_token, lambda n: mt.plugin_bytes(plan, hf, n))
    assert n % mt.PAGE == 0 and need(n) <= available < need(n + mt.PAGE)
    assert n < mt.largest_context(available, per_token)  # the reservations cost context
    ws, temps = mt.plugin_bytes(plan, hf, n)
    assert ws <= mt.cap_bytes() and temps > 0
