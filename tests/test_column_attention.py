"""Attention over kept key columns (token by token) against its torch reference, and its merge with the block
pass: together exact attention over the union of kept blocks and kept columns.

On a CPU host the kernel runs under Triton's interpreter (fp16/fp32); on a GPU compiled, bf16 included. Random
varlen chunks with context, shuffled pages, GQA/MQA/MHA, random sorted column lists; outputs poisoned first.
"""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.paged import random_paged_batch, to_fp8
from vllm_sparse.kernels.column_attention import column_attention, column_attention_ref, merge_attention
from vllm_sparse.kernels.paged import PagedKV
from vllm_sparse.kernels.reference import dense_causal_attention_ref, sparse_paged_attention_ref

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if GPU else [])
CASES = [
    # seq_lens, q_lens, q_heads, kv_heads, head_dim, page
    ((70, 150, 9), (70, 41, 1), 8, 2, 32, 16),  # whole prompt, chunk with context, a single row
    ((200,), (64,), 4, 1, 64, 32),  # MQA
    ((90, 33), (90, 33), 6, 6, 16, 16),  # MHA
    ((130,), (50,), 6, 2, 16, 64),  # group of 3 (padded to 4)
]


def _csr(lists, device=DEVICE):
    indptr = torch.tensor([0] + [len(x) for x in lists]).cumsum(0).to(torch.int32)
    idx = torch.cat([torch.as_tensor(x, dtype=torch.int32) for x in lists])
    return indptr.to(device), idx.to(device)


