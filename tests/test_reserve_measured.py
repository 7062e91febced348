"""Temporaries the engine reserves for, against what the path allocates, measured on CPU (`tests/live_bytes.py`).

The Triton kernel's page lists (`block_mask_to_page_csr`) within the temporaries bound the engine reserves for
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


@pytest.mark.parametrize("seq, q_len", [(4096, 64), (16384, 32), (8192, 256)])
@pytest.mark.parametrize("name, params", [("pooled", {}), ("pooled", {"proxy_heads": 1}),
                                          ("lowbit", {"rows": "pooled"}), ("lowbit", {"rows": "pooled", "bits": 4})])
def test_pooled_key_estimators_stay_within_their_reserved_bytes(monkeypatch, seq, q_len, name, params):
    """Scoring with pooled keys at many KV blocks and few queries (the block means' copies dominate). The CPU
    reference gathers the whole context to average it; the GPU's kernel writes only the means, as the stand-in
    here does, so the rest of the path is measured as the GPU runs it."""
    import vllm_sparse.estimators.base as base
    from tests.fixtures.paged import random_paged_batch
    from vllm_sparse.estimators.base import ChunkContext
    from vllm_sparse.estimators.registry import get_estimator

    hq, hkv, d, page, block = 8, 2, 128, 16, 16
    monkeypatch.setattr(base, "block_key_means_ref", lambda kv, bt, seq_len, bs: torch.randn(
        kv.num_kv_heads, -(-seq_len // bs), kv.key.shape[-1]))  # (block_key_means_triton's output)
    b = random_paged_batch([seq], [q_len], hq, hkv, d, page, seed=1)
    ctx = ChunkContext(torch.randn(q_len, hq, d), torch.arange(hq) // (hq // hkv), b.kv, b.block_table[0],
                       seq - q_len, block, d**-0.5)
    est = get_estimator(name)
    peak = peak_bytes(lambda: est.score(ctx, est.params(**params)))
    bound = chunk_temporaries_bytes(hq, hkv, q_len, seq, block, page, None, True, False, pooled_head_dim=d)
    assert peak <= bound
    assert peak > chunk_temporaries_bytes(hq, hkv, q_len, seq, block, page, None, True, False)  # (needs the term)


@pytest.mark.parametrize("seq, q_len", [(900, 600), (4000, 256)])
def test_a_group_spread_over_ranks_stays_within_its_reserved_bytes(monkeypatch, seq, q_len):
    """A GQA group over 4 ranks (8 q / 2 KV heads at TP=4) whose selection reads the group (`share: group`):
    each rank gathers every rank's queries and scores its group's 4 q heads, not its own 2. One rank measured
    (the all-gather a stand-in of the same shapes): within the bound with the exchange counted
    (`reserve.split_group_bytes`), over the rank's own heads' bound, which missed it."""
    from types import SimpleNamespace

    import vllm_sparse.estimators.base as base
    from tests.fixtures.paged import random_paged_batch
    from vllm_sparse.backend.reserve import split_group_bytes
    from vllm_sparse.backend.sparse_path import kept_blocks
    from vllm_sparse.backend.split_groups import rank_layer
    from vllm_sparse.config.plan import HeadPlan, LayerPlan
    from vllm_sparse.config.sharding import head_shard
    from vllm_sparse.estimators.base import ChunkContext
    from vllm_sparse.estimators.registry import get_estimator
    from vllm_sparse.kernels.paged import PagedKV
    from vllm_sparse.selection.budget import Budget

    num_q, num_kv, tp, d, block = 8, 2, 4, 32, 32
    monkeypatch.setattr(base, "block_key_means_ref", lambda kv, bt, seq_len, bs: torch.randn(
        kv.num_kv_heads, -(-seq_len // bs), kv.key.shape[-1]))  # (the GPU kernel's output only, as above)
    plan = HeadPlan("pooled", get_estimator("pooled").params(), Budget(keep_ratio=0.3, sink_blocks=1, local_blocks=1,
                                                                       share="group"))
    layer = LayerPlan(0, True, (plan,) * num_q)
    b = random_paged_batch([seq], [q_len], num_q, num_kv, d, 16, seed=3)
    shard = head_shard(num_q, num_kv, 0, tp)
    heads, split = rank_layer(layer, shard, lambda t, dim: torch.cat([t] * tp, dim))
    assert split is not None and split.share_queries
    q = b.q[:, shard.q_heads.start:shard.q_heads.stop].contiguous()
    own_kv = slice(shard.kv_heads.start, shard.kv_heads.stop)
    kv = PagedKV(b.kv.key[:, own_kv], b.kv.value[:, own_kv])
    ctx = ChunkContext(q, torch.zeros(q.shape[1], dtype=torch.long), kv, b.block_table[0], seq - q_len, block,
                       d**-0.5, (0,) * q.shape[1], False)
    peak = peak_bytes(lambda: kept_blocks(ctx, heads, split))

    scored, exchange = split_group_bytes(SimpleNamespace(layers=[layer], block_size=block), shard, q_len, seq, d,
                                         q.element_size())
    assert scored == 4 and exchange > 0  # the group's q heads, and its gathered queries
    args = (len(shard.kv_heads), q_len, seq, block, 16, 1, True, False)
    own_heads = chunk_temporaries_bytes(len(shard.q_heads), *args, pooled_head_dim=d)
    assert own_heads < peak <= exchange + chunk_temporaries_bytes(scored, *args, pooled_head_dim=d)


def test_a_sparse_steps_dense_tokens_stay_within_their_reserved_bytes():
    """The step's dense requests run on copies of their tokens (`_forward_dense_tokens`); measured with the dense
    backend's forward a stand-in that writes its output: within `dense_token_bytes`."""
    from types import SimpleNamespace

    from vllm_sparse.backend.impl import SparseImplMixin
    from vllm_sparse.backend.reserve import dense_token_bytes

    class Dense:
        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
            output.copy_(query)  # (q heads x head dim, as the output)

    class Impl(SparseImplMixin, Dense):
        def __init__(self):  # (the mixin's start needs an engine: only the method is measured)
            pass

    tokens, hq, hkv, d = 300, 8, 2, 64
    query, output = torch.randn(tokens, hq, d), torch.full((tokens, hq, d), float("nan"))
    key, value = torch.randn(tokens, hkv, d), torch.randn(tokens, hkv, d)
    dense = torch.arange(0, tokens, 2)  # every other token's request stays dense
    batch = SimpleNamespace(dense_tokens=dense, dense_metadata=object())
    peak = peak_bytes(lambda: Impl()._forward_dense_tokens(None, query, key, value, None, output, batch))
    assert 0 < peak <= dense_token_bytes(len(dense), hq, hkv, d, query.element_size())
    assert torch.equal(output[dense], query[dense]) and output[1::2].isnan().all()
