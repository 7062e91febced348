"""benchmarks/chunk_routing.py: which prefill chunks of concurrent prompts go sparse, from vLLM's own scheduler and
the builder's own rule (`backend.batch.classify`)."""

from __future__ import annotations

from tests.benchmark_modules import load_benchmark

PLAN = "benchmarks/configs/llama-3-8b-antidiagonal-7.5-s16-int8-tail.yaml"


def _route(config: str, chunk: int, batch: int = 3, length: int = 32768, out: int = 4, work_floor=None) -> dict:
    import dataclasses

    from vllm_sparse.config.build import build_plan
    from vllm_sparse.config.plan import ModelShape

    routing = load_benchmark("chunk_routing")
    plan = build_plan({"sparse": {"config": config}}, ModelShape(*routing.LLAMA_8B))
    if work_floor is not None:
        plan = dataclasses.replace(plan, min_chunk_work=work_floor)
    return routing.route(plan, chunk, batch, length, out, routing.model_dir())


def test_every_token_is_counted_once_and_the_prompts_first_chunk_below_dense_below_runs_dense():
    r = _route(PLAN, 8192)
    # each prompt's tokens once, and each output token but the last fed back as a decode row
    assert r["sparse_tokens"] + r["dense_tokens"] == 3 * 32768 + 3 * (4 - 1)
    # [0, 8K) of each prompt lies under dense_below (8192): at least those 3 x ~8K tokens run dense
    assert r["dense_tokens"] >= 3 * (8192 - 8)


def test_decode_rows_push_a_prompts_8k_to_16k_chunk_under_a_96m_work_floor_and_the_auto_64m_takes_it():
    """The first prompt's [8K, 16K) chunk, 100,667,392 token pairs, clears a 96M floor (100,663,296: `auto` until
    2026-12-07); the next prompts' share their steps with the first's decode rows, start and end a few tokens earlier,
    and fall under it (RESULTS.md, thirty-eighth session: 48% of 12 x 32K ran dense with 8K chunks). At `auto`, 64M,
    they go sparse; with 16K chunks both floors route alike."""
    old8, auto8, auto16 = _route(PLAN, 8192, work_floor=96 * 2**20), _route(PLAN, 8192), _route(PLAN, 16384)
    assert auto8["sparse_chunks"] == old8["sparse_chunks"] + 2  # the 2nd and 3rd prompts' [8K, 16K) chunks
    assert auto8["sparse_tokens"] > old8["sparse_tokens"] + 2 * 8000
    assert auto16["dense_tokens"] < 3 * 16  # 16K chunks: only decode rows and a prompt's few leftover tokens run dense
    # the timing plan that set 64M in its file routes as `auto` does now
    assert _route(PLAN.replace(".yaml", "-w64m.yaml"), 8192) == auto8
