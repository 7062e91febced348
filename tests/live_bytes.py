"""Peak bytes of the tensors a block of torch code allocates (any device, CPU included): a dispatch mode that
counts each new storage an op returns until the storage is freed. A CPU twin of torch.cuda's peak statistics for
checking the temporaries bounds of `backend/reserve.py`."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in inputs or key in self._storages:  # (in place, a view, or counted)
                continue
            self._storages.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out

    def _freed(self, key: int, nbytes: int) -> None:
        self._storages.discard(key)
        self.live -= nbytes


def peak_bytes(fn) -> int:
    """The most bytes `fn`'s new tensors held at once (its result's included)."""
    with LiveBytes() as mode:
        result = fn()
    del result
    return mode.peak
