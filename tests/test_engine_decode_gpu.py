"""GPU twin of test_engine_decode.py: sparse decode in vLLM on CUDA with CUDA graphs on (decode
steps replay full graphs that hold the Quest and TidalDecode kernels), against the stock FlashAttention backend.

bf16 and head_dim 64, as FlashAttention 3 needs; 16-token pages, 32-token selection blocks (and 64-token ones for
TidalDecode: the kernels' wide tiles).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_engine_cpu import _prompts
from tests.test_engine_decode import MAX_TOKENS, TIDAL, _config, _tidal_config, base_spec, run_decode_plans

pytestmark = [pytest.mark.engine, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ENGINE = {"dtype": "bfloat16", "max_model_len": 4096, "block_size": 16, "max_num_batched_tokens": 512,
          "max_num_seqs": 8, "gpu_memory_utilization": 0.3, "enforce_eager": False}


@pytest.fixture(scope="module")
def runs(model_cache, tmp_path_factory):
    """name -> that engine's results. Each engine (a process of its own) starts the first time a test reads it, so a
    selection of the tests (`-k b64`) starts only the engines it compares: seven engines take ~8 minutes here."""
    from tests.fixtures.tiny_llama import build_tiny_llama

    model = build_tiny_llama(model_cache, head_dim=64)
    tmp = tmp_path_factory.mktemp("configs")
    # TidalDecode in 64-token blocks as well: the decode kernels' wide tiles (128 tokens, blocks of 64 or more).
    base = {**base_spec(model, ENGINE), "prompts": _prompts(model), "backend": "sparse"}
    own = {name: {**base, "config": _tidal_config(tmp, name, {**TIDAL, "block_tokens": 64, **budget})}
           for name, budget in (("tidal_b64", {}), ("tidal_keep_all_b64", {"top_k_tokens": 4096}))}
    # The Quest plan with no --block-size where vLLM's default page is 64 tokens (0.34's on CUDA): SPARSE asks for
    # Quest's 16-token pages.
    own["default_pages"] = {**base, "engine": {k: v for k, v in ENGINE.items() if k != "block_size"},
                            "vllm_default_block_size": 64,
                            "config": _config(tmp, "default_pages", {"top_k_tokens": 64, "sink_blocks": 1,
                                                                     "local_blocks": 1})}

    def run(name: str) -> dict:
        result, output = run_decode_plans(model, tmp, ENGINE, only=(name,), last={name: own[name]} if name in own
                                          else None, outputs=True)[name]
        return {**result, "output": output}

    return LazyRuns(run)


class LazyRuns(dict):
    """A dict that runs an engine for a name it does not hold yet; an engine that failed fails every later read
    at once (not another start of up to its timeout)."""

    def __init__(self, run):
        super().__init__()
        self._run = run
        self._failed: dict[str, BaseException] = {}

    def __missing__(self, name):
        if name in self._failed:
            raise self._failed[name]
        try:
            self[name] = self._run(name)
        except BaseException as e:
            self._failed[name] = e
            raise
        return self[name]


@pytest.fixture(scope="module")
def prefix_run(model_cache, tmp_path_factory):
    """The prefix-hit engine alone (it needs none of the others' results)."""
    from tests.fixtures.tiny_llama import build_tiny_llama

    return run_decode_plans(build_tiny_llama(model_cache, head_dim=64), tmp_path_factory.mktemp("configs"), ENGINE,
                            prefix_hit=True, only=("prefix_hit",))


def _mean(a, b) -> float:
    return sum(abs(x - y) for x, y in zip(a, b)) / len(a)


def test_prefill_is_untouched_by_a_decode_plan(runs):
    for stock, ours in zip(runs["stock"]["results"], runs["sparse"]["results"]):
        assert ours["prompt_logprobs"] == stock["prompt_logprobs"]


@pytest.mark.parametrize("plan", ["keep_all", "tidal_keep_all", "tidal_keep_all_b64"])
def test_keep_all_budget_equals_dense_decode(runs, plan):
    # bf16: the split-K kernel sums in another order than FlashAttention; the first tokens agree.
    stock, keep_all = (runs[k]["results"] for k in ("stock", plan))
    for s, k in zip(stock, keep_all):
        assert k["token_ids"][:4] == s["token_ids"][:4]
        assert _mean(s["logprobs"][:4], k["logprobs"][:4]) < 5e-2
    diff = _mean(stock[0]["logprobs"], keep_all[0]["logprobs"])
    print(f"mean |logprob diff| of the long prompt's tokens, {plan}: {diff:.3e}")


def test_sparse_decode_selects_pages_for_long_contexts_only(runs):
    stock, sparse = runs["stock"]["results"], runs["sparse"]["results"]
    for o in sparse:
        assert len(o["token_ids"]) == MAX_TOKENS and all(math.isfinite(x) for x in o["logprobs"])
    assert max(abs(x - y) for x, y in zip(stock[0]["logprobs"], sparse[0]["logprobs"])) > 1e-2
    assert sparse[2]["token_ids"] == stock[2]["token_ids"]
    assert sparse[2]["logprobs"] == stock[2]["logprobs"]


def test_a_larger_default_page_size_gives_way_to_quests_pages(runs):
    """vLLM 0.34's default KV page on CUDA is 64 tokens; Quest's page bounds are measured over 16-token pages: an
    engine started without --block-size runs the Quest plan on 16-token pages, as with --block-size 16. vLLM asks
    for the page size after the model is built: the summaries' reservation, made before, counted 16-token pages."""
    assert runs["sparse"]["block_size"] == 16 and runs["default_pages"]["block_size"] == 16
    output = runs["default_pages"]["output"]
    assert "decode page summaries for 2 layers" in output and "exceed the" not in output
    for explicit, chosen in zip(runs["sparse"]["results"], runs["default_pages"]["results"]):
        assert chosen["token_ids"] == explicit["token_ids"]
        assert _mean(explicit["logprobs"], chosen["logprobs"]) < 1e-3


def assert_decode_plan_selects_for_long_contexts_only(stock: list[dict], sparse: list[dict]) -> None:
    """A decode plan against stock on the three prompts: the same prefill, finite decode log-probs, decode
    changed on the long prompt and untouched on the 40-token one (under dense_below)."""
    for s, o in zip(stock, sparse):
        assert o["prompt_logprobs"] == s["prompt_logprobs"]  # a decode plan leaves prefill alone
        assert len(o["token_ids"]) == MAX_TOKENS and all(math.isfinite(x) for x in o["logprobs"])
    assert max(abs(x - y) for x, y in zip(stock[0]["logprobs"], sparse[0]["logprobs"])) > 1e-2
    assert sparse[2]["token_ids"] == stock[2]["token_ids"] and sparse[2]["logprobs"] == stock[2]["logprobs"]


@pytest.mark.parametrize("plan", ["tidal", "tidal_b64"])
def test_tidal_decode_reuses_a_selection_for_long_contexts_only(runs, plan):
    assert_decode_plan_selects_for_long_contexts_only(runs["stock"]["results"], runs[plan]["results"])


def test_prefix_cache_hit_decodes_like_its_own_prefill(prefix_run):
    first, second = prefix_run["prefix_hit"]["results"]
    page = ENGINE["block_size"]  # a hit of every whole page but the one holding the last token
    assert first["cached_tokens"] == 0 and second["cached_tokens"] == (first["prompt_tokens"] - 1) // page * page
    assert second["token_ids"][:4] == first["token_ids"][:4]
    assert _mean(first["logprobs"][:4], second["logprobs"][:4]) < 5e-2
