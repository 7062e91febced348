"""The builder's share of sparse decode: per step, the rows that decode sparsely, and the dense
backend's metadata with those rows shortened to one token (their attention comes from the sparse
decode path, which overwrites them).

The shortened lengths live in a buffer the builder owns, so a captured CUDA graph that reads them
reads each step's values; they are computed on the device from the exact lengths, the same test
the decode kernels apply, so the two always agree on which rows are sparse.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_sparse import compat
from vllm_sparse.decode.step import DecodeRows


class DecodeRowsBuilder:
    def __init__(self, dense_below: int, max_rows: int, device: torch.device):
        self.dense_below = dense_below
        self._dense_seq_lens = torch.zeros(max_rows, dtype=torch.int32, device=device)
        self._steps = 0

    def shorten(self, cm):
        """-> (metadata for the dense backend, DecodeRows of the step)."""
        seq = cm.seq_lens
        n = seq.shape[0]
        if n > self._dense_seq_lens.shape[0]:
            raise RuntimeError(f"vllm-sparse: a step with {n} requests; decode buffers hold "
                               f"{self._dense_seq_lens.shape[0]} (max_num_seqs)")
        self._steps += 1
        rows = DecodeRows(cm.query_start_loc, seq, host_sparse=self._host_sparse_rows(cm), step=self._steps)
        buf = self._dense_seq_lens[:n]
        buf.copy_(seq)
        if rows.any_sparse:  # else no row can be sparse on the device either (host lengths are upper bounds)
            buf.masked_fill_(rows.sparse_mask(self.dense_below), 1)
        return compat.with_seq_lens(cm, buf), rows

    def _host_sparse_rows(self, cm) -> int:
        """From host data (host lengths may be upper bounds: never misses a sparse row). In numpy: the
        builder runs every step on the host, and numpy is several times quicker than torch on a few
        dozen numbers."""
        n = cm.num_reqs
        qsl = cm.query_start_loc_cpu[: n + 1].numpy()
        seq = compat.seq_lens_cpu(cm)[:n].numpy()
        return int(np.count_nonzero((qsl[1:] - qsl[:-1] == 1) & (seq >= self.dense_below)))
