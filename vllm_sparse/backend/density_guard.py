"""Layers whose chunks keep most of their blocks run dense: the plan's `dense_above` rule, on host data.

A sparse chunk-layer costs estimation and selection plus attention over the blocks it keeps. Near a density of
1 that is more than vLLM's dense attention: antidiagonal scoring at stride 8 costs roughly 7-13% of a 16K
chunk's dense attention at 128K (int8 / bf16 products: 3.75 / 7.13 ms on an H200 against ~54 ms of FA3), so a
layer that keeps more than ~83-89% of its causal blocks loses (FA3 over compacted tables costs 1.05-1.26x
dense per kept block at 10% kept, H100). Threshold plans (`top_p`) keep that much where attention is spread
out: the shipped Llama plan kept 90% on a dummy-weight model and took 6% longer than dense at 128K
(benchmarks/RESULTS.md, 2026-11-25).

How, without a host sync: each sparse layer adds the KV pages its chunks read to a device counter (one launch,
`kernels/page_count.py`; the causal pages are host numbers), counting only chunks with no rows below
`dense_below` (those attend densely by rule, whatever the layer selects). Once per step with sparse chunks,
the metadata builder queues a copy of the counters to pinned host memory and reads the copy it queued before,
once its event has completed: the density a step or two late. A layer that kept more than `dense_above` of its
causal pages runs vLLM's dense attention in the next PROBE_STEPS steps with sparse chunks, then sparse again
to measure anew (a new document may be sparser); a step whose every sparse layer runs dense is a dense step.
Dense is the plan's reference: a layer routed dense moves its output towards dense, and the same request's
output may then differ with the requests before it. Layers whose GQA groups span tensor-parallel ranks are not
guarded: their ranks select together, and they must take one path.
"""

from __future__ import annotations

import threading
import weakref

import torch

from vllm_sparse.config.plan import DENSE_ABOVE_PROBE_STEPS as PROBE_STEPS
from vllm_sparse.kernels.page_count import add_page_count
from vllm_sparse.log import logger


class DensityGuard:
    """One per process and device: every layer's kept and causal pages since the last copy, and which layers
    run dense now."""

    def __init__(self, device: torch.device, num_layers: int, dense_above: float):
        self.device, self.dense_above = device, dense_above
        self._cuda = device.type == "cuda"
        self.use_kernel = self._cuda  # count with one launch (tests set it on CPU, interpreted)
        self._kept = torch.zeros(num_layers, dtype=torch.int64, device=device)
        self._causal = [0] * num_layers  # host numbers, as the layers queued their counts
        self._host = torch.zeros(num_layers, dtype=torch.int64, pin_memory=self._cuda)
        self._in_flight: tuple | None = None  # (event or None, causal pages) of the copy not read yet
        self._recorded = False  # counts queued since the last copy
        self._step = 0
        self._dense_until = [0] * num_layers
        self.dense_layers: frozenset[int] = frozenset()
        self._owner = None  # the builder that steps the guard (a model with several KV cache groups has several)
        self._lock = threading.Lock()
        self._told = False

    # -- the layers' side (hot path: one launch, host integers) ---------------------------------------
    def record(self, layer: int, kept, causal: int) -> None:
        """One chunk-layer: `kept` KV pages read (a host number, or device counts of any shape, summed here) of
        `causal` (a host number)."""
        if self.use_kernel and isinstance(kept, torch.Tensor):
            add_page_count(kept, self._kept, layer)
        elif isinstance(kept, torch.Tensor):
            self._kept[layer] += kept.sum().to(torch.int64)
        else:
            self._kept[layer] += int(kept)
        self._causal[layer] += causal
        self._recorded = True

    # -- the builder's side (once per step with sparse chunks) ---------------------------------------
    def claim(self, builder) -> bool:
        """True for the builder that steps the guard (the first to ask, or the next once it is gone)."""
        with self._lock:
            if self._owner is None or self._owner() is None:
                self._owner = weakref.ref(builder)
            return self._owner() is builder

    def begin_step(self) -> frozenset[int]:
        """The layers that run dense in this step: reads the copy queued before (if its event has completed),
        queues a copy of the counts since, and moves the step on. No host sync."""
        self._step += 1
        if self._in_flight is not None:
            event, causal = self._in_flight
            if event is None or event.query():
                self._in_flight = None
                self._decide(self._host.tolist(), causal)
        if self._in_flight is None and self._recorded:
            self._host.copy_(self._kept, non_blocking=self._cuda)
            self._kept.zero_()  # (queued after the copy)
            event = None
            if self._cuda:
                event = torch.cuda.Event()
                event.record()
            self._in_flight = (event, self._causal)
            self._causal = [0] * len(self._causal)
            self._recorded = False
        dense = frozenset(i for i, until in enumerate(self._dense_until) if until > self._step)
        if dense != self.dense_layers:
            self.dense_layers = dense
        return self.dense_layers

    def _decide(self, kept: list[int], causal: list[int]) -> None:
        went_dense = []
        for layer, (k, c) in enumerate(zip(kept, causal)):
            if c <= 0:
                continue
            if k > self.dense_above * c:
                if self._dense_until[layer] <= self._step:
                    went_dense.append((layer, k / c))
                self._dense_until[layer] = self._step + PROBE_STEPS
            else:
                self._dense_until[layer] = 0
        if went_dense and not self._told:
            self._told = True
            logger.info("vllm-sparse: %d layer(s) kept more than dense_above=%.2f of their KV blocks (e.g. layer %d: "
                        "%.0f%%): they run dense for the next %d steps with sparse chunks, then measure again (this "
                        "note once per process)", len(went_dense), self.dense_above, went_dense[0][0],
                        100 * went_dense[0][1], PROBE_STEPS)


_GUARDS: dict[torch.device, DensityGuard] = {}
_GUARDS_LOCK = threading.Lock()


def density_guard(device: torch.device, num_layers: int, dense_above: float) -> DensityGuard | None:
    """This process's guard for `device` (None when the plan's `dense_above` is 1: never). A new engine in the
    same process with another plan or model replaces it."""
    if dense_above >= 1:
        return None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _GUARDS_LOCK:
        guard = _GUARDS.get(device)
        if guard is None or guard.dense_above != dense_above or len(guard._dense_until) != num_layers:
            guard = _GUARDS[device] = DensityGuard(device, num_layers, dense_above)
        return guard


def guard_of(device: torch.device) -> DensityGuard | None:
    """The layers' handle on the guard their builder made (None: no guard)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _GUARDS.get(device)
