"""The Triton selection kernels against their torch references.

`select_blocks_triton` vs `select_blocks` (every budget rule, ties, min/max), `tile_tables_triton`
vs `tile_tables_ref` (union tiles, GQA groups, partial last pages, shuffled block tables) and
`block_key_means_triton` vs `block_key_means_ref`. On a CPU host they run in Triton's interpreter at
tiny shapes; on a GPU compiled, at more seeds and at a 128K-context shape.
"""

from __future__ import annotations

import pytest
import torch

from vllm_sparse.estimators.block_means import block_key_means_ref, block_key_means_triton
from vllm_sparse.kernels.flash_compact import ListPacking
from vllm_sparse.kernels.paged import PagedKV
from vllm_sparse.selection.budget import Budget, select_blocks
from vllm_sparse.selection.select_kernel import select_blocks_triton
from vllm_sparse.selection.tile_tables import chunk_causal_pages, tile_seq_lens, tile_tables_ref, tile_tables_triton

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
SEEDS = range(12) if GPU else range(2)

BUDGETS = [
    Budget(top_k=3, sink_blocks=1, local_blocks=2),
    Budget(keep_ratio=0.3, sink_blocks=2, local_blocks=1, max_blocks=5),
    Budget(keep_ratio=0.1, sink_blocks=0, local_blocks=1, min_blocks=2),
    Budget(top_p=0.7, sink_blocks=1, local_blocks=1),
    Budget(top_p=0.95, sink_blocks=0, local_blocks=3, min_blocks=3, max_blocks=9),
]


def _scores(seed: int, heads: int, rows: int, first: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(heads, rows, first + rows, generator=g) * 3
    return (s.round() if ties else s).to(DEVICE)  # rounded: many equal scores, which rank by block id


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: b.describe())
@pytest.mark.parametrize("seed", SEEDS)
def test_select_blocks_kernel_matches_reference(budget, seed):
    heads, rows, first = 3, 2 + seed % 4, [0, 5, 23][seed % 3]
    scores = _scores(seed, heads, rows, first, ties=seed % 2 == 1)
    out = torch.ones(heads, rows, first + rows, dtype=torch.bool, device=DEVICE)  # poison: every cell written
    got = select_blocks_triton(scores, budget, first, out=out)
    assert got is out
    assert torch.equal(got.cpu(), select_blocks(scores.cpu(), budget, first))


@pytest.mark.parametrize("budget", BUDGETS + [Budget(keep_ratio=1.0), Budget(top_k=1, sink_blocks=0, local_blocks=0,
                                                                       min_blocks=0)], ids=lambda b: b.describe())
def test_select_blocks_kernel_ranks_unscored_blocks_as_the_reference(budget):
    """Causal blocks an estimator left unscored (-inf) rank below every scored one, by block id, and the row's
    blocks past the diagonal rank among them (the reference ranks them, then drops them): a count reaching
    into the -inf blocks keeps the same ones. Near-uniform scores make long runs of equal mass for top-p."""
    g = torch.Generator().manual_seed(5)
    heads, rows, first = 2, 4, 37
    scores = (torch.randn(heads, rows, first + rows, generator=g) * 0.01).round(decimals=2)
    scores[..., ::3] = float("-inf")
    scores = scores.to(DEVICE)
    out = torch.ones(heads, rows, first + rows, dtype=torch.bool, device=DEVICE)
    got = select_blocks_triton(scores, budget, first, out=out)
    assert torch.equal(got.cpu(), select_blocks(scores.cpu(), budget, first))


@pytest.mark.parametrize("budget", [Budget(top_k=k, sink_blocks=0, local_blocks=0, min_blocks=0) for k in (1, 4, 9)]
                         + [BUDGETS[3]], ids=lambda b: b.describe())
def test_select_blocks_kernel_orders_the_whole_float_range(budget):
    """The kernel ranks by int32 images of the scores' bits: extremes of either sign, subnormals, signed zeros
    (equal, so they rank by block) and infinities must rank as torch compares them."""
    g = torch.Generator().manual_seed(11)
    values = torch.tensor([-3.4e38, -1e30, -1.0, -1e-40, -1e-45, -0.0, 0.0, 1e-45, 1e-40, 1.0, 1e30, 3.4e38,
                           float("-inf"), -2.5, 2.5, 7e-39])
    heads, rows, first = 3, 3, 13
    scores = values[torch.randint(len(values), (heads, rows, first + rows), generator=g)]
    if budget.top_p is not None:
        scores = scores.clamp(-80, 80)  # (top_p takes a softmax: finite mass)
    scores = scores.to(DEVICE)
    got = select_blocks_triton(scores, budget, first, out=torch.ones(scores.shape, dtype=torch.bool, device=DEVICE))
    assert torch.equal(got.cpu(), select_blocks(scores.cpu(), budget, first))


