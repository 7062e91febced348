"""The serving workload, dense vs SPARSE in one run: every class of turn a long-context server sees.

Each engine (dense, then each sparse plan) runs in its own process with vLLM's defaults for serving
(prefix caching on, chunked prefill), and gets the same traffic, driven through the engine's own
add_request/step loop so every request's time to first token (TTFT) is its own:

  first:N        a fresh N-token prompt (nothing cached), 1 token out; the first of  (--first)
                 each length reported apart, the rest are the class (--first-repeats)
  follow:D+n     n new tokens after a cached D-token document (a prefix-cache hit), (--docs x --follow)
                 1 token out: turn 1 is reported apart (`first_s`); the class's
                 median and p90 are over turns 2.. (steady state, --follow-repeats)
  chats+long:N   --chats short prompts (--chat-tokens, --chat-out tokens out) arriving with one fresh
                 N-token prompt: TTFT of the chats and of the long prompt, chat tokens/s
  concurrent:BxN B fresh N-token prompts at once, --concurrent-out tokens each: TTFT of each,
                 throughput (prompt + generated tokens / wall time); two rounds of fresh prompts, the
                 first (an engine's first steps that mix prefill and decode) reported apart

Every class also records the prefill tokens its engine sent down the sparse and the dense path (the
plugin's own counters), so a table row says which rule decided it. Results stream out as they are
measured (a line per measurement; the JSON is rewritten after each), so an engine killed by the
time limit keeps what it finished. The table, last, gives per class dense and sparse median and p90
TTFT and the ratio dense / sparse (above 1: sparse is faster).

    python benchmarks/workload.py --out $OUT/workload.json [--graphs] \
        [--config benchmarks/configs/llama-3-8b-antidiagonal-10.yaml] [--extra-config PLAN ...]

The model is the Llama-3.1-8B shape with dummy weights (`e2e.py`) unless --model names a directory.

Turns that are mostly host work (a few new tokens on a long cached document) follow the host's speed, and the
GPU machines' hosts run at two speeds (RESULTS.md, thirteenth session: two dense processes 0.74x apart). Each
turn's row carries a host probe timed just before it, the turn's thread's time on a CPU and waiting for one, the
other threads' CPU time and Python's collections; the table flags classes whose engines' probes differ, and
`host_matched.py` compares such turns across runs at equal probe times.

`--paired` runs only the follow-up classes, with the dense engine and the plan's alive in one process and each
turn run on both back to back (alternating which goes first): turns that are mostly host time (a few new
tokens on a long cached document) then compare the engines under the same host conditions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import build_model, kill_session  # noqa: E402  (the 8B-shaped dummy model and its tokenizer)

from vllm_sparse import envs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROW = "WORKLOAD_ROW "
DEFAULT_PLAN = REPO / "benchmarks/configs/llama-3-8b-antidiagonal-10.yaml"


def prompt(n: int, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"prompt_token_ids": torch.randint(3, 500, (n,), generator=g).tolist()}


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def drive(engine, requests: list[tuple[dict, object]], tag: str, timeline: list | None = None) -> list[dict]:
    """Add every (prompt, params) at once, step until all finish -> per request: TTFT and finish time
    from the moment they were added (s), tokens out, prompt tokens the prefix cache served. `timeline`, if
    given, gets when the requests were all added and when each of the first 24 steps returned (s): where
    a turn's time went, step by step."""
    sync()
    t0 = time.perf_counter()
    ids = []
    for i, (p, params) in enumerate(requests):
        ids.append(f"{tag}-{i}")
        engine.add_request(ids[-1], p, params)
    if timeline is not None:
        timeline.append(time.perf_counter() - t0)
    first: dict[str, float] = {}
    done: dict[str, dict] = {}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if timeline is not None and len(timeline) <= 24:
            timeline.append(time.perf_counter() - t0)
        for out in outputs:
            now = time.perf_counter() - t0
            if out.outputs and out.outputs[0].token_ids and out.request_id not in first:
                first[out.request_id] = now
            if out.finished:
                done[out.request_id] = {"ttft_s": first.get(out.request_id, now), "finish_s": now,
                                        "tokens_out": len(out.outputs[0].token_ids),
                                        "cached_tokens": getattr(out, "num_cached_tokens", None) or 0}
    return [done[i] for i in ids]


