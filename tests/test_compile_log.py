"""VLLM_SPARSE_LOG_COMPILES: every Triton kernel a process compiles is logged with its specialisation."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from vllm_sparse import compile_log

triton = pytest.importorskip("triton")
from triton import knobs  # noqa: E402


@pytest.fixture
def hook_restored():
    before = knobs.runtime.jit_cache_hook
    yield
    knobs.runtime.jit_cache_hook = before


def test_off_by_default(monkeypatch, hook_restored):
    monkeypatch.delenv("VLLM_SPARSE_LOG_COMPILES", raising=False)
    knobs.runtime.jit_cache_hook = None
    assert compile_log.install() is False
    assert knobs.runtime.jit_cache_hook is None


def test_logs_the_kernel_and_lets_triton_compile(monkeypatch, hook_restored, caplog):
    monkeypatch.setenv("VLLM_SPARSE_LOG_COMPILES", "1")
    assert compile_log.install() is True
    caplog.set_level(logging.WARNING, logger="vllm.sparse")
    # Triton's call (runtime/jit.py `_call_hook`): keywords only; a truthy return would skip the compile.
    ret = knobs.runtime.jit_cache_hook(key=("k",), repr="_select_blocks_kernel[num_warps=4](n_kv_blocks: i32)",
                                       fn=SimpleNamespace(module="vllm_sparse.selection.select_kernel",
                                                          name="_select_blocks_kernel", jit_function=None),
                                       compile={}, is_manual_warmup=False, already_compiled=False)
    assert ret is None
    lines = [r.getMessage() for r in caplog.records]
    assert any("vllm_sparse.selection.select_kernel._select_blocks_kernel" in m and "n_kv_blocks: i32" in m
               for m in lines), lines


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton compiles only for a GPU here (CPU: interpreter)")
def test_a_real_compile_is_logged(monkeypatch, hook_restored, caplog):
    import triton.language as tl

    @triton.jit
    def _add_one(X, N, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(X + i, tl.load(X + i, mask=i < N) + 1, mask=i < N)

    monkeypatch.setenv("VLLM_SPARSE_LOG_COMPILES", "1")
    compile_log.install()
    caplog.set_level(logging.WARNING, logger="vllm.sparse")
    x = torch.randn(10, device="cuda")
    want = x + 1
    _add_one[(1,)](x, 10, BLOCK=16)
    torch.testing.assert_close(x, want)
    assert any("_add_one" in r.getMessage() for r in caplog.records)
