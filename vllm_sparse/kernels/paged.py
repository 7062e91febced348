"""A layout-neutral view of one layer's paged KV cache.

vLLM backends store pages differently (the CPU backend keeps each key page transposed,
FlashAttention keeps [2, pages, page_size, heads, dim]); every consumer here sees
key/value as [num_pages, num_kv_heads, page_size, head_dim] views over the same memory,
so pages are read in place whatever the backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class PagedKV:
    key: torch.Tensor  # [num_pages, num_kv_heads, page_size, head_dim] (a view; may be strided)
    value: torch.Tensor  # same shape as key
    # An fp8 cache stores key / k_scale and value / v_scale (vLLM's per-tensor scales, `layer._k_scale_float`):
    # every reader multiplies them back, the kernels by folding them into their logit and output scales.
    k_scale: float = 1.0
    v_scale: float = 1.0
    # The same scales as device tensors (vLLM's `layer._k_scale`, 0-dim float32), for FA3's k/v descales: read on
    # the device, so a scale vLLM computes at run time (`calculate_kv_scales`) needs no host copy.
    k_descale: torch.Tensor | None = None
    v_descale: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        """An fp8 cache: values to dequantize (times k_scale / v_scale) when read."""
        return self.key.dtype in FP8_DTYPES

    @property
    def page_size(self) -> int:
        return self.key.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.key.shape[1]

    def gather(self, pages: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first `num_tokens` tokens stored in `pages` (physical ids, in order).

        Returns [num_tokens, num_kv_heads, head_dim] each: the cache's dtype, or fp32 dequantized for fp8.
        """
        k = self.key[pages].permute(0, 2, 1, 3).reshape(-1, self.num_kv_heads, self.key.shape[-1])[:num_tokens]
        v = self.value[pages].permute(0, 2, 1, 3).reshape(-1, self.num_kv_heads, self.value.shape[-1])[:num_tokens]
        if self.quantized:
            return k.float() * self.k_scale, v.float() * self.v_scale
        return k, v

    def as_fp8(self, dtype: torch.dtype, layer) -> PagedKV:
        """This view of an fp8 cache (vLLM allocates it as bytes) as `dtype` values with `layer`'s per-tensor
        scales (`_k_scale_float`, `_k_scale`; the same for values)."""
        return PagedKV(self.key.view(dtype), self.value.view(dtype), layer._k_scale_float, layer._v_scale_float,
                       layer._k_scale, layer._v_scale)

    @classmethod
    def from_cpu_cache(cls, kv_cache: torch.Tensor) -> PagedKV:
        """vLLM CPU_ATTN cache [pages, kv_heads, page_size, 2*head_dim] (vec/vec16 ISA layout).

        The first half of each page row-block holds the keys transposed ([head_dim, page_size]),
        the second half the values ([page_size, head_dim]).
        """
        pages, heads, page_size, two_d = kv_cache.shape
        d = two_d // 2
        flat = kv_cache.view(pages, heads, 2 * page_size * d)
        key = flat[..., : page_size * d].view(pages, heads, d, page_size).transpose(-1, -2)
        value = flat[..., page_size * d :].view(pages, heads, page_size, d)
        return cls(key=key, value=value)

    @classmethod
    def from_flash_cache(cls, kv_cache: torch.Tensor) -> PagedKV:
        """vLLM's FlashAttention cache, whose layout is the release's (`compat.flash_cache_keys_values`)."""
        from vllm_sparse import compat

        key, value = compat.flash_cache_keys_values(kv_cache)
        return cls(key=key, value=value)
