"""The Triton sparse paged attention kernel against the torch reference.

On a CPU host the kernel runs under Triton's interpreter at tiny shapes (fp16/fp32: the
interpreter's bf16 dot is wrong); on a GPU the same tests run compiled, bf16 included.
Inputs: random varlen chunks with context, shuffled pages, GQA/MQA/MHA, random sorted page lists.
"""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.paged import random_paged_batch
from vllm_sparse.kernels.paged import PagedKV
from vllm_sparse.kernels.reference import sparse_paged_attention_ref
from vllm_sparse.kernels.sparse_attention import sparse_paged_attention

GPU = torch.cuda.is_available()


def _flash_kernels() -> list[str]:
    """The FlashAttention versions vLLM's build runs on this machine's GPU (FA3: Hopper; FA2: capability 8.0 up)."""
    if not GPU:
        return []
    from vllm_sparse.backend.kernel_choice import flash_attention_available

    return [k for k, v in (("fa3", 3), ("fa2", 2)) if flash_attention_available(torch.device("cuda"), v)]


FLASH = _flash_kernels()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if GPU else [])

CASES = [
    # seq_lens, q_lens, q_heads, kv_heads, head_dim, page
    ((70, 150, 9), (70, 41, 1), 8, 2, 32, 16),  # whole prompt, chunk with context, a single row
    ((200,), (64,), 4, 1, 64, 32),  # MQA (gemma-3), page-aligned chunk
    ((90, 33), (90, 33), 6, 6, 16, 16),  # MHA
    ((130,), (50,), 6, 2, 16, 64),  # group of 3, page larger than a key step
    ((150, 61), (120, 61), 14, 2, 16, 16),  # group of 7 (Qwen2.5-7B's): tiles of (token, head) pairs cut tokens
    ((96, 40), (40, 40), 8, 2, 128, 16),  # Llama's head dim
    ((72,), (30,), 2, 1, 256, 16),  # Gemma's: the kernel's wide-head tile settings
]


def _csr(lists, device):
    indptr = torch.tensor([0] + [len(x) for x in lists]).cumsum(0).to(torch.int32)
    idx = torch.cat([torch.as_tensor(x, dtype=torch.int32) for x in lists])
    return indptr.to(device), idx.to(device)


def _random_lists(seq_lens, hkv, page, density, seed):
    g = torch.Generator().manual_seed(seed)
    lists = []
    for length in seq_lens:
        n_pages = (length + page - 1) // page
        for _ in range(hkv):
            keep = torch.rand(n_pages, generator=g) < density
            if density >= 1.0:
                keep[:] = True
            lists.append(torch.nonzero(keep).flatten())
    return lists


def _flash_layout(kv: PagedKV) -> PagedKV:
    """The same pages in vLLM 0.26's FlashAttention layout: K|V packed, stored [pages, page, heads, 2D]."""
    packed = torch.cat([kv.key, kv.value], dim=-1).transpose(1, 2).contiguous().transpose(1, 2)
    return PagedKV.from_flash_cache(packed)


def _run_both(b, lists, scale, dtype, flash, per_q_head=False):
    indptr, idx = _csr(lists, DEVICE)
    q = b.q.to(DEVICE)
    kv = PagedKV(b.kv.key.to(DEVICE), b.kv.value.to(DEVICE))
    kv = _flash_layout(kv) if flash else kv
    bt, qsl, lens = b.block_table.to(DEVICE), b.query_start_loc.to(DEVICE, torch.int32), b.seq_lens.to(DEVICE)
    out = torch.full_like(q, float("nan"))  # poison: every row must be written
    got, lse = sparse_paged_attention(q, kv, bt, qsl, lens, indptr, idx, scale, out=out, return_lse=True,
                                      lists_per_q_head=per_q_head)
    assert got is out
    ref, ref_lse = sparse_paged_attention_ref(q.cpu(), PagedKV(b.kv.key, b.kv.value), b.block_table,
                                              b.query_start_loc, b.seq_lens, indptr.cpu(), idx.cpu().long(),
                                              scale, return_lse=True, lists_per_q_head=per_q_head)
    return got.cpu(), lse.cpu(), ref, ref_lse


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|got - ref| / |ref|; 0 when both are all zeros (every page list empty, so no key is visible)."""
    return (got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)


def _tol(dtype):
    return {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]  # fp32 dot may run as tf32


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [1.0, 0.4])
def test_kernel_matches_reference(case, dtype, density):
    seq_lens, q_lens, hq, hkv, d, page = case
    seed = 1000 * CASES.index(case) + 10 * DTYPES.index(dtype) + int(density * 10)  # each case its own data
    b = random_paged_batch(seq_lens, q_lens, hq, hkv, d, page, dtype=dtype, seed=seed)
    lists = _random_lists(seq_lens, hkv, page, density, seed)
    got, lse, ref, ref_lse = _run_both(b, lists, d**-0.5, dtype, flash=False)
    assert not got.isnan().any(), f"unwritten rows (seed {seed})"
    err = _rel_err(got, ref)
    assert err < _tol(dtype), f"relative error {err:.2e} (seed {seed})"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse)), f"rows with no visible key differ (seed {seed})"
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("per_q_head", [False, True])
def test_small_shared_memory_tiles_match_reference(monkeypatch, per_q_head):
    """GPUs with 99 KiB of shared memory per block (sm_86, sm_89) take smaller tiles at head_dim 256 (the Hopper ones
    do not fit there: `tests/gpu_compile.py`): those tiles, several per chunk, give the reference's output."""
    from vllm_sparse.kernels import sparse_attention

    dev = torch.device(DEVICE)
    monkeypatch.setattr(sparse_attention, "needs_small_tiles", lambda head_dim, device: False)
    assert sparse_attention._tile_config(4, 256, dev)[:2] == (32, 32)  # (Hopper's: 128 packed rows)
    monkeypatch.setattr(sparse_attention, "needs_small_tiles", lambda head_dim, device: head_dim > 128)
    assert sparse_attention._tile_config(4, 256, dev) == (16, 32, 8, 2)  # 64 packed rows
    seq_lens, q_lens, hq, hkv, d, page = (150, 40), (100, 40), 8, 2, 256, 16
    b = random_paged_batch(seq_lens, q_lens, hq, hkv, d, page, dtype=torch.float16, seed=71 + per_q_head)
    lists = _random_lists(seq_lens, hq if per_q_head else hkv, page, 0.5, 71)
    got, lse, ref, ref_lse = _run_both(b, lists, d**-0.5, torch.float16, flash=True, per_q_head=per_q_head)
    assert not got.isnan().any()
    assert _rel_err(got, ref) < _tol(torch.float16)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("case", [c for c in CASES if c[2] != c[3]])  # the cases whose KV heads serve a group