def _random_columns(seq_lens, lists, density, seed, exclude=None):
    """A sorted random list of token positions per (segment, list); `exclude[s * lists + i]`: positions left out."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s, n in enumerate(seq_lens):
        for i in range(lists):
            keep = torch.rand(n, generator=g) < density
            if exclude is not None:
                keep[exclude[s * lists + i]] = False
            out.append(torch.nonzero(keep).flatten())
    return out


def _on(b, kv=None):
    kv = kv or b.kv
    return (b.q.to(DEVICE), PagedKV(kv.key.to(DEVICE), kv.value.to(DEVICE), kv.k_scale, kv.v_scale),
            b.block_table.to(DEVICE), b.query_start_loc.to(DEVICE, torch.int32), b.seq_lens.to(DEVICE))


# fp32 inputs: exact products on the interpreter; TF32 products (10-bit mantissas) in tl.dot on a GPU.
FP32_TOL = dict(atol=1e-2, rtol=1e-2) if GPU else dict(atol=2e-3, rtol=2e-3)


def _poisoned(q: torch.Tensor) -> dict:
    """out= and lse= for column_attention, NaN: every token and head must be written (0 and -inf where no
    column is seen)."""
    return {"out": torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEVICE),
            "lse": torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device=DEVICE)}


def _tol(dtype):
    return {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]


@pytest.mark.parametrize("per_q_head", [False, True], ids=["list-per-kv-head", "list-per-q-head"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seqs{c[0]}-q{c[2]}-kv{c[3]}-d{c[4]}-p{c[5]}")
def test_kernel_matches_reference(case, dtype, per_q_head):
    seq_lens, q_lens, hq, hkv, d, page = case
    seed = 100 * CASES.index(case) + 10 * DTYPES.index(dtype) + per_q_head
    b = random_paged_batch(seq_lens, q_lens, hq, hkv, d, page, dtype=dtype, seed=seed)
    lists = hq if per_q_head else hkv
    indptr, idx = _csr(_random_columns(seq_lens, lists, 0.3, seed))
    q, kv, bt, qsl, lens = _on(b)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), device=DEVICE)
    got, got_lse = column_attention(q, kv, bt, qsl, lens, indptr, idx, d**-0.5, max(q_lens), out=out, lse=lse,
                                    lists_per_q_head=per_q_head)
    assert got is out and not got.isnan().any() and not got_lse.isnan().any(), "unwritten rows"
    ref, ref_lse = column_attention_ref(b.q, b.kv, b.block_table, b.query_start_loc, b.seq_lens, indptr.cpu(),
                                        idx.cpu(), d**-0.5, lists_per_q_head=per_q_head)
    err = (got.cpu().float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)
    assert err < _tol(dtype), f"relative error {err:.2e}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(got_lse.cpu())), "rows that see no column differ"
    assert (got.cpu()[~finite] == 0).all()
    torch.testing.assert_close(got_lse.cpu()[finite], ref_lse[finite], atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seqs{c[0]}-q{c[2]}-kv{c[3]}")
def test_blocks_and_columns_merged_equal_attention_over_their_union(case):
    """The block pass over random kept pages, this pass over random columns outside them, merged by their
    log-sum-exps: exact attention over the union of the two key sets (a masked dense reference)."""
    seq_lens, q_lens, hq, hkv, d, page = case
    seed = 7 + CASES.index(case)
    b = random_paged_batch(seq_lens, q_lens, hq, hkv, d, page, dtype=torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed)
    pages, outside = [], []
    for n in seq_lens:
        for _ in range(hkv):
            kept = torch.nonzero(torch.rand(-(-n // page), generator=g) < 0.4).flatten()
            pages.append(kept)
            in_pages = torch.zeros(n, dtype=torch.bool)
            for p in kept.tolist():
                in_pages[p * page:(p + 1) * page] = True
            outside.append(in_pages)
    cols = _random_columns(seq_lens, hkv, 0.25, seed, exclude=outside)
    p_indptr, p_idx = _csr(pages, "cpu")
    c_indptr, c_idx = _csr(cols)
    q, kv, bt, qsl, lens = _on(b)
    o_blk, lse_blk = sparse_paged_attention_ref(b.q, b.kv, b.block_table, b.query_start_loc, b.seq_lens, p_indptr,
                                                p_idx.long(), d**-0.5, return_lse=True)
    o_col, lse_col = column_attention(q, kv, bt, qsl, lens, c_indptr, c_idx, d**-0.5, max(q_lens), **_poisoned(q))
    merged, _ = merge_attention(o_blk.to(DEVICE), lse_blk.to(DEVICE), o_col, lse_col)
    group = hq // hkv
    for s, n in enumerate(seq_lens):
        q0, q1 = int(b.query_start_loc[s]), int(b.query_start_loc[s + 1])
        for h in range(hkv):
            keys = torch.zeros(n, dtype=torch.bool)
            for p in pages[s * hkv + h].tolist():
                keys[p * page:(p + 1) * page] = True
            keys[cols[s * hkv + h].cpu()] = True
            q_pos = torch.arange(n - (q1 - q0), n)
            seen = keys[None, :] & (torch.arange(n)[None, :] <= q_pos[:, None])
            k, v = b.keys[s][:, h].float(), b.values[s][:, h].float()
            logits = torch.einsum("tgd,kd->tgk", b.q[q0:q1, h * group:(h + 1) * group].float(), k) * d**-0.5
            logits = logits.masked_fill(~seen[:, None, :], float("-inf"))
            want = torch.nan_to_num(torch.einsum("tgk,kd->tgd", logits.softmax(-1), v))  # rows seeing nothing: 0
            torch.testing.assert_close(merged[q0:q1, h * group:(h + 1) * group].cpu().float(), want, **FP32_TOL)


def test_every_column_kept_is_dense_attention():
    """Density 1.0: every token a kept column (no block) is plain causal attention."""
    seq_lens, q_lens, hq, hkv, d, page = (150,), (41,), 8, 2, 32, 16
    b = random_paged_batch(seq_lens, q_lens, hq, hkv, d, page, dtype=torch.float32, seed=3)
    indptr, idx = _csr([torch.arange(150)] * hkv)
    q, kv, bt, qsl, lens = _on(b)
    got, _ = column_attention(q, kv, bt, qsl, lens, indptr, idx, d**-0.5, 41, **_poisoned(q))
    want = dense_causal_attention_ref(b.q, b.keys[0], b.values[0], d**-0.5)
    torch.testing.assert_close(got.cpu(), want, **FP32_TOL)


def test_fp8_cache_matches_reference():
    """An fp8 cache (e4m3, per-tensor scales): pages converted to the queries' type, scales folded in."""
    seq_lens, q_lens, hq, hkv, d, page = (200, 90), (64, 90), 4, 1, 64, 32
    b = random_paged_batch(seq_lens, q_lens, hq, hkv, d, page, dtype=torch.float16, seed=9)
    kv8 = to_fp8(b.kv)
    indptr, idx = _csr(_random_columns(seq_lens, hkv, 0.3, 9))
    q, kv, bt, qsl, lens = _on(b, kv8)
    got, got_lse = column_attention(q, kv, bt, qsl, lens, indptr, idx, d**-0.5, 90, **_poisoned(q))
    ref, ref_lse = column_attention_ref(b.q, kv8, b.block_table, b.query_start_loc, b.seq_lens, indptr.cpu(),
                                        idx.cpu(), d**-0.5)
    assert not got.isnan().any() and not got_lse.isnan().any()
    assert (got.cpu().float() - ref.float()).norm() / ref.float().norm() < 5e-3
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(got_lse.cpu()), finite)  # the same rows see a column
    torch.testing.assert_close(got_lse.cpu()[finite], ref_lse[finite], atol=5e-3, rtol=5e-3)


