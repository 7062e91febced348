"""Host tensors to the GPU without waiting for it.

A copy from pageable host memory first waits for the stream's earlier work (CUDA stages it through a
pinned buffer). Under async scheduling the builder prepares step N+1 while step N runs, so such a copy
stalls the host until step N ends. From pinned memory the copy is queued and the host goes on; the
caching host allocator keeps the pinned buffer until the copy has run.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def constant_on(values: tuple, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A small constant of the plan (head numbers, a head mask) on `device`, made once per process and reused:
    the per-layer paths index with these, and `torch.tensor(values, device=cuda)` copies from pageable memory
    (see above). A plan has a bounded set of them (its head groups), so the cache stays small."""
    key = (tuple(values), torch.device(device), dtype)
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = to_device(torch.tensor(key[0], dtype=dtype), key[1])
    return t
