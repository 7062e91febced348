"""The fidelity yardstick: real google/gemma-3-270m in vLLM's CPU engine retrieves a 5-digit pass key
from a ~2K-token prompt, with the stock backend and with SPARSE (shipped config found by architecture)."""

from __future__ import annotations

import pytest

from tests.engines import run_engine
from vllm_sparse.eval.tasks import passkey_correct, passkey_prompt

pytestmark = pytest.mark.engine

DEPTHS = (0.1, 0.5, 0.8)  # the Q4 model itself misses some needles at depth 0.9+ (dense too)
ENGINE = {"kv_cache_memory_bytes": 1 << 30, "dtype": "bfloat16", "max_model_len": 4096, "max_num_batched_tokens": 2048,
          "max_num_seqs": 4}


@pytest.fixture(scope="module")
def cases(gemma3_270m):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma3_270m)
    return [passkey_prompt(tok, 2000, depth=d, seed=i) for i, d in enumerate(DEPTHS)]


def _run(model, cases, backend):
    spec = {"model": str(model), "backend": backend, "prompts": [p for p, _ in cases], "engine": ENGINE,
            "max_tokens": 8, "prompt_logprobs": False}
    return run_engine(spec)


@pytest.fixture(scope="module")
def dense(gemma3_270m, cases):
    return _run(gemma3_270m, cases, None)[0]


def test_dense_gemma_retrieves_passkey_at_2k(dense, cases):
    for r, (_, answer) in zip(dense["results"], cases):
        assert 1800 <= r["prompt_tokens"] <= 2200
        assert passkey_correct(r["text"], answer), f"wanted {answer}, got {r['text']!r}"


def test_sparse_backend_with_shipped_config_matches_dense(gemma3_270m, cases, dense, monkeypatch):
    monkeypatch.delenv("VLLM_SPARSE_CONFIG", raising=False)
    sparse, output = _run(gemma3_270m, cases, "sparse")
    assert "configs/gemma-3.yaml (from shipped config)" in output
    for d, s, (_, answer) in zip(dense["results"], sparse["results"], cases):
        assert passkey_correct(s["text"], answer)
        assert s["token_ids"] == d["token_ids"]  # 2K < dense_below: every layer ran vLLM's own kernel
