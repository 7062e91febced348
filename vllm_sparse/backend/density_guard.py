"""Layers whose chunks keep most of their blocks run dense: the plan's `dense_above` rule, on host data.

A sparse chunk-layer costs estimation and selection plus attention over the blocks it keeps. Near a density of
1 that is more than vLLM's dense attention: antidiagonal scoring at stride 8 costs roughly 7-13% of a 16K
chunk's dense attention at 128K (int8 / bf16 products: 3.75 / 7.13 ms on an H200 against ~54 ms of FA3), so a
layer that keeps more than ~83-89% of its causal blocks loses (FA3 over compacted tables costs 1.05-1.26x
dense per kept block at 10% kept, H100). Threshold plans (`top_p`) keep that much where attention is spread
out: the shipped Llama plan kept 90% on a dummy-weight model and took 6% longer than dense at 128K
(benchmarks/RESULTS.md, 2026-11-25).

How, without a host sync: each sparse layer adds the KV pages its chunks read to a device counter per context
bucket (one launch, `kernels/page_count.py`; the causal pages are host numbers). Every sparse chunk counts, its
rows below `dense_below` (which read every block by rule) included: the rule weighs what the sparse path reads
against what dense attention would read, and a prompt's first chunk pays estimation for its later rows as any
chunk does (2026-12-05, H100: with first chunks left out, the shipped Llama plan's 32K prompts stayed 3% slower
than dense, their first chunk sparse at ~90% kept; benchmarks/RESULTS.md). A layer keeps less of a
longer context, so densities are kept apart by the chunk's length (powers of two from 16K): what the first
chunks of a prompt keep does not decide for its last ones. Once per step with sparse chunks the metadata
builder queues a copy of the counters to pinned host memory and reads the copy it queued before, once its
event has completed: the density a step or two late. A (layer, bucket) that kept more than `dense_above` of its
causal pages runs vLLM's dense attention in the next PROBE_STEPS steps with sparse chunks, then sparse again to
measure anew (a new document may be sparser). A layer runs dense in a step when every sparse chunk of the step
is in a bucket where it does; a step whose every sparse layer runs dense is a dense step. Dense is the plan's
reference: a layer routed dense moves its output towards dense, and the same request's output may then differ
with the requests before it. Layers whose GQA groups span tensor-parallel ranks are not guarded: their ranks
select together, and they must take one path. One guard per metadata builder: per engine and KV cache group.
"""

from __future__ import annotations

import torch

from vllm_sparse.config.plan import DENSE_ABOVE_PROBE_STEPS as PROBE_STEPS
from vllm_sparse.kernels.page_count import add_page_count
from vllm_sparse.log import logger

BUCKETS = 8  # chunk lengths (context + own tokens) up to 16K, 32K, ..., 1M, and above


def context_bucket(seq_len: int) -> int:
    """The density bucket of a chunk that ends at `seq_len` tokens: 0 up to 16K, then one per doubling."""
    return min(BUCKETS - 1, max(0, (seq_len - 1).bit_length() - 14))


class DensityGuard:
    """One metadata builder's: its layers' kept and causal pages per context bucket since the last copy, and
    which (layer, bucket) run dense now."""

    def __init__(self, device: torch.device, num_layers: int, dense_above: float):
        self.device, self.dense_above = device, dense_above
        self._cuda = device.type == "cuda"
        self.use_kernel = self._cuda  # count with one launch (tests set it on CPU, interpreted)
        self._num_layers = num_layers
        n = num_layers * BUCKETS
        self._kept = torch.zeros(n, dtype=torch.int64, device=device)
        self._causal = [0] * n  # host numbers, as the layers queued their counts
        self._host = torch.zeros(n, dtype=torch.int64, pin_memory=self._cuda)
        self._in_flight: tuple | None = None  # (event or None, causal pages) of the copy not read yet
        self._recorded = False  # counts queued since the last copy
        self._step = 0
        self._dense_until = [0] * n  # per (layer, bucket): the step before which it runs dense
        self._told = False

    # -- the layers' side (hot path: one launch, host integers) ---------------------------------------
    def record(self, layer: int, seq_len: int, kept, causal: int) -> None:
        """One chunk-layer of a chunk ending at `seq_len` tokens: `kept` KV pages read (a host number, or device
        counts of any shape, summed here) of `causal` (a host number)."""
        slot = layer * BUCKETS + context_bucket(seq_len)
        if self.use_kernel and isinstance(kept, torch.Tensor):
            add_page_count(kept, self._kept, slot)
        elif isinstance(kept, torch.Tensor):
            self._kept[slot] += kept.sum().to(torch.int64)
        else:
            self._kept[slot] += int(kept)
        self._causal[slot] += causal
        self._recorded = True

    # -- the builder's side (once per step with sparse chunks) ---------------------------------------
    def begin_step(self, seq_lens) -> frozenset[int]:
        """The layers that run dense in this step, whose sparse chunks end at `seq_lens` tokens (host numbers):
        reads the copy queued before (if its event has completed), queues a copy of the counts since, and moves
        the step on. No host sync."""
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
        buckets = {context_bucket(n) for n in seq_lens}
        if not buckets:  # (a step with no sparse chunk: no layer is routed, where all() would say every one)
            return frozenset()
        return frozenset(layer for layer in range(self._num_layers)
                         if all(self._dense_until[layer * BUCKETS + b] > self._step for b in buckets))

    def _decide(self, kept: list[int], causal: list[int]) -> None:
        went_dense = []
        for slot, (k, c) in enumerate(zip(kept, causal)):
            if c <= 0:
                continue
            if k > self.dense_above * c:
                if self._dense_until[slot] <= self._step:
                    went_dense.append((slot // BUCKETS, k / c))
                self._dense_until[slot] = self._step + PROBE_STEPS
            else:
                self._dense_until[slot] = 0
        if went_dense and not self._told:
            self._told = True
            logger.info("vllm-sparse: layer %d's sparse chunks read %.0f%% of their KV blocks, more than dense_above="
                        "%.2f (%d layer and length bucket(s) this time): such layers run dense for the next %d steps "
                        "with sparse chunks of that length, then measure again (this note once per engine)",
                        went_dense[0][0], 100 * went_dense[0][1], self.dense_above, len(went_dense), PROBE_STEPS)
