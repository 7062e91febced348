"""benchmarks/e2e.py's profile tables: the serving path's Python frames by host time, where a GPU profile of a
host-bound sparse turn shows only `vllm::unified_attention_with_output`'s self CPU time for the whole forward."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from tests.benchmark_modules import load_benchmark
from vllm_sparse.backend.attend import column_lists

E2E = load_benchmark("e2e")
WL = load_benchmark("workload")


def _plugin_work(n: int) -> None:
    columns = torch.randint(0, 1000, (8, 64)).sort(-1).values
    for _ in range(n):
        column_lists(columns, 2)


def test_the_frames_table_takes_the_serving_paths_prefixes_only():
    """The plugin's, Triton's launch path, vLLM's attention layers and FlashAttention wrapper; not the rest."""
    from types import SimpleNamespace

    def frame(key, total):
        return SimpleNamespace(key=key, cpu_time_total=total, self_cpu_time_total=1.0, count=1)

    keys = ["triton/runtime/jit.py(1167): __call__",
            "vllm/vllm_flash_attn/flash_attn_interface.py(176): flash_attn_varlen_func",
            "vllm/model_executor/layers/attention/attention.py(488): forward",
            "vllm_sparse/backend/attend.py(77): attend",
            "vllm/v1/core/sched/scheduler.py(200): schedule", "torch/nn/modules/module.py(1782): _call_impl",
            "aten::mm"]
    text = E2E.python_frames_table([frame(k, 100.0 - i) for i, k in enumerate(keys)])
    listed = [line.split(None, 4)[4] for line in text.splitlines()[1:]]  # (4 numbers, then the frame)
    assert listed == keys[:4]


def test_the_plugins_python_frames_are_tabled_by_host_time(tmp_path):
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        _plugin_work(7)
    out = tmp_path / "profile.txt"
    E2E.write_profile(prof, str(out))
    text = out.read_text()
    section = text[text.index("the serving path's Python frames by host time"):]
    rows = [line for line in section.splitlines()[1:] if line.strip()]
    ours = [line for line in rows if "vllm_sparse/backend/attend.py" in line and "column_lists" in line]
    assert ours, section
    total_ms, self_ms, calls, per_call_us = ours[0].split()[:4]
    assert int(calls) == 7
    assert float(total_ms) >= float(self_ms) > 0
    assert abs(float(per_call_us) * 7 - float(total_ms) * 1e3) <= 6  # (total rounded to 10 us, a call to 0.1)
    # Only the serving path's frames: this test's own and the profiler's are left out.
    assert not any("test_profile_tables.py" in line or "torch/profiler" in line for line in rows), section
    totals = [float(line.split()[0]) for line in rows]
    assert totals == sorted(totals, reverse=True)


def test_a_profile_without_stacks_says_it_has_no_frames(tmp_path):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _plugin_work(2)
    out = tmp_path / "profile.txt"
    E2E.write_profile(prof, str(out))
    assert "none recorded (a profile without with_stack" in out.read_text()


def test_the_launch_count_takes_the_driver_entry_triton_launches_through(tmp_path, monkeypatch):
    """A profiled turn's kernel launches count the runtime's and the driver's entry points, Triton 3.6's
    `cuLaunchKernelEx` among them, and nothing else."""
    from types import SimpleNamespace

    def event(key, count):
        return SimpleNamespace(key=key, count=count, self_device_time_total=0, device_type=SimpleNamespace(name="CPU"))

    events = [event("cudaLaunchKernel", 2), event("cudaLaunchKernelExC", 3), event("cuLaunchKernel", 5),
              event("cuLaunchKernelEx", 7), event("aten::mm", 11), event("cudaMemcpyAsync", 13)]
    monkeypatch.setattr(E2E, "write_profile", lambda prof, out: (events, []))
    monkeypatch.setitem(__import__("sys").modules, "e2e", E2E)  # (workload.py imports it by its bare name)
    row = WL.profile_turn(_Engine(), [({"prompt_token_ids": [1]}, None)], str(tmp_path / "p.txt"))
    assert row["kernel_launches"] == 2 + 3 + 5 + 7


class _Engine:
    """An engine as `workload.drive` drives it: every request answered by one step that runs some plugin code."""

    def __init__(self):
        self.pending = []

    def add_request(self, request_id, prompt, params):
        self.pending.append(request_id)

    def has_unfinished_requests(self):
        return bool(self.pending)

    def step(self):
        from types import SimpleNamespace

        _plugin_work(3)
        done, self.pending = self.pending, []
        return [SimpleNamespace(request_id=r, finished=True, num_cached_tokens=0,
                                outputs=[SimpleNamespace(token_ids=[1])]) for r in done]


def test_a_profiled_class_gets_a_cprofile_turn_on_fresh_requests_beside_the_torch_profile(tmp_path, monkeypatch):
    rows, made = [], []
    monkeypatch.setattr(WL, "emit", rows.append)

    def make_requests():
        made.append(len(made))
        return [({"prompt_token_ids": [1, 2, 3]}, None)]

    spec = {"profile": "follow:8+4", "profile_out": str(tmp_path / "w.profile-plan.txt"), "pyprofile": True}
    WL.profiled(_Engine(), spec, make_requests)
    assert [r["class"] for r in rows] == ["profile", "pyprofile"] and made == [0, 1]
    assert rows[1]["of"] == "follow:8+4" and rows[1]["table"] == str(tmp_path / "w.profile-plan.cprofile.txt")
    text = (tmp_path / "w.profile-plan.cprofile.txt").read_text()
    assert "Ordered by: internal time" in text and "Ordered by: cumulative time" in text
    assert "vllm_sparse/backend/attend.py" in text and "column_lists" in text
    # The table and its classes skip both profile rows (they hold no requests to summarise).
    measured = {"class": "follow:8+4", "turn": 0, "wall_s": 0.01, "paths": {"sparse": 4, "dense": 0, "chunks": 1},
                "requests": [{"ttft_s": 0.01, "finish_s": 0.01, "tokens_out": 1, "cached_tokens": 8}]}
    assert list(WL.classes([measured, *rows])) == ["follow:8+4"]
    assert "follow:8+4" in WL.table({"engines": {"dense": {"rows": [measured, *rows]},
                                                 "plan.yaml": {"rows": [measured, *rows]}}})
    rows.clear()
    WL.profiled(_Engine(), {**spec, "pyprofile": False}, make_requests)
    assert [r["class"] for r in rows] == ["profile"]


def test_a_profiled_turn_can_keep_its_timeline(tmp_path):
    import gzip
    import json

    out = tmp_path / "w.profile-plan.txt"
    row = WL.profile_turn(_Engine(), [({"prompt_token_ids": [1]}, None)], str(out), trace=True)
    assert row["trace"] == str(tmp_path / "w.profile-plan.trace.json.gz")
    with gzip.open(row["trace"]) as f:
        events = json.load(f)["traceEvents"]
    assert any("column_lists" in e.get("name", "") for e in events)  # (Python frames: profiled with stacks)
    assert not (tmp_path / "w.profile-plan.trace.json").exists()  # (only the gzipped copy stays)
    assert "trace" not in WL.profile_turn(_Engine(), [({"prompt_token_ids": [1]}, None)], str(out))
