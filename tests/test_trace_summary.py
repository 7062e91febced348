"""`benchmarks/trace_summary.py` reads a profiled turn's Chrome trace: the GPU's busy time as the union of its
events, its idle gaps, and the Python frames' inclusive times (a synthetic trace with known answers)."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import trace_summary  # noqa: E402


def _trace(tmp_path: Path) -> Path:
    events = [
        {"ph": "X", "cat": "kernel", "name": "a", "ts": 1000, "dur": 100},
        {"ph": "X", "cat": "gpu_memcpy", "name": "b", "ts": 1050, "dur": 100},  # overlaps a: busy 1000-1150
        {"ph": "X", "cat": "kernel", "name": "c", "ts": 1400, "dur": 50},  # a 250 us gap before it
        {"ph": "X", "cat": "gpu_memset", "name": "d", "ts": 1500, "dur": 10},  # 50 us: under the gap threshold
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5000},  # (host: not GPU time)
        {"ph": "X", "cat": "python_function", "name": "vllm_sparse/x.py(1): f", "ts": 0, "dur": 300},
        {"ph": "X", "cat": "python_function", "name": "vllm_sparse/x.py(1): f", "ts": 400, "dur": 200},
        {"ph": "X", "cat": "python_function", "name": "other.py(2): g", "ts": 0, "dur": 900},
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 2000},  # (not a complete event)
    ]
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    return path


def test_the_gpu_timeline_is_the_union_of_its_events_and_its_gaps_over_the_threshold(tmp_path):
    gpu = trace_summary.gpu_timeline(trace_summary.load_events(_trace(tmp_path)), gap_us=200)
    assert gpu["events"] == 4
    assert gpu["busy_ms"] == pytest.approx((150 + 50 + 10) / 1e3)
    assert gpu["span_ms"] == pytest.approx(510 / 1e3)
    assert gpu["gaps"] == [(pytest.approx(0.15), pytest.approx(0.25))]
    # The host's first event starts at 0, the GPU's at 1000; the host's last ends at 5000, the GPU's at 1510.
    assert gpu["lead_ms"] == pytest.approx(1.0)
    assert gpu["trail_ms"] == pytest.approx(3.49)


def test_python_frames_are_summed_by_name_for_the_needles_given(tmp_path):
    frames = trace_summary.python_frames(trace_summary.load_events(_trace(tmp_path)), ["vllm_sparse"])
    assert frames == [("vllm_sparse/x.py(1): f", 2, pytest.approx(0.5))]
    assert trace_summary.gpu_timeline([], 200)["events"] == 0
