"""benchmarks/host_matched.py: host-bound turns of separate processes compared at equal host speed, and
benchmarks/host_speed.py's summary of the host's speed over time."""

import pytest

from tests.benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def hm():
    return load_benchmark("host_matched")


def _run(engines: dict[str, list[tuple[float, float]]], cls="follow:131072+8") -> dict:
    """A workload.py result: per engine, steady turns of (probe ms, TTFT ms) after one turn-0 outlier."""
    out = {}
    for label, pts in engines.items():
        rows = [{"class": "startup", "seconds": 1.0},
                {"class": cls, "turn": 0, "host_probe_ms": 5.0, "requests": [{"ttft_s": 9.0}]}]
        rows += [{"class": cls, "turn": i + 1, "host_probe_ms": p, "requests": [{"ttft_s": t / 1e3}]}
                 for i, (p, t) in enumerate(pts)]
        out[label] = {"rows": rows}
    return {"engines": out}


def test_a_fast_and_a_slow_process_compare_equal_at_equal_probe_times(hm):
    # Both backends cost 40 ms + 2.5 ms per probe-ms; the dense process ran on a fast host, the SPARSE one on a
    # slow one, a second dense one on a slow one: the medians of the processes differ, the bins do not.
    line = lambda ps: [(p, 40 + 2.5 * p) for p in ps]  # noqa: E731
    runs = [_run({"dense": line([11, 11.5, 12]), "plan.yaml": line([19, 19.5, 20]),
                  "dense-again": line([19, 20, 20.5])}),
            _run({"plan.yaml": line([10.5, 11, 12.5])})]
    points = hm.steady_points(runs)
    assert len(points["follow:131072+8"]["dense"]) == 6 and len(points["follow:131072+8"]["sparse"]) == 6
    c = hm.compare(points["follow:131072+8"], [13, 16])
    fast, mid, slow = c["bins"]
    assert fast["ratio"] == pytest.approx((40 + 2.5 * 11.5) / (40 + 2.5 * 11))  # medians of each side's fast turns
    assert mid["dense_n"] == mid["sparse_n"] == 0 and mid["ratio"] is None
    assert slow["dense_n"] == 3 and slow["sparse_n"] == 3
    assert c["fit_ratio"] == pytest.approx(1.0)
    (da, db), (sa, sb) = c["fits"]["dense"], c["fits"]["sparse"]
    assert (da, db) == pytest.approx((40, 2.5)) and (sa, sb) == pytest.approx((40, 2.5))
    table = hm.table({"follow:131072+8": c})
    assert "1.00x at the median probe" in table and ">=16" in table


def test_a_slower_backend_shows_at_equal_probe_times(hm):
    runs = [_run({"dense": [(p, 40 + 2.5 * p) for p in (11, 12, 19, 20)],
                  "plan.yaml": [(p, 1.1 * (40 + 2.5 * p)) for p in (11, 12, 19, 20)]})]
    c = hm.compare(hm.steady_points(runs)["follow:131072+8"], [13, 16])
    assert c["bins"][0]["ratio"] == pytest.approx(1 / 1.1)
    assert c["fit_ratio"] == pytest.approx(1 / 1.1)


def test_turn_zero_and_other_classes_are_left_out(hm):
    run = _run({"dense": [(11, 60), (12, 62), (13, 64)], "p.yaml": [(11, 61), (12, 63), (13, 65)]})
    run["engines"]["dense"]["rows"].append({"class": "first:65536", "turn": 1, "host_probe_ms": 11,
                                            "requests": [{"ttft_s": 3.3}]})
    points = hm.steady_points([run], {"follow:131072+8"})
    assert set(points) == {"follow:131072+8"}
    assert 5.0 not in [p for p, _ in points["follow:131072+8"]["dense"]]  # turn 0's probe


def test_host_speed_summary_counts_slow_probes():
    hs = load_benchmark("host_speed")
    rows = [{"probe_ms": m, "cpu": 3, "ticks": dict.fromkeys(hs.KINDS, 1)} for m in (10, 10.5, 11, 20, 21)]
    s = hs.summary(rows, slow_ms=14)
    assert s["min"] == 10 and s["max"] == 21 and s["median"] == 11
    assert s["slow_share"] == pytest.approx(0.4) and s["cpus"] == [3] and s["ticks"]["steal"] == 5
    real = hs.sample(2, 0.0)  # the real probe runs and reads this machine's counters where it has them
    assert len(real) == 2 and all(r["probe_ms"] > 0 for r in real)
