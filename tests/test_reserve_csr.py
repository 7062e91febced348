"""The Triton kernel's page lists (`block_mask_to_page_csr`) within the temporaries bound the engine reserves for
them (`reserve.CSR_ELEMENT_BYTES` per page list, union tile and context page), measured on CPU by the bytes its
tensors hold at once (`tests/live_bytes.py`); the FA3 path's tables are counted at their own, smaller size."""

import pytest
import torch

from tests.live_bytes import peak_bytes
from vllm_sparse.backend.reserve import CSR_ELEMENT_BYTES, TABLE_ELEMENT_BYTES, chunk_temporaries_bytes
from vllm_sparse.selection.pages import block_mask_to_page_csr


def test_the_tracker_counts_live_tensors_and_frees():
    def two_at_once():
        a = torch.zeros(1000)
        b = torch.zeros(1000)
        del a
        return b + 1  # a freed: two 4,000-byte tensors at most, then a third

    assert peak_bytes(lambda: torch.zeros(1000)) == 4000
    assert peak_bytes(two_at_once) == 8000


@pytest.mark.parametrize("rows, blocks, block_size, page_size", [(24, 64, 128, 16), (9, 200, 64, 16), (4, 33, 32, 32)])
def test_page_lists_stay_within_their_reserved_bytes(rows, blocks, block_size, page_size):
    per_block = block_size // page_size
    mask = torch.rand(rows, blocks, generator=torch.Generator().manual_seed(rows)) < 0.3
    num_pages = torch.randint(blocks * per_block // 2, blocks * per_block + 1, (rows,))
    elements = rows * blocks * per_block  # (page list x tile) rows, each over the context's pages
    peak = peak_bytes(lambda: block_mask_to_page_csr(mask, block_size, page_size, num_pages))
    assert TABLE_ELEMENT_BYTES * elements < peak <= CSR_ELEMENT_BYTES * elements


def test_the_bound_counts_page_lists_only_where_the_triton_kernel_runs():
    args = (32, 8, 16384, 1 << 20, 128, 16, 1, True, False)
    fa3, triton = chunk_temporaries_bytes(*args), chunk_temporaries_bytes(*args, page_csr=True)
    lists, tiles, pages = 8, 16384 // 128 + 1, (1 << 20) // 16
    assert triton - fa3 == lists * tiles * pages * (CSR_ELEMENT_BYTES - TABLE_ELEMENT_BYTES)
