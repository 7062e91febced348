"""Every estimator on planted patterns: it must find the blocks a planted key, column or diagonal lives in."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.paged import random_paged_batch
from vllm_sparse.estimators.base import ChunkContext
from vllm_sparse.estimators.registry import estimator_names, get_estimator
from vllm_sparse.kernels.paged import PagedKV
from vllm_sparse.selection.budget import Budget, select_blocks

BLOCK, PAGE, D, HQ, HKV = 64, 16, 32, 4, 2
SEQ, QLEN = 2048, 512
SCORING = [n for n in estimator_names() if n not in ("dense", "sink_local")]
PARAMS = {"vertical_slash": {"vertical_size": 64, "slash_size": 64}, "lowbit": {"sample_stride": 8}}


def _chunk(keys: torch.Tensor, q: torch.Tensor) -> ChunkContext:
    """Pack per-position keys [SEQ, HKV, D] into shuffled pages and build the chunk for the last QLEN queries."""
    b = random_paged_batch([SEQ], [QLEN], HQ, HKV, D, PAGE, seed=11)
    key = b.kv.key.clone()
    for p in range(SEQ // PAGE):
        key[int(b.block_table[0, p])] = keys[p * PAGE:(p + 1) * PAGE].permute(1, 0, 2)
    kv = PagedKV(key, b.kv.value)
    return ChunkContext(q, torch.arange(HQ) // (HQ // HKV), kv, b.block_table[0], SEQ - QLEN, BLOCK, D**-0.5)


def _kept(name, chunk, top_k=4):
    est = get_estimator(name)
    scores = est.score(chunk, est.params(**PARAMS.get(name, {})))
    assert scores.shape == (HQ, chunk.num_query_blocks, chunk.num_kv_blocks)
    mask = select_blocks(scores, Budget(top_k=top_k, sink_blocks=0, local_blocks=1), chunk.first_query_block)
    return mask


def _noise(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SEQ, HKV, D, generator=g) * 0.3, torch.randn(QLEN, HQ, D, generator=g) * 0.3, g


@pytest.mark.parametrize("name", SCORING)
def test_finds_a_planted_needle_block(name):
    keys, q, g = _noise(1)
    direction = torch.randn(D, generator=g)
    direction /= direction.norm()
    needle = 10  # KV block 10 (positions 640-703): its keys answer every query
    keys[needle * BLOCK:(needle + 1) * BLOCK] += 4.0 * direction
    q += 4.0 * direction
    mask = _kept(name, _chunk(keys, q))
    assert mask[:, :, needle].all(), f"{name} missed the needle block"


@pytest.mark.parametrize("name", ["vertical_slash", "lowbit", "pooled"])
def test_finds_a_planted_vertical_column(name):
    keys, q, g = _noise(2)
    direction = torch.randn(D, generator=g)
    direction /= direction.norm()
    column = 1000  # one key position every query attends to: KV block 15
    keys[column:column + 3] += 12.0 * direction
    q += 2.0 * direction
    mask = _kept(name, _chunk(keys, q))
    assert mask[:, :, column // BLOCK].all(), f"{name} missed the vertical column"


@pytest.mark.parametrize("name", ["vertical_slash", "antidiagonal", "lowbit"])
def test_finds_a_planted_slash_diagonal(name):
    keys, q, g = _noise(3)
    lag = 300  # every query attends to the keys 300..303 positions back: a slash band, width 4
    dirs = torch.randn(SEQ, D, generator=g)
    dirs /= dirs.norm(dim=-1, keepdim=True)
    for w in range(4):  # key at j matches the query at j + lag + w
        keys[: SEQ - lag - w] += 6.0 * dirs[lag + w:, None, :]
    # (A one-wide diagonal can miss every strided antidiagonal by parity; real slash lines have width.)
    q += 6.0 * dirs[SEQ - QLEN:, None, :].expand(QLEN, 1, D).repeat(1, HQ, 1)
    chunk = _chunk(keys, q)
    mask = _kept(name, chunk, top_k=4)
    for r, qb in enumerate(chunk.query_block_ids().tolist()):
        # Queries of block qb attend to positions qb*64-300 .. qb*64+63-300: blocks qb-5 and qb-4.
        hit = mask[:, r, qb - 5] | mask[:, r, qb - 4]
        assert hit.all(), f"{name} missed the slash diagonal in row {r}"


def test_pooled_group_share_scores_alike_within_a_group():
    keys, q, _ = _noise(4)
    chunk = _chunk(keys, q)
    est = get_estimator("pooled")
    scores = est.score(chunk, est.params(share="group"))
    torch.testing.assert_close(scores[0], scores[1])  # heads 0, 1 share KV head 0
    torch.testing.assert_close(scores[2], scores[3])
    assert not torch.allclose(scores[0], scores[2])


def test_pooled_proxy_heads_share_ranking_but_not_budget():
    keys, q, g = _noise(5)
    direction = torch.randn(D, generator=g)
    # Blocks differ in how well their keys answer the query direction: a real ranking to share.
    keys += (torch.randn(SEQ // BLOCK, generator=g).repeat_interleave(BLOCK)[:, None, None] * direction)
    q += 0.5 * direction
    q[:, 1] *= 3.0  # head 1 is sharper than its proxy (head 0)
    chunk = _chunk(keys, q)
    est = get_estimator("pooled")
    scores = est.score(chunk, est.params(proxy_heads=1))
    causal = torch.isfinite(scores[0])
    assert torch.equal(scores[0].argsort(-1)[causal.any(-1)], scores[1].argsort(-1)[causal.any(-1)])
    budget = Budget(top_p=0.5, sink_blocks=0, local_blocks=1)
    kept = select_blocks(scores, budget, chunk.first_query_block).sum(-1)
    assert (kept[1] <= kept[0]).all() and (kept[1] < kept[0]).any()  # the sharper head keeps fewer


@pytest.mark.parametrize("bits", [8, 4])
def test_lowbit_logits_per_kv_head_are_each_q_heads_integer_product(bits):
    """The GQA path (keys quantized once per KV head, each q head against its KV head's: the torch reference the
    fused lowbit kernels are compared with) against the integer product written out head by head."""
    from vllm_sparse.estimators.quant import lowbit_logits, quantize_symmetric

    g = torch.Generator().manual_seed(bits)
    q = torch.randn(QLEN, HQ, D, generator=g)
    chunk = _chunk(torch.randn(SEQ, HKV, D, generator=g), q)
    qh, k_kv = q.permute(1, 0, 2), torch.randn(HKV, 40, D, generator=g)
    got = lowbit_logits(qh, k_kv, bits, 0.7, chunk)
    for h in range(HQ):
        qi, qs = quantize_symmetric(qh[h], bits)
        ki, ks = quantize_symmetric(k_kv[int(chunk.kv_head_of[h])], bits)
        torch.testing.assert_close(got[h], (qi * qs) @ (ki * ks).T * 0.7, atol=1e-4, rtol=1e-5)


def test_lowbit_int8_close_to_exact_and_int4_coarser():
    from vllm_sparse.estimators.quant import lowbit_logits

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, 64, generator=g), torch.randn(2, 40, 64, generator=g)
    exact = q @ k.transpose(1, 2)
    err8 = (lowbit_logits(q, k, 8, 1.0) - exact).abs().max()
    err4 = (lowbit_logits(q, k, 4, 1.0) - exact).abs().max()
    assert err8 < 0.05 * exact.abs().max() and err8 < err4


@pytest.mark.parametrize("name", estimator_names())
def test_scores_never_admit_future_blocks(name):
    keys, q, _ = _noise(6)
    chunk = _chunk(keys, q)
    est = get_estimator(name)
    scores = est.score(chunk, est.params(**PARAMS.get(name, {})))
    assert not torch.isfinite(scores[:, ~chunk.causal_block_mask()]).any()
    assert torch.isfinite(scores[:, chunk.causal_block_mask()]).all()
