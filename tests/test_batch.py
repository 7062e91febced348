"""Per-step batch split: which chunks go sparse, and the dense backend's metadata for the rest."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_sparse import compat
from vllm_sparse.backend.batch import SparseChunk, classify
from vllm_sparse.config.plan import chunk_work

# decode (seq 50) | prefill chunk with context (100 tokens, seq 400) | short prompt (30) | decode (seq 700)
Q_LENS, SEQ_LENS = [1, 100, 30, 1], [50, 400, 30, 700]


def _common():
    qsl = torch.tensor([0] + Q_LENS).cumsum(0).to(torch.int32)
    n = int(qsl[-1])
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=torch.tensor(SEQ_LENS, dtype=torch.int32),
        seq_lens_cpu_upper_bound=torch.tensor(SEQ_LENS, dtype=torch.int32),
        num_reqs=4, num_actual_tokens=n, max_query_len=100, max_seq_len=700,
        block_table_tensor=torch.arange(4 * 30, dtype=torch.int32).view(4, 30),
        slot_mapping=torch.arange(1000, 1000 + n, dtype=torch.int64), positions=torch.arange(n),
    )


def test_classify_sends_long_prefill_chunks_sparse():
    chunks, dense_reqs, dense_tokens = classify(_common(), min_context=300)
    assert chunks == [SparseChunk(req=1, q_start=1, q_end=101, context_len=300)]
    assert chunks[0].seq_len == 400
    assert dense_reqs.tolist() == [0, 2, 3]  # decodes stay dense however long; so do short prompts
    assert dense_tokens.tolist() == [0, *range(101, 131), 131]


def test_chunks_shorter_than_a_block_stay_dense():
    """A few query tokens over a long cached context (a speculative verify step, a short suffix after
    a prefix-cache hit) read the cache like a decode: dense, however long the context."""
    chunks, _, _ = classify(_common(), min_context=300, min_query_len=128)
    assert chunks == []  # the whole step keeps vLLM's own metadata
    chunks, _, _ = classify(_common(), min_context=300, min_query_len=100)
    assert [c.req for c in chunks] == [1]


def test_a_step_whose_longest_query_is_under_the_floor_reads_no_tensor():
    """Every decode step (and every short follow-up under `min_query_tokens`) is decided from the batch's host
    `max_query_len` alone: no per-request tensor is read or built."""
    decode = dataclasses.replace(_common(), max_query_len=1, query_start_loc_cpu=None, seq_lens_cpu_upper_bound=None)
    chunks, reqs, tokens = classify(decode, min_context=0)
    assert chunks == [] and len(reqs) == 0 and len(tokens) == 0
    short = dataclasses.replace(_common(), query_start_loc_cpu=None, seq_lens_cpu_upper_bound=None)  # longest 100
    assert classify(short, min_context=0, min_query_len=101)[0] == []
    with pytest.raises(TypeError):  # at the floor the per-request lengths are read
        classify(short, min_context=0, min_query_len=100)


def test_chunks_with_too_little_work_stay_dense():
    """`min_chunk_work`: a chunk goes sparse only when its causal attention work (each query token x the
    tokens it sees) reaches the floor: the 100-token chunk after 300 cached tokens does 100 * 300 + 5050."""
    work = 100 * 300 + 100 * 101 // 2
    assert chunk_work(torch.tensor(Q_LENS), torch.tensor(SEQ_LENS))[1] == work
    assert chunk_work(torch.tensor([1]), torch.tensor([50])).tolist() == [50]  # a decode row sees its context
    chunks, reqs, _ = classify(_common(), min_context=300, min_work=work + 1)
    assert chunks == []
    chunks, reqs, _ = classify(_common(), min_context=300, min_work=work)
    assert [c.req for c in chunks] == [1] and reqs.tolist() == [0, 2, 3]


def test_the_floors_are_the_devices_unless_the_plan_sets_them():
    from vllm_sparse.config.loader import parse_config
    from vllm_sparse.config.plan import AUTO_MIN_CHUNK_WORK, AUTO_MIN_QUERY_TOKENS, ModelShape, resolve_plan

    shape = ModelShape("m", ("LlamaForCausalLM",), 2, 4, 2)

    def plan(**entry):
        return resolve_plan(parse_config({"version": 1, "models": [{
            "match": {"architectures": ["LlamaForCausalLM"]}, **entry,
            "layers": [{"layers": "all", "estimator": {"name": "sink_local"}}]}]}, "test"), shape, "test")

    auto = plan()
    assert auto.min_chunk_work is None and auto.min_query_tokens is None
    assert auto.chunk_work_floor("cuda") == AUTO_MIN_CHUNK_WORK["cuda"] > 0
    assert auto.query_token_floor("cuda") == AUTO_MIN_QUERY_TOKENS["cuda"] > 16
    # The CPU path is the reference: its tests take every chunk of 16+ tokens.
    assert (auto.chunk_work_floor("cpu"), auto.query_token_floor("cpu")) == (0, 16)
    assert plan(min_chunk_work="96M").chunk_work_floor("cuda") == 96 * 2**20
    assert plan(min_chunk_work=0, min_query_tokens=16).query_token_floor("cuda") == 16
    assert plan(min_chunk_work=0).chunk_work_floor("cuda") == 0
    assert plan(min_chunk_work="1.5g").chunk_work_floor("cpu") == 3 * 2**29


def test_requests_with_bidirectional_multimodal_ranges_stay_dense_and_keep_their_ranges():
    import dataclasses

    cm = dataclasses.replace(_common(), mm_req_doc_ranges={1: [(310, 340)], 2: [(0, 10)]})
    chunks, reqs, tokens = classify(cm, min_context=300)
    assert chunks == []  # the only long prefill has image tokens: the whole step stays dense
    cm = dataclasses.replace(_common(), mm_req_doc_ranges={2: [(0, 10)]})
    chunks, reqs, tokens = classify(cm, min_context=300)
    assert [c.req for c in chunks] == [1] and reqs.tolist() == [0, 2, 3]
    sub = compat.slice_common_metadata(cm, reqs, tokens)
    assert sub.mm_req_doc_ranges == {1: [(0, 10)]}  # request 2 is the subset's request 1


def test_the_dense_subset_copies_only_the_block_table_columns_its_sequences_reach():
    """A table row is `max_model_len` wide; the subset keeps the columns its longest sequence reaches at the
    smallest page the width and the spec's block size allow (here 30 columns for 480 tokens: 16-token pages),
    never fewer."""
    cm = _common()
    _, reqs, tokens = classify(cm, min_context=300)  # dense: the decodes (seq 50, 700) and the short prompt (30)
    full = compat.slice_common_metadata(cm, reqs, tokens, max_model_len=30 * 16, block_size=16)
    assert torch.equal(full.block_table_tensor, cm.block_table_tensor[[0, 2, 3]])  # 700 tokens reach past 30 pages
    wide = compat.slice_common_metadata(cm, reqs, tokens, max_model_len=30 * 32, block_size=32)  # 22 columns
    assert torch.equal(wide.block_table_tensor, cm.block_table_tensor[[0, 2, 3], :22])
    split = compat.slice_common_metadata(cm, reqs, tokens, max_model_len=30 * 32, block_size=16)  # kernel pages 16
    assert torch.equal(split.block_table_tensor, cm.block_table_tensor[[0, 2, 3]])
    short_reqs = torch.tensor([0, 2])
    short_tokens = torch.tensor([0, *range(101, 131)])
    short = compat.slice_common_metadata(cm, short_reqs, short_tokens, max_model_len=30 * 16, block_size=16)
    assert torch.equal(short.block_table_tensor, cm.block_table_tensor[[0, 2], :4])  # 50 tokens: 4 pages of 16
    unsliced = compat.slice_common_metadata(cm, short_reqs, short_tokens)
    assert torch.equal(unsliced.block_table_tensor, cm.block_table_tensor[[0, 2]])


def test_a_table_narrower_than_max_model_len_keeps_the_columns_of_the_specs_pages():
    """vLLM's chunked local attention hands the builder virtual requests whose table is `attention_chunk_size`
    wide, not `max_model_len`: the page the width implies (here 1,024 tokens) is not the cache's, and the
    spec's 16-token pages decide (50 tokens: 4 columns, not 1)."""
    cm = _common()
    short = compat.slice_common_metadata(cm, torch.tensor([0, 2]), torch.tensor([0, *range(101, 131)]),
                                         max_model_len=30 * 1024, block_size=16)
    assert torch.equal(short.block_table_tensor, cm.block_table_tensor[[0, 2], :4])


