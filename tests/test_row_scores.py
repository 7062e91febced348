"""The fused per-row estimators (`estimators/row_scores.py`) against their torch paths.

`antidiagonal`, sampled-row `lowbit` (int8 and int4) and `vertical_slash` score blocks from the
cache in Triton without a [heads, rows, context] tensor; their torch paths are the references.
Random paged GQA inputs, pages shuffled, chunks with and without context (also unaligned to the
stride), head subsets (per-head plans), workspaces too small for one slab, blocks wider than a
tile. The workspace is poisoned with NaN first, so a score built from an entry no kernel wrote
fails. On a CPU host the kernels run in Triton's interpreter (fp32/fp16); with a GPU compiled,
bf16 included, and at a 32K-context shape whose peak memory is checked.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.fixtures.paged import random_paged_batch
from vllm_sparse.estimators.base import ChunkContext
from vllm_sparse.estimators.registry import get_estimator
from vllm_sparse.estimators.row_scores import ScoredRows, query_block_slabs
from vllm_sparse.kernels.paged import PagedKV
from vllm_sparse.kernels.workspace import WORKSPACE

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])
HQ, HKV, D, PAGE = 6, 2, 32, 16

CASES = [
    # estimator params, block size
    ("antidiagonal", {"stride": 8}, 64),
    ("antidiagonal", {"stride": 4}, 32),
    ("antidiagonal", {"stride": 1}, 128),  # a block spans two column tiles
    ("antidiagonal", {"stride": 8, "bits": 8}, 64),  # int8 rows and key columns quantized before the product
    ("antidiagonal", {"stride": 4, "bits": 4}, 32),
    ("antidiagonal", {"stride": 16, "bits": 8}, 128),  # XAttention's other stride: 16 x head_dim bytes per row
    ("antidiagonal", {"stride": 32, "bits": 8}, 128),  # half stride 16's work: an estimator that bounds 1M's share
    ("lowbit", {"sample_stride": 8}, 64),
    ("lowbit", {"sample_stride": 5, "bits": 4}, 64),
    ("lowbit", {"sample_stride": 16}, 256),  # wider than a tile: the in-tile quantizing kernel
    ("lowbit", {"sample_stride": 100}, 64),  # query blocks without a scored row
    ("vertical_slash", {"last_q": 40, "vertical_size": 50, "slash_size": 60}, 64),
]
SHAPES = [(700, 300), (705, 303), (400, 400)]  # (seq_len, q_len): context 400, 402 (unaligned), none


def _chunk(seq: int, q_len: int, bs: int, dtype, seed: int, heads=None) -> ChunkContext:
    b = random_paged_batch([seq], [q_len], HQ, HKV, D, PAGE, dtype=dtype, seed=seed)
    kv_of = torch.arange(HQ) // (HQ // HKV)
    q = b.q
    if heads is not None:  # a per-head plan scores a subset of the layer's heads
        q, kv_of = q[:, heads], kv_of[heads]
    kv = dataclasses.replace(b.kv, key=b.kv.key.to(DEVICE), value=b.kv.value.to(DEVICE))
    return ChunkContext(q.to(DEVICE), kv_of.to(DEVICE), kv, b.block_table[0].to(DEVICE), seq - q_len, bs, D**-0.5,
                        tuple(kv_of.tolist()))


def _poison_workspace(nbytes: int = 64 << 20) -> None:
    WORKSPACE.reserve(nbytes, torch.device(DEVICE))
    WORKSPACE.floats(WORKSPACE.reserved(torch.device(DEVICE)) // 4, torch.device(DEVICE)).fill_(float("nan"))


def _compare(chunk: ChunkContext, name: str, raw: dict) -> float:
    est = get_estimator(name)
    params = est.params(**raw)
    ref = est.score(dataclasses.replace(chunk, kernels=False), params)
    got = est.score(dataclasses.replace(chunk, kernels=True), params)
    assert got.shape == ref.shape == (chunk.q.shape[1], chunk.num_query_blocks, chunk.num_kv_blocks)
    assert not torch.isnan(got).any(), "a score was built from workspace no kernel wrote"
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(got)), "causal pattern differs"
    return float((ref[finite] - got[finite]).abs().max())


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'-'.join(f'{k}{v}' for k, v in c[1].items())}-b{c[2]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"seq{s[0]}-q{s[1]}")
def test_fused_scores_match_torch(case, shape):
    name, raw, bs = case
    _poison_workspace()
    for dtype in DTYPES:
        chunk = _chunk(*shape, bs, dtype, seed=sum(shape) + bs)
        # log-mass scores; the torch path sums in another order (and tf32-free fp32 on the GPU)
        assert _compare(chunk, name, raw) < 2e-4, dtype


@pytest.mark.parametrize("name,raw", [("antidiagonal", {"stride": 4}), ("antidiagonal", {"stride": 4, "bits": 8}),
                                      ("lowbit", {"sample_stride": 7}),
                                      ("vertical_slash", {"last_q": 20, "vertical_size": 30, "slash_size": 30})])
@pytest.mark.parametrize("heads", [[0, 3, 5], [3, 4, 5], [1]], ids=str)
def test_fused_scores_on_head_subsets(name, raw, heads):
    _poison_workspace()
    assert _compare(_chunk(705, 303, 64, torch.float32, seed=len(heads), heads=heads), name, raw) < 2e-4


@pytest.mark.parametrize("name,raw", [("antidiagonal", {"stride": 2}), ("antidiagonal", {"stride": 2, "bits": 8}),
                                      ("lowbit", {"sample_stride": 3})])
def test_fused_scores_in_slabs_when_the_workspace_is_small(name, raw, monkeypatch):
    # 16 KiB holds two or three query blocks' rows: the chunk (23 query blocks, its context unaligned to
    # them) runs in many slabs, none allocating.
    monkeypatch.setattr(WORKSPACE, "_buffers", {})
    WORKSPACE.reserve(16 << 10, torch.device(DEVICE))
    WORKSPACE.floats(4 << 10, torch.device(DEVICE)).fill_(float("nan"))
    chunk = _chunk(480, 360, 16, torch.float32, seed=5)
    per_qb = HQ * chunk.num_kv_blocks * -(-16 // raw.get("stride", raw.get("sample_stride", 1)))
    assert WORKSPACE.capacity(torch.device(DEVICE)) < chunk.num_query_blocks * per_qb  # several slabs
    assert _compare(chunk, name, raw) < 2e-4


def _five_kv_heads(seed: int, block_size: int) -> ChunkContext:
    """A 140-token chunk after 160 of context, 10 q heads over 5 KV heads: passes of several KV heads."""
    b = random_paged_batch([300], [140], 10, 5, D, PAGE, dtype=torch.float32, seed=seed)
    kv_of = torch.arange(10) // 2
    kv = dataclasses.replace(b.kv, key=b.kv.key.to(DEVICE), value=b.kv.value.to(DEVICE))
    return ChunkContext(b.q.to(DEVICE), kv_of.to(DEVICE), kv, b.block_table[0].to(DEVICE), 160, block_size,
                        D**-0.5, tuple(kv_of.tolist()))


@pytest.mark.parametrize("counted", [None, 1, 2], ids=["cap", "one-head", "two-heads"])
def test_quantized_key_columns_of_many_kv_heads_per_launch(counted, monkeypatch):
    # Five KV heads: key columns of all of them in one launch (no count: the cap holds them), one per launch,
    # or two per launch (the count covers twice the context: passes of 2, 2 and 1). Scores are the same.
    chunk = _five_kv_heads(11, 64)
    fused = dataclasses.replace(chunk, kernels=True)
    monkeypatch.setattr(WORKSPACE, "_key_tokens", {})
    if counted:
        WORKSPACE.count_key_columns(counted * 300, torch.device(DEVICE))
    assert WORKSPACE.key_column_heads(5, 300, D + 4, torch.device(DEVICE)) == (counted or 5)
    # A workspace that holds the chunk's rows and no more: the key columns go where the count says.
    monkeypatch.setattr(WORKSPACE, "_buffers", {})
    _poison_workspace(4 << 10)
    assert _compare(chunk, "antidiagonal", {"stride": 8, "bits": 8}) < 2e-4
    est = get_estimator("antidiagonal")
    got = est.score(fused, est.params(stride=8, bits=8))
    # Against the other extreme: every head in one launch for the one-head case, one head a launch for the others.
    monkeypatch.setattr(WORKSPACE, "_key_tokens", {})
    if counted != 1:
        WORKSPACE.count_key_columns(300, torch.device(DEVICE))
    assert torch.equal(got, est.score(fused, est.params(stride=8, bits=8)))


def test_key_columns_of_every_kv_head_in_the_room_the_rows_leave(monkeypatch):
    # One KV head's key columns counted at this context, and a reserved workspace with room beside the chunk's
    # rows: the int8 copy of every KV head's columns lives in that room (no allocation), one pass quantizes and
    # scores them all, and the scores are, bit for bit, those of one KV head a pass (the counted rule).
    from vllm_sparse.estimators import row_scores

    chunk = _five_kv_heads(13, 64)
    fused = dataclasses.replace(chunk, kernels=True)
    est = get_estimator("antidiagonal")
    params = est.params(stride=8, bits=8)
    monkeypatch.setattr(WORKSPACE, "_key_tokens", {})
    WORKSPACE.count_key_columns(chunk.seq_len, torch.device(DEVICE))
    quantized, placed = [], []
    original_quantize, original_place = row_scores._RowLse._quantize_columns, row_scores._RowLse._place_key_columns

    def _quantize(self, kv0, heads):
        quantized.append((kv0, heads))
        return original_quantize(self, kv0, heads)

    def _place(self, *args):
        original_place(self, *args)
        placed.append(self.k_in.untyped_storage().data_ptr())

    monkeypatch.setattr(row_scores._RowLse, "_quantize_columns", _quantize)
    monkeypatch.setattr(row_scores._RowLse, "_place_key_columns", _place)
    scores = {}
    for room in (False, True):
        monkeypatch.setattr(WORKSPACE, "_buffers", {})
        _poison_workspace((64 << 10) if room else (4 << 10))  # the rows take ~3.6 KiB
        quantized.clear(), placed.clear()
        scores[room] = est.score(fused, params)
        assert quantized == ([(0, 5)] if room else [(kv, 1) for kv in range(5)])
        assert WORKSPACE.reserved(torch.device(DEVICE)) > 0  # (else `floats` below would allocate, not point at it)
        reserved = WORKSPACE.floats(1, torch.device(DEVICE)).untyped_storage().data_ptr()  # the reservation (its head)
        assert (placed == [reserved]) is room  # the copy: in the workspace, or allocated
        assert not torch.isnan(scores[room]).any()
    assert torch.equal(scores[True], scores[False])
    assert _compare(chunk, "antidiagonal", {"stride": 8, "bits": 8}) < 2e-4


def test_passes_over_key_columns_quantize_once_through_many_slabs(monkeypatch):
    # One KV head's key columns a launch (the count covers one head at this context) and a workspace that holds
    # two or three query blocks' rows: each pass runs through every slab before the next, so each KV head's keys
    # are quantized once (not once a slab), and the scores are the torch path's.
    from vllm_sparse.estimators import row_scores

    monkeypatch.setattr(WORKSPACE, "_buffers", {})
    monkeypatch.setattr(WORKSPACE, "_key_tokens", {})
    WORKSPACE.reserve(16 << 10, torch.device(DEVICE))
    WORKSPACE.floats(4 << 10, torch.device(DEVICE)).fill_(float("nan"))
    chunk = _chunk(480, 360, 16, torch.float32, seed=6)
    WORKSPACE.count_key_columns(chunk.seq_len, torch.device(DEVICE))
    assert WORKSPACE.key_column_heads(HKV, chunk.seq_len, D + 4, torch.device(DEVICE)) == 1
    per_qb = (HQ // HKV) * chunk.num_kv_blocks * 16 // 2  # one pass's heads, stride 2
    assert WORKSPACE.capacity(torch.device(DEVICE)) < chunk.num_query_blocks * per_qb  # several slabs a pass
    quantized = []
    original = row_scores._RowLse._quantize_columns
    monkeypatch.setattr(row_scores._RowLse, "_quantize_columns",
                        lambda self, kv0, heads: (quantized.append((kv0, heads)), original(self, kv0, heads))[1])
    assert _compare(chunk, "antidiagonal", {"stride": 2, "bits": 8}) < 2e-4
    assert quantized == [(kv, 1) for kv in range(HKV)]


@pytest.mark.parametrize("slab_heads,runs", [(10, [10]), (4, [4, 4, 2]), (2, [2, 2, 2, 2, 2])],
                         ids=["all", "two-passes", "one-pass"])
def test_passes_over_key_columns_share_mass_launches_while_their_rows_fit_one_slab(slab_heads, runs, monkeypatch):
    # Five KV heads of two q heads, one KV head's key columns a launch, and a workspace that holds the chunk's rows
    # of `slab_heads` q heads: consecutive passes join one run while its rows fit one slab, and each run is one
    # mass launch over its heads (a launch per pass would hold one GQA group's heads: too few programs for a GPU);
    # each KV head's keys quantized once; the torch path's scores.
    from vllm_sparse.estimators import row_scores

    chunk = _five_kv_heads(12, 16)
    n_rows = -(-chunk.q.shape[0] // 2) + 1  # stride-2 rows of the chunk (its context is even: one more at most)
    monkeypatch.setattr(WORKSPACE, "_buffers", {})
    monkeypatch.setattr(WORKSPACE, "_key_tokens", {})
    WORKSPACE.reserve(slab_heads * n_rows * chunk.num_kv_blocks * 4, torch.device(DEVICE))
    WORKSPACE.floats(WORKSPACE.reserved(torch.device(DEVICE)) // 4, torch.device(DEVICE)).fill_(float("nan"))
    WORKSPACE.count_key_columns(chunk.seq_len, torch.device(DEVICE))
    assert WORKSPACE.key_column_heads(5, chunk.seq_len, D + 4, torch.device(DEVICE)) == 1
    quantized, grids = [], []
    original_quantize, original_mass = row_scores._RowLse._quantize_columns, row_scores._block_mass_kernel

    def _quantize(self, kv0, heads):
        quantized.append((kv0, heads))
        return original_quantize(self, kv0, heads)

    class _Recorded:
        def __getitem__(self, grid):
            grids.append(grid)
            return original_mass[grid]

    monkeypatch.setattr(row_scores._RowLse, "_quantize_columns", _quantize)
    monkeypatch.setattr(row_scores, "_block_mass_kernel", _Recorded())
    assert _compare(chunk, "antidiagonal", {"stride": 2, "bits": 8}) < 2e-4
    assert quantized == [(kv, 1) for kv in range(5)]
    assert [h for _, h in grids] == runs
    assert {qbs for qbs, _ in grids} == {chunk.num_query_blocks}  # each run in one slab


def test_fused_lowbit_quantizes_like_the_reference():
    """Keys quantized in the kernel equal quantize_symmetric's (ties to even, per-key scales): the
    int8 scores match exactly-computed reference scores far tighter than a float product would."""
    chunk = dataclasses.replace(_chunk(600, 200, 64, torch.float32, seed=9), scale=1e-3)  # moderate logits
    # Every key's largest entry is 127, so its scale is exactly 1 and the half-integer entries are
    # rounding ties: a kernel rounding half away from zero (or half up) would give other integers.
    key = chunk.kv.key
    key.copy_(torch.round(key * 20) / 2)
    key[..., 0] = 127.0
    assert _compare(chunk, "lowbit", {"sample_stride": 4}) < 1e-4  # one key entry off by 1: ~4e-3


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs CUDA")
@pytest.mark.parametrize("name,raw", [("antidiagonal", {"stride": 8}), ("antidiagonal", {"stride": 8, "bits": 8}),
                                      ("lowbit", {"sample_stride": 16})])
def test_fused_scores_stay_within_the_workspace_at_32k(name, raw, monkeypatch):
    """32K context, 8K chunk, Llama-8B heads: the torch path holds [32, rows, 32K] fp32 logits (0.5-2 GiB);
    the fused path's peak beyond its inputs (and the reserved workspace) is a small share of that."""
    from tests.fixtures.paged import random_paged_batch as batch

    seq, q_len, hq, hkv, d = 32768, 8192, 32, 8, 128
    b = batch([seq], [q_len], hq, hkv, d, PAGE, dtype=torch.bfloat16, seed=3)
    kv = dataclasses.replace(b.kv, key=b.kv.key.cuda(), value=b.kv.value.cuda())
    chunk = ChunkContext(b.q.cuda(), (torch.arange(hq) // (hq // hkv)).cuda(), kv, b.block_table[0].cuda(),
                         seq - q_len, 128, d**-0.5, tuple(h // (hq // hkv) for h in range(hq)))
    est = get_estimator(name)
    params = est.params(**raw)
    monkeypatch.setattr(WORKSPACE, "_buffers", {})  # (a fresh reservation of this size, whatever came before)
    WORKSPACE.reserve(512 << 20, torch.device("cuda"))
    monkeypatch.setattr(WORKSPACE, "_key_tokens", {})
    WORKSPACE.count_key_columns(seq, torch.device("cuda"))  # an engine whose longest context is this one's
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = est.score(chunk, params)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    stride = raw.get("stride", 1)
    logits_bytes = hq * est.workspace_rows(params, q_len) * (seq // stride) * 4  # the torch path's [h, rows, ctx]
    # antidiagonal: the scores alone (its rows' workspace, 1/16 of the logits, comes from the reservation), and
    # with bits the int8 copies of the chunk's queries and of one KV head's keys
    quantized = (q_len * hq + seq) * d if name == "antidiagonal" and raw.get("bits") else 0
    assert extra < logits_bytes / 16 + quantized, \
        f"{extra / 2**20:.0f} MiB beyond the inputs ({logits_bytes / 2**20:.0f} MiB)"
    ref = est.score(dataclasses.replace(chunk, kernels=False), params)
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(got))
    assert float((ref[finite] - got[finite]).abs().max()) < 1e-3


@pytest.mark.skipif(GPU, reason="CPU twin of test_fused_scores_compiled_for_each_head_dim")
@pytest.mark.parametrize("head_dim,hq,hkv", [(128, 4, 2), (256, 2, 1)], ids=lambda v: str(v))
@pytest.mark.parametrize("name,raw", [("antidiagonal", {"stride": 8, "bits": 8}), ("lowbit", {"sample_stride": 16}),
                                      ("vertical_slash", {"last_q": 32, "vertical_size": 40, "slash_size": 50})])
def test_fused_scores_for_wide_heads_in_the_interpreter(name, raw, head_dim, hq, hkv):
    """Llama's and Gemma 3's head sizes take their own tile settings: in Triton's interpreter at a short context."""
    seq, q_len = 320, 128
    _poison_workspace()
    b = random_paged_batch([seq], [q_len], hq, hkv, head_dim, PAGE, dtype=torch.float16, seed=head_dim)
    kv_of = torch.arange(hq) // (hq // hkv)
    chunk = ChunkContext(b.q, kv_of, b.kv, b.block_table[0], seq - q_len, 64, head_dim**-0.5, tuple(kv_of.tolist()))
    assert _compare(chunk, name, raw) < 2e-4


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs CUDA")
@pytest.mark.parametrize("head_dim,hq,hkv", [(64, 8, 2), (128, 32, 8), (256, 4, 1)], ids=lambda v: str(v))
@pytest.mark.parametrize("name,raw", [("antidiagonal", {"stride": 8}), ("antidiagonal", {"stride": 8, "bits": 8}),
                                      ("antidiagonal", {"stride": 16, "bits": 8}), ("lowbit", {"sample_stride": 16}),
                                      ("vertical_slash", {"last_q": 64, "vertical_size": 256, "slash_size": 512})])
def test_fused_scores_compiled_for_each_head_dim(name, raw, head_dim, hq, hkv):
    """The launch configurations per head size (Llama 64/128, Gemma 3's 256) compile and agree with torch,
    bf16, an 8K context with a 2K chunk (the CPU twin: the small-shape tests above)."""
    seq, q_len = 8192, 2048
    b = random_paged_batch([seq], [q_len], hq, hkv, head_dim, PAGE, dtype=torch.bfloat16, seed=head_dim)
    kv = dataclasses.replace(b.kv, key=b.kv.key.cuda(), value=b.kv.value.cuda())
    chunk = ChunkContext(b.q.cuda(), (torch.arange(hq) // (hq // hkv)).cuda(), kv, b.block_table[0].cuda(),
                         seq - q_len, 128, head_dim**-0.5, tuple(h // (hq // hkv) for h in range(hq)))
    assert _compare(chunk, name, raw) < 1e-3


@pytest.mark.parametrize("rows", [ScoredRows(first=400, step=8, count=38, stride=8),
                                  ScoredRows(first=403, step=8, count=38),
                                  ScoredRows(first=402, step=100, count=4)], ids=str)
@pytest.mark.parametrize("max_rows", [1, 5, 17, 1000])
def test_query_block_slabs_cover_every_row_once_in_whole_blocks(rows, max_rows):
    chunk = _chunk(705, 303, 32, torch.float32, seed=1)
    slabs = list(query_block_slabs(rows, chunk, max_rows))
    assert slabs[0][0] == 0 and slabs[-1][1] == chunk.num_query_blocks
    assert all(a[1] == b[0] for a, b in zip(slabs, slabs[1:]))  # consecutive runs of query blocks
    assert [s[2] for s in slabs] == [sum(s[3] for s in slabs[:i]) for i in range(len(slabs))]
    assert sum(s[3] for s in slabs) == rows.count
    for qa, qz, r0, n in slabs:  # at most max_rows, unless one block alone holds more
        assert n <= max_rows or qz == qa + 1
        # each row's last token lies in the slab's blocks
        for j in range(r0, r0 + n):
            assert qa <= rows.last_token(j, chunk.seq_len) // 32 - chunk.first_query_block < qz


def test_reserved_workspace_holds_the_largest_chunk_in_one_slab(monkeypatch):
    """The engine reserves what a max-size chunk at max_model_len needs (capped), so the chunk runs in
    one slab and never allocates."""
    from vllm_sparse.backend.reserve import estimator_workspace_bytes, reserve_estimator_workspace
    from vllm_sparse.config.loader import load_config
    from vllm_sparse.config.plan import ModelShape, resolve_plan

    llama = ModelShape("llama-3.1-8b", ("LlamaForCausalLM",), 32, 32, 8)
    plan = resolve_plan(load_config("configs/llama-3.yaml"), llama, "shipped")
    need = estimator_workspace_bytes(plan, 32, 16384, 131072)
    # antidiagonal stride 8: a float per (q head, 16K / 8 rows, 128K / 128 blocks)
    assert 32 * 2048 * 1024 * 4 <= need <= 32 * 2050 * 1024 * 4
    assert estimator_workspace_bytes(plan, 32, 16384, 1 << 20) > 1 << 30  # 1M context: slabs under the cap
    assert estimator_workspace_bytes(plan, 32, 16384, 131072, 8, 128) == need  # (bf16 rows: no key columns)
    int8 = resolve_plan(load_config("benchmarks/configs/llama-3-8b-antidiagonal-10-s16-int8.yaml"), llama, "bench")
    rows_only = estimator_workspace_bytes(int8, 32, 16384, 131072)
    # int8 rows: room for a 4K chunk's rows (258 rows of 16 tokens) beside 8 KV heads' key columns at 128K
    columns = 8 * (8192 * 16 * 128 + 8192 * 4)
    assert estimator_workspace_bytes(int8, 32, 16384, 131072, 8, 128) == max(rows_only, 32 * 259 * 1024 * 4
                                                                           + columns + 4096)
    monkeypatch.setattr(WORKSPACE, "_buffers", {})
    held = reserve_estimator_workspace(plan, 32, 16384, 131072, torch.device("cpu"))
    assert held == WORKSPACE.reserved(torch.device("cpu")) >= need
    rows = ScoredRows(first=131072 - 16384, step=8, count=2048, stride=8)
    chunk = dataclasses.replace(_chunk(705, 303, 128, torch.float32, seed=2), context_len=131072 - 16384,
                                q=torch.empty(16384, 32, 128))
    slabs = list(query_block_slabs(rows, chunk, WORKSPACE.capacity(torch.device("cpu")) // (32 * 1024)))
    assert len(slabs) == 1
    monkeypatch.setenv("VLLM_SPARSE_WORKSPACE_MIB", "64")  # the cap wins over the need
    monkeypatch.setattr(WORKSPACE, "_buffers", {})
    assert reserve_estimator_workspace(plan, 32, 16384, 131072, torch.device("cpu")) == 64 << 20


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs CUDA")
def test_workspace_reserved_on_cuda_serves_cuda_and_cuda_index(monkeypatch):
    """The engine reserves on cuda:N; tensors report cuda:N; tools say "cuda": one buffer for all three."""
    monkeypatch.setattr(WORKSPACE, "_buffers", {})
    WORKSPACE.reserve(8 << 20, torch.device("cuda", torch.cuda.current_device()))
    head = WORKSPACE.floats(1024, torch.device("cuda"))
    assert head.data_ptr() == WORKSPACE.floats(1024, torch.empty(1, device="cuda").device).data_ptr()
    assert WORKSPACE.capacity(torch.device("cuda")) == (8 << 20) // 4


def test_step_temporaries_bound_covers_the_measured_peaks_and_scales_with_the_context():
    """The bound the engine counts in vLLM's memory profile (`reserve.py`) covers what one chunk-layer
    allocated on an H200 from 128K to 1M tokens (benchmarks/results/temporaries_h200.json, recomputed here
    from today's formula), and follows the plan: nothing for a dense plan, a table per q head without
    the union over heads, the line sums for vertical_slash only."""
    import json
    from pathlib import Path

    from vllm_sparse.backend.reserve import chunk_temporaries_bytes, step_temporaries_bytes
    from vllm_sparse.config.loader import load_config, parse_config
    from vllm_sparse.config.plan import ModelShape, resolve_plan

    measured = json.loads((Path(__file__).parents[1] / "benchmarks/results/temporaries_h200.json").read_text())
    for row in measured["rows"]:
        lines = row["estimator"] == "vertical_slash"
        bound = chunk_temporaries_bytes(32, 8, 16384, row["ctx"], 128, 16, 1, True, lines)
        assert bound >= row["kernels_peak_gib"] * 2**30, (row["estimator"], row["ctx"])

    at = lambda ctx, **kw: chunk_temporaries_bytes(32, 8, 16384, ctx, 128, 16, 1, **{  # noqa: E731
        "union_heads": True, "line_sums": False, **kw})
    assert 1.9 < at(1 << 20) / at(1 << 19) < 2.1  # linear in the context
    assert at(1 << 20, line_sums=True) - at(1 << 20) == 32 * (1 << 20) * 32
    # quantized antidiagonal: int8 queries of the chunk and one KV head's keys, with their scales
    assert at(1 << 20, quantized_head_dim=128) - at(1 << 20) == (32 * (16384 + 256) + (1 << 20) + 128) * 132
    own = at(1 << 20, union_heads=False) - at(1 << 20)
    assert own == (32 - 8) * 129 * ((1 << 20) // 16 * 4 + (1 << 20) // 128)  # a table per q head, not per KV head

    llama = ModelShape("llama-3.1-8b", ("LlamaForCausalLM",), 32, 32, 8)
    plan = resolve_plan(load_config("configs/llama-3.yaml"), llama, "shipped")
    assert step_temporaries_bytes(plan, 32, 8, 16384, 1 << 20, 16) == chunk_temporaries_bytes(
        32, 8, 16384, 1 << 20, plan.block_size, 16, plan.union_tile, plan.union_heads, False)
    raw = {"version": 1, "models": [{"match": {"architectures": ["LlamaForCausalLM"]},
                                     "layers": [{"layers": "all", "dense": True}]}]}
    int8 = dataclasses.replace(plan, layers=tuple(dataclasses.replace(lp, heads=tuple(
        dataclasses.replace(hp, params=hp.params.model_copy(update={"bits": 8})) if hp else hp for hp in lp.heads))
        for lp in plan.layers))
    assert step_temporaries_bytes(int8, 32, 8, 16384, 1 << 20, 16, 128) == chunk_temporaries_bytes(
        32, 8, 16384, 1 << 20, plan.block_size, 16, plan.union_tile, plan.union_heads, False, quantized_head_dim=128)
    dense = resolve_plan(parse_config(raw, "test"), llama, "test")
    assert step_temporaries_bytes(dense, 32, 8, 16384, 1 << 20, 16) == 0


FP8_CASES = [
    ("antidiagonal", {"stride": 8}, 64),
    ("antidiagonal", {"stride": 8, "bits": 8}, 64),  # key columns quantized from fp8 pages
    ("lowbit", {"sample_stride": 8}, 64),
    ("vertical_slash", {"last_q": 40, "vertical_size": 50, "slash_size": 60}, 64),
    ("pooled", {}, 64),  # block-mean keys (the block_means kernel)
]


@pytest.mark.parametrize("case", FP8_CASES, ids=lambda c: f"{c[0]}-{'-'.join(f'{k}{v}' for k, v in c[1].items())}")
def test_estimators_read_fp8_caches(case):
    """An fp8 KV cache (e4m3, per-tensor scale as vLLM's): the torch path scores what it scores on the
    dequantized cache, and the kernels agree with it (the scale folded into their logit scale)."""
    from tests.fixtures.paged import dequantized, to_fp8

    name, raw, bs = case
    chunk = _chunk(705, 303, bs, torch.float16 if DEVICE == "cpu" else torch.bfloat16, seed=23)
    kv8 = to_fp8(PagedKV(chunk.kv.key.cpu(), chunk.kv.value.cpu()))
    fp8 = dataclasses.replace(chunk, kv=PagedKV(kv8.key.to(DEVICE), kv8.value.to(DEVICE), kv8.k_scale, kv8.v_scale))
    plain = dataclasses.replace(chunk, kv=PagedKV(*(t.to(DEVICE) for t in (dequantized(kv8).key,
                                                                           dequantized(kv8).value))))
    est = get_estimator(name)
    params = est.params(**raw)
    ref = est.score(dataclasses.replace(plain, kernels=False), params)
    ref8 = est.score(dataclasses.replace(fp8, kernels=False), params)
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(ref8))
    assert float((ref[finite] - ref8[finite]).abs().max()) < 1e-4
    if name in ("antidiagonal", "lowbit", "vertical_slash"):  # the fused kernels
        assert _compare(fp8, name, raw) < 1e-2
    else:  # the block means' kernel (used on GPUs) against the torch means of the dequantized cache
        from vllm_sparse.estimators.block_means import block_key_means_ref, block_key_means_triton

        got = block_key_means_triton(fp8.kv, fp8.block_table, fp8.seq_len, bs)
        want = block_key_means_ref(plain.kv, plain.block_table, plain.seq_len, bs)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
