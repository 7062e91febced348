"""`dense_tail`: the query blocks holding each sparse chunk's last tokens attend densely (a prompt's question,
where its first output token is read from), the rest of the chunk as the plan selects."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.paged import random_paged_batch
from vllm_sparse.backend.attention_mass import dense_rows, tail_rows
from vllm_sparse.backend.batch import SparseChunk, classify, selected_row_counts, tile_geometry
from vllm_sparse.backend.sparse_path import attend_sparse_chunks, selected_rows
from vllm_sparse.config.plan import HeadPlan
from vllm_sparse.estimators.base import ChunkContext
from vllm_sparse.estimators.registry import get_estimator
from vllm_sparse.kernels.reference import dense_causal_attention_ref
from vllm_sparse.selection.budget import Budget
from vllm_sparse.selection.tile_tables import chunk_dense_tail

GPU = torch.cuda.is_available()


@pytest.mark.parametrize("context_len, q_len, dense_tail, rows", [
    (0, 320, 32, 1),  # chunk end on a block edge: one whole row
    (64, 250, 32, 2),  # end 314, 26 tokens into its last block: the last 32 tokens span two rows
    (64, 250, 26, 1),  # ... 26 of them: its last row alone
    (64, 250, 1000, 8),  # more than the chunk: every row (blocks 2..9)
    (64, 250, 0, 0),  # off
])
def test_the_tail_rows_are_the_blocks_holding_the_chunks_last_tokens(context_len, q_len, dense_tail, rows):
    ctx = ChunkContext(torch.zeros(q_len, 1, 8), None, None, None, context_len, 32, 1.0)
    assert tail_rows(ctx, dense_tail) == rows
    assert tail_rows(ctx, dense_tail) <= ctx.num_query_blocks
    # The eval's audit counts recall over the rows the plan selects for: neither the tail's nor those whose tokens
    # all lie before dense_below (blocks 0-2 of 32 tokens here).
    below = 96
    chosen = selected_rows(ctx, below, dense_tail)
    assert chosen == slice(dense_rows(ctx, below), ctx.num_query_blocks - rows)
    assert chosen.start == max(below // 32 - context_len // 32, 0)


def test_the_step_counts_each_chunks_selected_rows_as_the_sparse_path_does():
    """The builder's host count over a whole step's lengths (`selected_row_counts`) equals the rows the sparse path
    selects for per chunk (`selected_rows`), over chunk geometries on and off block edges."""
    bs, below = 32, 96
    rows = [(c, q) for c in (0, 31, 32, 64, 90, 200) for q in (1, 2, 31, 32, 33, 64, 250)]
    contexts, q_lens = (torch.tensor(x) for x in zip(*rows))
    for tail in (1, 26, 32, 33, 64, 1000):
        counts = selected_row_counts(q_lens, contexts + q_lens, bs, below, tail)
        for (c, q), n in zip(rows, counts.tolist()):
            chosen = selected_rows(ChunkContext(torch.zeros(q, 1, 8), None, None, None, c, bs, 1.0), below, tail)
            assert max(n, 0) == max(chosen.stop - chosen.start, 0), (c, q, tail)


def test_a_chunk_whose_every_row_attends_densely_stays_off_the_sparse_path():
    """A chunk past dense_below whose rows there all hold tail tokens would only estimate: it stays dense, from host
    data; a longer one goes sparse; without a tail the rule is the context floor alone."""
    from vllm.v1.attention.backend import CommonAttentionMetadata
    q_lens, seq_lens = [40, 200], [136, 296]  # both past dense_below 96 (32-token blocks): rows 3-4 and 3-9
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    cm = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        seq_lens_cpu_upper_bound=torch.tensor(seq_lens, dtype=torch.int32), num_reqs=2, num_actual_tokens=240,
        max_query_len=200, max_seq_len=296, block_table_tensor=torch.arange(20, dtype=torch.int32).view(2, 10),
        slot_mapping=torch.arange(240, dtype=torch.int64), positions=torch.arange(240))
    chunks, reqs, tokens = classify(cm, 97, dense_tail=40, block_size=32, dense_below=96)
    assert [c.req for c in chunks] == [1] and reqs.tolist() == [0] and tokens.tolist() == list(range(40))
    assert [c.req for c in classify(cm, 97)[0]] == [0, 1]


@pytest.mark.parametrize("kernel", ["reference", "triton"])
def test_tail_tokens_attend_as_dense_attention_and_the_rest_as_the_plan_selects(kernel):
    """Random paged GQA data, two requests (one a later chunk after cached context, ends off block edges), a plan
    keeping two blocks a row: the tokens of the tail rows get dense attention's output, every other token the output
    the plan gives without a tail (and that differs from dense, or the test would prove nothing). The torch path and
    the Triton kernels (on the GPU where there is one, else interpreted; fp32: the interpreter's bf16 products are
    wrong); the output poisoned first."""
    hq, hkv, d, page, bs, dense_tail = 4, 2, 32, 16, 32, 40
    seqs, q_lens = [314, 397], [314, 141]  # request 1: 256 tokens cached, a 141-token chunk
    device = torch.device("cuda" if GPU else "cpu")
    b = random_paged_batch(seqs, q_lens, hq, hkv, d, page, seed=11).to(device)
    est = get_estimator("sink_local")
    plan = HeadPlan("sink_local", est.params(sink_blocks=1, local_blocks=1),
                    Budget(top_k=2, sink_blocks=1, local_blocks=1))
    qsl = [0, q_lens[0], sum(q_lens)]
    chunks = tuple(SparseChunk(r, qsl[r], qsl[r + 1], seqs[r] - q_lens[r]) for r in range(2))

    def run(tail: int) -> torch.Tensor:
        out = torch.full_like(b.q, float("nan"))
        attend_sparse_chunks(b.q, out, b.kv, b.block_table, chunks, [plan] * hq, bs, d**-0.5, union_tile=1,
                             layer=0, kernel=kernel, dense_below=0, dense_tail=tail)
        assert not out.isnan().any()
        return out

    with_tail, without = run(dense_tail), run(0)
    # fp32: exact products in torch and the interpreter; TF32 products (10-bit mantissas) in tl.dot on a GPU (an
    # H100 measured 3.6e-3 here)
    tol = dict(atol=1e-2, rtol=1e-2) if GPU and kernel == "triton" else dict(atol=2e-5, rtol=2e-5)
    for r, c in enumerate(chunks):
        q = b.q[c.q_start:c.q_end]
        dense = dense_causal_attention_ref(q, b.keys[r].to(device), b.values[r].to(device), d**-0.5)
        # First token of the rows holding the chunk's last `dense_tail` tokens, within the chunk.
        first = max(c.seq_len - dense_tail, c.context_len) // bs * bs - c.context_len
        first = max(first, 0)
        assert 0 < first < c.q_end - c.q_start - dense_tail  # (some tokens before the tail, some after)
        torch.testing.assert_close(with_tail[c.q_start:c.q_end][first:], dense[first:], **tol)
        torch.testing.assert_close(with_tail[c.q_start:c.q_end][:first], without[c.q_start:c.q_end][:first],
                                   atol=0, rtol=0)
        assert (without[c.q_start:c.q_end][first:] - dense[first:]).abs().max() > 10 * tol["atol"]  # sparse there


def test_dense_tail_is_a_plan_setting_and_plan_says_it(tmp_path):
    import yaml

    from tests.test_config import GEMMA
    from vllm_sparse.cli.main import describe_chunk_rule
    from vllm_sparse.config.errors import SparseConfigError
    from vllm_sparse.config.loader import load_config
    from vllm_sparse.config.plan import resolve_plan

    def plan_of(**settings):
        p = tmp_path / "p.yaml"
        p.write_text(yaml.safe_dump({"version": 1, "models": [{
            "match": {"architectures": ["Gemma3ForCausalLM"]}, "union_tile": 1, **settings,
            "layers": [{"layers": "full_attention", "estimator": {"name": "antidiagonal", "stride": 16},
                        "budget": {"keep_ratio": 0.15}}]}]}))
        return resolve_plan(load_config(p), GEMMA, str(p), explicit=True)

    assert plan_of().dense_tail == 0 and "dense_tail" not in describe_chunk_rule(plan_of())
    plan = plan_of(dense_tail=128)
    assert plan.dense_tail == 128 and "its last 128 tokens attend densely" in describe_chunk_rule(plan)
    with pytest.raises(SparseConfigError, match="dense_tail"):
        plan_of(dense_tail=-1)
    # One union per chunk would spread the tail's dense rows over the whole chunk: refused, naming both settings.
    with pytest.raises(SparseConfigError, match=r"models\[0\]\.dense_tail.*union_tile"):
        plan_of(dense_tail=128, union_tile=None)
    assert plan_of(dense_tail=128, union_tile=4).union_tile == 4  # (a tile of 4 rows: its tail tile reads all)


def _tail_batch(dtype, device):
    """Two requests (the second a 147-token chunk after 250 cached tokens: its first row is a partial block; both end
    off block edges), random paged GQA data, pages of 16 tokens (FlashAttention's least), a plan keeping two 32-token
    blocks a row."""
    hq, hkv, d, page, bs = 4, 2, 32, 16, 32
    seqs, q_lens = [314, 397], [314, 147]
    b = random_paged_batch(seqs, q_lens, hq, hkv, d, page, dtype=dtype, seed=12).to(device)
    est = get_estimator("sink_local")
    plan = HeadPlan("sink_local", est.params(sink_blocks=1, local_blocks=1),
                    Budget(top_k=2, sink_blocks=1, local_blocks=1))
    qsl = [0, q_lens[0], sum(q_lens)]
    return b, plan, tuple(SparseChunk(r, qsl[r], qsl[r + 1], seqs[r] - q_lens[r]) for r in range(2)), bs


def _attend(b, plan, chunks, bs, kernel, tile, tail, step_tiles=False):
    """`step_tiles`: the tile geometry the builder makes once a step (`tile_geometry`), else made per call."""
    out = torch.full_like(b.q, float("nan"))
    tiles = tile_geometry(list(chunks), bs, tile, b.q.device, tail) if step_tiles else None
    attend_sparse_chunks(b.q, out, b.kv, b.block_table, chunks, [plan] * b.q.shape[1], bs, b.q.shape[-1]**-0.5,
                         union_tile=tile, layer=0, kernel=kernel, dense_below=0, dense_tail=tail, tiles=tiles)
    assert not out.isnan().any()
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU twin: Triton runs the tile-table kernel on CPU tensors "
                    "only in its interpreter, not selected on a GPU host "
                    "(test_fa3_attends_the_tail_as_dense_attention_gpu there)")
@pytest.mark.parametrize("step_tiles", [False, True])
@pytest.mark.parametrize("tile", [1, 3, 5, None])  # 5: request 1's tail tile is its first; None: one tile a chunk
@pytest.mark.parametrize("kernel", ["fa3", "fa2"])
def test_flash_attends_the_tail_tiles_in_one_dense_call_cpu_twin(monkeypatch, kernel, tile, step_tiles):
    """FlashAttention's path (vLLM's call replaced by the torch stand-in of `test_sparse_kernel.py`, which also refuses
    what FA2 / FA3 refuse) attends the tiles holding the tail in one call with every q head over the request's own
    pages: the chunk's output equals the exact torch path's with the same tail (a tile holding a tail row reads every
    causal block there too: its union holds the row's), and the tail tokens equal dense attention; with the tile
    geometry made per call or the builder's for the step."""
    from tests.test_sparse_kernel import _flash_stand_in

    calls = _flash_stand_in(monkeypatch)
    b, plan, chunks, bs = _tail_batch(torch.float32, torch.device("cpu"))
    got = _attend(b, plan, chunks, bs, kernel, tile, 40, step_tiles)
    hq, hkv = b.q.shape[1], b.kv.num_kv_heads
    assert [c for c in calls if c[2] == hq] == [(int(kernel[2]), 0, hq, hkv)] * 2  # one dense call a chunk
    torch.testing.assert_close(got, _attend(b, plan, chunks, bs, "reference", tile, 40), atol=2e-5, rtol=2e-5)
    for r, c in enumerate(chunks):
        dense = dense_causal_attention_ref(b.q[c.q_start:c.q_end], b.keys[r], b.values[r], b.q.shape[-1]**-0.5)
        torch.testing.assert_close(got[c.q_end - 40:c.q_end], dense[-40:], atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU twin: Triton runs the tile-table kernel on CPU tensors "
                    "only in its interpreter (test_fa3_attends_the_tail_as_dense_attention_gpu's packed case there)")
@pytest.mark.parametrize("step_tiles", [False, True])
@pytest.mark.parametrize("tile", [1, 3, 5, None])
@pytest.mark.parametrize("kernel", ["fa3", "fa2"])
def test_flash_packs_the_tiles_before_the_tail_in_one_call_cpu_twin(monkeypatch, kernel, tile, step_tiles):
    """With `VLLM_SPARSE_FA_PACK_LISTS` a chunk's tiles before its dense tail take one FlashAttention call for every
    page list (the tail's tiles there as sequences without queries), the tail its dense call: the output equals the
    exact torch path's and the unpacked calls', the tail tokens dense attention's. A chunk whose first tile holds a
    tail row (tile 5: request 1's; None: both) has no sparse tiles and makes the dense call alone."""
    from tests.test_sparse_kernel import _flash_stand_in
    from vllm_sparse.kernels import flash_compact
    from vllm_sparse.kernels.workspace import WORKSPACE

    calls = _flash_stand_in(monkeypatch)
    # 1 MiB reserved, poisoned: the packed copies must write every byte they read
    monkeypatch.setattr(WORKSPACE, "_buffers", {torch.device("cpu"): torch.full((2**18,), float("nan"))})
    b, plan, chunks, bs = _tail_batch(torch.float32, torch.device("cpu"))
    hq, hkv = b.q.shape[1], b.kv.num_kv_heads
    monkeypatch.setattr(flash_compact, "PACK_LISTS", False)
    unpacked = _attend(b, plan, chunks, bs, kernel, tile, 40, step_tiles)
    calls.clear()
    monkeypatch.setattr(flash_compact, "PACK_LISTS", True)
    got = _attend(b, plan, chunks, bs, kernel, tile, 40, step_tiles)
    sparse_tiles = [chunk_dense_tail(c.context_len, c.q_end - c.q_start, bs, tile, 40)[0] for c in chunks]
    want = []
    for n in sparse_tiles:  # per chunk: the packed call (a list's q heads over the heads-as-pages view), the dense one
        want += ([(int(kernel[2]), None, hq // hkv, 1)] if n else []) + [(int(kernel[2]), None, hq, hkv)]
    assert [(v, None, h, k) for v, _, h, k in calls] == want
    assert sparse_tiles[1] == 0 if tile in (5, None) else all(sparse_tiles)
    torch.testing.assert_close(got, unpacked, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, _attend(b, plan, chunks, bs, "reference", tile, 40), atol=2e-5, rtol=2e-5)
    for r, c in enumerate(chunks):
        dense = dense_causal_attention_ref(b.q[c.q_start:c.q_end], b.keys[r], b.values[r], b.q.shape[-1]**-0.5)
        torch.testing.assert_close(got[c.q_end - 40:c.q_end], dense[-40:], atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU twin (Triton's tile tables on CPU tensors: interpreter)")
@pytest.mark.parametrize("built, served", [(40, 0), (0, 40), (40, 200)])
def test_a_step_geometry_made_for_another_tail_is_refused(monkeypatch, built, served):
    """FlashAttention's branch reads the step's tail split: one made for another `dense_tail` (another plan) would
    attend the wrong rows densely, so it is refused with both splits named."""
    from tests.test_sparse_kernel import _flash_stand_in

    _flash_stand_in(monkeypatch)
    b, plan, chunks, bs = _tail_batch(torch.float32, torch.device("cpu"))
    tiles = tile_geometry(list(chunks), bs, 1, b.q.device, built)
    with pytest.raises(ValueError, match="dense tail split .* is not this chunk's"):
        attend_sparse_chunks(b.q, torch.empty_like(b.q), b.kv, b.block_table, chunks, [plan] * b.q.shape[1], bs,
                             b.q.shape[-1]**-0.5, union_tile=1, layer=0, kernel="fa3", dense_tail=served, tiles=tiles)


def test_the_dense_tiles_start_at_the_tile_holding_the_first_tail_row():
    """`chunk_dense_tail`: (tiles before the first holding a tail row, that tile's first query token in the chunk),
    None with the tail off; the tail rows are those the sparse path keeps densely (`selected_rows`)."""
    # 141 tokens after 256 (32-token blocks): rows are blocks 8-12, block 12 partial; the last 45 tokens start block 11
    assert chunk_dense_tail(256, 141, 32, 1, 45) == (3, 96)  # the tail's rows 3-4: tokens 96-140
    assert chunk_dense_tail(256, 141, 32, 3, 45) == (1, 96)  # tiles [0-2], [3-4]
    assert chunk_dense_tail(256, 141, 32, 3, 77) == (0, 0)  # row 2 on: the first tile holds a tail row, all dense
    assert chunk_dense_tail(256, 141, 32, 1, 0) is None  # off
    # 100 tokens after 50: the first row is partial (block 1, 14 tokens)
    assert chunk_dense_tail(50, 100, 32, 1, 86) == (1, 14)  # row 1 (block 2) starts 14 tokens in
    assert chunk_dense_tail(50, 100, 32, 2, 1) == (1, 46)  # the last row's tile: rows 2-3, from block 3
    for context in (0, 31, 32, 50, 200):
        for q_len in (1, 2, 31, 33, 141):
            for tail in (1, 26, 32, 45, 1000):
                ctx = ChunkContext(torch.zeros(q_len, 1, 8), None, None, None, context, 32, 1.0)
                for tile in (1, 2, 3, None):
                    n, first = chunk_dense_tail(context, q_len, 32, tile, tail)
                    width = tile or ctx.num_query_blocks
                    assert n == selected_rows(ctx, 0, tail).stop // width, (context, q_len, tail, tile)
                    assert first == max((ctx.first_query_block + n * width) * 32 - context, 0)


@pytest.mark.skipif(not GPU or torch.cuda.get_device_capability()[0] != 9, reason="FA3 needs a Hopper GPU")
@pytest.mark.parametrize("pack", [False, True], ids=["call-per-list", "packed"])
def test_fa3_attends_the_tail_as_dense_attention_gpu(monkeypatch, pack):
    """vLLM's FA3 itself (bf16): the tail tokens get dense attention; the tokens before it the output without a
    tail (the CPU twins above check the calls' arguments against FA's API). `packed`: the tiles before the tail in
    one call for every list (`VLLM_SPARSE_FA_PACK_LISTS`), the tail's tiles sequences without queries there."""
    from vllm_sparse.backend import attend
    from vllm_sparse.kernels import flash_compact
    from vllm_sparse.kernels.workspace import WORKSPACE

    b, plan, chunks, bs = _tail_batch(torch.bfloat16, torch.device("cuda"))
    packed, room = [], None
    monkeypatch.setattr(flash_compact, "PACK_LISTS", False)  # (on by default; an earlier test may leave a workspace)
    if pack:
        unpacked = _attend(b, plan, chunks, bs, "fa3", 1, 40)  # (a call per list, before packing is on)
        monkeypatch.setattr(WORKSPACE, "_buffers", {})
        WORKSPACE.reserve(1 << 20, torch.device("cuda"))
        room = next(iter(WORKSPACE._buffers.values())).fill_(float("nan"))  # (stray writes show past the copies)

        def counted(*args):
            packed.append(flash_compact.list_packing(*args))
            return packed[-1]

        monkeypatch.setattr(attend, "list_packing", counted)
    monkeypatch.setattr(flash_compact, "PACK_LISTS", pack)
    with_tail, without = _attend(b, plan, chunks, bs, "fa3", 1, 40), _attend(b, plan, chunks, bs, "fa3", 1, 0)
    if pack:  # the same output as a call per list; nothing written past the largest chunk's packed copies
        torch.testing.assert_close(with_tail.float(), unpacked.float(), atol=2e-2, rtol=2e-2)
        assert room[-(-flash_compact.packed_bytes(b.q, b.q) // 4):].isnan().all()
    for r, c in enumerate(chunks):
        q = b.q[c.q_start:c.q_end]
        dense = dense_causal_attention_ref(q.float(), b.keys[r].float(), b.values[r].float(), b.q.shape[-1]**-0.5)
        first = max(c.seq_len - 40, c.context_len) // bs * bs - c.context_len
        torch.testing.assert_close(with_tail[c.q_start:c.q_end][first:].float(), dense[first:], atol=2e-2, rtol=2e-2)
        # (FA3 may split the keys of fewer tiles otherwise: another summation order)
        torch.testing.assert_close(with_tail[c.q_start:c.q_end][:first].float(),
                                   without[c.q_start:c.q_end][:first].float(), atol=2e-2, rtol=2e-2)
        assert (without[c.q_start:c.q_end][first:].float() - dense[first:]).abs().max() > 0.2  # sparse there
    assert all(p is not None for p in packed) and len(packed) == (4 if pack else 0)  # (2 chunks, 2 runs)