@pytest.mark.skipif(not GPU, reason="a 128K-context shape is too slow for Triton's interpreter")
@pytest.mark.parametrize("budget", [BUDGETS[1], BUDGETS[3]], ids=lambda b: b.describe())
def test_select_blocks_kernel_matches_reference_at_128k(budget):
    # The last 16K-query chunk of a 128K prompt in 128-token blocks: 128 rows x 1024 blocks.
    g = torch.Generator(device=DEVICE).manual_seed(54)
    scores = torch.log_softmax(torch.randn(8, 128, 1024, device=DEVICE, generator=g) * 2, dim=-1)
    got = select_blocks_triton(scores, budget, 896)
    want = select_blocks(scores, budget, 896)
    # top_p sums the sorted mass in a different order than torch: a row may differ by its boundary block.
    diff = (got != want).sum(-1)
    assert diff.max() <= (0 if budget.top_p is None else 1)
    assert (diff > 0).float().mean() < 0.01


TILE_CASES = [
    # kv_heads, group, block, page, context, q_len
    (2, 4, 32, 16, 70, 90),  # chunk with context, partial last page
    (1, 3, 16, 16, 0, 50),  # whole prompt, MQA, page == block
    (3, 1, 64, 16, 130, 200),  # MHA, 4 pages per block
    (2, 2, 32, 8, 33, 1),  # one query
]


