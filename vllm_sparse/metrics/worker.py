"""The sparse path's counters in one worker process, with no host sync on the hot path.

Prefill token and chunk counts are host numbers the metadata builder has anyway. Kept density
is accumulated into a device histogram by the layers that run sparse; estimation time is a pair
of CUDA events per chunk-layer (perf_counter on CPU). A daemon thread reads all of it at most
once per `VLLM_SPARSE_METRICS_INTERVAL_S` (default 1 s): it waits on an event recorded after the
layers' work on its own stream, so the step that is running never waits for it. It writes one JSON
snapshot per worker into `VLLM_SPARSE_METRICS_DIR`, which `collector.py` serves.
"""

from __future__ import annotations

import atexit
import bisect
import json
import os
import threading
import time
import weakref

import torch

from vllm_sparse import envs
from vllm_sparse.metrics.density_kernel import record_density_kernel
from vllm_sparse.metrics.paths import DENSITY_BUCKETS, ESTIMATION_BUCKETS, LAYER_GROUP, metrics_dir

ENABLED = envs.flag("VLLM_SPARSE_METRICS")
INTERVAL_S = envs.positive_float("VLLM_SPARSE_METRICS_INTERVAL_S")
MAX_PENDING_TIMINGS = 4096  # event pairs waiting to be read; more are not timed (the thread is behind)


