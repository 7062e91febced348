"""Quest page summaries: per physical KV page and KV head, the channel-wise min and max of its keys.

Indexed like vLLM's KV cache (by physical page id), so a page shared by prefix caching has one
summary, and a decode step finds a sequence's summaries through its own block table. They are
updated wherever vLLM writes keys (`do_kv_cache_update`): a page whose first slot is written in a
step starts afresh (its earlier content belonged to a freed page or a preempted request), any other
page widens its min/max with the new keys. Pages that are only read (prefix-cache hits) keep the
summary their writer left.

Memory: two key vectors per page and KV head, i.e. 1/page_size of the layer's KV cache (6.25% at
vLLM's default 16-token pages). The last row is a sink for padded slots (slot -1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _update_kernel(key_ptr, sk_t, sk_h, slot_ptr, mins_ptr, maxs_ptr, ss_p, ss_h, n_tokens,
                   HKV: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, HP: tl.constexpr):
    """Program per token; the first token of each page in the step (a step writes a page's slots
    as one run of consecutive tokens) folds the whole run in: fresh if the run starts the page."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    prev = tl.load(slot_ptr + t - 1, mask=t > 0, other=-1).to(tl.int64)
    page = slot // PS
    leader = (slot >= 0) & ((t == 0) | (prev < 0) | (prev // PS != page))
    if leader:
        h = tl.arange(0, HP)
        d = tl.arange(0, D)
        hmask = (h < HKV)[:, None]
        lo = tl.full((HP, D), float("inf"), tl.float32)
        hi = tl.full((HP, D), float("-inf"), tl.float32)
        for i in range(PS):  # the run: at most the page's slots
            s = tl.load(slot_ptr + t + i, mask=t + i < n_tokens, other=-1).to(tl.int64)
            if (s >= 0) & (s // PS == page):
                k = tl.load(key_ptr + (t + i) * sk_t + h[:, None] * sk_h + d[None, :], mask=hmask, other=0.0)
                lo = tl.minimum(lo, k.to(tl.float32))
                hi = tl.maximum(hi, k.to(tl.float32))
        off = page * ss_p + h[:, None] * ss_h + d[None, :]
        if slot % PS != 0:  # the page had keys before this step
            lo = tl.minimum(lo, tl.load(mins_ptr + off, mask=hmask, other=0.0).to(tl.float32))
            hi = tl.maximum(hi, tl.load(maxs_ptr + off, mask=hmask, other=0.0).to(tl.float32))
        tl.store(mins_ptr + off, lo.to(mins_ptr.dtype.element_ty), mask=hmask)
        tl.store(maxs_ptr + off, hi.to(maxs_ptr.dtype.element_ty), mask=hmask)


class PageSummaries:
    def __init__(self, num_pages: int, num_kv_heads: int, head_size: int, page_size: int, dtype: torch.dtype,
                 device: torch.device):
        # Zeros, not +-inf: a page never written is never selected by a sequence (block tables point at
        # written pages only), and a finite value keeps stray bounds finite.
        self.mins = torch.zeros(num_pages + 1, num_kv_heads, head_size, dtype=dtype, device=device)
        self.maxs = torch.zeros_like(self.mins)
        self.page_size = page_size
        self.num_pages = num_pages  # (row num_pages: where a padded slot's update goes)

    @property
    def nbytes(self) -> int:
        return 2 * self.mins.numel() * self.mins.element_size()

    @staticmethod
    def bytes_per_page(num_kv_heads: int, head_size: int, dtype: torch.dtype) -> int:
        return 2 * num_kv_heads * head_size * torch.empty(0, dtype=dtype).element_size()

    def update(self, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Fold the step's new keys ([tokens, kv_heads, head_size], written at `slot_mapping`) in.
        One kernel on CUDA (the torch reference elsewhere); no host syncs, fixed shapes: safe inside a
        captured CUDA graph."""
        if key.is_cuda:
            self.update_kernel(key, slot_mapping)
        else:
            self.update_reference(key, slot_mapping)

    def update_kernel(self, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        n = slot_mapping.shape[0]
        if n == 0:
            return
        assert key.stride(-1) == 1
        heads, d = key.shape[1], key.shape[2]
        _update_kernel[(n,)](key, key.stride(0), key.stride(1), slot_mapping, self.mins, self.maxs,
                             self.mins.stride(0), self.mins.stride(1), n, HKV=heads, D=d, PS=self.page_size,
                             HP=triton.next_power_of_2(heads))

    def update_reference(self, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        n = slot_mapping.shape[0]
        key = key[:n]
        slots = slot_mapping.long()
        valid = slots >= 0
        page = torch.where(valid, slots // self.page_size, self.num_pages)
        fresh = torch.where(valid & (slots % self.page_size == 0), page, self.num_pages)
        self.mins.index_fill_(0, fresh, float("inf"))
        self.maxs.index_fill_(0, fresh, float("-inf"))
        idx = page.view(-1, 1, 1).expand_as(key)
        k = key.to(self.mins.dtype)
        self.mins.scatter_reduce_(0, idx, k, "amin", include_self=True)
        self.maxs.scatter_reduce_(0, idx, k, "amax", include_self=True)


def check_against_cache(summaries: PageSummaries, keys: torch.Tensor, pages: torch.Tensor, seq_len: int) -> None:
    """Debug check (VLLM_SPARSE_CHECK_SUMMARIES=1, CPU path): a row's page summaries equal those
    recomputed from its keys in the cache [seq_len, kv_heads, D]; raises naming the first bad page."""
    lo, hi = reference_summary(keys, seq_len, summaries.page_size)
    bad = ((summaries.mins[pages].float() != lo) | (summaries.maxs[pages].float() != hi)).flatten(1).any(1)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise AssertionError(f"vllm-sparse: page summary of logical page {i} (physical {int(pages[i])}) of a "
                             f"{seq_len}-token sequence does not match the keys in the cache")


def reference_summary(keys: torch.Tensor, seq_len: int, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summaries recomputed from a sequence's keys [seq_len, kv_heads, head_size]: per logical page
    ([pages, kv_heads, head_size] min and max), for tests."""
    pages = -(-seq_len // page_size)
    pad = pages * page_size - seq_len
    k = keys[:seq_len].float()
    lo = torch.cat([k, k.new_full((pad, *k.shape[1:]), float("inf"))]).view(pages, page_size, *k.shape[1:])
    hi = torch.cat([k, k.new_full((pad, *k.shape[1:]), float("-inf"))]).view(pages, page_size, *k.shape[1:])
    return lo.amin(1), hi.amax(1)