def test_merge_with_an_empty_side():
    """A side that saw no key (lse -inf) gives the other side's output; both empty: 0 and -inf."""
    out_a, out_b = torch.randn(5, 3, 8), torch.randn(5, 3, 8)
    lse_a = torch.randn(5, 3)
    lse_b = torch.full((5, 3), float("-inf"))
    merged, lse = merge_attention(out_a, lse_a, torch.zeros_like(out_b), lse_b)
    torch.testing.assert_close(merged, out_a)
    torch.testing.assert_close(lse, lse_a)
    merged, lse = merge_attention(torch.zeros(2, 1, 4), torch.full((2, 1), float("-inf")), torch.zeros(2, 1, 4),
                                  torch.full((2, 1), float("-inf")))
    assert (merged == 0).all() and torch.isinf(lse).all()


def test_union_tiles_share_a_block_table_row():
    """Two union tiles of one chunk as segments over one block-table row (`block_table_rows`), each with its
    own column lists: as the reference, and as each tile run as a sequence of its own."""
    hq, hkv, d, page, ctx = 4, 2, 32, 16, 64
    b = random_paged_batch((ctx + 64,), (64,), hq, hkv, d, page, dtype=torch.float32, seed=13)
    qsl = torch.tensor([0, 32, 64], dtype=torch.int32)
    lens = torch.tensor([ctx + 32, ctx + 64])
    rows = torch.zeros(2, dtype=torch.int32)
    cols = _random_columns([ctx + 32, ctx + 64], hkv, 0.3, 13)
    indptr, idx = _csr(cols)
    got, lse = column_attention(b.q.to(DEVICE), _on(b)[1], b.block_table.to(DEVICE), qsl.to(DEVICE), lens.to(DEVICE),
                                indptr, idx, d**-0.5, 32, block_table_rows=rows.to(DEVICE), **_poisoned(b.q))
    ref, ref_lse = column_attention_ref(b.q, b.kv, b.block_table, qsl, lens, indptr.cpu(), idx.cpu(), d**-0.5,
                                        block_table_rows=rows)
    torch.testing.assert_close(got.cpu(), ref, **FP32_TOL)
    for t in range(2):  # each tile alone: the same rows
        i, p = _csr(cols[t * hkv:(t + 1) * hkv], "cpu")
        alone, _ = column_attention_ref(b.q[32 * t:32 * (t + 1)], b.kv, b.block_table, torch.tensor([0, 32]),
                                        lens[t:t + 1], i, p, d**-0.5)
        torch.testing.assert_close(ref[32 * t:32 * (t + 1)], alone)


