"""benchmarks/memory_table.py: the largest context per shape and KV dtype, computed from measured start-up
profiles, checked against what vLLM itself allocated on an H200 and against its own definition."""

from pathlib import Path

import pytest
import torch

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


def test_decode_plans_cost_what_the_engines_measured(mt):
    """The decode plans at 1M against the Qwen engines' KV caches (H200, vLLM 0.26, max_num_seqs 8, util 0.9,
    2026-12-04, before the summaries' reservation was taken again after the weights load): the baseline engine
    (the own-heads prefill plan, dense decode) 2,027,600 tokens, the Quest plan 1,891,440 (0.9328 of it), the
    TidalDecode plan 2,027,456 (its 16-row workspace: 144 tokens). The table's ratios, computed as the engine then
    reserved, give them within 0.2%; with the refit Quest gives back the weights' share (~0.8%)."""
    def ratios(refit):
        return {(r["decode"], r["kv_dtype"]): r["vs_prefill_only"]
                for r in mt.decode_rows_table(0.9, mt.decode_rows(8), refit=refit)}

    before, after = ratios(False), ratios(True)
    assert before[("Quest", "bf16")] == pytest.approx(1_891_440 / 2_027_600, abs=0.002)
    assert before[("TidalDecode", "bf16")] == pytest.approx(2_027_456 / 2_027_600, abs=0.0005)
    weights_share = mt.NON_KV["qwen2.5-7b-1m"][0] * mt.GIB / 17 / mt.kv_bytes_per_token(mt.SHAPES["qwen2.5-7b-1m"][1],
                                                                                          "bf16")
    assert after[("Quest", "bf16")] - before[("Quest", "bf16")] == pytest.approx(weights_share / 2_027_600, rel=0.05)
    assert after[("TidalDecode", "bf16")] == before[("TidalDecode", "bf16")]  # no summaries: nothing to refit


def test_the_decode_workspace_grows_with_the_rows(mt):
    """`vllm serve`'s default 1024 sequences on an H200 make the decode workspace ~0.3 GiB at 1M (64-token blocks:
    the scores, one a block per row and KV head), against 8 MiB at 8 sequences: counted without allocating, as
    `decode_workspace` allocates it."""
    from vllm_sparse.decode.memory import DecodeWorkspace

    plan, hf = _plan(mt, "qwen2.5-7b-1m")
    assert mt.decode_rows(8) == 16 and mt.decode_rows(1024) == 1024 and mt.decode_rows(300) == 512
    quest = [r for r in mt.decode_rows_table(0.9, 1024) if r["decode"] == "Quest" and r["kv_dtype"] == "bf16"][0]
    assert 250 < quest["decode_workspace_mib_at_1m"] < 330
    ws = DecodeWorkspace(16, 28, 4, 128, 2**14, 67, torch.device("cpu"))
    assert sum(t.nbytes for t in vars(ws).values() if isinstance(t, torch.Tensor)) == \
        mt.decode_workspace_bytes(16, 28, 4, 128, 2**14, 67)