def _tile_case(case, tile, seed: int):
    """A chunk's kept-block mask (30% of each row's blocks, sink and diagonal kept) over a shuffled block table, and
    its union tiles' bounds: (mask, block_table, max_pages, tile, bounds, seq_lens)."""
    kv, group, bs, page, ctx, q_len = case
    g = torch.Generator().manual_seed(seed)
    seq = ctx + q_len
    first, nkb = ctx // bs, (seq - 1) // bs + 1
    rows = nkb - first
    tile = tile or rows
    scores = torch.randn(kv * group, rows, nkb, generator=g)
    mask = select_blocks(scores, Budget(keep_ratio=0.3, sink_blocks=1, local_blocks=1), first).to(DEVICE)
    max_pages = -(-seq // page)
    block_table = torch.randperm(max_pages + 7, generator=g).to(torch.int32).to(DEVICE)  # pages shuffled
    bounds, seq_lens = tile_seq_lens(first, -(-rows // tile), tile, bs, ctx, q_len, torch.device(DEVICE))
    return mask, block_table, max_pages, tile, bounds, seq_lens


@pytest.mark.parametrize("case", TILE_CASES)
@pytest.mark.parametrize("tile", [1, 2, 3, None])
def test_tile_tables_kernel_matches_reference(case, tile):
    kv, group, bs, page, ctx, q_len = case
    mask, block_table, max_pages, tile, bounds, seq_lens = _tile_case(case, tile, sum(case) * 10 + (tile or 0))
    assert int(bounds[-1]) == q_len
    want = tile_tables_ref(mask, kv, tile, seq_lens, bs, page, block_table, max_pages)
    got = tile_tables_triton(mask, kv, tile, seq_lens, bs, page, block_table, max_pages)
    assert got[3] is want[3] is None
    assert all(torch.equal(g, w) for g, w in zip(got[:3], want[:3], strict=True))
    # The same inputs as slices at odd offsets of larger allocations (as a step's shared tensors hand them over).
    mask_in = torch.ones(mask.numel() + 3, dtype=torch.bool, device=DEVICE)
    mask_in[3:] = mask.flatten()
    lens_in = torch.full((seq_lens.numel() + 1,), -1, dtype=torch.int32, device=DEVICE)
    lens_in[1:] = seq_lens
    sliced = tile_tables_triton(mask_in[3:].view_as(mask), kv, tile, lens_in[1:], bs, page, block_table, max_pages)
    assert all(torch.equal(g, w) for g, w in zip(sliced[:3], want[:3], strict=True))
    # Every tile's list ends with the page holding its last query (FA3's causal alignment needs it).
    last_page = block_table[(seq_lens - 1) // page]
    idx = (got[1] - 1).clamp_min(0).long()
    assert torch.equal(got[0].gather(2, idx[..., None])[..., 0], last_page[None].expand_as(idx))


@pytest.mark.parametrize("case", TILE_CASES)
@pytest.mark.parametrize("tile", [1, 3, None])
@pytest.mark.parametrize("per_q_head", [False, True], ids=["list-per-kv-head", "list-per-q-head"])
@pytest.mark.parametrize("tail", [False, True], ids=["", "dense-tail"])
def test_tile_tables_kernel_writes_packed_tables_as_reference(case, tile, per_q_head, tail):
    """With `ListPacking` (one FlashAttention call for every list): the same counts and lengths, every kept page's
    id in the heads-as-pages view (physical id * page ratio + the list's KV head; 0 past the count), and the packed
    queries' start of each (list, tile) and their end, list after list. `dense-tail`: the last tile a dense tail's,
    so the packed queries are the tokens before it (`q_tokens`) and its start is capped there (an empty sequence)."""
    kv, group, bs, page, ctx, q_len = case
    mask, block_table, max_pages, tile, bounds, seq_lens = _tile_case(case, tile, sum(case) * 7 + (tile or 0))
    lists = kv * group if per_q_head else kv
    ratio = page * kv  # (vLLM 0.26's cache: a page's heads, each 2 x head_dim, over one head's stride)
    if tail:  # (as `batch.DenseTail.packed_query_start_loc`: the tiles' starts capped at the tail's first token)
        q_len = int(bounds[-2])
        bounds = bounds.clamp(max=q_len)
    packing = ListPacking(ratio, lists // kv, bounds, q_len)
    plain = tile_tables_ref(mask, lists, tile, seq_lens, bs, page, block_table, max_pages)
    want = tile_tables_ref(mask, lists, tile, seq_lens, bs, page, block_table, max_pages, packing)
    got = tile_tables_triton(mask, lists, tile, seq_lens, bs, page, block_table, max_pages, packing)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert torch.equal(got[1], plain[1]) and torch.equal(got[2], plain[2])
    live = torch.arange(max_pages, device=DEVICE) < got[1][..., None]
    heads = (torch.arange(lists, device=DEVICE) // (lists // kv))[:, None, None]
    assert torch.equal(got[0], torch.where(live, plain[0] * ratio + heads, 0))
    starts = [i * q_len + int(b) for i in range(lists) for b in bounds[:-1]]
    assert got[3].tolist() == starts + [lists * q_len]


@pytest.mark.parametrize("page,block,head_dim,kv_heads", [(16, 32, 32, 2), (16, 16, 64, 1), (8, 32, 24, 3)])
def test_block_key_means_kernel_matches_reference(page, block, head_dim, kv_heads):
    g = torch.Generator().manual_seed(page * block + head_dim)
    n_pages = 21
    dtype = torch.bfloat16 if GPU else torch.float16
    packed = torch.randn(n_pages, page, kv_heads, 2 * head_dim, generator=g).to(DEVICE, dtype)
    kv = PagedKV.from_flash_cache(packed.permute(0, 2, 1, 3))  # vLLM 0.26's FlashAttention layout
    table = torch.randperm(n_pages, generator=g).to(torch.int32).to(DEVICE)
    for seq_len in (1, page, 2 * block + 5, n_pages * page - 3):
        want = block_key_means_ref(kv, table, seq_len, block)
        got = block_key_means_triton(kv, table, seq_len, block)
        assert got.shape == want.shape == (kv_heads, (seq_len - 1) // block + 1, head_dim)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_warm_up_compiles_every_row_bucket_and_budget_kind(monkeypatch):
    """Engine start launches each selection kernel once per row bucket up to max_model_len and per
    budget kind, so no request compiles (checked here with recorders in place of the kernels)."""
    from vllm_sparse.backend import warmup
    from vllm_sparse.kernels.launch import row_bucket, row_buckets

    seen = {"select": set(), "tables": set(), "means": 0}

    def select(scores, budget, first):
        seen["select"].add((row_bucket(scores.shape[-1], torch.device("cuda")), budget.top_p is not None,
                            budget.max_blocks is not None))
        return torch.ones(scores.shape, dtype=torch.bool)

    def tables(mask, *args):
        seen["tables"].add((row_bucket(mask.shape[-1], torch.device("cuda")), mask.shape[0]))

    def means(*args):
        seen["means"] += 1

    monkeypatch.setattr(warmup, "select_blocks_triton", select)
    monkeypatch.setattr(warmup, "tile_tables_triton", tables)
    monkeypatch.setattr(warmup, "block_key_means_triton", means)
    # (real kernels: CPU tensors here, which a GPU host's compiled Triton refuses)
    monkeypatch.setattr(warmup, "record_density_kernel", lambda *a: None)
    monkeypatch.setattr(warmup, "add_page_count", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    kinds = ((False, False), (True, True))
    max_blocks = 5000  # e.g. 640K tokens in 128-token blocks
    warmup._compile.__wrapped__(kinds, 4, 128, 16, 64, torch.float16, max_blocks, "cpu", True)
    assert row_buckets(max_blocks) == [1024, 2048, 4096, 8192]
    assert seen["select"] == {(n, *k) for n in row_buckets(max_blocks) for k in kinds}
    # Table masks with a row per q head (group 4) and per KV head (estimators that score per group).
    assert seen["tables"] == {(n, g) for n in row_buckets(max_blocks) for g in (4, 1)} and seen["means"] == 1


def test_dummy_sparse_step_runs_every_head_plan_set_and_leaves_stats_alone():
    """The engine-start step runs the whole sparse path once per distinct set of head plans (here on
    the CPU reference path), and counts nothing into the eval statistics."""
    from pathlib import Path

    from vllm_sparse.backend import warmup
    from vllm_sparse.config.loader import load_config
    from vllm_sparse.config.plan import ModelShape, resolve_plan
    from vllm_sparse.config.sharding import head_shard
    from vllm_sparse.selection.stats import STATS

    shape = ModelShape("org/llama-3-tiny", ("LlamaForCausalLM",), num_layers=4, num_q_heads=8, num_kv_heads=2)
    plan = resolve_plan(load_config(Path(__file__).parents[1] / "configs/llama-3.yaml"), shape, "llama")
    calls = []
    import vllm_sparse.backend.sparse_path as sparse_path

    original = sparse_path.attend_sparse_chunks  # the warm-up imports it when it runs: a spy can wrap it

    def spy(q, out, *args, **kwargs):
        out.fill_(float("nan"))
        original(q, out, *args, **kwargs)
        calls.append(bool(out.isfinite().all()))

    STATS.enable()
    STATS.reset()
    try:
        sparse_path.attend_sparse_chunks = spy
        warmup.run_dummy_sparse_steps(plan, head_shard(8, 2, 0, 1, "llama"), 2, 16, 16, torch.float32,
                                      torch.device("cpu"))
        assert STATS.enabled and not STATS.snapshot()
    finally:
        sparse_path.attend_sparse_chunks = original
        STATS.enabled = STATS.audit = False
    assert calls == [True]  # layers 2-3 share one set of head plans: one step, every output row written
    # 2 KV heads over 4 ranks: the rank's 2 q heads, and its group's 4 (masks and scoring of split groups).
    calls.clear()
    try:
        sparse_path.attend_sparse_chunks = spy
        warmup.run_dummy_sparse_steps(plan, head_shard(8, 2, 1, 4, "llama"), 1, 16, 16, torch.float32,
                                      torch.device("cpu"))
    finally:
        sparse_path.attend_sparse_chunks = original
    assert calls == [True, True]


@pytest.mark.parametrize("case", TILE_CASES)
@pytest.mark.parametrize("tile", [1, 2, 3, None])
def test_chunk_causal_pages_on_the_host_match_the_tiles(case, tile):
    """The density metric's denominator, from host lengths, is the tiles' causal pages the device path summed."""
    kv, group, bs, page, ctx, q_len = case
    first, nkb = ctx // bs, (ctx + q_len - 1) // bs + 1
    rows = nkb - first
    _, seq_lens = tile_seq_lens(first, -(-rows // (tile or rows)), tile or rows, bs, ctx, q_len, torch.device("cpu"))
    assert chunk_causal_pages(ctx, q_len, bs, tile or rows, page) == int(((seq_lens + page - 1) // page).sum())