def test_every_batch_metadata_field_of_this_vllm_has_a_rule_and_an_unknown_one_stops_the_start():
    compat.check_common_metadata()  # the installed vLLM: every field classified
    cls = dataclasses.make_dataclass("Batch", [("seq_lens", object), ("new_per_request_thing", object)])
    with pytest.raises(RuntimeError, match="new_per_request_thing"):
        compat.check_common_metadata(cls)


def test_dense_subset_metadata():
    cm = _common()
    _, reqs, tokens = classify(cm, min_context=300)
    sub = compat.slice_common_metadata(cm, reqs, tokens)
    assert sub.num_reqs == 3 and sub.num_actual_tokens == 32 and sub.max_query_len == 30 and sub.max_seq_len == 700
    assert sub.query_start_loc_cpu.tolist() == [0, 1, 31, 32] and sub.query_start_loc.tolist() == [0, 1, 31, 32]
    assert sub.seq_lens.tolist() == [50, 30, 700]
    assert torch.equal(sub.block_table_tensor, cm.block_table_tensor[[0, 2, 3]])
    assert torch.equal(sub.slot_mapping, cm.slot_mapping[tokens])
    assert torch.equal(sub.positions, cm.positions[tokens])
    assert cm.num_reqs == 4  # the step's own metadata is untouched


