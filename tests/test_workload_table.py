"""benchmarks/workload.py's reading of its rows: steady-state medians per class, and the host probes that say
whether two engines' host-bound turns ran on equally fast processes."""

import os
import threading

import pytest

from tests.benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def wl():
    return load_benchmark("workload")


def _skip_only_without_proc(result, path: str, threads: bool = False) -> None:
    """Skip where this machine's /proc cannot give the counters (a sandbox's lists no threads but one); where it
    can, a None is a reading bug, and fails."""
    if result is not None:
        return
    readable = os.path.exists(path) and (not threads or len(os.listdir(path)) >= threading.active_count())
    assert not readable, f"{path} is readable here, yet the probe returned None"
    pytest.skip(f"this machine's /proc has no usable {path}")


def _rows(ttfts_ms, probes_ms, threads_ms, dense_tokens, thread="python3"):
    return [{"class": "startup", "seconds": 1.0, "host": {"cpus": 2}}] + [
        {"class": "follow:131072+8", "turn": turn, "wall_s": t / 1e3,
         "requests": [{"ttft_s": t / 1e3, "finish_s": t / 1e3, "tokens_out": 1, "cached_tokens": 131072}],
         "paths": {"sparse": 0, "dense": dense_tokens, "chunks": 0}, "host_probe_ms": p,
         "other_threads": [40, th, thread, th]}
        for turn, (t, p, th) in enumerate(zip(ttfts_ms, probes_ms, threads_ms))]


def test_the_table_sets_each_engines_host_probe_beside_its_turns(wl):
    # turn 0 is one-time cost and reported apart; the medians are over turns 1-3
    dense = _rows([90.0, 72.0, 74.0, 73.0], [50.0, 8.0, 8.5, 8.2], [0.0, 1.0, 2.0, 1.0], 0)
    sparse = _rows([120.0, 107.0, 105.0, 108.0], [50.0, 12.0, 12.6, 12.4], [0.0, 30.0, 40.0, 50.0], 8,
                   thread="vllm-sparse-met")
    classes = wl.classes(sparse)
    assert classes["follow:131072+8"]["host_probe_ms"] == [12.0, 12.6, 12.4]
    assert classes["follow:131072+8"]["first_s"] == pytest.approx(0.120)
    table = wl.table({"engines": {"dense": {"rows": dense}, "plan.yaml": {"rows": sparse}}})
    line = next(x for x in table.splitlines() if "follow:131072+8" in x)
    assert "73.0ms" in line and "107.0ms" in line and "0.68x" in line, line
    assert "host probe 8.2 / 12.4 ms (unequal host speeds: compare at equal probes, host_matched.py)" in line, line
    assert "other threads 1 / 40 ms (busiest python3 / vllm-sparse-met)" in line, line


def test_rows_without_probes_print_no_probe(wl):
    rows = _rows([10.0, 11.0, 12.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], 0)
    for r in rows:
        r.pop("host_probe_ms", None)
        r.pop("other_threads", None)
    table = wl.table({"engines": {"dense": {"rows": rows}, "plan.yaml": {"rows": rows}}})
    assert "follow:131072+8" in table and "host probe" not in table and "other threads" not in table


def test_the_host_probe_times_real_work(wl):
    ms = wl.host_probe()
    assert 0.5 < ms < 5000  # 8,192 sha256 hashes of pickled pairs: milliseconds, never zero


def test_other_threads_cpu_time_counts_a_busy_thread(wl):
    before = wl.other_threads_cpu_ms()
    _skip_only_without_proc(before, "/proc/self/task", threads=True)
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            sum(range(1000))

    t = threading.Thread(target=spin)
    t.start()
    try:
        import time

        time.sleep(0.3)
        during = wl.other_threads_cpu_ms()
    finally:
        stop.set()
        t.join()
    _skip_only_without_proc(during, "/proc/self/task", threads=True)
    threads, ms, busiest, busiest_ms = wl.threads_cpu_delta(before, during)
    assert threads >= len(before) + 1
    assert ms > 20 and busiest_ms > 20  # the spinning thread took CPU (ticks are 10 ms)
    assert busiest == during[t.native_id][0]  # and it is the one named


