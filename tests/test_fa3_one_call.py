"""FA3 over compacted tables in one call for every page list of a chunk (`VLLM_SPARSE_FA3_ONE_CALL=1`), on CPU:
FA3 itself is replaced by a torch model of its paged, varlen, bottom-right causal attention, so these tests
check what this project adds around it (the one-KV-head page view of the cache, the tables' page ids, the
list-major queries and their row offsets, the output permuted back) against the call per list. The GPU twin,
with FA3, is `tests/test_sparse_kernel.py::test_fa3_over_compacted_tables_matches_reference`."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from tests.fixtures.paged import random_paged_batch
from tests.test_sparse_kernel import _bottom_right_causal
from vllm_sparse.backend.batch import SparseChunk, tile_geometry
from vllm_sparse.backend.sparse_path import attend_sparse_chunks
from vllm_sparse.config.plan import HeadPlan
from vllm_sparse.estimators.registry import get_estimator
from vllm_sparse.kernels import fa3_compact
from vllm_sparse.kernels.fa3_compact import head_page_stride, pages_by_head
from vllm_sparse.kernels.paged import PagedKV
from vllm_sparse.selection.budget import Budget

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the GPU runs FA3 itself: tests/test_sparse_kernel.py")


def fa3_model(q, k, v, *, max_seqlen_q, cu_seqlens_q, max_seqlen_k, seqused_k, softmax_scale, causal, block_table,
              out, fa_version, num_splits):
    """flash_attn_varlen_func's paged path, in torch: sequence b's queries are rows cu[b]:cu[b + 1], its keys the
    first seqused_k[b] tokens of its pages in block_table[b], causal aligned bottom-right, GQA by head groups."""
    assert causal and fa_version == 3 and k.stride(-1) == 1 and block_table.dtype == torch.int32
    page, hk = k.shape[1], k.shape[2]
    group = q.shape[1] // hk
    for b in range(cu_seqlens_q.numel() - 1):
        q0, q1, n = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(seqused_k[b])
        assert q1 - q0 <= max_seqlen_q and n <= max_seqlen_k
        if q1 == q0:
            continue
        pages = block_table[b, :-(-n // page)].long()
        for h in range(hk):  # each KV head's group of q heads, by FA's causal rule on the list
            heads = slice(h * group, (h + 1) * group)
            kk, vv = k[pages, :, h].reshape(-1, k.shape[-1]), v[pages, :, h].reshape(-1, v.shape[-1])
            out[q0:q1, heads] = _bottom_right_causal(q[q0:q1, heads], kk, vv, softmax_scale, n).to(out.dtype)
    return out


@pytest.fixture
def fake_fa3(monkeypatch):
    calls = []

    def call(*args, **kwargs):
        calls.append(kwargs["block_table"].shape[0])
        return fa3_model(*args, **kwargs)

    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn", types.SimpleNamespace(flash_attn_varlen_func=call))
    monkeypatch.setattr(fa3_compact, "num_sms", lambda device: 132)
    return calls


def _flash_cache(b, packed: bool) -> PagedKV:
    """The batch's pages in vLLM's FlashAttention layouts: [pages, page, heads, D] each, or K|V packed per head."""
    key, value = b.kv.key.transpose(1, 2), b.kv.value.transpose(1, 2)  # [pages, page, heads, D]
    if packed:
        both = torch.cat([key, value], -1).contiguous()
        key, value = both[..., :key.shape[-1]], both[..., key.shape[-1]:]
    else:
        key, value = key.contiguous(), value.contiguous()
    return PagedKV(key.transpose(1, 2), value.transpose(1, 2))


@pytest.mark.parametrize("packed", [False, True], ids=["split", "kv-packed"])
def test_pages_by_head_views_each_head_of_each_page(packed):
    b = random_paged_batch([50], [20], 8, 3, 16, 4, seed=1)
    k = _flash_cache(b, packed).key.transpose(1, 2)
    mul = head_page_stride(k)
    assert mul is not None
    one = pages_by_head(k, mul)
    for p in range(k.shape[0]):
        for h in range(k.shape[2]):
            assert torch.equal(one[p * mul + h, :, 0], k[p, :, h])


@pytest.mark.parametrize("union_heads", [True, False], ids=["list-per-kv-head", "list-per-q-head"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "kv-packed"])
def test_one_fa3_call_for_every_list_equals_a_call_per_list(fake_fa3, monkeypatch, union_heads, packed):
    # A chunk of 150 queries after 170 tokens of context (unaligned to blocks and pages), 8 q / 2 KV heads.
    hq, hk, d, page, bs, ctx, q_len = 8, 2, 16, 4, 16, 170, 150
    b = random_paged_batch([ctx + q_len], [q_len], hq, hk, d, page, dtype=torch.float32, seed=3)
    kv = _flash_cache(b, packed)
    params = get_estimator("antidiagonal").params.model_validate({"stride": 4, "bits": 8})
    plan = HeadPlan("antidiagonal", params, Budget(keep_ratio=0.3, sink_blocks=1, local_blocks=1))
    chunks = (SparseChunk(0, 0, q_len, ctx),)
    outs = {}
    for one_call in (False, True):
        monkeypatch.setattr(fa3_compact, "one_call_enabled", lambda one_call=one_call: one_call)
        fake_fa3.clear()
        out = torch.full_like(b.q, float("nan"))
        attend_sparse_chunks(b.q, out, kv, b.block_table, chunks, [plan] * hq, bs, d**-0.5, 1, kernel="fa3",
                             union_heads=union_heads, tiles=tile_geometry(list(chunks), bs, 1, torch.device("cpu")))
        lists = hk if union_heads else hq
        assert fake_fa3 == ([lists * 10] if one_call else [10] * lists)  # 10 union tiles
        outs[one_call] = out
    assert not outs[True].isnan().any()
    torch.testing.assert_close(outs[True], outs[False], atol=1e-6, rtol=1e-6)
