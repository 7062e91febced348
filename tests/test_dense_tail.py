"""`dense_tail`: the query blocks holding each sparse chunk's last tokens attend densely (a prompt's question,
where its first output token is read from), the rest of the chunk as the plan selects."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.paged import random_paged_batch
from vllm_sparse.backend.attention_mass import dense_rows, tail_rows
from vllm_sparse.backend.batch import SparseChunk, classify, selected_row_counts
from vllm_sparse.backend.sparse_path import attend_sparse_chunks, selected_rows
from vllm_sparse.config.plan import HeadPlan
from vllm_sparse.estimators.base import ChunkContext
from vllm_sparse.estimators.registry import get_estimator
from vllm_sparse.kernels.reference import dense_causal_attention_ref
from vllm_sparse.selection.budget import Budget

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
    for r, c in enumerate(chunks):
        q = b.q[c.q_start:c.q_end]
        dense = dense_causal_attention_ref(q, b.keys[r].to(device), b.values[r].to(device), d**-0.5)
        # First token of the rows holding the chunk's last `dense_tail` tokens, within the chunk.
        first = max(c.seq_len - dense_tail, c.context_len) // bs * bs - c.context_len
        first = max(first, 0)
        assert 0 < first < c.q_end - c.q_start - dense_tail  # (some tokens before the tail, some after)
        torch.testing.assert_close(with_tail[c.q_start:c.q_end][first:], dense[first:], atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(with_tail[c.q_start:c.q_end][:first], without[c.q_start:c.q_end][:first],
                                   atol=0, rtol=0)
        assert (without[c.q_start:c.q_end][first:] - dense[first:]).abs().max() > 1e-2  # sparse there without it


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