@pytest.mark.parametrize("density", [1.0, 0.4])
def test_kernel_with_a_page_list_per_q_head_matches_reference(case, density):
    """`union_heads: false`: each q head attends to its own pages, not its group's union. The reference's
    per-q-head mode is itself checked against each head run alone, as a one-head group over its KV head."""
    seq_lens, q_lens, hq, hkv, d, page = case
    seed = 5000 + 100 * CASES.index(case) + int(density * 10)
    b = random_paged_batch(seq_lens, q_lens, hq, hkv, d, page, dtype=torch.float16, seed=seed)
    lists = _random_lists(seq_lens, hq, page, density, seed)  # a list per (sequence, q head)
    got, lse, ref, ref_lse = _run_both(b, lists, d**-0.5, torch.float16, flash=True, per_q_head=True)
    assert not got.isnan().any(), f"unwritten rows (seed {seed})"
    assert _rel_err(got, ref) < _tol(torch.float16), f"seed {seed}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=5e-3, rtol=5e-3)
    for h in range(hq):
        g = h // (hq // hkv)
        indptr, idx = _csr([lists[s * hq + h] for s in range(len(seq_lens))], "cpu")
        alone = sparse_paged_attention_ref(b.q[:, h:h + 1], PagedKV(b.kv.key[:, g:g + 1], b.kv.value[:, g:g + 1]),
                                           b.block_table, b.query_start_loc, b.seq_lens, indptr, idx.long(), d**-0.5)
        torch.testing.assert_close(ref[:, h:h + 1], alone)


def test_kernel_reads_flash_layout_and_skips_rows_without_keys():
    """FlashAttention's packed cache read in place; a row whose selected pages all lie ahead of it
    gets output 0 and lse -inf, as the reference."""
    seq_lens, q_lens, hq, hkv, d, page = (96, 40), (96, 8), 4, 2, 32, 16
    b = random_paged_batch(seq_lens, q_lens, hq, hkv, d, page, dtype=torch.float16, seed=3)
    lists = [[0, 3, 5], [5], [1, 2], [0, 1, 2]]  # seq 0 head 1: only page 5, unseen by rows < 80
    got, lse, ref, ref_lse = _run_both(b, lists, d**-0.5, torch.float16, flash=True)
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), ref.float(), atol=5e-3, rtol=5e-3)
    assert torch.isinf(lse[:80, 2:]).all() and (got[:80, 2:] == 0).all()
    assert torch.isfinite(lse[80:96, 2:]).all()


def test_segments_share_a_block_table_row():
    """Union per query tile: each tile of one chunk is a segment with its own page list."""
    hq, hkv, d, page, ctx = 4, 1, 32, 16, 64
    b = random_paged_batch((ctx + 64,), (64,), hq, hkv, d, page, dtype=torch.float16, seed=5)
    tiles = [(0, 32, [0, 4, 5]), (32, 64, [1, 4, 5, 6, 7])]  # (q start, q end, pages)
    qsl = torch.tensor([0, 32, 64], dtype=torch.int32)
    lens = torch.tensor([ctx + 32, ctx + 64])
    indptr, idx = _csr([t[2] for t in tiles], DEVICE)
    out = torch.full_like(b.q, float("nan")).to(DEVICE)
    sparse_paged_attention(b.q.to(DEVICE), PagedKV(b.kv.key.to(DEVICE), b.kv.value.to(DEVICE)),
                           b.block_table.to(DEVICE), qsl.to(DEVICE), lens.to(DEVICE), indptr, idx, d**-0.5,
                           out=out, block_table_rows=torch.zeros(2, dtype=torch.int32, device=DEVICE),
                           max_query_len=32)
    for (t0, t1, pages), seq_len in zip(tiles, lens.tolist()):
        ref = sparse_paged_attention_ref(b.q[t0:t1], b.kv, b.block_table, torch.tensor([0, t1 - t0]),
                                         torch.tensor([seq_len]), torch.tensor([0, len(pages)]),
                                         torch.tensor(pages), d**-0.5)
        torch.testing.assert_close(out[t0:t1].cpu().float(), ref.float(), atol=5e-3, rtol=5e-3)


def test_bad_shapes_are_named():
    b = random_paged_batch((32,), (32,), 6, 4, 32, 16)
    with pytest.raises(ValueError, match="q heads"):
        sparse_paged_attention(b.q, b.kv, b.block_table, b.query_start_loc, b.seq_lens,
                               torch.tensor([0, 2, 4, 6, 8]), torch.zeros(8, dtype=torch.int32), 1.0)


def _tail_complete_lists(seq_lens, q_lens, hkv, page, density, seed):
    """Random lists that keep every page from each chunk's first query on (as selection does)."""
    g = torch.Generator().manual_seed(seed)
    lists = []
    for length, ql in zip(seq_lens, q_lens):
        n_pages, first = (length + page - 1) // page, (length - ql) // page
        for _ in range(hkv):
            keep = torch.rand(n_pages, generator=g) < density
            keep[first:] = True
            lists.append(torch.nonzero(keep).flatten())
    return lists


def _bottom_right_causal(q, k, v, scale, used):
    """FlashAttention's causal rule on a compacted key list: query j of n sees keys <= j + used - n."""
    n = q.shape[0]
    logits = torch.einsum("tgd,kd->gtk", q.double(), k[:used].double()) * scale
    ok = torch.arange(used)[None, :] <= torch.arange(n)[:, None] + used - n
    return torch.einsum("gtk,kd->tgd", logits.masked_fill(~ok, float("-inf")).softmax(-1), v[:used].double())


