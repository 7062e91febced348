"""Every Triton kernel launch of the shipped plans compiles for Hopper (sm_90) and for a GPU with 99 KiB of shared
memory per block (sm_89: L40S, RTX 4090; sm_86 shares its limits), and fits there, on a machine without a GPU.

`gpu_compile.py` (a pytest plugin) records the launches of the warm-up tests and compiles each with Triton's CUDA
backend; a kernel that needs more shared memory than the architecture has would be refused by the GPU at engine
start. Here: the shipped plans with FA3's tables on sm_90, and with an fp8 cache (vLLM's FlashAttention takes fp8
pages on Hopper only) both attention paths there, and TidalDecode's decode kernels; on sm_89 with the Triton
attention kernel (no FA3 there) and with the opt-in FA2's tables. About 90 s on 2 cores. Every benchmark plan on
sm_80, sm_86, sm_89, sm_90 and sm_100, under the GPU image's Triton: `scripts/gpu-compile.sh`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# The kernels the selections below launch: estimation, selection, the density metric, FlashAttention's page tables
# and the Triton attention kernel on both architectures (on sm_90 it runs plans that keep key columns, and
# `VLLM_SPARSE_KERNEL=triton`); TidalDecode's decode on Hopper.
KERNELS = {"_select_blocks_kernel", "_block_key_means_kernel", "_record_density_kernel", "_quantize_rows_kernel",
           "_quantize_columns_kernel", "_row_block_lse_kernel", "_block_mass_kernel", "_sparse_paged_attention_kernel",
           "_tile_tables_kernel"}
HOPPER_KERNELS = {"_decode_split_kernel", "_decode_merge_kernel", "_segment_select_kernel", "_merge_select_kernel"}
SELECTIONS = {
    90: "(serving_launches and configs and fa3) or (other_engine_settings and llama and fp8) or "
        "(decode_warm_up_launches and tidal and width and auto)",
    89: "serving_launches and configs and (fa2 or triton)",
}


@pytest.mark.parametrize("arch", sorted(SELECTIONS, reverse=True))
def test_shipped_plans_compile_for_the_gpu(tmp_path, arch):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TRITON_INTERPRET"))}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")  # (what this run compiles, not another run's cache)
    report = tmp_path / f"sm_{arch}.json"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.gpu_compile", "-p", "no:cacheprovider", "--durations=0",
         "--gpu-arch", str(arch), "--gpu-compile-json", str(report), "tests/test_prefill_warmup.py",
         "tests/test_decode_warmup.py", "-k", SELECTIONS[arch]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    rows = json.loads(report.read_text())["rows"]
    assert all(r["ok"] for r in rows)
    # Every kernel these plans launch was compiled (the selection reached each path).
    assert KERNELS | (HOPPER_KERNELS if arch == 90 else set()) <= {r["kernel"] for r in rows}
    if arch == 90:  # (an fp8 cache's keys, read by the estimator)
        assert any("fp8e4nv" in r["key"] for r in rows)