def path_counts(worker) -> dict:
    """The plugin's prefill-token counters in this process: {"sparse": n, "dense": n, "chunks": n}."""
    import torch

    from vllm_sparse.metrics.worker import process_counts

    counts = process_counts()
    # The caching allocator's growth and its out-of-memory retries (each frees every cached block and
    # synchronises): a turn slower than its class's others that shows them waited on the allocator.
    mem = torch.cuda.memory_stats() if torch.cuda.is_available() else {}
    alloc = {k: mem.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free")}
    return {**counts["prefill"], "chunks": counts["chunks"], **alloc}


def longest_prompt(first, docs, follow, beside, concurrent_len) -> int:
    return max([*first, *(d + max(follow or [0]) for d in docs), beside, concurrent_len, 1])


def summary(values: list[float]) -> dict:
    s = sorted(values)
    p90 = s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]
    return {"median": statistics.median(s), "p90": p90, "n": len(s)}


def worker(spec: dict) -> None:
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: its counters too
    from vllm import LLM, SamplingParams

    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    longest = longest_prompt(spec["first"], spec["docs"], spec["follow"], spec["beside"],
                             spec["concurrent_len"] if spec["concurrent"] else 0)
    kw = dict(model=spec["model"], dtype="bfloat16", seed=0, enforce_eager=spec["eager"],
              max_model_len=longest + 256, max_num_batched_tokens=spec["chunk"], enable_chunked_prefill=True,
              enable_prefix_caching=True, max_num_seqs=max(32, spec["chats"] + 1, spec["concurrent"]))
    if spec["dummy"]:
        kw["load_format"] = "dummy"
    kw.update(spec.get("engine", {}))
    if spec.get("paired"):
        return paired_worker(spec, kw, one, longest)
    if spec["config"]:
        kw.update(attention_backend="sparse", additional_config={"sparse": {"config": spec["config"]}})
    t0 = time.perf_counter()
    llm = LLM(**kw)
    emit({"class": "startup", "seconds": time.perf_counter() - t0, "host": process_host()})
    engine = llm.llm_engine
    seed = iter(range(1000, 10**6))  # every prompt its own ids: nothing is cached by accident
    drive(engine, [(prompt(min(4096, longest), next(seed)), one)], "warmup")

    def measure(cls: str, requests, **extra) -> list[dict]:
        return measure_turn(llm, cls, requests, **extra)

    for n in spec["first"]:
        if spec.get("profile") == f"first:{n}":  # the first prompt of this length, under the profiler, apart
            profiled(engine, spec, lambda n=n: [(prompt(n, next(seed)), one)])
        for turn in range(spec["first_repeats"]):
            measure(f"first:{n}", [(prompt(n, next(seed)), one)], turn=turn)
    for d in spec["docs"]:
        doc = prompt(d, next(seed))["prompt_token_ids"]
        measure(f"doc:{d}", [({"prompt_token_ids": doc}, one)])  # fills the prefix cache
        for n in spec["follow"]:
            for turn in range(1 + spec["follow_repeats"]):
                ids = doc + prompt(n, next(seed))["prompt_token_ids"]
                measure(f"follow:{d}+{n}", [({"prompt_token_ids": ids}, one)], turn=turn)
            if spec.get("profile") == f"follow:{d}+{n}":  # one more turn, under the profiler
                profiled(engine, spec, lambda doc=doc, n=n: [
                    ({"prompt_token_ids": doc + prompt(n, next(seed))["prompt_token_ids"]}, one)])
    if spec["beside"]:
        chat = SamplingParams(temperature=0.0, max_tokens=spec["chat_out"], ignore_eos=True, detokenize=False)
        for rep in range(2):  # the first pass warms the mixed step's shapes; both are reported
            reqs = [(prompt(spec["beside"], next(seed)), one)] + [
                (prompt(spec["chat_tokens"], next(seed)), chat) for _ in range(spec["chats"])]
            measure(f"chats+long:{spec['beside']}", reqs, turn=rep)
    if spec["concurrent"]:
        out = SamplingParams(temperature=0.0, max_tokens=spec["concurrent_out"], ignore_eos=True, detokenize=False)
        # Two rounds: the first holds an engine's first mixed prefill + decode steps. (The second request's extra
        # ~0.4 s at 12 x 32K recurs in both: chunk alignment, its last tokens share a step with the next prefill.)
        for rep in range(2):
            reqs = [(prompt(spec["concurrent_len"], next(seed)), out) for _ in range(spec["concurrent"])]
            measure(f"concurrent:{spec['concurrent']}x{spec['concurrent_len']}", reqs, turn=rep)
        if spec.get("profile") == f"concurrent:{spec['concurrent']}x{spec['concurrent_len']}":  # a third round
            profiled(engine, spec, lambda: [(prompt(spec["concurrent_len"], next(seed)), out)
                                            for _ in range(spec["concurrent"])])


_PROBE_TOKENS = list(range(3, 131075))
HOST_SPEED_APART = 1.2  # two engines' probe medians further apart than this ran on hosts of different speed