@pytest.mark.parametrize("per_q_head", [False, True])
@pytest.mark.parametrize("case", CASES[:2])
def test_compacted_tables_with_bottom_right_causal_equal_sparse_attention(case, per_q_head):
    """CPU twin of the FA3 path: compacted block tables + FA's causal rule give the reference's output,
    with a list per KV head (its q heads read the union) or per q head (each its own)."""
    from vllm_sparse.kernels.flash_compact import compact_block_tables

    seq_lens, q_lens, hq, hkv, d, page = case
    n_lists = hq if per_q_head else hkv
    pack, group = hq // n_lists, hq // hkv
    b = random_paged_batch(seq_lens, q_lens, hq, hkv, d, page, seed=11)
    lists = _tail_complete_lists(seq_lens, q_lens, n_lists, page, 0.4, seed=12)
    indptr, idx = _csr(lists, "cpu")
    rows = torch.arange(len(seq_lens), dtype=torch.int32)
    max_pages = max((s + page - 1) // page for s in seq_lens)
    tables, counts = compact_block_tables(b.block_table, rows, indptr, idx, n_lists, max_pages)
    ref = sparse_paged_attention_ref(b.q, b.kv, b.block_table, b.query_start_loc, b.seq_lens, indptr, idx.long(),
                                     d**-0.5, lists_per_q_head=per_q_head)
    for s, length in enumerate(seq_lens):
        q0, q1 = int(b.query_start_loc[s]), int(b.query_start_loc[s + 1])
        last = length - ((length - 1) // page) * page
        for i in range(n_lists):
            n, h, heads = int(counts[i, s]), i * pack // group, slice(i * pack, (i + 1) * pack)
            pages = tables[i, s, :n].long()
            assert torch.equal(pages, b.block_table[s, lists[s * n_lists + i]].long())
            k = b.kv.key[pages, h].reshape(-1, d)
            v = b.kv.value[pages, h].reshape(-1, d)
            got = _bottom_right_causal(b.q[q0:q1, heads], k, v, d**-0.5, (n - 1) * page + last)
            torch.testing.assert_close(got.float(), ref[q0:q1, heads], atol=1e-4, rtol=1e-4)


def _flash_attn_varlen_twin(calls):
    """A torch stand-in for `vllm.vllm_flash_attn.flash_attn_varlen_func` over a paged cache (exact attention with
    FlashAttention's semantics: block table, seqused_k, bottom-right causal, GQA, written into `out`), which also
    refuses what vLLM 0.26's FA2 / FA3 refuse or copy: a last dim that is not contiguous (the wrapper would copy
    q/k/v, so a result meant for a view would miss it), pages not a multiple of 16 tokens, non-int32 or
    non-contiguous tables and lengths, and for FA2 a split count above 1 or fp8 descales."""

    def varlen(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, seqused_k=None, softmax_scale=None,
               causal=False, block_table=None, out=None, fa_version=2, num_splits=0, q_descale=None,
               k_descale=None, v_descale=None, **rest):
        assert not rest, rest
        assert causal and out is not None and block_table is not None and seqused_k is not None
        assert all(t.stride(-1) == 1 for t in (q, k, v, out)), "FlashAttention copies a non-contiguous last dim"
        assert k.shape[1] % 16 == 0, "FlashAttention's paged KV takes pages of a multiple of 16 tokens"
        assert block_table.dtype == seqused_k.dtype == cu_seqlens_q.dtype == torch.int32
        assert block_table.stride(-1) == 1 and seqused_k.is_contiguous() and cu_seqlens_q.is_contiguous()
        assert q.shape[1] % k.shape[2] == 0
        # The sequences' query starts: from 0 to every query row, never decreasing (sequences may be empty), as
        # FlashAttention indexes q, out and its softmax statistics by them.
        starts = cu_seqlens_q.tolist()
        assert starts[0] == 0 and starts[-1] == q.shape[0] == out.shape[0], (starts[0], starts[-1], q.shape, out.shape)
        assert all(a <= b for a, b in zip(starts, starts[1:])), "cu_seqlens_q decreases"
        if fa_version == 2:
            assert num_splits <= 1 and q_descale is None and k_descale is None and v_descale is None
        for descale in (q_descale, k_descale, v_descale):  # FA3: one per (sequence, KV head), as vLLM passes them
            assert descale is None or descale.shape == (cu_seqlens_q.shape[0] - 1, k.shape[2])
        calls.append((fa_version, num_splits, q.shape[1], k.shape[2]))
        page, group = k.shape[1], q.shape[1] // k.shape[2]
        for b in range(cu_seqlens_q.shape[0] - 1):
            q0, q1, used = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(seqused_k[b])
            assert q1 - q0 <= max_seqlen_q and used <= max_seqlen_k
            pages = block_table[b, :-(-used // page)].long()
            keys, values = k[pages].flatten(0, 1)[:used], v[pages].flatten(0, 1)[:used]  # [used, kv_heads, D]
            for h in range(q.shape[1]):
                got = _bottom_right_causal(q[q0:q1, h:h + 1], keys[:, h // group], values[:, h // group],
                                           softmax_scale, used)
                out[q0:q1, h] = got[:, 0].to(out.dtype)
        return out

    return varlen


def _compacted(case, per_q_head: bool, seed: int, device="cpu", **batch):
    """A random paged batch of `case` with tail-complete page lists (40% of the rest kept, a list per KV head or per
    q head), compacted into FlashAttention's tables on `device`: (batch, lists, indptr, indices, tables, counts,
    used tokens, query_start_loc and seq_lens as int32 on `device`)."""
    from vllm_sparse.kernels.flash_compact import compact_block_tables, used_tokens

    seq_lens, q_lens, hq, hkv, d, page = case
    n_lists = hq if per_q_head else hkv
    b = random_paged_batch(seq_lens, q_lens, hq, hkv, d, page, seed=seed, **batch)
    indptr, idx = _csr(_tail_complete_lists(seq_lens, q_lens, n_lists, page, 0.4, seed=seed + 1), device)
    bt = b.block_table.to(device)
    rows = torch.arange(len(seq_lens), dtype=torch.int32, device=device)
    tables, counts = compact_block_tables(bt, rows, indptr, idx, n_lists, bt.shape[1])
    seq_lens_t = b.seq_lens.to(device, torch.int32)
    return (b, n_lists, indptr, idx, tables, counts, used_tokens(counts, seq_lens_t, page),
            b.query_start_loc.to(device, torch.int32), seq_lens_t)


def _flash_stand_in(monkeypatch) -> list:
    """`vllm.vllm_flash_attn` as the torch stand-in above, on an H100's 132 SMs: -> the list its calls go to."""
    import sys
    import types

    from vllm_sparse.kernels import flash_compact

    calls = []
    module = types.ModuleType("vllm.vllm_flash_attn")
    module.flash_attn_varlen_func = _flash_attn_varlen_twin(calls)
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn", module)
    monkeypatch.setattr(flash_compact, "num_sms", lambda device: 132)
    return calls


@pytest.mark.parametrize("version", [3, 2], ids=["fa3", "fa2"])
@pytest.mark.parametrize("per_q_head", [False, True])
@pytest.mark.parametrize("case", [c for c in CASES if c[5] % 16 == 0])
def test_flash_attention_call_over_compacted_tables_cpu_twin(monkeypatch, case, per_q_head, version):
    """CPU twin of `sparse_attention_flash`: its calls, a page list at a time over strided views of the q heads,
    K/V pages and output, give the reference's output when FlashAttention does what its API says (the stand-in
    above, which also refuses arguments FA2 or FA3 would refuse); one call per list, FA2 with no split above 1."""
    from vllm_sparse.kernels import flash_compact

    calls = _flash_stand_in(monkeypatch)
    seq_lens, q_lens, hq, hkv, d, page = case
    b, n_lists, indptr, idx, tables, counts, used, qsl, seq_lens_t = _compacted(case, per_q_head, seed=15)
    packed = _flash_layout(PagedKV(b.kv.key, b.kv.value))
    k_cache, v_cache = packed.key.transpose(1, 2), packed.value.transpose(1, 2)  # [pages, page, heads, D] views
    out = torch.full_like(b.q, float("nan"))
    flash_compact.sparse_attention_flash(b.q, k_cache, v_cache, tables, used, qsl, seq_lens_t, max(q_lens), d**-0.5,
                                         out, fa_version=version)
    ref = sparse_paged_attention_ref(b.q, b.kv, b.block_table, b.query_start_loc, b.seq_lens, indptr, idx.long(),
                                     d**-0.5, lists_per_q_head=per_q_head)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref.to(out.dtype), atol=1e-4, rtol=1e-4)
    assert len(calls) == n_lists and {c[0] for c in calls} == {version}
    assert all(c[2] == hq // n_lists and c[3] == 1 for c in calls)  # a list's q heads over its one KV head
    if version == 2:
        assert {c[1] for c in calls} == {0}  # as vLLM's own FA2 prefill call
        one = torch.ones(1)
        with pytest.raises(ValueError, match="FA2 reads no fp8 cache"):
            flash_compact.sparse_attention_flash(b.q, k_cache, v_cache, tables, used, qsl, seq_lens_t, max(q_lens),
                                                 d**-0.5, out, fa_version=2, descales=(one, one, one))


def _packed_inputs(b, lists, tables, counts, k_cache, device):
    """The packed call's tables (heads-as-pages ids) and query starts, as `tile_tables` writes them for a
    `ListPacking`, from a call's per-list tables; and a workspace reservation that holds its queries and output."""
    from vllm_sparse.kernels.flash_compact import packed_bytes

    hkv = b.kv.key.shape[1]
    ratio = k_cache.stride(0) // k_cache.stride(2)  # (`ListPacking.page_ratio`)
    live = torch.arange(tables.shape[-1], device=device) < counts[..., None]
    heads = (torch.arange(lists, device=device) // (lists // hkv))[:, None, None]
    packed = torch.where(live, tables * ratio + heads.to(torch.int32), 0).to(torch.int32)
    tokens, qsl = b.q.shape[0], b.query_start_loc.to(device, torch.int32)
    starts = (qsl[:-1][None, :] + tokens * torch.arange(lists, device=device)[:, None]).flatten()
    packed_qsl = torch.cat([starts, torch.tensor([lists * tokens], device=device)]).to(torch.int32)
    room = torch.empty(packed_bytes(b.q, b.q) // 4 + 64, dtype=torch.float32, device=device)
    return packed, packed_qsl, room


@pytest.mark.parametrize("layout", ["vllm-0.26", "split"])
@pytest.mark.parametrize("version", [3, 2], ids=["fa3", "fa2"])
@pytest.mark.parametrize("per_q_head", [False, True])
@pytest.mark.parametrize("case", [c for c in CASES if c[5] % 16 == 0])
def test_packed_flash_attention_call_cpu_twin(monkeypatch, case, per_q_head, version, layout):
    """CPU twin of `sparse_attention_flash` with every list in one call (`ListPacking`): the queries copied
    head-major, the cache seen through `heads_as_pages` (each (page, KV head) a page of one head), a sequence per
    (list, segment): FlashAttention as its API says (the stand-in above, which also checks FA3's descale shapes)
    gives the reference's output, in one call of a list's q heads over one KV head, for vLLM 0.26's K|V-packed
    cache and the older split one (values at an offset), queries that are a view of the qkv projection and an
    output that is a slice of the batch's; the poisoned output rows are all written."""
    from vllm_sparse.kernels import flash_compact
    from vllm_sparse.kernels.workspace import WORKSPACE

    calls = _flash_stand_in(monkeypatch)
    seq_lens, q_lens, hq, hkv, d, page = case
    b, n_lists, indptr, idx, tables, counts, used, qsl, seq_lens_t = _compacted(case, per_q_head, seed=25)
    if layout == "split":  # [2, pages, page, kv heads, D]
        both = torch.stack([b.kv.key.transpose(1, 2), b.kv.value.transpose(1, 2)])
        k_cache, v_cache = both[0], both[1]
    else:
        packed_kv = _flash_layout(PagedKV(b.kv.key, b.kv.value))
        k_cache, v_cache = packed_kv.key.transpose(1, 2), packed_kv.value.transpose(1, 2)
    tables, packed_qsl, room = _packed_inputs(b, n_lists, tables, counts, k_cache, "cpu")
    monkeypatch.setattr(WORKSPACE, "_buffers", {torch.device("cpu"): room})
    tokens = b.q.shape[0]
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d)
    q = qkv[:, :hq * d].view(tokens, hq, d)  # (vLLM's queries: a view of the projection)
    q.copy_(b.q)
    batch_out = torch.full((tokens + 3, hq, d), float("nan"))
    out = batch_out[3:]
    one = torch.ones(())  # (FA3 reads fp8 with descales: the stand-in checks their shapes and ignores them)
    flash_compact.sparse_attention_flash(q, k_cache, v_cache, tables, used, qsl, seq_lens_t, max(q_lens), d**-0.5,
                                         out, fa_version=version, packed_qsl=packed_qsl,
                                         descales=(one, one, one) if version == 3 else None)
    ref = sparse_paged_attention_ref(b.q, b.kv, b.block_table, b.query_start_loc, b.seq_lens, indptr, idx.long(),
                                     d**-0.5, lists_per_q_head=per_q_head)
    assert not out.isnan().any() and batch_out[:3].isnan().all()
    torch.testing.assert_close(out, ref.to(out.dtype), atol=1e-4, rtol=1e-4)
    assert len(calls) == 1 and calls[0][2] == hq // n_lists and calls[0][3] == 1


def test_lists_pack_only_where_a_list_call_leaves_the_gpu_idle_and_the_workspace_holds_them(monkeypatch):
    """The host rule for one call over every list (`list_packing`): on with the setting, more than one list, a list's
    call under the SM count in query tiles, the head-major copies within the reserved workspace, keys and values
    of one layout whose page stride is whole head strides, page ids within int32, pages of at most 32 tokens."""
    from vllm_sparse.kernels import flash_compact
    from vllm_sparse.kernels.workspace import WORKSPACE

    monkeypatch.setattr(flash_compact, "num_sms", lambda device: 132)
    monkeypatch.setattr(flash_compact, "PACK_LISTS", True)
    q = torch.empty(2048, 32, 128, dtype=torch.bfloat16)  # a 2K-token follow-up, Llama's heads
    # vLLM 0.26's cache: [pages, kv heads, page, 2 x head dim], stored [pages, page, kv heads, 2 x head dim]
    cache = torch.empty(100, 16, 8, 256, dtype=torch.bfloat16).permute(0, 2, 1, 3)
    kv = cache[..., :128].transpose(1, 2), cache[..., 128:].transpose(1, 2)  # [pages, page, kv, D], as handed over
    bounds = torch.arange(0, 2049, 128, dtype=torch.int32)  # 16 tiles of one 128-token block
    monkeypatch.setattr(WORKSPACE, "_buffers", {torch.device("cpu"): torch.empty(2**25)})  # 128 MiB

    def packing(lists=8, pack=4, qsl=bounds, queries=q, caches=kv):
        return flash_compact.list_packing(lists, pack, qsl, 128, queries, q, *caches)

    got = packing()
    assert got is not None and got.page_ratio == 16 * 8 and got.lists_per_kv_head == 1  # page x heads
    assert got.q_tokens == 2048 and got.query_start_loc is bounds
    assert packing(32, 1).lists_per_kv_head == 4  # a list per q head
    older = torch.empty(2, 100, 16, 8, 128, dtype=torch.bfloat16)  # vLLM's older layout: [2, pages, page, kv, D]
    assert packing(caches=(older[0], older[1])).page_ratio == 16 * 8
    assert packing(1, 32) is None  # (one list: one call already)
    long_bounds = torch.arange(0, 16385, 128, dtype=torch.int32)  # 16K tokens: 512 tiles a list fill the GPU
    assert packing(qsl=long_bounds, queries=torch.empty(16384, 32, 128)) is None
    assert packing(caches=(kv[0], older[1])) is None  # keys and values of two layouts: one view cannot serve both
    odd = torch.empty(100 * (16 * 8 * 256 + 8)).as_strided((100, 16, 8, 128), (16 * 8 * 256 + 8, 8 * 256, 256, 1))
    assert packing(caches=(odd, odd)) is None  # (a page stride of 8 elements more: no whole number of heads)
    huge = torch.empty(2**24, 16, 8, 256, device="meta").transpose(1, 2)[..., :128].transpose(1, 2)  # 2^31 ids
    assert packing(caches=(huge, huge)) is None
    pages128 = torch.empty(13, 128, 8, 128, dtype=torch.bfloat16)  # FA3 may read pages of 128 tokens by TMA
    assert packing(caches=(pages128, pages128)) is None
    fp8 = torch.empty(100, 16, 8, 256, dtype=torch.float8_e4m3fn).permute(0, 2, 1, 3)  # (packed on an H100 since)
    assert packing(caches=(fp8[..., :128].transpose(1, 2), fp8[..., 128:].transpose(1, 2))).page_ratio == 16 * 8
    monkeypatch.setattr(WORKSPACE, "_buffers", {torch.device("cpu"): torch.empty(2**22)})  # 16 MiB: too small
    assert packing() is None
    monkeypatch.setattr(WORKSPACE, "_buffers", {})  # no reservation: never allocates for it
    assert packing() is None
    monkeypatch.setattr(WORKSPACE, "_buffers", {torch.device("cpu"): torch.empty(2**25)})
    monkeypatch.setattr(flash_compact, "PACK_LISTS", False)
    assert packing() is None


def test_the_setting_reserves_room_for_a_short_chunks_packed_copies(monkeypatch):
    """With `VLLM_SPARSE_FA_PACK_LISTS=1` the engine reserves a 4K-token chunk's packed queries and output even for
    a plan whose estimators use no workspace (pooled keys), so the setting is honoured, not a silent no-op."""
    from vllm_sparse.backend.reserve import reserve_estimator_workspace
    from vllm_sparse.config.loader import parse_config
    from vllm_sparse.config.plan import ModelShape, resolve_plan
    from vllm_sparse.kernels import flash_compact
    from vllm_sparse.kernels.workspace import WORKSPACE

    llama = ModelShape("llama-3.1-8b", ("LlamaForCausalLM",), 32, 32, 8)
    cfg = parse_config({"version": 1, "models": [{"match": {"architectures": ["LlamaForCausalLM"]}, "layers": [
        {"layers": "all", "estimator": {"name": "pooled"}, "budget": {"keep_ratio": 0.1}}]}]}, "pooled.yaml")
    plan = resolve_plan(cfg, llama, "pooled.yaml")
    cpu = torch.device("cpu")
    monkeypatch.setattr(WORKSPACE, "_buffers", {})
    assert reserve_estimator_workspace(plan, 32, 16384, 131072, cpu, 8, 128) == 0  # (pooled keys: no workspace)
    held = reserve_estimator_workspace(plan, 32, 16384, 131072, cpu, 8, 128, packed_lists_itemsize=2)
    q = torch.empty(4096, 32, 128, dtype=torch.bfloat16)
    assert held >= flash_compact.packed_bytes(q, q)
    monkeypatch.setattr(flash_compact, "num_sms", lambda device: 132)
    monkeypatch.setattr(flash_compact, "PACK_LISTS", True)
    cache = torch.empty(100, 16, 8, 128, dtype=torch.bfloat16)
    bounds = torch.arange(0, 4097, 128, dtype=torch.int32)  # 32 tiles of 128 tokens x 4 q heads: 128 < 132 SMs
    assert flash_compact.list_packing(8, 4, bounds, 128, q, q, cache, cache) is not None


@pytest.mark.gpu
@pytest.mark.skipif(not FLASH, reason="vLLM's FlashAttention (FA3 on Hopper, FA2 from compute capability 8.0)")
@pytest.mark.parametrize("packed", [False, True], ids=["call-per-list", "packed"])
@pytest.mark.parametrize("version", [3, 2], ids=["fa3", "fa2"])
@pytest.mark.parametrize("splits", [0, 1], ids=["fa-splits", "one-split"])
@pytest.mark.parametrize("per_q_head", [False, True])
@pytest.mark.parametrize("case", [c for c in CASES if c[4] >= 32 and c[5] % 16 == 0])
def test_flash_attention_over_compacted_tables_matches_reference(monkeypatch, case, per_q_head, splits, version,
                                                                 packed):
    """FlashAttention over compacted tables, a call per list or (`packed`) one call for every list through the
    heads-as-pages view of the cache and head-major queries in the workspace, against the torch reference."""
    from vllm_sparse.kernels.flash_compact import sparse_attention_flash
    from vllm_sparse.kernels.workspace import WORKSPACE

    if f"fa{version}" not in FLASH:
        pytest.skip(f"vLLM's FlashAttention runs no FA{version} on this GPU")
    # Both of the rule's answers (`fa3_num_splits`): the kernel's split-KV heuristic (small calls), one split (large).
    seq_lens, q_lens, hq, hkv, d, page = case
    b, n_lists, indptr, idx, tables, counts, used, qsl, seq_lens_dev = _compacted(case, per_q_head, 13, DEVICE,
                                                                                   dtype=torch.bfloat16)
    packed_kv = _flash_layout(PagedKV(b.kv.key.to(DEVICE), b.kv.value.to(DEVICE)))
    k_cache, v_cache = packed_kv.key.transpose(1, 2), packed_kv.value.transpose(1, 2)  # [pages, page, heads, D]
    packed_qsl = None
    if packed:
        tables, packed_qsl, room = _packed_inputs(b, n_lists, tables, counts, k_cache, DEVICE)
        monkeypatch.setattr(WORKSPACE, "_buffers", {torch.device(DEVICE, torch.cuda.current_device()): room})
    out = torch.full_like(b.q, float("nan")).to(DEVICE)
    sparse_attention_flash(b.q.to(DEVICE), k_cache, v_cache, tables, used, qsl, seq_lens_dev, max(q_lens), d**-0.5,
                           out, num_splits=splits, fa_version=version, packed_qsl=packed_qsl)
    ref = sparse_paged_attention_ref(b.q, b.kv, b.block_table, b.query_start_loc, b.seq_lens, indptr.cpu(),
                                     idx.cpu().long(), d**-0.5, lists_per_q_head=per_q_head)
    assert not out.isnan().any()
    err = _rel_err(out.cpu(), ref)
    assert err < 2e-2


def test_fa3_splits_kv_only_while_its_query_tiles_leave_the_gpu_idle(monkeypatch):
    """The host rule for FA3's num_splits: one split once a call's query tiles (segments x 128-row tiles
    of the packed q heads) fill the SMs; below that, FA3's own split-KV heuristic (0)."""
    from vllm_sparse.kernels import flash_compact

    monkeypatch.setattr(flash_compact, "num_sms", lambda device: 132)
    cpu = torch.device("cpu")
    assert flash_compact.fa3_num_splits(128, 128, 4, cpu) == 1  # a 16K-token chunk in 128-token tiles, GQA 4
    assert flash_compact.fa3_num_splits(33, 128, 4, cpu) == 1  # 132 tiles: just full
    assert flash_compact.fa3_num_splits(32, 128, 4, cpu) == 0  # a 4K-token follow-up: FA3 may split
    assert flash_compact.fa3_num_splits(128, 128, 1, cpu) == 0  # a list per q head: 128 tiles
    assert flash_compact.fa3_num_splits(1, 16384, 4, cpu) == 1  # one segment of 16K queries


@pytest.mark.parametrize("share", ["head", "group"])
@pytest.mark.parametrize("union_tile", [None, 1, 2])
@pytest.mark.parametrize("kernel", ["triton"] + FLASH + [f"{k}-packed" for k in FLASH])
def test_sparse_path_kernel_equals_reference_path(monkeypatch, union_tile, kernel, share):
    """The backend's sparse step through the kernel (one launch per chunk, unions per tile built on
    the device) gives what the reference path gives, for chunks with and without context: with a
    per-head plan on one KV head and the other dense, and with one group-shared plan on every head
    (selected once per KV head). The kernel path takes the builder's per-step tile geometry. `-packed`:
    FlashAttention in one call for every page list (`VLLM_SPARSE_FA_PACK_LISTS`), through a reserved workspace."""
    from vllm_sparse.backend import attend
    from vllm_sparse.backend.batch import SparseChunk, tile_geometry
    from vllm_sparse.backend.instrumented import attend_observed
    from vllm_sparse.config.plan import HeadPlan
    from vllm_sparse.estimators.registry import get_estimator
    from vllm_sparse.kernels import flash_compact
    from vllm_sparse.kernels.workspace import WORKSPACE
    from vllm_sparse.selection.budget import Budget

    packed, pack = [], kernel.endswith("-packed")
    monkeypatch.setattr(flash_compact, "PACK_LISTS", pack)  # (on by default: the other variants call per list)
    if pack:
        kernel = kernel.removesuffix("-packed")
        monkeypatch.setattr(WORKSPACE, "_buffers", {})
        WORKSPACE.reserve(1 << 20, torch.device(DEVICE))

        def counted(*args):
            packing = flash_compact.list_packing(*args)
            packed.append(packing is not None)
            return packing

        monkeypatch.setattr(attend, "list_packing", counted)

    dtype = torch.float16
    b = random_paged_batch((300, 200), (120, 200), 8, 2, 32, 16, dtype=dtype, seed=21)
    pooled = get_estimator("pooled")
    plan = HeadPlan("pooled", pooled.params(share=share), Budget(keep_ratio=0.3, sink_blocks=1, local_blocks=1))
    plans = [plan] * 4 + [None] * 4 if share == "head" else [plan] * 8  # per head: KV head 1 dense
    chunks = tuple(SparseChunk(s, int(b.query_start_loc[s]), int(b.query_start_loc[s + 1]),
                               int(b.seq_lens[s]) - int(b.query_start_loc[s + 1] - b.query_start_loc[s]))
                   for s in range(2))
    ref = torch.full_like(b.q, float("nan"))
    attend_observed(b.q, ref, b.kv, b.block_table, chunks, plans, 32, d_scale := 32**-0.5,
                    union_tile=union_tile, kernel="reference")
    q, kv = b.q.to(DEVICE), PagedKV(b.kv.key.to(DEVICE), b.kv.value.to(DEVICE))
    kv = _flash_layout(kv) if kernel in FLASH else kv
    got = torch.full_like(q, float("nan"))
    tiles = tile_geometry(list(chunks), 32, union_tile, torch.device(DEVICE))  # as the builder gives them
    attend_observed(q, got, kv, b.block_table.to(DEVICE), chunks, plans, 32, d_scale, union_tile=union_tile,
                    kernel=kernel, tiles=tiles)
    assert not got.isnan().any()
    torch.testing.assert_close(got.cpu().float(), ref.float(), atol=5e-3, rtol=5e-3)
    assert packed == ([True, True] if pack else [])  # (packed: both chunks in one call each)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU twin: Triton runs kernels on CPU tensors only in its "
                    "interpreter, not selected on a GPU host (test_sparse_path_kernel_equals_reference_path there)")
@pytest.mark.parametrize("pack", [False, True], ids=["call-per-list", "packed"])
@pytest.mark.parametrize("union_heads", [True, False])
@pytest.mark.parametrize("union_tile", [None, 1])
@pytest.mark.parametrize("estimator", ["pooled", "antidiagonal-int8"])
def test_sparse_path_through_flash_attention_equals_reference_path_cpu_twin(monkeypatch, union_tile, union_heads, pack,
                                                                           estimator):
    """CPU twin of the backend's FA3 path (`attend_chunk_with_kernel`: tables from `_tile_tables_kernel` in Triton's
    interpreter, FlashAttention as its API says): the reference path's output, with a call per page list, or one
    call for all of them where `VLLM_SPARSE_FA_PACK_LISTS` packs them (then one call per chunk). The int8
    antidiagonal estimator keeps its rows and key columns in the workspace the packed call then takes over (vLLM's
    memory profile counted key columns for one KV head, so both heads' go into the reservation's room, checked), the
    reservation poisoned first: a packed copy that read what the estimator left, or an estimator buffer the copies
    overwrote while still needed, shows."""
    from vllm_sparse.backend.batch import SparseChunk, tile_geometry
    from vllm_sparse.backend.instrumented import attend_observed
    from vllm_sparse.config.plan import HeadPlan
    from vllm_sparse.estimators.registry import get_estimator
    from vllm_sparse.kernels import flash_compact
    from vllm_sparse.kernels.workspace import WORKSPACE
    from vllm_sparse.selection.budget import Budget

    calls = _flash_stand_in(monkeypatch)
    monkeypatch.setattr(flash_compact, "PACK_LISTS", pack)
    monkeypatch.setattr(WORKSPACE, "_buffers", {torch.device("cpu"): torch.full((2**18,), float("nan"))})  # 1 MiB
    monkeypatch.setattr(WORKSPACE, "_key_tokens", {torch.device("cpu"): 1})  # (one KV head's columns counted)
    tails = []
    original_tail = WORKSPACE.tail
    monkeypatch.setattr(WORKSPACE, "tail", lambda offset, numel, device: tails.append(offset) or
                        original_tail(offset, numel, device))
    b = random_paged_batch((300, 200), (120, 200), 8, 2, 32, 16, dtype=torch.float16, seed=29)
    name, params = ("pooled", {}) if estimator == "pooled" else ("antidiagonal", {"stride": 8, "bits": 8})
    plans = [HeadPlan(name, get_estimator(name).params(**params), Budget(keep_ratio=0.3, sink_blocks=1,
                                                                          local_blocks=1))] * 8
    chunks = tuple(SparseChunk(s, int(b.query_start_loc[s]), int(b.query_start_loc[s + 1]),
                               int(b.seq_lens[s]) - int(b.query_start_loc[s + 1] - b.query_start_loc[s]))
                   for s in range(2))
    ref = torch.full_like(b.q, float("nan"))
    attend_observed(b.q, ref, b.kv, b.block_table, chunks, plans, 32, 32**-0.5, union_tile=union_tile,
                    kernel="reference", union_heads=union_heads)
    got = torch.full_like(b.q, float("nan"))
    tiles = tile_geometry(list(chunks), 32, union_tile, torch.device("cpu"))
    attend_observed(b.q, got, _flash_layout(b.kv), b.block_table, chunks, plans, 32, 32**-0.5, union_tile=union_tile,
                    kernel="fa3", tiles=tiles, union_heads=union_heads)
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), ref.float(), atol=5e-3, rtol=5e-3)
    lists = 2 if union_heads else 8
    assert len(calls) == (2 if pack else 2 * lists)  # two chunks
    assert any(t > 0 for t in tails) == (estimator == "antidiagonal-int8")  # key columns after the rows' scores
    assert tails.count(0) == (2 if pack else 0)  # the packed copies, from the reservation's start
    assert {c[2] for c in calls} == {8 // lists} and {c[3] for c in calls} == {1}


@pytest.mark.parametrize("union_tile", [None, 1])
@pytest.mark.parametrize("kernel", ["reference", "triton"] + FLASH)
def test_union_heads_false_attends_each_q_head_to_its_own_blocks(kernel, union_tile):
    """`union_heads: false` through the backend's sparse step: every q head's output is what that head
    gets when it is alone in its group (a one-head union is its own blocks), on each path; and it is not
    the group union's output (the heads keep different blocks, so reading the union would differ)."""
    from vllm_sparse.backend.batch import SparseChunk
    from vllm_sparse.backend.instrumented import attend_observed
    from vllm_sparse.config.plan import HeadPlan
    from vllm_sparse.estimators.registry import get_estimator
    from vllm_sparse.selection.budget import Budget

    hq, hkv, d, bs = 8, 2, 32, 32
    b = random_paged_batch((300, 200), (120, 200), hq, hkv, d, 16, dtype=torch.float16, seed=23)
    plan = HeadPlan("pooled", get_estimator("pooled").params(), Budget(keep_ratio=0.3, sink_blocks=1, local_blocks=1))
    chunks = tuple(SparseChunk(s, int(b.query_start_loc[s]), int(b.query_start_loc[s + 1]),
                               int(b.seq_lens[s]) - int(b.query_start_loc[s + 1] - b.query_start_loc[s]))
                   for s in range(2))
    q, kv, bt = b.q.to(DEVICE), PagedKV(b.kv.key.to(DEVICE), b.kv.value.to(DEVICE)), b.block_table.to(DEVICE)
    kv = _flash_layout(kv) if kernel in FLASH else kv

    def run(q, kv, heads, union_heads):
        out = torch.full_like(q, float("nan"))
        attend_observed(q, out, kv, bt, chunks, [plan] * heads, bs, d**-0.5, union_tile=union_tile,
                        union_heads=union_heads, kernel=kernel)
        assert not out.isnan().any()
        return out.cpu().float()

    own = run(q, kv, hq, False)
    for h in range(hq):
        g = h // (hq // hkv)
        alone = run(q[:, h:h + 1].contiguous(), PagedKV(kv.key[:, g:g + 1], kv.value[:, g:g + 1]), 1, True)
        torch.testing.assert_close(own[:, h:h + 1], alone, atol=5e-3, rtol=5e-3)
    union = run(q, kv, hq, True)
    assert (own - union).abs().amax() > 1e-2


@pytest.mark.parametrize("kernel", ["triton"] + FLASH)
def test_kernel_path_counts_the_same_densities_as_reference_path(kernel):
    """`vllm-sparse eval` reads kept densities from the kernel path on GPUs: same counts as the reference."""
    from vllm_sparse.backend.batch import SparseChunk
    from vllm_sparse.backend.instrumented import attend_observed
    from vllm_sparse.config.plan import HeadPlan
    from vllm_sparse.estimators.registry import get_estimator
    from vllm_sparse.selection.budget import Budget
    from vllm_sparse.selection.stats import STATS

    b = random_paged_batch((400,), (300,), 8, 2, 32, 16, dtype=torch.float16, seed=5)
    est = get_estimator("pooled")
    plans = [HeadPlan("pooled", est.params(), Budget(keep_ratio=0.3, sink_blocks=1, local_blocks=1))] * 8
    chunk = (SparseChunk(0, 0, 300, 100),)
    q, kv = b.q.to(DEVICE), PagedKV(b.kv.key.to(DEVICE), b.kv.value.to(DEVICE))
    kv = _flash_layout(kv) if kernel in FLASH else kv
    counts, audits = {}, {}
    runs = {"reference": (b.q, b.kv, b.block_table, False), kernel: (q, kv, b.block_table.to(DEVICE), False),
            # With the audit on, the kernel's device takes the reference path (and must run there).
            "audit": (q, kv, b.block_table.to(DEVICE), True)}
    try:
        for name, (qq, kk, bt, audit) in runs.items():
            STATS.enable(audit=audit)
            STATS.reset()
            out = torch.full_like(qq, float("nan"))
            attend_observed(qq, out, kk, bt, chunk, plans, 32, 32**-0.5, union_tile=2, layer=7,
                            kernel="reference" if name == "reference" else kernel)
            assert not out.isnan().any()
            st = STATS.snapshot()[7]
            counts[name] = (st.unions, st.requested_kept, st.requested_total, st.union_kept, st.union_total)
            audits[name] = st.audit
    finally:
        STATS.enabled = STATS.audit = False
        STATS.reset()
    assert counts["reference"][0] == 5  # 300 queries after 100 of context: query blocks 3..12, tiles of 2
    assert 0 < counts["reference"][3] < counts["reference"][4]
    assert counts[kernel] == counts["reference"] == counts["audit"]
    assert audits["reference"] == audits[kernel] == [] and len(audits["audit"]) == 5
    assert all(0 < rel < 1 and 0 < mass < 1 for rel, mass in audits["audit"])


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="CUDA graphs need a CUDA GPU")
def test_sparse_step_captures_in_a_cuda_graph_and_replays_on_new_inputs():
    """Estimation, selection, tables and attention have no host sync and shapes fixed by the chunk's,
    so a whole sparse step captures in a CUDA graph; a replay on new queries and keys gives what an
    eager step gives on them."""
    from vllm_sparse.backend.batch import SparseChunk
    from vllm_sparse.backend.instrumented import attend_observed
    from vllm_sparse.backend.kernel_choice import selected_kernel
    from vllm_sparse.config.plan import HeadPlan
    from vllm_sparse.estimators.registry import get_estimator
    from vllm_sparse.selection.budget import Budget

    kernel = selected_kernel(torch.device(DEVICE))
    b = random_paged_batch((600,), (256,), 8, 2, 64, 16, dtype=torch.bfloat16, seed=31)
    pooled = get_estimator("pooled")
    plans = [HeadPlan("pooled", pooled.params.model_validate({"share": "group"}),
                      Budget(keep_ratio=0.3, sink_blocks=1, local_blocks=1))] * 8
    chunk = (SparseChunk(0, 0, 256, 344),)
    kv = _flash_layout(PagedKV(b.kv.key.to(DEVICE), b.kv.value.to(DEVICE)))
    bt = b.block_table.to(DEVICE)
    q = b.q.to(DEVICE)

    def step(out):
        attend_observed(q, out, kv, bt, chunk, plans, 32, 64**-0.5, union_tile=1, kernel=kernel)

    out = torch.full_like(q, float("nan"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(out)  # warm-up off the capture stream, as torch asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(out)
    g = torch.Generator(device=DEVICE).manual_seed(32)
    q.copy_(torch.randn(q.shape, generator=g, device=DEVICE))
    kv.key.copy_(torch.randn(kv.key.shape, generator=g, device=DEVICE))
    kv.value.copy_(torch.randn(kv.value.shape, generator=g, device=DEVICE))
    out.fill_(float("nan"))
    graph.replay()
    eager = torch.full_like(q, float("nan"))
    step(eager)
    assert not out.isnan().any()
    torch.testing.assert_close(out, eager)


def test_kernel_setting_is_checked_at_start(monkeypatch):
    """VLLM_SPARSE_KERNEL: a value that is not a kernel, or a kernel the device cannot run, is an error
    naming the setting (the metadata builder checks it when the engine starts)."""
    from vllm_sparse.backend.kernel_choice import check_kernel_choice

    cpu = torch.device("cpu")
    monkeypatch.delenv("VLLM_SPARSE_KERNEL", raising=False)
    assert check_kernel_choice(cpu) == "reference"
    monkeypatch.setenv("VLLM_SPARSE_KERNEL", "flash")
    with pytest.raises(ValueError, match="VLLM_SPARSE_KERNEL='flash' is not a kernel; allowed: fa3, fa2, triton, ref"):
        check_kernel_choice(cpu)
    monkeypatch.setenv("VLLM_SPARSE_KERNEL", "triton")
    with pytest.raises(ValueError, match="VLLM_SPARSE_KERNEL=triton needs a CUDA device"):
        check_kernel_choice(cpu)
    monkeypatch.setenv("VLLM_SPARSE_KERNEL", "fa2")
    with pytest.raises(ValueError, match="VLLM_SPARSE_KERNEL=fa2 needs a CUDA device"):
        check_kernel_choice(cpu)
    monkeypatch.setenv("VLLM_SPARSE_KERNEL", "reference")
    assert check_kernel_choice(cpu) == "reference"


@pytest.mark.parametrize("versions, capability, expected", [
    ({2, 3}, (9, 0), "fa3"),  # Hopper: FA3, as vLLM's FlashAttention backend
    ({2}, (8, 0), "triton"),  # A100 (and sm_86 / sm_89): the Triton kernel; FA2 opt-in until run on a GPU
    ({2}, (10, 0), "triton"),  # Blackwell
    (set(), (8, 9), "triton"),  # no FlashAttention build
])
def test_the_kernel_follows_vllms_flash_attention_build(monkeypatch, versions, capability, expected):
    """By device, sparse chunks run FA3 where vLLM's build has it, else the Triton kernel; `fa2` runs where vLLM's
    build has FA2, and a forced version the GPU lacks stops the engine at start, naming the setting and the GPU."""
    from vllm_sparse.backend import kernel_choice

    monkeypatch.delenv("VLLM_SPARSE_KERNEL", raising=False)
    monkeypatch.setattr(kernel_choice, "flash_attention_available", lambda device, version: version in versions)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU sm_{capability[0]}{capability[1]}")
    cuda = torch.device("cuda", 0)
    assert kernel_choice.selected_kernel(cuda) == expected
    for forced in ("fa3", "fa2"):
        monkeypatch.setenv("VLLM_SPARSE_KERNEL", forced)
        if int(forced[2]) in versions:
            assert kernel_choice.check_kernel_choice(cuda) == forced
        else:
            with pytest.raises(ValueError, match=f"VLLM_SPARSE_KERNEL={forced} needs .* GPU sm_{capability[0]}"):
                kernel_choice.check_kernel_choice(cuda)


@pytest.mark.parametrize("case", CASES[:2] + CASES[3:], ids=lambda c: f"seqs{c[0]}-q{c[2]}-kv{c[3]}-d{c[4]}-p{c[5]}")
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if GPU else []), ids=str)
def test_fp8_cache_matches_the_dequantized_reference(case, dtype):
    """An fp8 KV cache (e4m3, per-tensor scales as vLLM's): the kernel converts pages to the queries' type and
    applies the scales, and matches exact attention over the dequantized cache."""
    from tests.fixtures.paged import dequantized, to_fp8

    seq_lens, q_lens, hq, hkv, d, page = case
    b = random_paged_batch(seq_lens, q_lens, hq, hkv, d, page, dtype=dtype, seed=11)
    kv8 = to_fp8(b.kv)
    assert kv8.quantized and kv8.k_scale != 1.0 and kv8.v_scale != kv8.k_scale
    indptr, idx = _csr(_random_lists(seq_lens, hkv, page, 0.6, seed=5), DEVICE)
    q = b.q.to(DEVICE)
    bt, qsl, lens = b.block_table.to(DEVICE), b.query_start_loc.to(DEVICE, torch.int32), b.seq_lens.to(DEVICE)
    out = torch.full_like(q, float("nan"))
    got, lse = sparse_paged_attention(q, PagedKV(kv8.key.to(DEVICE), kv8.value.to(DEVICE), kv8.k_scale, kv8.v_scale),
                                      bt, qsl, lens, indptr, idx, d**-0.5, out=out, return_lse=True)
    args = (b.block_table, b.query_start_loc, b.seq_lens, indptr.cpu(), idx.cpu().long(), d**-0.5)
    ref, ref_lse = sparse_paged_attention_ref(q.cpu(), dequantized(kv8), *args, return_lse=True)
    ref8 = sparse_paged_attention_ref(q.cpu(), kv8, *args)  # the reference reads fp8 pages itself
    assert torch.equal(ref8, ref)
    assert _rel_err(got.cpu(), ref) < _tol(dtype)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse.cpu()))
    assert torch.allclose(lse.cpu()[finite], ref_lse[finite], atol=1e-2)