def test_shared_padded_lists_with_blocks_excluded():
    """Segments sharing one padded list per (list) through (starts, ends), entries past a segment's length
    skipped, and the columns a segment's kept blocks hold skipped (`exclude`): as the reference, and the
    merge with the block pass is attention over the union."""
    hq, hkv, d, page, ctx = 4, 2, 32, 16, 64
    n = ctx + 64
    b = random_paged_batch((n,), (64,), hq, hkv, d, page, dtype=torch.float32, seed=17)
    qsl, lens, rows = torch.tensor([0, 32, 64], dtype=torch.int32), torch.tensor([ctx + 32, n]), torch.zeros(2).int()
    g = torch.Generator().manual_seed(17)
    width = 40
    table = torch.full((hkv, width), 10**6, dtype=torch.int32)  # padding: past every length
    for h in range(hkv):
        cols = torch.randperm(n, generator=g)[:30].sort().values
        table[h, :30] = cols.int()
    starts = (torch.arange(hkv) * width).repeat(2).int()
    ends = starts + width
    blocks = -(-n // page)
    pages = [torch.nonzero(torch.rand(blocks, generator=g) < 0.4).flatten() for _ in range(2 * hkv)]
    for t in range(2):  # each tile keeps its own diagonal pages
        for h in range(hkv):
            own = torch.arange((ctx + 32 * t) // page, -(-(ctx + 32 * (t + 1)) // page))
            pages[t * hkv + h] = torch.unique(torch.cat([pages[t * hkv + h], own]))
    exclude = torch.zeros(hkv, 2, blocks, dtype=torch.uint8)
    for t in range(2):
        for h in range(hkv):
            exclude[h, t, pages[t * hkv + h]] = 1
    args = (b.block_table, qsl, lens, (starts, ends), table.flatten(), d**-0.5)
    got, got_lse = column_attention(b.q.to(DEVICE), _on(b)[1], *(a.to(DEVICE) if torch.is_tensor(a) else
                                    tuple(x.to(DEVICE) for x in a) if isinstance(a, tuple) else a for a in args),
                                    32, block_table_rows=rows.to(DEVICE), exclude=exclude.to(DEVICE),
                                    exclude_block=page, **_poisoned(b.q))
    ref, ref_lse = column_attention_ref(b.q, b.kv, *args, block_table_rows=rows, exclude=exclude, exclude_block=page)
    torch.testing.assert_close(got.cpu(), ref, **FP32_TOL)
    p_indptr, p_idx = _csr(pages, "cpu")
    o_blk, lse_blk = sparse_paged_attention_ref(b.q, b.kv, b.block_table.repeat(2, 1), qsl, lens, p_indptr,
                                                p_idx.long(), d**-0.5, return_lse=True)  # (a row per tile)
    merged, _ = merge_attention(o_blk, lse_blk, got.cpu(), got_lse.cpu())
    for t in range(2):
        q0, q1, seq = 32 * t, 32 * (t + 1), int(lens[t])
        for h in range(hkv):
            keys = torch.zeros(seq, dtype=torch.bool)
            for p in pages[t * hkv + h].tolist():
                keys[p * page:(p + 1) * page] = True
            cols = table[h][table[h] < seq].long()
            keys[cols] = True
            q_pos = torch.arange(seq - 32, seq)
            seen = keys[None, :] & (torch.arange(seq)[None, :] <= q_pos[:, None])
            group = hq // hkv
            logits = torch.einsum("tgd,kd->tgk", b.q[q0:q1, h * group:(h + 1) * group].float(),
                                  b.keys[0][:seq, h].float()) * d**-0.5
            want = torch.nan_to_num(torch.einsum("tgk,kd->tgd", logits.masked_fill(~seen[:, None], float("-inf"))
                                                 .softmax(-1), b.values[0][:seq, h].float()))
            torch.testing.assert_close(merged[q0:q1, h * group:(h + 1) * group], want, **FP32_TOL)


def test_merge_in_the_kernel_equals_merge_attention():
    """merge=True: the kernel joins the block pass's output and lse in place, as `merge_attention` does."""
    seq_lens, q_lens, hq, hkv, d, page = (200, 90), (64, 90), 4, 1, 64, 32
    b = random_paged_batch(seq_lens, q_lens, hq, hkv, d, page, dtype=torch.float16, seed=21)
    indptr, idx = _csr(_random_columns(seq_lens, hkv, 0.2, 21))
    q, kv, bt, qsl, lens = _on(b)
    o_blk = torch.randn(q.shape, device=DEVICE).to(q.dtype)
    lse_blk = torch.randn(q.shape[:2], device=DEVICE)
    lse_blk[::7] = float("-inf")  # rows whose block pass saw nothing
    o_blk[::7] = 0
    o_col, lse_col = column_attention(q, kv, bt, qsl, lens, indptr, idx, d**-0.5, 90)
    want, want_lse = merge_attention(o_blk, lse_blk, o_col, lse_col)
    out, lse = o_blk.clone(), lse_blk.clone()
    column_attention(q, kv, bt, qsl, lens, indptr, idx, d**-0.5, 90, out=out, lse=lse, merge=True)
    torch.testing.assert_close(out.float(), want.float(), atol=3e-3, rtol=3e-3)
    finite = torch.isfinite(want_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], want_lse[finite], atol=1e-4, rtol=1e-4)
