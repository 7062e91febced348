"""Symmetric low-bit quantization for the `lowbit` estimator (SALE-style score estimation)."""

from __future__ import annotations

import torch


def quantize_symmetric(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector (last dim) symmetric quantization -> (integer values held in fp32, scale [..., 1]).

    fp32 holds the integer products exactly: |q| <= 127, so a dot product over d <= 1024 stays
    below 2**24.
    """
    qmax = 2 ** (bits - 1) - 1
    # Times fp32 reciprocals, not divided: CUDA's torch divides by a scalar that way (the scale from
    # qmax), and a multiply is what the fused kernels (row_scores) can afford per element (the scale's
    # reciprocal, once per vector), so every path rounds the same products to the same integers.
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) * (1.0 / qmax)
    return torch.round(x * (1.0 / scale)).clamp(-qmax, qmax), scale


def lowbit_logits(q: torch.Tensor, k: torch.Tensor, bits: int, scale: float, chunk=None) -> torch.Tensor:
    """q [h, n, d], k [h, m, d] -> approximate q @ k^T * scale from `bits`-bit integers, [h, n, m].

    With `chunk` (a ChunkContext), k holds one row set per KV head [kv_heads, m, d] and each q head
    is multiplied with its KV head's keys (chunk.by_kv_head), so keys are quantized once per KV head.
    """
    qi, qs = quantize_symmetric(q.float(), bits)
    ki, ks = quantize_symmetric(k.float(), bits)
    if chunk is None:
        return (qi @ ki.transpose(1, 2)) * qs * ks.transpose(1, 2) * scale
    return chunk.by_kv_head(qi, ki) * qs * ks.transpose(1, 2)[chunk.kv_head_of] * scale