def test_thread_deltas_count_new_threads_whole_and_ended_ones_not(wl):
    before = {1: ("main-ish", 100.0), 2: ("gone", 50.0)}
    after = {1: ("main-ish", 130.0), 3: ("new", 20.0)}
    assert wl.threads_cpu_delta(before, after) == [2, 50.0, "main-ish", 30.0]
    assert wl.threads_cpu_delta({}, {}) == [0, 0.0, "-", 0.0]
    assert wl.threads_cpu_delta(before, {1: ("idle", 100.0)}) == [1, 0.0, "-", 0.0]


def test_main_thread_counters_grow_with_work_on_this_thread(wl):
    before = wl.main_thread_sched()
    _skip_only_without_proc(before, "/proc/thread-self/schedstat")
    t = __import__("time").perf_counter()
    while __import__("time").perf_counter() - t < 0.2:
        sum(range(1000))
    after = wl.main_thread_sched()
    run_ms, wait_ms, switches = (b - a for a, b in zip(before[:3], after[:3]))
    assert run_ms > 100  # 0.2 s of work on this thread, most of it on a CPU
    assert wait_ms >= 0 and switches >= 0 and after[3] >= 0


def test_the_gc_timer_counts_collections_by_generation(wl):
    import gc

    with wl.GcTimer() as timer:
        gc.collect(0)
        gc.collect(2)
    assert timer.by_gen[0][0] >= 1 and timer.by_gen[2][0] >= 1
    assert timer.by_gen[2][1] > 0  # a full collection takes time
    assert timer not in gc.callbacks  # removed on exit


def test_the_table_sets_the_turns_thread_and_gc_beside_them(wl):
    dense = _rows([90.0, 72.0, 74.0, 73.0], [8.0] * 4, [0.0] * 4, 0)
    sparse = _rows([120.0, 107.0, 105.0, 108.0], [8.0] * 4, [0.0] * 4, 8)
    for rows, run, wait, gc_ms in ((dense, 60.0, 0.5, 1.0), (sparse, 95.0, 0.7, 2.0)):
        for r in rows[1:]:
            r["main_thread"] = [run, wait, 1, 3]
            r["gc"] = [[2, gc_ms / 2], [0, 0.0], [1, gc_ms / 2]]
    table = wl.table({"engines": {"dense": {"rows": dense}, "plan.yaml": {"rows": sparse}}})
    line = next(x for x in table.splitlines() if "follow:131072+8" in x)
    assert "main thread on CPU 60 / 95 ms, waiting 0.5 / 0.7 ms" in line, line
    assert "gc 1.0 / 2.0 ms" in line, line
    assert "first step()" not in line  # (no timelines)
    for rows, first_step in ((dense, [0.05, 0.06, 0.07]), (sparse, [0.10, 0.09, 0.11])):
        for r, back in zip(rows[2:], first_step):  # steady turns: added at 4 ms, first step() back `back` later
            r["timeline_s"] = [0.004, 0.004 + back, 0.2]
    table = wl.table({"engines": {"dense": {"rows": dense}, "plan.yaml": {"rows": sparse}}})
    line = next(x for x in table.splitlines() if "follow:131072+8" in x)
    assert "first step() back after 60 / 100 ms" in line, line


def test_equal_host_speeds_carry_no_warning(wl):
    dense = _rows([90.0, 72.0, 74.0, 73.0], [8.0, 8.0, 8.5, 8.2], [0.0] * 4, 0)
    sparse = _rows([90.0, 73.0, 74.0, 75.0], [8.0, 8.8, 8.4, 8.6], [0.0] * 4, 8)
    table = wl.table({"engines": {"dense": {"rows": dense}, "plan.yaml": {"rows": sparse}}})
    line = next(x for x in table.splitlines() if "follow:131072+8" in x)
    assert "host probe 8.2 / 8.6 ms" in line and "unequal" not in line, line
