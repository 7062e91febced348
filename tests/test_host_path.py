"""`benchmarks/host_path.py`: the CUDA path's host code of a sparse chunk-layer, on CPU with its kernels recorded."""

from __future__ import annotations

import sys
import tempfile

import torch

from tests.benchmark_modules import load_benchmark
from vllm_sparse.config.loader import load_config
from vllm_sparse.config.plan import resolve_plan


def test_recorded_chunk_layer_counts_what_the_cuda_path_launches():
    host_path = load_benchmark("host_path")
    path = host_path.REPO / host_path.DEFAULT_PLAN
    shape = host_path.shape_of(path.name)[0]
    plan = resolve_plan(load_config(path), shape, str(path), explicit=True)
    before = sys.modules.get("vllm.vllm_flash_attn")
    with tempfile.TemporaryDirectory() as metrics_dir:
        row = host_path.measure(plan, shape, 128, "fa3", 32768, 2048, 65536, 16384, 2, metrics_dir,
                                torch.device("cpu"))
    assert sys.modules.get("vllm.vllm_flash_attn") is before  # (the stand-in interface is gone again)
    assert row["layers"] == sum(lp.is_sparse for lp in plan.layers)
    # FA3 once per page list (a list per KV head: the plan unions each KV head's q heads); one selection, one table
    # build and one density record per chunk-layer; the estimator's quantizers, products and mass.
    assert row["flash_calls"] == shape.num_kv_heads
    by = row["launches_by_kernel"]
    assert by["_select_blocks_kernel"] == by["_tile_tables_kernel"] == by["_record_density_kernel"] == 1
    assert by["_quantize_rows_kernel"] == 1 and by["_block_mass_kernel"] >= 1
    assert by["_row_block_lse_kernel"] == by["_quantize_columns_kernel"] >= 1
    assert row["triton_launches"] == sum(by.values())
    assert row["torch_ops"] > 0 and 0 < row["host_us"]["min"] <= row["host_us"]["median"]
    assert not row["pack_lists"]
    with tempfile.TemporaryDirectory() as metrics_dir:  # a 2K-token chunk's 8 lists in one call where packed
        packed = host_path.measure(plan, shape, 128, "fa3", 32768, 2048, 65536, 16384, 2, metrics_dir,
                                   torch.device("cpu"), pack_lists=True)
    assert packed["flash_calls"] == 1 and packed["launches_by_kernel"] == by


def test_a_short_follow_up_at_128k_quantizes_every_kv_heads_key_columns_in_one_pass():
    """With the workspace reserved as the engine does (KV heads and head dim given: room for a 4K chunk's rows beside
    every KV head's int8 key columns at max_model_len), a 2K-token follow-up on a cached 128K prompt quantizes and
    scores all eight of Llama's KV heads in one pass: one launch of each (was two: 7 heads, then 1)."""
    host_path = load_benchmark("host_path")
    path = host_path.REPO / host_path.DEFAULT_PLAN
    shape = host_path.shape_of(path.name)[0]
    plan = resolve_plan(load_config(path), shape, str(path), explicit=True)
    with tempfile.TemporaryDirectory() as metrics_dir:
        rows = [host_path.measure(plan, shape, 128, "fa3", 131072, q_len, 131072 + 8192 + 256, 16384, 1, metrics_dir,
                                  torch.device("cpu")) for q_len in (2048, 4096, 8192)]
    by = [r["launches_by_kernel"] for r in rows]
    assert [b["_quantize_columns_kernel"] for b in by] == [1, 1, 2]  # (8K: rows fill the room, two passes)
    assert [b["_row_block_lse_kernel"] for b in by] == [1, 1, 2]


def test_a_dense_tail_counts_its_dense_call():
    """A plan with `dense_tail`: the chunk's tail tiles take one more FlashAttention call beside the page lists' (the
    dense call is on the recorded path, so its host cost is in the figure)."""
    host_path = load_benchmark("host_path")
    path = host_path.REPO / "benchmarks/configs/llama-3-8b-antidiagonal-10-s16-int8-tail.yaml"
    shape = host_path.shape_of(path.name)[0]
    plan = resolve_plan(load_config(path), shape, str(path), explicit=True)
    assert plan.dense_tail > 0
    with tempfile.TemporaryDirectory() as metrics_dir:
        row = host_path.measure(plan, shape, 128, "fa3", 32768, 2048, 65536, 16384, 1, metrics_dir,
                                torch.device("cpu"))
    assert row["flash_calls"] == shape.num_kv_heads + 1


def test_the_fa3_stand_in_survives_a_second_load_of_the_script():
    """Tests load the script afresh each time; torch's dispatcher is process-wide, so the second load must find the
    first load's CPU kernel and count through it (on a GPU host the first module stayed alive and registering again
    raised)."""
    import pytest

    first, second = load_benchmark("host_path"), load_benchmark("host_path")
    with pytest.MonkeyPatch.context() as mp:
        first.stand_in_fa3(mp)
        second.stand_in_fa3(mp)
        second._FA3_CALLS[0] = 0
        q = torch.randn(4, 2, 8)
        torch.ops._vllm_fa3_C.fwd(q, q, q, *([None] * 20), 1.0, True, -1, -1, 0.0, False, None, 1, None, 0, None,
                                  1, 0, None)
    assert first._FA3_CALLS[0] == second._FA3_CALLS[0] == 1
