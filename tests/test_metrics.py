"""The sparse path's Prometheus metrics: worker counters -> snapshot files -> the API server's collector.

The engine end of it (a long prompt through `vllm serve` shows on /metrics) is in test_server.py.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vllm_sparse.metrics import collector, paths, worker

GPU = torch.cuda.is_available()


def _scrape(directory) -> dict:
    registry = CollectorRegistry()
    registry.register(collector.SparseMetricsCollector(str(directory)))
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


@pytest.fixture
def metrics_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.DIR_ENV, str(tmp_path))
    monkeypatch.setattr(worker, "INTERVAL_S", 0.05)
    return tmp_path


def _wait_for(directory, key, value, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = _scrape(directory).get(key)
        if got == pytest.approx(value):
            return
        time.sleep(0.05)
    raise AssertionError(f"{key} never reached {value}; last scrape: {_scrape(directory)}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not GPU, reason="CUDA"))])
def test_worker_counters_reach_the_collector(metrics_dir, device):
    m = worker.WorkerMetrics(torch.device(device), num_layers=20, rank=1)
    m.count_step(sparse_tokens=1000, dense_tokens=24, chunks=2)
    m.count_step(sparse_tokens=0, dense_tokens=6, chunks=0)
    m.count_decode(sparse_tokens=5, dense_tokens=3)
    m.count_decode(sparse_tokens=0, dense_tokens=2)
    # Densities from device numbers (the kernels' page counts) and host ones (the reference path).
    m.record_density(3, torch.tensor([[1, 2], [2, 0]], device=device, dtype=torch.int32), 10)  # 0.5, layers 0-7
    m.record_density(9, 1, 100)  # 0.01, layers 8-15
    m.record_density(19, 7, 7)  # 1.0, layers 16-19
    for _ in range(3):
        token = m.start_timer()
        if device == "cuda":
            torch.cuda._sleep(1_000_000)  # some GPU time between the two events
        else:
            time.sleep(0.002)
        m.stop_timer(token)
    r = (("rank", "1"),)
    _wait_for(metrics_dir, ("vllm_sparse:estimation_seconds_count", r), 3)
    s = _scrape(metrics_dir)
    assert s[("vllm_sparse:prefill_tokens_total", (("path", "sparse"), ("rank", "1")))] == 1000
    assert s[("vllm_sparse:prefill_tokens_total", (("path", "dense"), ("rank", "1")))] == 30
    assert s[("vllm_sparse:sparse_chunks_total", r)] == 2
    assert s[("vllm_sparse:decode_tokens_total", (("path", "sparse"), ("rank", "1")))] == 5
    assert s[("vllm_sparse:decode_tokens_total", (("path", "dense"), ("rank", "1")))] == 5

    def bucket(layers, le):
        return s[("vllm_sparse:kept_density_bucket", (("layers", layers), ("le", le), ("rank", "1")))]

    assert bucket("0-7", "0.4") == 0 and bucket("0-7", "0.5") == 1 and bucket("0-7", "+Inf") == 1
    assert bucket("8-15", "0.02") == 1
    assert bucket("16-19", "0.9") == 0 and bucket("16-19", "1.0") == 1
    assert s[("vllm_sparse:kept_density_sum", (("layers", "0-7"), ("rank", "1")))] == pytest.approx(0.5)
    assert s[("vllm_sparse:estimation_seconds_sum", r)] > 0
    # Later records show on a later scrape: the snapshot follows the counters.
    m.record_density(4, 1, 4)
    _wait_for(metrics_dir, ("vllm_sparse:kept_density_count", (("layers", "0-7"), ("rank", "1"))), 2)


def test_collector_sums_live_workers_and_skips_dead_ones(metrics_dir):
    import json

    snap = {"rank": 0, "prefill_tokens": {"sparse": 10, "dense": 1}, "sparse_chunks": 1, "kept_density": {},
            "estimation_seconds": {"counts": [0] * (len(paths.ESTIMATION_BUCKETS) + 1), "sum": 0.0}}
    (metrics_dir / "worker-a.json").write_text(json.dumps({**snap, "pid": os.getpid()}))
    (metrics_dir / "worker-b.json").write_text(json.dumps({**snap, "pid": os.getpid()}))
    (metrics_dir / "worker-dead.json").write_text(json.dumps({**snap, "pid": 2 ** 22 + 12345}))  # no such pid
    (metrics_dir / "worker-torn.json").write_text("{")
    s = _scrape(metrics_dir)
    assert s[("vllm_sparse:prefill_tokens_total", (("path", "sparse"), ("rank", "0")))] == 20


def _claim_in_child(queue):
    queue.put((paths.claim_metrics_dir(), os.environ.get(paths.DIR_ENV)))


def test_a_top_level_process_serves_and_its_workers_write(monkeypatch):
    """A top-level process (vllm serve, a script) makes its own directory, also when it inherited one
    from whoever started it; processes it starts through multiprocessing (vLLM's engine core and
    workers) write into that one."""
    import multiprocessing

    monkeypatch.setenv(paths.DIR_ENV, "/inherited/from/a/parent")
    monkeypatch.setattr(paths, "_claimed_by", None)
    assert paths.claim_metrics_dir()
    made = os.environ[paths.DIR_ENV]
    assert made != "/inherited/from/a/parent" and os.path.isdir(made)
    assert not paths.claim_metrics_dir()  # once per process
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_claim_in_child, args=(queue,))
    child.start()
    assert queue.get(timeout=120) == (False, made)
    child.join()


@pytest.mark.parametrize("case", [(7, 100), (1, 3), (2, 40), (5, 5), (0, 9), (9, 10), (3, 30), (2**20 + 3, 2**21)])
def test_density_kernel_records_as_the_torch_ops(case, metrics_dir):
    """The one-launch density record (CUDA's path; here in Triton's interpreter) gives the torch path's
    buckets and sums, for page counts of any shape, bucket bounds included (0.02 of 100, 1.0)."""
    kept, total = case
    device = torch.device("cuda" if GPU else "cpu")
    accs = []
    for use_kernel in (False, True):
        m = worker.WorkerMetrics(device, num_layers=20, rank=0)
        m.use_kernel = use_kernel
        m._acc.copy_(torch.arange(m._acc.numel(), dtype=torch.float64, device=device) * 0.5)  # earlier records
        parts = torch.tensor([kept // 3, kept // 3, kept - 2 * (kept // 3)], dtype=torch.int32, device=device)
        m.record_density(11, parts.view(3, 1), total)
        m.record_density(0, parts[:1], total)
        # As serving passes it: a slice of a CSR index array at an odd offset of a larger buffer.
        csr = torch.randint(0, 50, (11,), dtype=torch.int32, generator=torch.Generator().manual_seed(kept))
        m.record_density(7, csr.to(device)[3:7], max(total, 200))
        accs.append(m._acc.cpu())
    assert torch.equal(accs[0], accs[1])


def test_a_builder_takes_over_step_counting_from_one_that_is_gone(metrics_dir):
    """One builder per process counts each step; one vLLM threw away (a memory profile's, over a minimal cache)
    must not keep the claim, or the real builders would count nothing."""
    import gc

    class Builder:
        pass

    m = worker.WorkerMetrics(torch.device("cpu"), num_layers=4, rank=0)
    thrown_away, real, second_group = Builder(), Builder(), Builder()
    assert m.claim_step_counting(thrown_away)
    assert not m.claim_step_counting(real)  # (the first is alive: one counter per process)
    del thrown_away
    gc.collect()
    assert m.claim_step_counting(real)  # the first is gone: the next to ask counts
    assert not m.claim_step_counting(second_group)  # (another KV cache group's builder of the same engine)


def test_the_reader_thread_ends_before_the_interpreter_does(metrics_dir, monkeypatch):
    """The snapshot thread is stopped at exit (a daemon thread left inside a CUDA call while CUDA is torn down
    can abort the process): stop() ends it within one wait, and a second stop() is harmless."""
    import time

    monkeypatch.setattr(worker, "INTERVAL_S", 60.0)  # (a thread that would sleep a minute between snapshots)
    m = worker.WorkerMetrics(torch.device("cpu"), num_layers=4, rank=0)
    assert m._thread.is_alive()
    t0 = time.perf_counter()
    m.stop()
    assert not m._thread.is_alive() and time.perf_counter() - t0 < 5
    m.stop()
