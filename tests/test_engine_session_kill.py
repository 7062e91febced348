"""The benchmarks' engines run in sessions of their own; `e2e.kill_session` ends one whole and returns only once
none of its processes runs (the next engine then finds the GPU memory free)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.benchmark_modules import load_benchmark

E2E = load_benchmark("e2e")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_session_returns_once_every_process_of_the_session_is_gone():
    # A leader that ignores SIGTERM and a grandchild of its own: both must be gone, not only signalled.
    proc = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 60 & sleep 60; wait"], start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not E2E._session_running(proc.pid):
        time.sleep(0.05)
    assert E2E._session_running(proc.pid)
    E2E.kill_session(proc.pid)
    assert not E2E._session_running(proc.pid)  # (the leader may stay a zombie until reaped: it holds no memory)
    assert proc.wait(timeout=10) == -9
    E2E.kill_session(proc.pid)  # an ended session: nothing to do, no error


def test_a_session_that_never_ran_is_not_running():
    assert not E2E._session_running(2**22 + 12345)


def test_workload_kills_a_silent_engine_at_its_deadline(tmp_path, monkeypatch):
    """The deadline comes from a timer: an engine that hangs without printing is killed on time too (it was
    checked only when a line came)."""
    workload = load_benchmark("workload")
    silent = tmp_path / "silent_engine.py"
    silent.write_text("import time\ntime.sleep(60)\n")
    monkeypatch.setattr(workload, "__file__", str(silent))  # (the worker process runs this module's file)
    t0 = time.monotonic()
    assert workload.run({"timeout": 1}, "silent", lambda row: None) == "killed after 1 s"
    assert time.monotonic() - t0 < 10