def test_host_lengths_never_read_from_the_device():
    """vLLM 0.26's `seq_lens_cpu` property copies from the GPU when its cache is empty (the V2 model
    runner leaves it empty): a copy that waits for the previous step and stalls async scheduling.
    The host lengths come from the host fields, the device lengths untouched."""
    cm = _common()
    poisoned = dataclasses.replace(cm, seq_lens=torch.full((4,), -1, dtype=torch.int32))
    assert compat.seq_lens_cpu(poisoned).tolist() == SEQ_LENS

    @dataclasses.dataclass
    class Runner026Metadata:  # the 0.26 shape: a deprecated cache field and a property that reads the GPU
        seq_lens: torch.Tensor
        seq_lens_cpu_upper_bound: torch.Tensor | None
        _seq_lens_cpu: torch.Tensor | None = None

        @property
        def seq_lens_cpu(self):
            raise AssertionError("read seq_lens from the device")

    bound = torch.tensor(SEQ_LENS)
    assert compat.seq_lens_cpu(Runner026Metadata(bound.neg(), bound)) is bound  # V2 runner: cache empty
    exact = bound - 1
    assert compat.seq_lens_cpu(Runner026Metadata(bound.neg(), bound, exact)) is exact  # V1 runner: cache filled


def test_block_size_must_be_a_multiple_of_the_page():
    from vllm_sparse.backend.checks import check_block_size
    from vllm_sparse.config.errors import SparseConfigError

    check_block_size(128, 32, "x.yaml")
    with pytest.raises(SparseConfigError, match="block_size 64 must be a multiple of the KV cache block size 128"):
        check_block_size(64, 128, "x.yaml")


def test_decode_rows_shorten_sparse_decode_rows_only():
    """The dense backend sees each sparse decode row (one query token, context >= dense_below) shortened to
    one token, every other row as it is; the host count agrees; the lengths land in the builder's own
    buffer (a captured graph reads it), also when no row is sparse."""
    from vllm_sparse.backend.decode_rows import DecodeRowsBuilder

    cm = _common()
    builder = DecodeRowsBuilder(dense_below=60, max_rows=8, device=torch.device("cpu"))
    short, rows = builder.shorten(cm)
    assert short.seq_lens.tolist() == [50, 400, 30, 1]  # the prefill chunk (400) is not a decode row
    assert short.seq_lens.data_ptr() == builder._dense_seq_lens.data_ptr()
    assert rows.host_sparse == 1 and rows.seq_lens.tolist() == SEQ_LENS
    assert cm.seq_lens.tolist() == SEQ_LENS  # the step's own lengths untouched

    assert builder.shorten(cm)[1].step == rows.step + 1  # each step its own number (tidal's CPU record)

    builder = DecodeRowsBuilder(dense_below=701, max_rows=8, device=torch.device("cpu"))
    builder._dense_seq_lens.fill_(-7)  # stale values from an earlier step
    short, rows = builder.shorten(cm)
    assert short.seq_lens.tolist() == SEQ_LENS and rows.host_sparse == 0
    assert short.seq_lens.data_ptr() == builder._dense_seq_lens.data_ptr()