class WorkerMetrics:
    def __init__(self, device: torch.device, num_layers: int, rank: int):
        if device.type == "cuda" and device.index is None:  # the thread sets it as its current device
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.rank = device, rank
        self._num_layers = max(num_layers, 1)
        self._groups = -(-self._num_layers // LAYER_GROUP)
        self._bounds = torch.tensor(DENSITY_BUCKETS, dtype=torch.float32, device=device)
        nb = len(DENSITY_BUCKETS) + 1  # the last bin: above every bound (+Inf)
        # One flat accumulator: [groups * nb] bucket counts, then [groups] density sums.
        self._acc = torch.zeros(self._groups * nb + self._groups, dtype=torch.float64, device=device)
        self._nb = nb
        self._one = torch.ones(1, dtype=torch.float64, device=device)
        self._lock = threading.Lock()
        self.tokens = {"sparse": 0, "dense": 0}
        self.decode_tokens = {"sparse": 0, "dense": 0}
        self.chunks = 0
        self._est_counts = [0] * (len(ESTIMATION_BUCKETS) + 1)
        self._est_sum = 0.0
        self._pending: list = []  # (start, end) CUDA event pairs not read yet
        self._free: list = []
        self._step_counter_claimed = False
        self._dirty = False  # densities recorded since the last read: only then does the thread touch the GPU
        self._last_acc = [0.0] * self._acc.numel()
        self._written: dict | None = None
        self._cuda = device.type == "cuda"
        self.use_kernel = self._cuda  # record densities with one launch (tests set it on CPU, interpreted)
        if self._cuda:
            self._side = torch.cuda.Stream(device)
            self._main = None  # the stream the layers ran on, learnt at the first record
        self._path = os.path.join(metrics_dir(), f"worker-{os.getpid()}-{device.type}{device.index or 0}.json")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vllm-sparse-metrics", daemon=True)
        self._thread.start()
        # Ended before the interpreter tears CUDA down: a daemon thread left inside a CUDA call then can abort the
        # process on its way out.
        atexit.register(self.stop)

    def claim_step_counting(self, builder=None) -> bool:
        """True for the first metadata builder that asks: it alone counts each step's tokens. A builder that
        asks after the claimer is gone takes over (vLLM may build throw-away builders first, e.g. for a memory
        profile over a minimal cache)."""
        with self._lock:
            holder = self._step_counter_claimed
            if holder is False or (holder is not True and holder() is None):
                self._step_counter_claimed = weakref.ref(builder) if builder is not None else True
                return True
        return False

    # -- hot path (no host sync) ---------------------------------------------------------------
    def count_step(self, sparse_tokens: int, dense_tokens: int, chunks: int) -> None:
        """Prefill tokens of one step by path, and its sparse chunks (host numbers)."""
        with self._lock:
            self.tokens["sparse"] += sparse_tokens
            self.tokens["dense"] += dense_tokens
            self.chunks += chunks

    def count_decode(self, sparse_tokens: int, dense_tokens: int) -> None:
        """Decode tokens of one step by path (host numbers)."""
        with self._lock:
            self.decode_tokens["sparse"] += sparse_tokens
            self.decode_tokens["dense"] += dense_tokens

    def record_density(self, layer: int, kept, total: int) -> None:
        """One chunk-layer's share of causal KV pages read: `kept` pages (a host number, or device page counts
        of any shape, summed here) of `total` (a host number). On CUDA one launch (`density_kernel.py`)."""
        group = layer // LAYER_GROUP if layer >= 0 else 0
        if self.use_kernel and isinstance(kept, torch.Tensor):
            record_density_kernel(kept.contiguous().to(torch.int32), total, self._bounds, self._acc, group * self._nb,
                                  self._groups * self._nb + group)
            self._mark_dirty()
            return
        kept = torch.as_tensor(kept, device=self.device).sum().float()
        share = kept / torch.full_like(kept, float(total))  # a true division, as the kernel's (one ulp apart else)
        slot = torch.bucketize(share.reshape(1), self._bounds) + group * self._nb
        self._acc.index_put_((slot,), self._one, accumulate=True)
        self._acc.narrow(0, self._groups * self._nb + group, 1).add_(share.reshape(1))
        self._mark_dirty()

    def _mark_dirty(self) -> None:
        if self._cuda and self._main is None:
            self._main = torch.cuda.current_stream(self.device)
        self._dirty = True

    def start_timer(self):
        if not self._cuda:
            return time.perf_counter()
        if len(self._pending) >= MAX_PENDING_TIMINGS:
            return None
        with self._lock:
            pair = self._free.pop() if self._free else (torch.cuda.Event(enable_timing=True),
                                                        torch.cuda.Event(enable_timing=True))
        pair[0].record()
        return pair

    def stop_timer(self, token) -> None:
        if token is None:
            return
        if not self._cuda:
            self._observe_estimation(time.perf_counter() - token)
            return
        token[1].record()
        with self._lock:
            self._pending.append(token)

    # -- the reader thread -----------------------------------------------------------------------
    def _observe_estimation(self, seconds: float) -> None:
        with self._lock:
            self._est_counts[bisect.bisect_left(ESTIMATION_BUCKETS, seconds)] += 1  # first bound >= seconds
            self._est_sum += seconds

    def _drain_timings(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        keep = []
        for pair in pending:
            if pair[1].query():
                self._observe_estimation(pair[0].elapsed_time(pair[1]) / 1e3)
                with self._lock:
                    self._free.append(pair)
            else:
                keep.append(pair)
        with self._lock:
            self._pending = keep + self._pending

    def _read_device(self) -> list[float]:
        """The accumulators; on CUDA only after new records, so the thread makes no CUDA call while
        vLLM captures its graphs at start (no sparse step has run then)."""
        if not self._dirty:
            return self._last_acc
        self._dirty = False
        if not self._cuda:
            self._last_acc = self._acc.tolist()
            return self._last_acc
        done = torch.cuda.Event()
        done.record(self._main or torch.cuda.current_stream(self.device))
        copied = torch.cuda.Event(blocking=True)  # its wait sleeps: no core spun while the launch queue drains
        with torch.cuda.stream(self._side):
            self._side.wait_event(done)
            host = self._acc.to("cpu", non_blocking=True)
            copied.record(self._side)
        copied.synchronize()  # this thread waits; the layers' stream does not
        self._last_acc = host.tolist()
        return self._last_acc

    def snapshot(self) -> dict:
        if self._cuda and (self._pending or self._dirty):
            # The current device is per thread; set it only once a sparse step has run, so that no
            # CUDA call comes from this thread while vLLM captures its graphs at start.
            torch.cuda.set_device(self.device)
            self._drain_timings()
        acc = self._read_device()
        g, nb = self._groups, self._nb
        density = {}
        for k in range(g):
            counts = acc[k * nb:(k + 1) * nb]
            if any(counts):
                layers = f"{k * LAYER_GROUP}-{min((k + 1) * LAYER_GROUP, self._num_layers) - 1}"
                density[layers] = {"counts": counts, "sum": acc[g * nb + k]}
        with self._lock:
            return {"pid": os.getpid(), "rank": self.rank, "prefill_tokens": dict(self.tokens),
                    "decode_tokens": dict(self.decode_tokens),
                    "sparse_chunks": self.chunks, "kept_density": density,
                    "estimation_seconds": {"counts": list(self._est_counts), "sum": self._est_sum}}

    def publish(self) -> None:
        snap = self.snapshot()
        if snap == self._written:
            return
        tmp = self._path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(snap, f)
        os.replace(tmp, self._path)  # readers never see half a file
        self._written = snap

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the reader thread (at interpreter exit; idempotent): it finishes a snapshot it is writing."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            try:
                self.publish()
            except FileNotFoundError:  # the serving process removed the directory on exit: so do we
                return
            except Exception as e:  # metrics must never take a worker down
                from vllm_sparse.log import logger

                logger.warning("vllm-sparse: metrics snapshot failed: %s", e)


_METRICS: dict[torch.device, WorkerMetrics] = {}
_METRICS_LOCK = threading.Lock()


def worker_metrics(device: torch.device, num_layers: int) -> WorkerMetrics | None:
    """This process's counters for `device` (one per process and device), or None when disabled."""
    if not ENABLED:
        return None
    if device.type == "cuda" and device.index is None:  # one key per GPU: "cuda" is the current one
        device = torch.device("cuda", torch.cuda.current_device())
    with _METRICS_LOCK:
        if device not in _METRICS:
            from vllm_sparse import compat

            _METRICS[device] = WorkerMetrics(device, num_layers, compat.tensor_parallel_rank())
        return _METRICS[device]


def process_counts(worker=None) -> dict:
    """This process's token counters, summed over its devices: {"prefill": {"sparse", "dense"}, "decode":
    {"sparse", "dense"}, "chunks"} (host numbers; `worker` lets `collective_rpc` call it)."""
    out = {"prefill": {"sparse": 0, "dense": 0}, "decode": {"sparse": 0, "dense": 0}, "chunks": 0}
    with _METRICS_LOCK:
        metrics = list(_METRICS.values())
    for m in metrics:
        with m._lock:
            for path in ("sparse", "dense"):
                out["prefill"][path] += m.tokens[path]
                out["decode"][path] += m.decode_tokens[path]
            out["chunks"] += m.chunks
    return out