def host_probe() -> float:
    """This process's host speed now (ms): 131,072 tokens hashed in 16-token blocks as vLLM's prefix cache
    hashes a prompt (sha256 of each pickled (parent, tokens) pair). A dense-routed follow-up turn on a long cached
    prompt is mostly such host work (the GPU's share of 128K + 8 is ~9 of 65-110 ms), so two engines' turns
    compare only where their processes' probes agree."""
    t0, parent = time.perf_counter(), b""
    for i in range(0, len(_PROBE_TOKENS), 16):
        parent = hashlib.sha256(pickle.dumps((parent, tuple(_PROBE_TOKENS[i:i + 16]), None))).digest()
    return (time.perf_counter() - t0) * 1e3


def other_threads_cpu_ms() -> dict[int, tuple[str, float]] | None:
    """Name and CPU ms used so far of each of this process's threads other than the calling one, by thread id,
    from /proc (None off Linux): a thread that spins while a turn runs on the host takes CPU time from it."""
    import os
    import threading

    me, out = threading.get_native_id(), {}
    try:
        tids = os.listdir("/proc/self/task")
        if len(tids) < threading.active_count():  # (a sandbox's /proc that lists no threads but one)
            return None
        for tid in map(int, tids):
            if tid == me:
                continue
            name, fields = proc_stat(f"/proc/self/task/{tid}/stat")
            out[tid] = name, (int(fields[11]) + int(fields[12])) * 1e3 / os.sysconf("SC_CLK_TCK")  # utime + stime
    except FileNotFoundError:  # a thread ended while being read: read again
        return other_threads_cpu_ms()
    except (OSError, ValueError, IndexError):
        return None
    return out


def proc_stat(path: str) -> tuple[str, list[str]]:
    """A /proc .../stat file: the thread's name and the fields after it (field 3 on; a name may hold spaces)."""
    with open(path) as f:
        stat = f.read()
    return stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()


def threads_cpu_delta(before: dict, after: dict) -> list:
    """[threads alive after, CPU ms the other threads used between the two reads, the busiest one's name, its ms]
    (a thread started in between counts whole, one that ended does not)."""
    used = {tid: (name, ms - before.get(tid, (name, 0.0))[1]) for tid, (name, ms) in after.items()}
    busiest = max(used.values(), key=lambda x: x[1], default=("-", 0.0))
    name = busiest[0] if busiest[1] > 0 else "-"  # (none used a tick)
    return [len(after), round(sum(ms for _, ms in used.values()), 1), name, round(busiest[1], 1)]