def test_decode_selection_refuses_dual_batch_overlap():
    """Two micro-batches interleaved layer by layer would share one decode workspace (a tidal
    selector's choice would be overwritten by the other micro-batch's): an error at start."""
    from types import SimpleNamespace

    from tests.test_config import entry, plan_of
    from vllm_sparse.backend.checks import check_decode_layers
    from vllm_sparse.config.errors import SparseConfigError

    assert compat.micro_batches(SimpleNamespace(enable_dbo=False, ubatch_size=1)) == 1
    assert compat.micro_batches(SimpleNamespace(enable_dbo=True)) == 2
    plan = plan_of(entry(decode={"top_k_tokens": 256}))
    config = SimpleNamespace(parallel_config=SimpleNamespace(enable_dbo=True),
                             compilation_config=SimpleNamespace(static_forward_context={}))
    with pytest.raises(SparseConfigError, match="enable_dbo: decode selection keeps each step's chosen blocks"):
        check_decode_layers(config, [], plan)


def test_a_sparse_steps_dense_requests_get_metadata_from_a_builder_of_their_own(monkeypatch):
    """vLLM's FlashAttention builder keeps persistent buffers (FA3's scheduler metadata under CUDA graphs)
    and returns views into them. The step's whole-batch metadata (which the layers a plan keeps dense
    read) must not change when the dense sub-batch is built: that build goes to a second builder."""
    from types import SimpleNamespace

    from vllm_sparse.backend import builder as builder_mod

    class Metadata:
        pass

    class PersistentBufferBuilder:  # as FlashAttentionMetadataBuilder._store_scheduler_metadata does
        def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
            self.buffer = torch.zeros(8, dtype=torch.int32)

        def build(self, common_prefix_len, cm):
            self.buffer[: cm.num_reqs] = cm.seq_lens
            md = Metadata()
            md.seq_lens_view = self.buffer[: cm.num_reqs]
            md.block_table = cm.block_table_tensor
            return md

    class SparseMetadata(Metadata):
        sparse_batch = None

    class Builder(builder_mod.SparseBuilderMixin, PersistentBufferBuilder):
        metadata_cls = SparseMetadata

    sparse_layer = SimpleNamespace(is_sparse=True, is_sparse_decode=False)
    plan = SimpleNamespace(layer=lambda i: sparse_layer, layers=[sparse_layer], source="x.yaml", block_size=64,
                           union_tile=None, dense_below=300, dense_tail=0, sparse_context_floor=300, min_query_tokens=2,
                           min_chunk_work=0, query_token_floor=lambda kind: 2, chunk_work_floor=lambda kind: 0,
                           dense_above_on=lambda kind: 1.0)
    monkeypatch.setattr(builder_mod, "plan_for", lambda vllm_config: plan)
    monkeypatch.setattr(builder_mod, "worker_metrics", lambda *a: None)
    vllm_config = SimpleNamespace(
        cache_config=SimpleNamespace(cache_dtype="auto"), kv_transfer_config=None,
        parallel_config=SimpleNamespace(decode_context_parallel_size=1, prefill_context_parallel_size=1),
        compilation_config=SimpleNamespace(static_forward_context={}),
        model_config=SimpleNamespace(max_model_len=30 * 32))  # (the table's 30 columns: 32-token pages)
    b = Builder(SimpleNamespace(block_size=32), ["model.layers.0.self_attn.attn"], vllm_config, "cpu")
    md = b.build(0, _common())
    assert md.sparse_batch.chunks == (SparseChunk(req=1, q_start=1, q_end=101, context_len=300),)
    assert md.seq_lens_view.tolist() == SEQ_LENS  # the whole batch's, after the sub-batch was built
    assert md.sparse_batch.dense_metadata.seq_lens_view.tolist() == [50, 30, 700]
    assert md.sparse_batch.dense_metadata.block_table.shape == (3, 22)  # the columns 700 tokens reach, of 30

    # Every pipeline stage builds every step: only the first counts its tokens (the collector sums the workers).
    claims = []
    monkeypatch.setattr(builder_mod, "worker_metrics", lambda *a: SimpleNamespace(
        claim_step_counting=lambda builder: claims.append(builder) or True))
    Builder(SimpleNamespace(block_size=32), ["model.layers.0.self_attn.attn"], vllm_config, "cpu")
    monkeypatch.setattr(builder_mod.compat, "pipeline_parallel_rank", lambda: 1)
    later_stage = Builder(SimpleNamespace(block_size=32), ["model.layers.0.self_attn.attn"], vllm_config, "cpu")
    assert len(claims) == 1 and later_stage._metrics is None

    # The `dense_above` rule: once every sparse layer of the group runs dense, the step is a dense step (vLLM's
    # own metadata, its tokens counted dense); before the density is read, a sparse step as above.
    from vllm_sparse.backend.density_guard import DensityGuard

    plan.dense_above_on = lambda kind: 0.5
    guarded = Builder(SimpleNamespace(block_size=32), ["model.layers.0.self_attn.attn"], vllm_config, "cpu")
    assert isinstance(guarded._guard, DensityGuard) and guarded._guard is not b._guard  # (one a builder)
    md = guarded.build(0, _common())
    assert md.sparse_batch.chunks and md.sparse_batch.guard is guarded._guard  # the layers count into it
    md.sparse_batch.guard.record(0, 400, 9, 10)  # the layer's chunk (400 tokens) read 90% of its blocks
    assert guarded.build(0, _common()).sparse_batch.chunks  # the step that queues the count
    md = guarded.build(0, _common())  # reads it: layer 0 runs dense, and it is the group's only sparse layer
    assert getattr(md, "sparse_batch", None) is None and md.seq_lens_view.tolist() == SEQ_LENS
    # While eval or calibration measure the plan, every chunk-layer runs sparse and nothing is counted.
    from vllm_sparse.selection.stats import STATS

    monkeypatch.setattr(STATS, "enabled", True)
    md = guarded.build(0, _common())
    assert md.sparse_batch.chunks and md.sparse_batch.dense_layers == frozenset() and md.sparse_batch.guard is None


