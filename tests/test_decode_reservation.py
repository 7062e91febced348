"""The page summaries' reservation: made while vLLM builds the model, before the weights load, then taken
again once they are in memory (`refit_after_load`), so the weights' memory is not counted as the cache's.
The GPU's memory calls are stood in for (this machine has no GPU); the GPU engines run the real ones."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.test_config import entry, plan_of
from vllm_sparse.backend.impl import SparseImplMixin
from vllm_sparse.decode import memory

GIB = 2**30
QUEST = {"estimator": "quest", "top_k_tokens": 4096, "block_tokens": 16}


class FakeGpu:
    """A GPU of `total` bytes whose memory in use is what the test puts there, plus what is held."""

    def __init__(self, monkeypatch, total: int, in_use: int):
        self.total, self.in_use, self.held, self.released = total, in_use, 0, []
        monkeypatch.setattr(memory, "_total_memory", lambda device: self.total)
        monkeypatch.setattr(memory, "_memory_in_use", lambda device: self.in_use + self.held)
        monkeypatch.setattr(memory, "_release_cached", self.release)
        monkeypatch.setattr(memory, "_hold", self.hold)
        monkeypatch.setattr(memory, "_reservation", {})

    def hold(self, nbytes: int, device) -> None:
        self.held = nbytes
        memory._reservation["tensor"] = object()  # (the reservation's tensor; nothing reads it)
        memory._reservation["bytes"] = nbytes

    def release(self, device) -> None:
        self.released.append(self.held)
        self.held = 0  # the dropped reservation's block goes back to the GPU


def engine(kv_cache_memory_bytes=None, util=0.9, block_size=16, user_specified=True):
    cache = SimpleNamespace(block_size=block_size, user_specified_block_size=user_specified,
                            gpu_memory_utilization=util, kv_cache_memory_bytes=kv_cache_memory_bytes)
    return SimpleNamespace(cache_config=cache)


def share(plan, memory_bytes, explicit=False):
    return memory.summaries_share(plan, 16, 8, 128, torch.bfloat16, 2, memory_bytes, explicit)


def test_refit_after_the_weights_load_counts_them_in_use(monkeypatch):
    plan = plan_of(entry(decode=QUEST))
    gpu = FakeGpu(monkeypatch, total=100 * GIB, in_use=1 * GIB)
    memory.reserve_at_load(engine(), plan, 8, 128, torch.bfloat16, torch.device("cuda", 0))
    at_load = share(plan, int(0.9 * 100 * GIB) - 1 * GIB)
    assert memory._reservation["bytes"] == at_load > 0

    gpu.in_use += 16 * GIB  # the weights load
    memory.refit_after_load()
    assert gpu.released == [at_load]  # released before the memory in use was read again
    refit = memory._reservation["bytes"]
    assert refit == share(plan, int(0.9 * 100 * GIB) - 17 * GIB)
    assert at_load - refit == pytest.approx(16 * GIB / 17, rel=1e-6)  # the weights' share, held for nothing before

    memory.refit_after_load()  # once per reservation: the later layers' calls change nothing
    assert memory._reservation["bytes"] == refit and len(gpu.released) == 1


def test_the_reservation_counts_the_pages_the_engine_will_get(monkeypatch):
    """While vLLM builds the model its block size is still its default (64 on CUDA in vLLM 0.34): it asks the backend
    for the page size only after the load, and SPARSE then answers Quest's 16 (`backend/capabilities.py`). The
    reservation counts 16-token pages from the start (4x the summaries of 64-token ones), and a --block-size the user
    gave as given."""
    plan = plan_of(entry(decode={**QUEST, "block_tokens": 64}))
    FakeGpu(monkeypatch, total=100 * GIB, in_use=1 * GIB)
    memory.reserve_at_load(engine(block_size=64, user_specified=False), plan, 8, 128, torch.bfloat16,
                           torch.device("cuda", 0))
    assert memory._reservation["bytes"] == share(plan, int(0.9 * 100 * GIB) - 1 * GIB)  # 16-token pages
    FakeGpu(monkeypatch, total=100 * GIB, in_use=1 * GIB)
    memory.reserve_at_load(engine(block_size=64), plan, 8, 128, torch.bfloat16, torch.device("cuda", 0))
    given = memory.summaries_share(plan, 64, 8, 128, torch.bfloat16, 2, int(0.9 * 100 * GIB) - 1 * GIB, False)
    assert memory._reservation["bytes"] == given < share(plan, int(0.9 * 100 * GIB) - 1 * GIB) / 3


def test_refit_leaves_an_explicit_cache_size_alone(monkeypatch):
    plan = plan_of(entry(decode=QUEST))
    gpu = FakeGpu(monkeypatch, total=100 * GIB, in_use=1 * GIB)
    memory.reserve_at_load(engine(kv_cache_memory_bytes=40 * GIB), plan, 8, 128, torch.bfloat16,
                           torch.device("cuda", 0))
    assert memory._reservation["bytes"] == share(plan, 40 * GIB, explicit=True)
    gpu.in_use += 16 * GIB
    memory.refit_after_load()
    assert gpu.released == [] and memory._reservation["bytes"] == share(plan, 40 * GIB, explicit=True)


def test_the_summaries_take_the_refit_reservation(monkeypatch):
    """After the refit the builders' summaries still come out of the reservation (what is left is counted)."""
    plan = plan_of(entry(decode=QUEST))
    gpu = FakeGpu(monkeypatch, total=100 * GIB, in_use=1 * GIB)
    memory.reserve_at_load(engine(), plan, 8, 128, torch.bfloat16, torch.device("cuda", 0))
    gpu.in_use += 16 * GIB
    memory.refit_after_load()
    refit = memory._reservation["bytes"]
    monkeypatch.setattr(memory, "_summaries", {})
    memory.allocate_summaries(["model.layers.0.self_attn.attn"], 64, 8, 128, 16, torch.bfloat16, torch.device("cpu"))
    need = memory._summaries["model.layers.0.self_attn.attn"].nbytes
    assert "tensor" not in memory._reservation and memory._reservation["left"] == refit - need