def main_thread_sched() -> list[float] | None:
    """This thread's scheduler counters so far (Linux; None elsewhere): [ms on a CPU, ms runnable but waiting for
    one, involuntary context switches, the CPU it last ran on]. Over a host-bound turn, waiting time says another
    thread or process took its CPU; equal waits but more time on the CPU say the CPU ran this thread slower."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            run_ns, wait_ns, _ = f.read().split()
        with open("/proc/thread-self/status") as f:
            invol = next(int(line.split()[1]) for line in f if line.startswith("nonvoluntary_ctxt_switches"))
        cpu = int(proc_stat("/proc/thread-self/stat")[1][36])  # field 39, `processor`
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return [int(run_ns) / 1e6, int(wait_ns) / 1e6, invol, cpu]


class GcTimer:
    """Python's garbage collections while it is installed: [count, ms] per generation (gc.callbacks). A process
    holding more tracked objects pays more for each full collection."""

    def __init__(self):
        self.by_gen = [[0, 0.0] for _ in range(3)]
        self._t = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            g = self.by_gen[min(info.get("generation", 0), 2)]
            g[0] += 1
            g[1] = round(g[1] + (time.perf_counter() - self._t) * 1e3, 2)

    def __enter__(self):
        import gc

        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        import gc

        gc.callbacks.remove(self)


def process_host() -> dict:
    """Where this process runs on the host, at an engine's start: CPUs it may use, the machine's NUMA nodes, its
    resident memory and threads (Linux; {} elsewhere). Host-bound turns differ between processes (RESULTS.md,
    twelfth session): these say whether two engines' processes sat alike."""
    import glob
    import os

    out = {}
    try:
        out["cpus"] = len(os.sched_getaffinity(0))
        out["numa_nodes"] = len(glob.glob("/sys/devices/system/node/node[0-9]*"))
        with open("/proc/self/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        out["rss_mib"] = int(status["VmRSS"].split()[0]) // 1024
        out["threads"] = int(status["Threads"])
        import gc

        out["gc_tracked"] = len(gc.get_objects())  # what a full collection walks
        out["gc_frozen"] = gc.get_freeze_count()
    except (OSError, KeyError, ValueError, AttributeError):
        pass
    return out


def measure_turn(llm, cls: str, requests, engine: str | None = None, **extra) -> list[dict]:
    """One turn of `cls` through `llm`, emitted as a row: each request's times, the wall time, the prefill tokens
    by path (the plugin's counters) and the allocator's activity during it, the step timeline, the process's
    host speed just before it (`host_probe`) and its other threads' CPU time during it. `engine`: which of the
    paired engines ran it (a row's first field)."""
    probe = host_probe()
    before = llm.collective_rpc(path_counts)[0]
    threads0, sched0 = other_threads_cpu_ms(), main_thread_sched()
    t, steps = time.perf_counter(), []
    with GcTimer() as gc_timer:
        rows = drive(llm.llm_engine, requests, cls, steps)
    wall = time.perf_counter() - t
    threads1, sched1 = other_threads_cpu_ms(), main_thread_sched()
    if sched0 is not None and sched1 is not None:  # [run ms, wait ms, involuntary switches] in the turn, CPU at end
        extra["main_thread"] = [round(b - a, 2) for a, b in zip(sched0[:3], sched1[:3])] + [sched1[3]]
    extra["gc"] = gc_timer.by_gen
    if threads0 is not None and threads1 is not None:
        extra["other_threads"] = threads_cpu_delta(threads0, threads1)
    after = llm.collective_rpc(path_counts)[0]
    delta = {k: after[k] - before[k] for k in after}
    paths = {k: delta.pop(k) for k in ("sparse", "dense", "chunks")}
    emit({**({"engine": engine} if engine else {}), "class": cls, "requests": rows,
          "wall_s": wall, "paths": paths, "allocator": delta, "timeline_s": [round(x, 4) for x in steps],
          "host_probe_ms": round(probe, 2), **extra})
    return rows


def paired_worker(spec: dict, kw: dict, one, longest: int) -> None:
    """`--paired`: the dense engine and the plan's in this one process, both alive, and each follow-up turn run
    on both back to back, in alternating order (dense first on even turns): the two engines' turns then share
    the process's host speed and its drift, which separate processes do not (host-bound turns read it)."""
    from vllm import LLM

    llms = {}
    for name in ("dense", "sparse"):
        extra = {"attention_backend": "sparse", "additional_config": {"sparse": {"config": spec["config"]}}} \
            if name == "sparse" else {}
        t0 = time.perf_counter()
        llms[name] = LLM(**kw, **extra)
        emit({"engine": name, "class": "startup", "seconds": time.perf_counter() - t0, "host": process_host()})
    seed = iter(range(1000, 10**6))
    for llm in llms.values():
        drive(llm.llm_engine, [(prompt(min(4096, longest), next(seed)), one)], "warmup")

    def measure(name: str, cls: str, requests, **extra) -> None:
        # (the plugin's counters are the process's; only the SPARSE engine's steps move them)
        measure_turn(llms[name], cls, requests, engine=name, **extra)

    for d in spec["docs"]:
        doc = prompt(d, next(seed))["prompt_token_ids"]
        for name in llms:
            measure(name, f"doc:{d}", [({"prompt_token_ids": doc}, one)])  # fills each engine's prefix cache
        for n in spec["follow"]:
            for turn in range(1 + spec["follow_repeats"]):
                ids = doc + prompt(n, next(seed))["prompt_token_ids"]  # the same new tokens to both engines
                for name in (("dense", "sparse") if turn % 2 == 0 else ("sparse", "dense")):
                    measure(name, f"follow:{d}+{n}", [({"prompt_token_ids": ids}, one)], turn=turn)


LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")  # runtime, driver


def profiled(engine, spec: dict, make_requests) -> None:
    """The profiled class's extra turn under the torch profiler (`profile_turn`), and with `pyprofile` one more under
    cProfile (`pyprofile_turn`), each turn on fresh requests from `make_requests()`; a row for each."""
    emit({"class": "profile", "of": spec["profile"], **profile_turn(engine, make_requests(), spec["profile_out"],
                                                                     spec.get("trace", False))})
    if spec.get("pyprofile"):
        out = spec["profile_out"].removesuffix(".txt") + ".cprofile.txt"
        emit({"class": "pyprofile", "of": spec["profile"], **pyprofile_turn(engine, make_requests(), out)})


def pyprofile_turn(engine, requests, out: str, top: int = 45) -> dict:
    """One turn under cProfile: every Python function the engine's thread ran (the scheduler, the model runner, the
    attention backend, Triton's launch path), by own time and by total time, to `out` -> wall, the profile's total.
    cProfile slows each Python call about alike, where the torch profiler's stacks weigh on the ops it records: the
    two tables apportion a host-bound turn's host time from two sides."""
    import cProfile
    import io
    import pstats

    sync()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    try:
        drive(engine, requests, "pyprofile")
        sync()
    finally:
        prof.disable()
    wall = time.perf_counter() - t0
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    Path(out).write_text(text.getvalue())
    return {"wall_ms": wall * 1e3, "profiled_s": stats.total_tt, "table": out}


def profile_turn(engine, requests, out: str, trace: bool = False) -> dict:
    """One turn under the torch profiler (host and GPU), its tables to `out` (`e2e.write_profile`) ->
    wall, GPU kernel time, kernel launches, where the host waited for the GPU. `trace`: its timeline too, gzipped
    Chrome trace JSON beside the tables (when the GPU ran and what the host did meanwhile: a short turn's; a long one's
    runs to hundreds of MB)."""
    import torch
    from e2e import write_profile
    from torch.profiler import ProfilerActivity, profile

    sync()
    t0 = time.perf_counter()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, with_stack=True) as prof:  # (CPU alone: the CPU engine's, e.g. a test's)
        drive(engine, requests, "profile")
        sync()
    wall = time.perf_counter() - t0
    events, waits = write_profile(prof, out)
    extra = {}
    if trace:
        import gzip
        import shutil

        raw = out.removesuffix(".txt") + ".trace.json"
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as src, gzip.open(raw + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw)
        extra["trace"] = raw + ".gz"
    # (cuLaunchKernelEx: Triton 3.6's launches, left out of this count before 2026-12-07)
    launches = sum(e.count for e in events if e.key in LAUNCH_CALLS)
    return {"wall_ms": wall * 1e3, "kernel_launches": launches, "table": out,
            "gpu_ms": sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3,
            "host_waits": [{k: w[k] for k in ("name", "calls", "ms")} | {"where": w["stack"][:3]} for w in waits[:4]],
            **extra}