def test_tile_geometry_built_once_per_step_equals_the_per_call_one():
    """The builder's per-step tile geometry (one host->device copy for every chunk, shared by the layers)
    is what the forward builds per chunk and layer without it (`attend.chunk_tile_geometry`): chunks on and off
    block boundaries, one union per chunk or per few query blocks, with and without a dense tail."""
    import random

    from vllm_sparse.backend.attend import chunk_tile_geometry
    from vllm_sparse.backend.batch import SparseChunk, tile_geometry
    from vllm_sparse.estimators.base import ChunkContext

    rng = random.Random(7)
    for block_size, union_tile, dense_tail in ((64, None, 0), (64, 1, 0), (128, 2, 128), (32, 3, 0), (32, 1, 40),
                                               (64, None, 200)):
        chunks, start = [], 0
        for req in range(5):
            context, q_len = rng.randrange(0, 5000), rng.randrange(1, 3000)
            chunks.append(SparseChunk(req, start, start + q_len, context))
            start += q_len
        step = tile_geometry(chunks, block_size, union_tile, torch.device("cpu"), dense_tail)
        for c, got in zip(chunks, step):
            ctx = ChunkContext(torch.zeros(c.q_end - c.q_start, 1, 8), None, None, None, c.context_len, block_size, 1.0)
            want = chunk_tile_geometry(ctx, union_tile or ctx.num_query_blocks, dense_tail)
            case = (block_size, union_tile, dense_tail, c)
            assert torch.equal(got.query_start_loc, want.query_start_loc), case
            assert torch.equal(got.seq_lens, want.seq_lens), case
            assert (got.tail is None) == (want.tail is None) == (dense_tail == 0), case
            arrays = [got.query_start_loc, got.seq_lens]
            if got.tail is not None:
                assert got.tail[:2] == want.tail[:2], case
                for a, b in zip(got.tail[2:], want.tail[2:]):
                    assert torch.equal(a, b), case
                arrays += [got.tail.query_start_loc, got.tail.packed_query_start_loc]
                # (a packed call's tiles: the tail's start at its first token, with no queries; the first tail tile
                # starts there)
                assert got.tail.packed_query_start_loc.tolist() == [min(x, got.tail.first_token)
                                                                    for x in got.query_start_loc.tolist()], case
                assert int(got.query_start_loc[got.tail.sparse_tiles]) == got.tail.first_token, case
            # Each array starts 16-byte aligned, as fresh allocations do: Triton specialises on a pointer's
            # alignment, and a slice at another offset compiled a new kernel variant mid-request.
            assert all(a.data_ptr() % 16 == 0 for a in arrays), case


