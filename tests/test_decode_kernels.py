"""Sparse decode: page summaries, Quest selection, TidalDecode's exact scores and split-K attention
against torch references.

Random varlen rows over a shuffled paged cache, GQA, decode rows mixed with rows the path must leave
alone (a prefill row, a row under dense_below, a padded row). On a CPU host the Triton kernels run in
the interpreter at tiny shapes (fp16/fp32: the interpreter's bf16 dot is wrong); on a GPU compiled,
in bf16 too, at a 128K context.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vllm_sparse.config.plan import DecodeHeadPlan
from vllm_sparse.decode import select as select_mod
from vllm_sparse.decode.attention import decode_attention, reference_decode_attention, split_slots
from vllm_sparse.decode.select import (
    candidate_width,
    quest_select,
    reference_block_scores,
    reference_select,
    select_top_blocks,
)
from vllm_sparse.decode.step import DecodeHeads, row_blocks
from vllm_sparse.decode.summaries import PageSummaries, reference_summary
from vllm_sparse.decode.tidal import reference_exact_block_scores
from vllm_sparse.kernels.paged import PagedKV

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if GPU else [torch.float16, torch.float32]
SEEDS = range(6) if GPU else range(2)


class Case:
    """A paged cache written through `PageSummaries.update` in random chunks, and a decode batch."""

    def __init__(self, seed, dtype, seq_lens, q_lens, kv_heads=2, group=3, d=32, page=16, block=32,
                 plans=None, dense_below=64):
        g = torch.Generator().manual_seed(seed)
        self.dtype, self.page, self.block, self.dense_below = dtype, page, block, dense_below
        self.seq_lens, self.q_lens = seq_lens, q_lens
        rows = len(seq_lens)
        pages_per = [-(-s // page) for s in seq_lens]
        num_pages = sum(pages_per) + 5
        perm = torch.randperm(num_pages, generator=g)
        width = max(pages_per) + 2
        self.block_table = torch.full((rows, width), 10**6, dtype=torch.int32)  # poison beyond the row's pages
        at = 0
        for r, n in enumerate(pages_per):
            self.block_table[r, :n] = perm[at:at + n].int()
            at += n
        cache = torch.randn(2, num_pages, page, kv_heads, d, generator=g).to(dtype)
        self.paged = PagedKV(key=cache[0].transpose(1, 2), value=cache[1].transpose(1, 2))
        self.summ = PageSummaries(num_pages, kv_heads, d, page, dtype, torch.device("cpu"))
        # Poison: the summaries start as garbage, as after a previous owner of the pages.
        self.summ.mins.copy_(torch.randn(self.summ.mins.shape, generator=g) * 9)
        self.summ.maxs.copy_(torch.randn(self.summ.maxs.shape, generator=g) * 9)
        for r, s in enumerate(seq_lens):  # write each row's keys in random chunks, with padded slots
            t = 0
            while t < s:
                n = int(torch.randint(1, 40, (1,), generator=g))
                pos = torch.arange(t, min(s, t + n))
                slots = self.block_table[r, pos // page].long() * page + pos % page
                slots = torch.cat([slots, torch.full((2,), -1)])
                keys = self.paged.key[slots.clamp(min=0) // page, :, slots.clamp(min=0) % page]
                self.summ.update(keys, slots)
                t += n
        self.q_heads = kv_heads * group
        qsl = torch.zeros(rows + 1, dtype=torch.int32)
        qsl[1:] = torch.tensor(q_lens).cumsum(0)
        self.qsl = qsl
        self.query = torch.randn(int(qsl[-1]) + 1, self.q_heads, d, generator=g).to(dtype)
        plans = plans or [DecodeHeadPlan("quest", 2, 1, 1)] * kv_heads
        self.plans = tuple(plans)
        self.heads = DecodeHeads.build(self.plans, "cpu")

    def sparse_rows(self):
        return [r for r, (s, q) in enumerate(zip(self.seq_lens, self.q_lens)) if q == 1 and s >= self.dense_below]

    def to(self, device):
        for name in ("block_table", "qsl", "query"):
            setattr(self, name, getattr(self, name).to(device))
        self.paged = dataclasses.replace(self.paged, key=self.paged.key.to(device), value=self.paged.value.to(device))
        self.summ.mins, self.summ.maxs = self.summ.mins.to(device), self.summ.maxs.to(device)
        self.heads = DecodeHeads.build(self.plans, device)
        return self

    def reference(self, r):
        s = self.seq_lens[r]
        pages = self.block_table[r, : -(-s // self.page)].long().cpu()
        mins, maxs = self.summ.mins.cpu()[pages], self.summ.maxs.cpu()[pages]
        tok = int(self.qsl[r])
        h = DecodeHeads.build(self.plans, "cpu")
        scores = reference_block_scores(self.query[tok].cpu(), mins, maxs, s, self.page, self.block, h.sink, h.local)
        return scores, reference_select(scores, h.kept)


def _seq_case(seed, dtype, **kw):
    g = torch.Generator().manual_seed(100 + seed)
    lens = [int(x) for x in torch.randint(64, 300, (4,), generator=g)]
    # rows: decode, decode, a prefill chunk (q_len 5), a decode under dense_below, a padded row (q_len 0)
    return Case(seed, dtype, lens + [40, 50], [1, 1, 5, 1, 0, 1][:4] + [1, 0], **kw)


@pytest.mark.parametrize("seed", SEEDS)
def test_page_summaries_follow_every_write(seed):
    case = _seq_case(seed, torch.float32)
    for r, s in enumerate(case.seq_lens):
        pages = case.block_table[r, : -(-s // case.page)].long()
        keys, _ = case.paged.gather(pages, s)
        want_lo, want_hi = reference_summary(keys, s, case.page)
        assert torch.equal(case.summ.mins[pages].float(), want_lo)
        assert torch.equal(case.summ.maxs[pages].float(), want_hi)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_summary_update_kernel_matches_reference(seed, dtype):
    """Steps as vLLM writes them: runs of consecutive slots per request (a prefill chunk starting at any
    offset of a page, a decode token), requests' pages shuffled, padded slots (-1) at the end."""
    g = torch.Generator().manual_seed(seed)
    pages, page, heads, d = 40, 16, 3, 32
    ref = PageSummaries(pages, heads, d, page, dtype, torch.device(DEVICE))
    ref.mins.copy_(torch.randn(ref.mins.shape, generator=g).to(dtype))  # garbage of earlier owners
    ref.maxs.copy_(torch.randn(ref.maxs.shape, generator=g).to(dtype))
    got = PageSummaries(pages, heads, d, page, dtype, torch.device(DEVICE))
    got.mins.copy_(ref.mins)
    got.maxs.copy_(ref.maxs)
    perm = torch.randperm(pages, generator=g)
    owners = [perm[i * 10:(i + 1) * 10] for i in range(4)]  # 4 requests, 10 pages each
    filled = [0, 0, 0, 0]
    for _ in range(6):  # steps
        slots = []
        for r in range(4):
            n = int(torch.randint(1, 50, (1,), generator=g)) if torch.rand(1, generator=g) < 0.6 else 1
            n = min(n, 10 * page - filled[r])
            pos = torch.arange(filled[r], filled[r] + n)
            slots.append(owners[r][pos // page] * page + pos % page)
            filled[r] += n
        slots = torch.cat(slots + [torch.full((3,), -1)]).to(DEVICE)
        key = torch.randn(len(slots), heads, d, generator=g).to(dtype).to(DEVICE)
        ref.update_reference(key, slots)
        got.update_kernel(key, slots)
        assert torch.equal(got.mins[:pages], ref.mins[:pages]) and torch.equal(got.maxs[:pages], ref.maxs[:pages])


def test_page_summaries_restart_on_a_reused_page():
    """A freed page written again from its first slot forgets its previous owner's keys."""
    s = PageSummaries(4, 1, 8, 16, torch.float32, torch.device("cpu"))
    s.update(torch.full((16, 1, 8), 5.0), torch.arange(16, 32))  # page 1 full of 5s
    s.update(torch.full((3, 1, 8), -1.0), torch.arange(16, 19))  # new owner: slots 0-2 of page 1
    assert s.mins[1].max() == -1 and s.maxs[1].max() == -1
    s.update(torch.full((1, 1, 8), 2.0), torch.tensor([19]))  # its next decode token widens it
    assert s.mins[1].max() == -1 and s.maxs[1].max() == 2


@pytest.fixture(params=[None, 4], ids=["one-segment", "segments-of-4"])
def segment(request, monkeypatch):
    """The selection's first stage over segments of this many blocks (None: the shipped size, one
    segment at these tiny shapes), so the two-stage path runs at shapes the interpreter can take."""
    if request.param:
        monkeypatch.setattr(select_mod, "SELECT_SEGMENT", request.param)
        monkeypatch.setattr(select_mod, "SELECT_CHUNK", 4)  # the second stage's candidates: several chunks
    return request.param


def _candidates(rows, kv, nbp, kept):
    return torch.full((2, rows, kv, candidate_width(nbp, kept)), -7, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_quest_selection_kernel_matches_reference(seed, dtype, segment):
    plans = [DecodeHeadPlan("quest", 2, 1, 1), DecodeHeadPlan("quest", 3, 0, 2)]
    case = _seq_case(seed, dtype, plans=plans).to(DEVICE)
    rows = len(case.seq_lens)
    nbp = row_blocks(case.block_table.shape[1] * case.page, case.block)
    scores = torch.full((rows, 2, nbp), float("nan"), device=DEVICE)
    cand = _candidates(rows, 2, nbp, 8)
    selected = torch.full((rows, 2, 8), -7, dtype=torch.int32, device=DEVICE)
    counts = torch.full((rows, 2), -7, dtype=torch.int32, device=DEVICE)
    seq = torch.tensor(case.seq_lens, dtype=torch.int32, device=DEVICE)
    quest_select(case.query, case.summ.mins, case.summ.maxs, case.block_table, case.qsl, seq, case.heads, scores,
                 cand, selected, counts, page_size=case.page, block_tokens=case.block, dense_below=case.dense_below)
    for r in range(rows):
        if r not in case.sparse_rows():
            assert (counts[r] == -7).all() and (selected[r] == -7).all(), f"row {r} is not a sparse decode row"
            continue
        want_scores, _ = case.reference(r)
        nb = want_scores.shape[1]
        got_scores = scores[r, :, :nb].cpu()
        assert torch.allclose(got_scores, want_scores, rtol=1e-4, atol=1e-3)
        # selection from the kernel's own scores (no rounding-order ties): exactly the reference's
        for h, want in enumerate(reference_select(got_scores, case.heads.kept.cpu())):
            assert int(counts[r, h]) == len(want)
            assert torch.equal(selected[r, h, : len(want)].cpu().long(), want)


@pytest.mark.parametrize("seed", SEEDS)
def test_block_selection_breaks_ties_toward_later_blocks(seed, segment):
    """Scores with many exact ties (and +inf for forced blocks): the kernel keeps exactly the
    reference's blocks, the later of equal blocks first."""
    g = torch.Generator().manual_seed(seed)
    rows, kv, nbp = 3, 2, 64
    seq = torch.tensor([1000, 600, 900], dtype=torch.int32)  # 63, 38 and 57 blocks of 16 tokens
    scores = (torch.randn(rows, kv, nbp, generator=g) * 2).round()
    scores[:, :, :2] = float("inf")
    plans = (DecodeHeadPlan("quest", 5, 1, 1), DecodeHeadPlan("quest", 17, 2, 3))
    sel = torch.full((rows, kv, 22), -7, dtype=torch.int32, device=DEVICE)
    cnt = torch.full((rows, kv), -7, dtype=torch.int32, device=DEVICE)
    qsl = torch.arange(rows + 1, dtype=torch.int32, device=DEVICE)
    select_top_blocks(scores.to(DEVICE), _candidates(rows, kv, nbp, 22), qsl, seq.to(DEVICE),
                      DecodeHeads.build(plans, DEVICE), sel, cnt, block_tokens=16, dense_below=64)
    kept = torch.tensor([p.kept_blocks for p in plans])
    for r in range(rows):
        nb = -(-int(seq[r]) // 16)
        for h, want in enumerate(reference_select(scores[r, :, :nb], kept)):
            assert int(cnt[r, h]) == len(want)
            assert torch.equal(sel[r, h, : len(want)].cpu().long(), want)


def _attend(case):
    rows = len(case.seq_lens)
    kv = case.paged.num_kv_heads
    nbp = row_blocks(case.block_table.shape[1] * case.page, case.block)
    # Poisoned: the selection must write every sparse row's blocks and counts (the attention reads them).
    scores = torch.full((rows, kv, nbp), float("nan"), device=DEVICE)
    selected = torch.full((rows, kv, int(case.heads.kept.max())), -7, dtype=torch.int32, device=DEVICE)
    counts = torch.full((rows, kv), -1, dtype=torch.int32, device=DEVICE)
    seq = torch.tensor(case.seq_lens, dtype=torch.int32, device=DEVICE)
    cand = _candidates(rows, kv, nbp, int(case.heads.kept.max()))
    quest_select(case.query, case.summ.mins, case.summ.maxs, case.block_table, case.qsl, seq, case.heads, scores,
                 cand, selected, counts, page_size=case.page, block_tokens=case.block, dense_below=case.dense_below)
    out = torch.full_like(case.query, float("nan"))  # poison: sparse decode rows must be written
    slots = split_slots(rows, kv) * case.q_heads
    po = torch.full((slots, case.query.shape[2]), float("nan"), device=DEVICE)
    pml = torch.full((slots, 2), float("nan"), device=DEVICE)
    decode_attention(case.query, case.paged, case.block_table, case.qsl, seq, case.heads, selected, counts, po, pml,
                     out, block_tokens=case.block, scale=0.3, dense_below=case.dense_below)
    return out, selected, counts


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_decode_attention_kernel_matches_reference(seed, dtype):
    plans = [DecodeHeadPlan("quest", 2, 1, 1), None]  # KV head 1 reads every block
    case = _seq_case(seed, dtype, plans=plans).to(DEVICE)
    out, selected, counts = _attend(case)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    for r in range(len(case.seq_lens)):
        tok = int(case.qsl[r])
        if r not in case.sparse_rows():
            if case.q_lens[r]:
                assert torch.isnan(out[tok]).all(), f"row {r} must be left to the dense backend"
            continue
        s = case.seq_lens[r]
        pages = case.block_table[r, : -(-s // case.page)].long()
        n = int(counts[r, 0])
        assert 0 < n and 0 <= int(selected[r, 0, :n].min()) and int(selected[r, 0, :n].max()) < -(-s // case.block)
        blocks = [selected[r, 0, :n].long(), None]
        want = reference_decode_attention(case.query[tok], case.paged, pages, s, blocks, case.block, 0.3)
        assert torch.allclose(out[tok].float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("seed", SEEDS)
def test_keep_all_equals_dense_decode(seed):
    """A budget that covers the whole context selects every block: exactly dense attention."""
    dtype = DTYPES[0]
    plans = [DecodeHeadPlan("quest", 50, 1, 1)] * 2
    case = _seq_case(seed, dtype, plans=plans).to(DEVICE)
    out, _, _ = _attend(case)
    for r in case.sparse_rows():
        tok, s = int(case.qsl[r]), case.seq_lens[r]
        k, v = case.paged.gather(case.block_table[r, : -(-s // case.page)].long(), s)
        q = case.query[tok].float().view(2, 3, -1)
        dense = torch.softmax(torch.einsum("hgd,thd->hgt", q, k.float()) * 0.3, -1)
        dense = torch.einsum("hgt,thd->hgd", dense, v.float()).reshape(6, -1)
        assert torch.allclose(out[tok].float(), dense, atol=2e-3, rtol=2e-3)


@pytest.mark.skipif(not GPU, reason="a 128K context is too slow for Triton's interpreter")
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_decode_kernels_at_128k(dtype):
    case = Case(7, dtype, [131072, 70000, 1000], [1, 1, 1], kv_heads=8, group=4, d=128, page=16, block=64,
                plans=[DecodeHeadPlan("quest", 64, 1, 1)] * 8, dense_below=16384).to(DEVICE)
    out, selected, counts = _attend(case)
    for r in (0, 1):
        tok, s = int(case.qsl[r]), case.seq_lens[r]
        pages = case.block_table[r, : -(-s // case.page)].long()
        blocks = [selected[r, h, : int(counts[r, h])].long() for h in range(8)]
        want = reference_decode_attention(case.query[tok], case.paged, pages, s, blocks, case.block, 0.3)
        assert torch.allclose(out[tok].float(), want, atol=2e-2, rtol=2e-2)
        _, ref_sel = case.reference(r)
        overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(blocks, ref_sel)) / (66 * 8)
        assert overlap > 0.98


def _tidal_select(case):
    """A tidal selector layer through the kernels: full attention that writes exact block scores, then
    the selection. -> (output, scores, selected, counts), all poisoned first."""
    rows, kv = len(case.seq_lens), case.paged.num_kv_heads
    nbp = row_blocks(case.block_table.shape[1] * case.page, case.block)
    kept = int(case.heads.kept.max())
    scores = torch.full((rows, kv, nbp), float("nan"), device=DEVICE)
    selected = torch.full((rows, kv, kept), -7, dtype=torch.int32, device=DEVICE)
    counts = torch.full((rows, kv), -7, dtype=torch.int32, device=DEVICE)
    seq = torch.tensor(case.seq_lens, dtype=torch.int32, device=DEVICE)
    out = torch.full_like(case.query, float("nan"))
    slots = split_slots(rows, kv) * case.q_heads
    po = torch.full((slots, case.query.shape[2]), float("nan"), device=DEVICE)
    pml = torch.full((slots, 2), float("nan"), device=DEVICE)
    unused = torch.full((rows, kv, 1), -7, dtype=torch.int32, device=DEVICE)
    decode_attention(case.query, case.paged, case.block_table, case.qsl, seq, DecodeHeads.build((None,) * kv, DEVICE),
                     unused, unused[..., 0], po, pml, out, block_tokens=case.block, scale=0.3,
                     dense_below=case.dense_below, scores=scores, score_heads=case.heads)
    select_top_blocks(scores, _candidates(rows, kv, nbp, kept), case.qsl, seq, case.heads, selected, counts,
                      block_tokens=case.block, dense_below=case.dense_below)
    return out, scores, selected, counts


def _pages(case, r):
    return case.block_table[r, : -(-case.seq_lens[r] // case.page)].long()


@pytest.fixture
def few_splits(monkeypatch):
    """On a CPU host, 4 splits per row (still several programs per row) so the interpreter keeps up."""
    if not GPU:
        from vllm_sparse.decode import attention as attention_mod

        monkeypatch.setattr(attention_mod, "SPLIT_PROGRAMS", 48)


@pytest.mark.parametrize("block", [32, 64, 256], ids=["blocks-in-a-tile", "blocks-in-a-wide-tile", "tiles-in-a-block"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_tidal_selector_and_reader_kernels_match_reference(seed, dtype, block, few_splits):
    """The selector attends to every block and scores each exactly; the selection is the reference's
    over those scores; a reader layer's attention over the chosen blocks is the reference's."""
    plans = [DecodeHeadPlan("tidal", 2, 1, 1, selector=True), DecodeHeadPlan("tidal", 1, 0, 2, selector=True)]
    case = _seq_case(seed, dtype, plans=plans, block=block).to(DEVICE)
    out, scores, selected, counts = _tidal_select(case)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    for r in range(len(case.seq_lens)):
        tok = int(case.qsl[r])
        if r not in case.sparse_rows():
            assert torch.isnan(scores[r]).all() and (counts[r] == -7).all(), f"row {r} is not a sparse decode row"
            if case.q_lens[r]:
                assert torch.isnan(out[tok]).all(), f"row {r} must be left to the dense backend"
            continue
        s = case.seq_lens[r]
        k, _ = case.paged.gather(_pages(case, r), s)
        want = reference_exact_block_scores(case.query[tok].cpu(), k.cpu(), s, case.block, case.heads.sink.cpu(),
                                            case.heads.local.cpu(), 0.3)
        got = scores[r, :, : want.shape[1]].cpu()
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-2), (got, want)
        dense = reference_decode_attention(case.query[tok], case.paged, _pages(case, r), s, [None, None], case.block,
                                           0.3)
        assert torch.allclose(out[tok].float(), dense, atol=tol, rtol=tol)
        for h, chosen in enumerate(reference_select(got, case.heads.kept.cpu())):
            assert int(counts[r, h]) == len(chosen)
            assert torch.equal(selected[r, h, : len(chosen)].cpu().long(), chosen)
    # A reader layer (new queries, same cache): attention over the selector's blocks, head by head.
    case.query = torch.randn(case.query.shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)
    readers = tuple(DecodeHeadPlan("tidal", p.top_k_blocks, p.sink_blocks, p.local_blocks) for p in plans)
    out = torch.full_like(case.query, float("nan"))
    rows, kv = len(case.seq_lens), 2
    slots = split_slots(rows, kv) * case.q_heads
    po = torch.full((slots, case.query.shape[2]), float("nan"), device=DEVICE)  # (poison: written before read)
    pml = torch.full((slots, 2), float("nan"), device=DEVICE)
    seq = torch.tensor(case.seq_lens, dtype=torch.int32, device=DEVICE)
    decode_attention(case.query, case.paged, case.block_table, case.qsl, seq, DecodeHeads.build(readers, DEVICE),
                     selected, counts, po, pml, out, block_tokens=case.block, scale=0.3, dense_below=case.dense_below)
    for r in case.sparse_rows():
        tok = int(case.qsl[r])
        blocks = [selected[r, h, : int(counts[r, h])].long() for h in range(kv)]
        want = reference_decode_attention(case.query[tok], case.paged, _pages(case, r), case.seq_lens[r], blocks,
                                          case.block, 0.3)
        assert torch.allclose(out[tok].float(), want, atol=tol, rtol=tol)


def test_merge_of_more_than_64_splits(monkeypatch):
    """A long row at batch 1 may take more splits than the merge reads at once (64): the merge walks them in
    pieces, splits with no blocks (a short row over many splits) weigh nothing, and the selector's output and
    exact scores stay the reference's."""
    from vllm_sparse.decode import attention as attention_mod

    monkeypatch.setattr(attention_mod, "MAX_SPLITS", 256)
    monkeypatch.setattr(attention_mod, "SPLIT_PROGRAMS", 512)
    plans = [DecodeHeadPlan("tidal", 2, 1, 1, selector=True)] * 2
    case = Case(0, DTYPES[0], [500, 40], [1, 1], kv_heads=2, group=3, d=32, page=16, block=16, plans=plans,
                dense_below=64).to(DEVICE)
    rows, kv = len(case.seq_lens), 2
    splits = attention_mod.split_count(rows, kv, split_slots(rows, kv) // rows)  # (_tidal_select's workspace)
    assert splits == 128  # two pieces for the merge; 32 blocks of 16 tokens over 128 splits: most read nothing
    out, scores, _, _ = _tidal_select(case)
    tok, s = int(case.qsl[0]), case.seq_lens[0]
    k, _ = case.paged.gather(_pages(case, 0), s)
    want = reference_exact_block_scores(case.query[tok].cpu(), k.cpu(), s, case.block, case.heads.sink.cpu(),
                                        case.heads.local.cpu(), 0.3)
    assert torch.allclose(scores[0, :, : want.shape[1]].cpu(), want, rtol=1e-3, atol=1e-2)
    dense = reference_decode_attention(case.query[tok], case.paged, _pages(case, 0), s, [None, None], case.block, 0.3)
    assert torch.allclose(out[tok].float(), dense, atol=2e-3, rtol=2e-3)
    assert torch.isnan(out[int(case.qsl[1])]).all()  # under dense_below: the dense backend's row


def test_tidal_keep_all_reads_every_block(few_splits):
    """A budget that covers the context: the selector keeps every block, so its readers attend densely."""
    plans = [DecodeHeadPlan("tidal", 50, 1, 1, selector=True)] * 2
    case = _seq_case(0, DTYPES[0], plans=plans).to(DEVICE)
    _, _, selected, counts = _tidal_select(case)
    for r in case.sparse_rows():
        nb = -(-case.seq_lens[r] // case.block)
        for h in range(2):
            assert torch.equal(selected[r, h, : int(counts[r, h])].cpu(), torch.arange(nb, dtype=torch.int32))


def test_tidal_layers_on_the_cpu_path():
    """DecodeLayer's reference path (the CPU engine's): the selector attends densely and records its
    choice by exact scores; a reader attends over that choice; a reader whose selector did not run in
    this step (another selector, or the same one in an earlier step) is an error, never a stale choice."""
    from vllm_sparse.decode.step import DecodeLayer, DecodeRows

    case = _seq_case(3, torch.float32, plans=[DecodeHeadPlan("tidal", 2, 1, 1, selector=True)] * 2)
    seq = torch.tensor(case.seq_lens, dtype=torch.int32)
    rows = DecodeRows(case.qsl, seq, host_sparse=len(case.sparse_rows()))
    args = (case.block, case.dense_below, 8, 4096, case.q_heads, 32, torch.device("cpu"))
    selector = DecodeLayer(case.plans, None, *args, layer=4)
    reader = DecodeLayer(tuple(DecodeHeadPlan("tidal", 2, 1, 1) for _ in case.plans), None, *args, layer=5,
                         selector=4)
    orphan = DecodeLayer(reader.plans, None, *args, layer=9, selector=7)
    out = torch.full_like(case.query, float("nan"))
    selector.attend(case.query, out, case.paged, case.block_table, rows, 0.3)
    q2 = torch.randn(case.query.shape, generator=torch.Generator().manual_seed(9))
    out2 = torch.full_like(case.query, float("nan"))
    reader.attend(q2, out2, case.paged, case.block_table, rows, 0.3)
    for r in case.sparse_rows():
        tok, s = int(case.qsl[r]), case.seq_lens[r]
        dense = reference_decode_attention(case.query[tok], case.paged, _pages(case, r), s, [None, None], case.block,
                                           0.3)
        assert torch.allclose(out[tok], dense, atol=1e-5)
        k, _ = case.paged.gather(_pages(case, r), s)
        scores = reference_exact_block_scores(case.query[tok], k, s, case.block, selector.heads.sink,
                                              selector.heads.local, 0.3)
        blocks = reference_select(scores, selector.heads.kept)
        want = reference_decode_attention(q2[tok], case.paged, _pages(case, r), s, blocks, case.block, 0.3)
        assert torch.allclose(out2[tok], want, atol=1e-5)
    with pytest.raises(RuntimeError, match="layer 9 reads the tidal selection of layer 7"):
        orphan.attend(q2, out2, case.paged, case.block_table, rows, 0.3)
    next_step = DecodeRows(case.qsl, seq, host_sparse=rows.host_sparse, step=rows.step + 1)
    with pytest.raises(RuntimeError, match="layer 5 reads the tidal selection of layer 4"):
        reader.attend(q2, out2, case.paged, case.block_table, next_step, 0.3)


@pytest.mark.skipif(not GPU, reason="DecodeLayer's CUDA path (its CPU twin: test_tidal_layers_on_the_cpu_path)")
def test_tidal_layers_on_the_cuda_path_survive_a_quest_layer_between():
    """Selector, then a Quest layer, then a reader, as DecodeLayer runs them in an engine: the Quest
    layer's selection does not touch the tidal choice, and the reader attends over exactly what the
    selector chose (which is the reference's choice from exact scores)."""
    from vllm_sparse.decode.step import DecodeLayer, DecodeRows

    tidal = DecodeHeadPlan("tidal", 2, 1, 1, selector=True)
    case = _seq_case(5, torch.float16, plans=[tidal] * 2).to(DEVICE)
    seq = torch.tensor(case.seq_lens, dtype=torch.int32, device=DEVICE)
    rows = DecodeRows(case.qsl, seq, host_sparse=len(case.sparse_rows()), step=1)
    args = (case.block, case.dense_below, 8, case.block_table.shape[1] * case.page, case.q_heads, 32,
            torch.device(DEVICE))
    selector = DecodeLayer(case.plans, None, *args, layer=0)
    quest = DecodeLayer((DecodeHeadPlan("quest", 1, 0, 1),) * 2, case.summ, *args, layer=1)
    reader = DecodeLayer((DecodeHeadPlan("tidal", 2, 1, 1),) * 2, None, *args, layer=2, selector=0)
    ws = selector.workspace
    assert quest.workspace is ws and reader.workspace is ws
    outs = []
    for i, layer in enumerate((selector, quest, reader)):
        q = torch.randn(case.query.shape, generator=torch.Generator().manual_seed(20 + i)).half().to(DEVICE)
        out = torch.full_like(q, float("nan"))
        layer.attend(q, out, case.paged, case.block_table, rows, 0.3)
        outs.append((q, out))
        if i == 0:
            chosen = ws.tidal_selected.clone(), ws.tidal_counts.clone()
    assert torch.equal(ws.tidal_selected, chosen[0]) and torch.equal(ws.tidal_counts, chosen[1])
    (q0, _), (q2, out2) = outs[0], outs[2]
    for r in case.sparse_rows():
        tok, s = int(case.qsl[r]), case.seq_lens[r]
        k, _ = case.paged.gather(_pages(case, r), s)
        scores = reference_exact_block_scores(q0[tok], k, s, case.block, selector.heads.sink, selector.heads.local, 0.3)
        want_blocks = reference_select(scores.cpu(), selector.heads.kept.cpu())
        got_blocks = [ws.tidal_selected[r, h, : int(ws.tidal_counts[r, h])].long().cpu() for h in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(got_blocks, want_blocks))
        want = reference_decode_attention(q2[tok], case.paged, _pages(case, r), s, got_blocks, case.block, 0.3)
        assert torch.allclose(out2[tok].float(), want, atol=2e-3, rtol=2e-3)


@pytest.mark.skipif(not GPU, reason="a 128K context is too slow for Triton's interpreter")
def test_tidal_selector_at_128k():
    """Exact scores and the selection over a 128K row spread over many splits (the CPU twin is
    test_tidal_selector_and_reader_kernels_match_reference)."""
    plans = [DecodeHeadPlan("tidal", 256, 1, 2, selector=True)] * 8
    case = Case(8, torch.bfloat16, [131072, 70000, 1000], [1, 1, 1], kv_heads=8, group=4, d=128, page=16, block=16,
                plans=plans, dense_below=16384).to(DEVICE)
    out, scores, selected, counts = _tidal_select(case)
    for r in (0, 1):
        tok, s = int(case.qsl[r]), case.seq_lens[r]
        k, _ = case.paged.gather(_pages(case, r), s)
        want = reference_exact_block_scores(case.query[tok], k, s, case.block, case.heads.sink, case.heads.local, 0.3)
        got = scores[r, :, : want.shape[1]]
        assert torch.allclose(got, want.to(DEVICE), rtol=1e-2, atol=5e-2)
        dense = reference_decode_attention(case.query[tok], case.paged, _pages(case, r), s, [None] * 8, case.block, 0.3)
        assert torch.allclose(out[tok].float(), dense, atol=2e-2, rtol=2e-2)
        for h, chosen in enumerate(reference_select(got.cpu(), case.heads.kept.cpu())):
            assert torch.equal(selected[r, h, : int(counts[r, h])].cpu().long(), chosen)
    assert torch.isnan(scores[2]).all()  # under dense_below


@pytest.mark.parametrize("seed", SEEDS)
def test_decode_kernels_read_fp8_caches(seed, few_splits):
    """An fp8 KV cache (e4m3, per-tensor scales as vLLM's): a tidal selector's exact block scores and its
    attention, and a reader's attention over the chosen blocks, equal the references over the dequantized
    cache (the kernels fold k_scale into the logit scale and v_scale into the output)."""
    from tests.fixtures.paged import to_fp8

    plans = [DecodeHeadPlan("tidal", 2, 1, 1, selector=True), DecodeHeadPlan("tidal", 1, 0, 2, selector=True)]
    case = _seq_case(seed, torch.float16, plans=plans, block=32)
    case.paged = to_fp8(case.paged)
    assert case.paged.quantized and case.paged.k_scale != 1.0
    case = case.to(DEVICE)
    out, scores, selected, counts = _tidal_select(case)
    assert case.sparse_rows()
    for r in case.sparse_rows():
        tok, s = int(case.qsl[r]), case.seq_lens[r]
        k, _ = case.paged.gather(_pages(case, r), s)  # dequantized
        want = reference_exact_block_scores(case.query[tok].cpu(), k.cpu(), s, case.block, case.heads.sink.cpu(),
                                            case.heads.local.cpu(), 0.3)
        assert torch.allclose(scores[r, :, : want.shape[1]].cpu(), want, rtol=1e-3, atol=1e-2)
        dense = reference_decode_attention(case.query[tok], case.paged, _pages(case, r), s, [None, None], case.block,
                                           0.3)
        assert torch.allclose(out[tok].float(), dense, atol=2e-3, rtol=2e-3)
