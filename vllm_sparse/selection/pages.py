"""Kept-block masks -> CSR page lists for the sparse kernel, without a host sync.

`torch.nonzero` would need the number of kept pages on the host; here every row writes its pages
at `indptr[row] + rank` into a buffer sized for the worst case (all pages kept), and dropped
cells go to one spare slot at the end. Shapes depend only on the mask's shape, so the step can
run inside a CUDA graph.
"""

from __future__ import annotations

import torch


def block_mask_to_page_csr(
    mask: torch.Tensor,  # [rows, kv_blocks] bool: kept selection blocks per (segment, kv head)
    block_size: int,
    page_size: int,
    num_pages: torch.Tensor,  # [rows] pages that hold the row's tokens (ceil(seq_len / page_size))
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indptr [rows + 1] int32, indices [rows * kv_blocks * pages_per_block + 1] int32).

    Row r's sorted logical page ids are indices[indptr[r]:indptr[r + 1]]; the tail is scratch.
    """
    if block_size % page_size:
        raise ValueError(f"selection block {block_size} is not a multiple of the KV page size {page_size}")
    rows, blocks = mask.shape
    per_block = block_size // page_size
    page_ids = torch.arange(blocks * per_block, device=mask.device, dtype=torch.int32)
    keep = mask.repeat_interleave(per_block, dim=1) & (page_ids[None, :] < num_pages[:, None])
    counts = keep.sum(dim=1, dtype=torch.int32)
    indptr = torch.zeros(rows + 1, dtype=torch.int32, device=mask.device)
    torch.cumsum(counts, dim=0, out=indptr[1:])
    capacity = keep.numel()
    dest = (indptr[:-1, None] + keep.cumsum(dim=1, dtype=torch.int32) - 1).to(torch.int64)
    dest = torch.where(keep, dest, capacity)  # dropped pages all land in the spare slot
    indices = torch.zeros(capacity + 1, dtype=torch.int32, device=mask.device)
    indices.scatter_(0, dest.flatten(), page_ids.expand(rows, -1).flatten())
    return indptr, indices
