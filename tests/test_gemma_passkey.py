"""The fidelity yardstick: real google/gemma-3-270m in vLLM's CPU engine retrieves a 5-digit pass key
from a ~2K-token prompt, with the stock backend and with SPARSE: the shipped config found by
architecture (dense at this length), and the shipped plan made sparse from 1K tokens, where the
sparse path must run, keep part of the blocks, and still find every key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.engines import run_engine
from vllm_sparse.eval.tasks import passkey_correct, passkey_prompt

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.engine

DEPTHS = (0.1, 0.5, 0.8)  # the Q4 model itself misses some needles at depth 0.9+ (dense too)
ENGINE = {"kv_cache_memory_bytes": 1 << 30, "dtype": "bfloat16", "max_model_len": 4096, "max_num_batched_tokens": 2048,
          "max_num_seqs": 4}


@pytest.fixture(scope="module")
def cases(gemma3_270m):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma3_270m)
    return [passkey_prompt(tok, 2000, depth=d, seed=i) for i, d in enumerate(DEPTHS)]


def _run(model, cases, backend, **extra):
    spec = {"model": str(model), "backend": backend, "prompts": [p for p, _ in cases], "engine": ENGINE,
            "max_tokens": 8, "prompt_logprobs": False, **extra}
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


def test_shipped_plan_sparse_from_1k_keeps_part_of_the_blocks_and_every_key(gemma3_270m, cases, dense, tmp_path):
    shipped = yaml.safe_load((REPO / "configs/gemma-3.yaml").read_text())
    shipped["models"][0]["dense_below"] = 1024  # the 2K prompts' chunks go sparse
    config = tmp_path / "gemma-3-from-1k.yaml"
    config.write_text(yaml.safe_dump(shipped))
    sparse, output = _run(gemma3_270m, cases, "sparse", config=str(config), stats=True)
    assert f"{config} (from --additional-config)" in output
    stats = sparse["stats"]
    assert sorted(stats, key=int) == ["5", "11", "17"]  # the global layers, and only they
    for layer in stats.values():
        assert layer["unions"] > 0  # the sparse path ran
        assert 0 < layer["requested_density"] <= layer["union_density"] < 1  # and skipped blocks
    for s, (_, answer) in zip(sparse["results"], cases):
        assert passkey_correct(s["text"], answer), f"wanted {answer}, got {s['text']!r}"
