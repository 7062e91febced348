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
