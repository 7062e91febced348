"""Mean key of every selection block of one request, straight from the paged cache.

The pooled scorers (`pooled`, `lowbit` with pooled rows) compare block-mean queries with
block-mean keys. In torch the pages are gathered first (at 128K a 256 MB copy per layer, read
again to sum); the Triton kernel reads each page once, in place: one program per (block,
KV head) sums its pages' rows in fp32. Both return [num_kv_heads, kv_blocks, D] fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_sparse.kernels.launch import storage_base
from vllm_sparse.kernels.paged import PagedKV


def block_key_means_ref(kv: PagedKV, block_table_row: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    page = kv.page_size
    n_pages = (seq_len - 1) // page + 1
    n_blocks = (seq_len - 1) // block_size + 1
    pages = block_table_row[:n_pages].long()
    full = n_pages - 1  # the last page may be partly filled: sum only its tokens
    tail = seq_len - full * page
    sums = torch.cat([kv.key[pages[:full]].float().sum(dim=2),
                      kv.key[pages[full:], :, :tail].float().sum(dim=2)]) * kv.k_scale  # [pages, kv, D]
    per_block = block_size // page
    sums = torch.nn.functional.pad(sums, (0, 0, 0, 0, 0, n_blocks * per_block - n_pages))
    block_sums = sums.view(n_blocks, per_block, *sums.shape[1:]).sum(1)  # [blocks, kv, D]
    starts = torch.arange(n_blocks, device=sums.device) * block_size
    counts = (torch.clamp(starts + block_size, max=seq_len) - starts).to(torch.float32)
    return (block_sums / counts[:, None, None]).permute(1, 0, 2)


@triton.jit(do_not_specialize=["k_offset", "stride_kp", "stride_kh", "stride_kt", "bt_offset", "seq_len",
                               "n_blocks"])
def _block_key_means_kernel(
    K, k_offset, stride_kp, stride_kh, stride_kt,  # [pages, kv_heads, page, D] at K + k_offset, D contiguous
    BT, bt_offset, OUT,  # int32 block table row at BT + bt_offset; [kv_heads, n_blocks, D] fp32
    seq_len, n_blocks,
    PER_BLOCK: tl.constexpr, PAGE: tl.constexpr, HEAD_D: tl.constexpr, D_POW2: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    tok = tl.arange(0, PAGE)
    d = tl.arange(0, D_POW2)
    acc = tl.zeros([D_POW2], dtype=tl.float32)
    for j in tl.static_range(PER_BLOCK):
        first = (b * PER_BLOCK + j) * PAGE
        if first < seq_len:
            phys = tl.load(BT + bt_offset + b * PER_BLOCK + j).to(tl.int64)
            live = (first + tok) < seq_len
            x = tl.load(K + k_offset + phys * stride_kp + h * stride_kh + tok[:, None] * stride_kt + d[None, :],
                        mask=live[:, None] & (d[None, :] < HEAD_D), other=0.0)
            acc += tl.sum(x.to(tl.float32), axis=0)
    n = tl.minimum(seq_len - b * PER_BLOCK * PAGE, PER_BLOCK * PAGE)
    tl.store(OUT + (h * n_blocks + b) * HEAD_D + d, acc / n, mask=d < HEAD_D)


def block_key_means_triton(kv: PagedKV, block_table_row: torch.Tensor, seq_len: int, block_size: int
                           ) -> torch.Tensor:
    key = kv.key
    if key.stride(-1) != 1:
        raise ValueError("block_key_means_triton needs the head dim contiguous in the cache")
    page, heads, d = kv.page_size, kv.num_kv_heads, key.shape[-1]
    n_blocks = (seq_len - 1) // block_size + 1
    out = torch.empty(heads, n_blocks, d, dtype=torch.float32, device=key.device)
    k_base, k_offset = storage_base(key)
    bt, bt_offset = storage_base(block_table_row)
    _block_key_means_kernel[(n_blocks, heads)](
        k_base, k_offset, key.stride(0), key.stride(1), key.stride(2), bt, bt_offset, out, seq_len, n_blocks,
        PER_BLOCK=block_size // page, PAGE=page, HEAD_D=d, D_POW2=triton.next_power_of_2(d), num_warps=4,
    )
    return out * kv.k_scale if kv.quantized else out