def test_a_failed_engines_reservation_is_replaced_by_the_next_engines(monkeypatch):
    """An engine whose start failed after its reservation (before its builders took it) leaves it held; the next
    engine in the process reserves its own share, of the memory with the old reservation released."""
    plan = plan_of(entry(decode=QUEST))
    gpu = FakeGpu(monkeypatch, total=100 * GIB, in_use=1 * GIB)
    first, second = engine(util=0.5), engine(util=0.9)
    memory.reserve_at_load(first, plan, 8, 128, torch.bfloat16, torch.device("cuda", 0))
    memory.reserve_at_load(first, plan, 8, 128, torch.bfloat16, torch.device("cuda", 0))  # its next layer: kept
    assert memory._reservation["bytes"] == share(plan, int(0.5 * 100 * GIB) - 1 * GIB) and gpu.released == []
    memory.reserve_at_load(second, plan, 8, 128, torch.bfloat16, torch.device("cuda", 0))
    assert len(gpu.released) == 1 and memory._reservation["bytes"] == share(plan, int(0.9 * 100 * GIB) - 1 * GIB)
    gpu.in_use += 16 * GIB
    memory.refit_after_load()  # the second engine's inputs
    assert memory._reservation["bytes"] == share(plan, int(0.9 * 100 * GIB) - 17 * GIB)


def test_no_reservation_off_the_gpu(monkeypatch):
    monkeypatch.setattr(memory, "_reservation", {})
    memory.reserve_at_load(engine(), plan_of(entry(decode=QUEST)), 8, 128, torch.bfloat16, torch.device("cpu"))
    memory.refit_after_load()
    assert memory._reservation == {}


class _Base:
    def __init__(self):
        self.calls = []

    def process_weights_after_loading(self, act_dtype):
        self.calls.append(("base", act_dtype))


class _Impl(SparseImplMixin, _Base):
    def __init__(self, plan):  # (not the mixin's: it resolves an engine's plan)
        _Base.__init__(self)
        self._plan = plan


@pytest.mark.parametrize("decode", [True, False])
def test_the_backend_refits_when_vllm_has_loaded_the_weights(monkeypatch, decode):
    import vllm_sparse.backend.impl as impl_mod

    impl = _Impl(plan_of(entry(decode=QUEST)) if decode else plan_of(entry()))
    monkeypatch.setattr(impl_mod, "refit_after_load", lambda: impl.calls.append("refit"))
    impl.process_weights_after_loading(torch.bfloat16)
    assert impl.calls == ([("base", torch.bfloat16), "refit"] if decode else [("base", torch.bfloat16)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU twin of the tests above: needs a CUDA GPU")
def test_refit_on_a_gpu_releases_the_first_reservation(monkeypatch):
    """The same with the GPU's own memory calls: the first reservation's memory goes back to the GPU (not only to
    torch's cache, whose reserved bytes the refit reads as in use) and the refit share is taken of what the stand-in
    weights left."""
    monkeypatch.setattr(memory, "_reservation", {})
    device = torch.device("cuda", torch.cuda.current_device())
    plan = plan_of(entry(decode=QUEST))
    torch.cuda.empty_cache()
    base, total = torch.cuda.memory_reserved(device), torch.cuda.mem_get_info(device)[1]
    memory.reserve_at_load(engine(util=0.5), plan, 8, 128, torch.bfloat16, device)
    at_load = memory._reservation["bytes"]
    assert at_load == pytest.approx(share(plan, int(0.5 * total) - base), abs=64)
    weights = torch.empty(2 * GIB, dtype=torch.uint8, device=device)  # the weights load
    memory.refit_after_load()
    refit = memory._reservation["bytes"]
    assert refit == pytest.approx(share(plan, int(0.5 * total) - base - 2 * GIB), abs=64)
    assert at_load - refit == pytest.approx(2 * GIB / 17, rel=0.01)
    assert memory._reservation["tensor"].numel() == refit and memory._reservation["tensor"].is_cuda
    # The first reservation went back to the GPU, not only to torch's cache (read as in use by the refit).
    assert abs(torch.cuda.memory_reserved(device) - (base + 2 * GIB + refit)) < 4 * 2**20
    del weights
    memory._reservation.clear()
    torch.cuda.empty_cache()