def test_the_dense_subset_indexes_host_fields_on_the_host():
    """Host copies of per-request fields (`seq_lens_cpu_upper_bound`, ...) are sliced by the host indices: a copy
    of device indices back to the host would wait for the GPU's queued work every sparse step. Device fields on
    the meta device stand in for a GPU's: any copy from them to the host fails."""
    cm = _common()
    meta = {f: getattr(cm, f).to("meta") for f in ("query_start_loc", "seq_lens", "block_table_tensor",
                                                    "slot_mapping", "positions")}
    cm = dataclasses.replace(cm, **meta)
    _, reqs, tokens = classify(cm, min_context=300)
    sub = compat.slice_common_metadata(cm, reqs, tokens)
    assert sub.seq_lens_cpu_upper_bound.tolist() == [SEQ_LENS[0], SEQ_LENS[2], SEQ_LENS[3]]
    assert sub.query_start_loc_cpu.tolist() == [0, 1, 31, 32]
    assert sub.seq_lens.device.type == "meta" and sub.seq_lens.shape == (3,)
    assert sub.slot_mapping.device.type == "meta" and sub.slot_mapping.shape == (32,)


def test_plan_constants_are_made_once_per_device():
    from vllm_sparse.transfer import constant_on

    a = constant_on([0, 2, 3], torch.device("cpu"))
    assert a.tolist() == [0, 2, 3] and a.dtype == torch.long
    assert constant_on((0, 2, 3), torch.device("cpu")) is a  # the per-layer paths reuse it: no copy per call
    mask = constant_on([True, False], torch.device("cpu"), torch.bool)
    assert mask.dtype == torch.bool and mask.tolist() == [True, False]


@pytest.mark.parametrize("dense_below", [1024, 1000, 1152, 128, 0])
def test_sparse_context_floor_is_the_first_context_with_a_row_past_the_dense_rows(dense_below):
    """A chunk goes sparse exactly when it has a query block that does not attend densely (`dense_rows`): one
    ending exactly at a block-aligned dense_below has none, so it stays dense (it would estimate and select for
    rows that read every block); with an unaligned dense_below, the block holding it attends sparsely wherever
    the chunk that brings it ends."""
    from vllm_sparse.backend.attention_mass import dense_rows
    from vllm_sparse.config.plan import SparsePlan
    from vllm_sparse.estimators.base import ChunkContext

    bs = 128
    floor = SparsePlan("test", "m", bs, dense_below, (), 1, 1).sparse_context_floor
    for seq_len in range(max(1, floor - 2 * bs - 3), floor + 2 * bs + 3):
        for q_len in {1, 2, 127, 128, 129, 300, seq_len}:
            if q_len > seq_len:
                continue
            ctx = ChunkContext(torch.empty(q_len, 1, 1), torch.zeros(1, dtype=torch.long), None, torch.empty(0),
                               seq_len - q_len, bs, 1.0)
            has_sparse_row = dense_rows(ctx, dense_below) < ctx.num_query_blocks
            assert has_sparse_row == (seq_len >= floor), (seq_len, q_len)