def emit(row: dict) -> None:
    print(ROW + json.dumps(row), flush=True)


def run(spec: dict, label: str, on_row, env: dict[str, str] | None = None) -> str | None:
    """One engine in its own process (`env`: variables set for it alone); each measurement goes to on_row as it
    comes. -> error or None."""
    # A session of its own, killed whole at the end (`e2e.kill_session`).
    proc = subprocess.Popen([sys.executable, "-u", __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True,
                            env={**os.environ, **(env or {})})
    tail: list[str] = []
    # The deadline from a timer, not between lines: an engine that hangs without printing is killed on time too.
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        kill_session(proc.pid)

    timer = threading.Timer(spec["timeout"], expire)
    timer.start()
    try:
        for line in proc.stdout:
            if line.startswith(ROW):
                on_row(json.loads(line[len(ROW):]))
            else:
                tail = (tail + [line])[-40:]
                if not line.startswith(("INFO", "DEBUG", "(EngineCore")) or "Error" in line:
                    print(f"[{label}] {line}", end="", flush=True)
        proc.wait()
    finally:
        timer.cancel()
        kill_session(proc.pid)
    if expired.is_set():
        return f"killed after {spec['timeout']} s"
    if proc.returncode:
        sys.stderr.write("".join(tail[-20:]))
        return f"exit {proc.returncode}"
    return None


def classes(rows: list[dict]) -> dict[str, dict]:
    """Measurement rows -> per class: TTFT summary, throughput, prefill tokens by path. Where a class
    ran more than one turn, turn 0 (one-time costs: a new shape's first run) is reported apart as
    `first_s` and the summary is over the later turns (steady state)."""
    out: dict[str, dict] = {}
    steady = {r["class"] for r in rows if r.get("turn", 0) > 0}
    for r in rows:
        cls = r.get("class")
        if cls in (None, "startup", "profile", "pyprofile") or cls.startswith("doc:"):
            continue
        c = out.setdefault(cls, {"ttft": [], "wall_s": 0.0, "tokens": 0, "paths": {"sparse": 0, "dense": 0}})
        reqs = r["requests"]
        for k, v in r.get("allocator", {}).items():  # every turn's, the first too
            c.setdefault("allocator", {}).setdefault(k, 0)
            c["allocator"][k] += v
        if cls in steady and r.get("turn", 0) == 0:
            c["first_s"] = reqs[0]["ttft_s"]
            continue
        if cls.startswith("chats+long:"):
            c["long_ttft_s"] = reqs[0]["ttft_s"]
            chats = reqs[1:]
            c["ttft"] += [q["ttft_s"] for q in chats]
            c["chat_tok_s"] = sum(q["tokens_out"] for q in chats) / max(q["finish_s"] for q in chats)
        else:
            c["ttft"] += [q["ttft_s"] for q in reqs]
        c["wall_s"] += r["wall_s"]
        if "host_probe_ms" in r:
            c.setdefault("host_probe_ms", []).append(r["host_probe_ms"])
        if "other_threads" in r:
            c.setdefault("other_threads_ms", []).append(r["other_threads"][1])
            c.setdefault("busiest_thread", []).append(tuple(r["other_threads"][2:4]))  # (name, ms)
        if "main_thread" in r:  # (see main_thread_sched)
            c.setdefault("main_run_ms", []).append(r["main_thread"][0])
            c.setdefault("main_wait_ms", []).append(r["main_thread"][1])
        if "gc" in r:
            c.setdefault("gc_ms", []).append(sum(ms for _, ms in r["gc"]))
        if len(r.get("timeline_s", [])) > 1:  # the first step() back: scheduling and every launch of it, on the host
            c.setdefault("first_step_ms", []).append((r["timeline_s"][1] - r["timeline_s"][0]) * 1e3)
        c["tokens"] += sum(q["tokens_out"] for q in reqs)
        c["cached_tokens"] = max(c.get("cached_tokens", 0), max(q["cached_tokens"] for q in reqs))
        for k in ("sparse", "dense"):
            c["paths"][k] += r["paths"][k]
    for c in out.values():
        c["ttft_summary"] = summary(c["ttft"]) if c["ttft"] else None
    return out


def median_gap(ttfts: list[float]) -> float | None:
    """The median time between consecutive first tokens of one batch (None for fewer than 3)."""
    t = sorted(ttfts)
    return statistics.median(b - a for a, b in zip(t, t[1:])) if len(t) > 2 else None


def table(results: dict) -> str:
    dense = classes(results["engines"].get("dense", {}).get("rows", []))
    lines = []
    for plan, eng in results["engines"].items():
        if plan == "dense":
            continue
        sparse = classes(eng.get("rows", []))
        lines.append(f"\n{plan}" + (f"  ({eng['error']})" if eng.get("error") else ""))
        lines.append(f"  {'class':<26} {'dense med':>9} {'p90':>7} {'sparse med':>10} {'p90':>7} {'ratio':>6}"
                     f" {'sparse path':>11}  note")
        for cls, s in sparse.items():
            d = dense.get(cls)
            if not d or not d["ttft_summary"] or not s["ttft_summary"]:
                continue
            dm, sm = d["ttft_summary"]["median"], s["ttft_summary"]["median"]
            share = s["paths"]["sparse"] / max(1, s["paths"]["sparse"] + s["paths"]["dense"])
            note = ""
            if "first_s" in s and "first_s" in d:
                note = f"turn 1: {d['first_s'] * 1e3:.0f} / {s['first_s'] * 1e3:.0f} ms"
            if cls.startswith("follow:"):
                note += f"; cached {s.get('cached_tokens', 0)}"
            if "long_ttft_s" in s:
                note = (f"long TTFT {d['long_ttft_s']:.2f} / {s['long_ttft_s']:.2f} s; chat tok/s "
                        f"{d['chat_tok_s']:.0f} / {s['chat_tok_s']:.0f}")
            if cls.startswith("concurrent:"):
                note = f"wall {d['wall_s']:.2f} / {s['wall_s']:.2f} s ({d['wall_s'] / s['wall_s']:.2f}x)"
                gd, gs = median_gap(d["ttft"]), median_gap(s["ttft"])
                if gd and gs:  # prompts one after another: the steady rate, apart from the batch's start
                    note += f"; first tokens {gd * 1e3:.0f} / {gs * 1e3:.0f} ms apart ({gd / gs:.2f}x)"
            if d.get("host_probe_ms") and s.get("host_probe_ms"):  # (see host_probe)
                pd, ps = statistics.median(d["host_probe_ms"]), statistics.median(s["host_probe_ms"])
                note += f"; host probe {pd:.1f} / {ps:.1f} ms"
                if max(pd, ps) > HOST_SPEED_APART * min(pd, ps):  # the GPU machines' hosts run at two speeds
                    note += " (unequal host speeds: compare at equal probes, host_matched.py)"
            if d.get("other_threads_ms") and s.get("other_threads_ms"):  # CPU the other threads used in a turn
                busiest = [max(x["busiest_thread"], key=lambda b: b[1])[0] for x in (d, s)]
                note += (f"; other threads {statistics.median(d['other_threads_ms']):.0f} / "
                         f"{statistics.median(s['other_threads_ms']):.0f} ms (busiest {busiest[0]} / {busiest[1]})")
            if d.get("main_run_ms") and s.get("main_run_ms"):  # the turn's thread: on a CPU / waiting for one
                med = {k: [statistics.median(x[k]) for x in (d, s)] for k in ("main_run_ms", "main_wait_ms")}
                note += (f"; main thread on CPU {med['main_run_ms'][0]:.0f} / {med['main_run_ms'][1]:.0f} ms, "
                         f"waiting {med['main_wait_ms'][0]:.1f} / {med['main_wait_ms'][1]:.1f} ms")
            if cls.startswith("follow:") and d.get("first_step_ms") and s.get("first_step_ms"):
                # a one-step turn whose first step() comes back near its token was host-bound (2026-12-05)
                note += (f"; first step() back after {statistics.median(d['first_step_ms']):.0f} / "
                         f"{statistics.median(s['first_step_ms']):.0f} ms")
            if d.get("gc_ms") and s.get("gc_ms"):
                note += f"; gc {statistics.median(d['gc_ms']):.1f} / {statistics.median(s['gc_ms']):.1f} ms"
            retries = [x.get("allocator", {}).get("num_alloc_retries", 0) for x in (d, s)]
            if any(retries):  # the caching allocator freed its cache and retried: a slow, synchronising step
                note += f"; allocator retries {retries[0]} / {retries[1]}"
            lines.append(f"  {cls:<26} {dm * 1e3:>8.1f}ms {d['ttft_summary']['p90'] * 1e3:>6.0f} {sm * 1e3:>9.1f}ms "
                         f"{s['ttft_summary']['p90'] * 1e3:>6.0f} {dm / sm:>5.2f}x {share:>10.0%}  {note}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--config", default=str(DEFAULT_PLAN), help="the sparse plan")
    ap.add_argument("--extra-config", action="append", default=[], help="more sparse plans in the same run")
    ap.add_argument("--model", help="a model directory (default: the Llama-3.1-8B shape, dummy weights)")
    ap.add_argument("--first", type=ints, default=ints("32768,65536,131072"))
    ap.add_argument("--first-repeats", type=int, default=2, help="fresh prompts per length (turn 1 reported apart)")
    ap.add_argument("--docs", type=ints, default=ints("32768,131072"), help="cached document lengths")
    ap.add_argument("--follow", type=ints, default=ints("8,256,2048,8192"), help="new tokens per follow-up turn")
    ap.add_argument("--follow-repeats", type=int, default=3, help="steady-state turns after the first, per size")
    ap.add_argument("--beside", type=int, default=131072, help="the long prompt the chats arrive with (0: none)")
    ap.add_argument("--chats", type=int, default=16)
    ap.add_argument("--chat-tokens", type=int, default=512)
    ap.add_argument("--chat-out", type=int, default=64)
    ap.add_argument("--concurrent", type=int, default=12, help="long prompts at once (0: none)")
    ap.add_argument("--concurrent-len", type=int, default=32768)
    ap.add_argument("--concurrent-out", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=16384, help="max_num_batched_tokens")
    ap.add_argument("--graphs", action="store_true", help="CUDA graphs on (default: enforce_eager)")
    ap.add_argument("--engine", default="{}", help="JSON of more LLM(...) arguments")
    ap.add_argument("--timeout", type=int, default=1800,
                    help="seconds for the whole run: an engine may use what is left less --reserve per engine after it")
    ap.add_argument("--dense-again", action="store_true",
                    help="a second dense engine last: its ratio to the first is the engine-to-engine spread")
    ap.add_argument("--sparse-first", action="store_true",
                    help="the plans' engines before the dense one (an engine started second may run its host work "
                    "slower: host-bound turns read the order)")
    ap.add_argument("--paired", action="store_true",
                    help="the follow-up classes only, dense and the plan's engine alive in one process, each turn run "
                    "on both back to back in alternating order (host-bound turns then share the host's drift); "
                    "give --first= --beside 0 --concurrent 0 and, on a GPU, each engine's kv_cache_memory_bytes in "
                    "--engine")
    ap.add_argument("--env-twin", metavar="NAME=VALUE",
                    help="the first plan once more, its engine's process with this vllm-sparse variable set "
                         "(label PLAN+NAME=VALUE): a runtime switch beside the same plan without it, in one run")
    ap.add_argument("--reserve", type=int, default=150, help="seconds kept for each engine still to run")
    ap.add_argument("--only", choices=["dense", "sparse"], help="run one side")
    ap.add_argument("--profile", help="follow:D+n: one more turn of that class under the profiler, every engine; "
                    "first:N: the first N-token prompt under the profiler, before that class's measured turns; "
                    "concurrent:BxN: a third round of that class under the profiler, after the measured two")
    ap.add_argument("--pyprofile", action="store_true",
                    help="with --profile: one more turn of that class under cProfile (every Python function of the "
                         "engine's thread, by own and total time), its table beside the torch profiler's")
    ap.add_argument("--trace", action="store_true",
                    help="with --profile: the profiled turn's timeline as gzipped Chrome trace JSON beside its tables "
                         "(for a short turn: a long one's runs to hundreds of MB)")
    ap.add_argument("--out", default="workload.json")
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    model = args.model
    if model is None:  # the 8B shape, its positions long enough for the longest document plus a follow-up
        model = build_model(Path(tempfile.mkdtemp(prefix="workload-")))
        cfg = json.loads((model / "config.json").read_text())
        longest = longest_prompt(args.first, args.docs, args.follow, args.beside,
                                 args.concurrent_len if args.concurrent else 0)
        cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], longest + 512)
        (model / "config.json").write_text(json.dumps(cfg, indent=1))
        model = str(model)
    base = {"model": model, "dummy": args.model is None, "first": args.first, "first_repeats": args.first_repeats,
            "docs": args.docs, "follow": args.follow, "follow_repeats": args.follow_repeats, "beside": args.beside,
            "chats": args.chats, "chat_tokens": args.chat_tokens, "chat_out": args.chat_out,
            "concurrent": args.concurrent, "concurrent_len": args.concurrent_len,
            "concurrent_out": args.concurrent_out, "chunk": args.chunk, "eager": not args.graphs,
            "engine": json.loads(args.engine), "timeout": args.timeout, "profile": args.profile,
            "pyprofile": args.pyprofile, "trace": args.trace}
    import torch
    import vllm

    results = {"meta": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                        "vllm": vllm.__version__, "torch": torch.__version__, "argv": sys.argv,
                        "graphs": args.graphs, "spec": base},
               "engines": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.paired and (args.first or args.beside or args.concurrent or args.extra_config or args.only
                        or args.dense_again or args.sparse_first or args.profile):
        ap.error("--paired runs the follow-up classes of one plan: give --first= --beside 0 --concurrent 0, and "
                 "none of --extra-config, --only, --dense-again, --sparse-first, --profile")
    engines = [("dense", None)] + [(p, p) for p in [args.config, *args.extra_config]]
    twin_label, twin_env = None, None
    if args.env_twin:
        name, _, value = args.env_twin.partition("=")
        envs.get(name)  # (a name vllm-sparse does not read is refused here, not ignored in the engine)
        twin_label, twin_env = f"{args.config}+{args.env_twin}", {name: value}
        engines.append((twin_label, args.config))
    if args.paired:  # one process runs both: its rows say which engine they are from
        engines = [("paired", args.config)]
        results["engines"] = {"dense": {"rows": []}, args.config: {"rows": []}}
    if args.only:
        engines = engines[:1] if args.only == "dense" else engines[1:]
    if args.sparse_first:
        engines = engines[1:] + engines[:1]
    if args.dense_again:
        engines.append(("dense-again", None))
    deadline = time.monotonic() + args.timeout
    for i, (label, cfg) in enumerate(engines):
        eng = results["engines"].setdefault(label, {"rows": []}) if not args.paired else None
        base["timeout"] = max(30, int(deadline - time.monotonic()) - args.reserve * (len(engines) - 1 - i))

        def on_row(row, eng=eng, label=label):
            if args.paired:
                label = "dense" if row.pop("engine") == "dense" else args.config
                eng = results["engines"][label]
            eng["rows"].append(row)
            brief = {k: v for k, v in row.items() if k != "requests"}
            if "requests" in row:
                brief["ttft_ms"] = [round(q["ttft_s"] * 1e3, 1) for q in row["requests"]][:4]
            print(f"[{label}] {json.dumps(brief)}", flush=True)
            out.write_text(json.dumps(results, indent=1))

        profile_out = str(out.with_suffix("")) + f".profile-{Path(cfg).stem if cfg else label}.txt"
        err = run({**base, "config": cfg, "profile_out": profile_out, "paired": args.paired}, label, on_row,
                  env=twin_env if label == twin_label else None)
        if err:
            for e in ([eng] if eng is not None else results["engines"].values()):
                e["error"] = err
        out.write_text(json.dumps(results, indent=1))
    m = results["meta"]
    print(f"\n{m['device']}  vLLM {m['vllm']}  torch {m['torch']}  "
          f"{'CUDA graphs' if args.graphs else 'enforce_eager'}, chunk {args.chunk}; ratio = dense / sparse TTFT"
          + ("; dense-again: a second dense engine, the spread between engines" if args.dense_again else ""))
    print(table(results))


if __name__ == "__main__":
    main()
