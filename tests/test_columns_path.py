"""`vertical_slash` with `blocks: columns` through the sparse path (estimate, select, attend): the kept
diagonals as blocks, the kept columns token by token, joined by log-sum-exp. On the torch reference path and
through the Triton kernels (the interpreter on a CPU host), random paged GQA chunks with context."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.paged import random_paged_batch
from vllm_sparse.backend.batch import SparseChunk
from vllm_sparse.backend.sparse_path import attend_sparse_chunks
from vllm_sparse.config.plan import HeadPlan
from vllm_sparse.estimators.registry import get_estimator
from vllm_sparse.kernels.reference import dense_causal_attention_ref
from vllm_sparse.selection.budget import Budget

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
HQ, HKV, D, PAGE, BS = 8, 2, 32, 16, 32


def _plan(vertical: int, slash: int, blocks: str = "columns") -> HeadPlan:
    est = get_estimator("vertical_slash")
    params = est.params(last_q=16, vertical_size=vertical, slash_size=slash, blocks=blocks)
    return HeadPlan("vertical_slash", params, Budget(top_p=1.0, sink_blocks=0, local_blocks=1))


def _run(plan, kernel, union_heads=True, seed=0, dtype=torch.float32):
    seq, q_len = 300, 120
    b = random_paged_batch([seq], [q_len], HQ, HKV, D, PAGE, dtype=dtype, seed=seed)
    q = b.q.to(DEVICE)
    kv = type(b.kv)(b.kv.key.to(DEVICE), b.kv.value.to(DEVICE))
    out = torch.full_like(q, float("nan"))
    attend_sparse_chunks(q, out, kv, b.block_table.to(DEVICE), (SparseChunk(0, 0, q_len, seq - q_len),), [plan] * HQ,
                         BS, D**-0.5, union_tile=1, kernel=kernel, union_heads=union_heads)
    dense = dense_causal_attention_ref(b.q, b.keys[0], b.values[0], D**-0.5)
    return out.cpu(), dense, b


KERNELS = ["reference", "triton"]


def _tol(kernel: str) -> dict:
    """fp32 inputs: exact products on the interpreter; TF32 products (10-bit mantissas) in tl.dot on a GPU (an H100
    measured errors to 4.5e-3 on these shapes)."""
    return dict(atol=1e-2, rtol=1e-2) if GPU and kernel == "triton" else dict(atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("union_heads", [True, False], ids=["union", "own-heads"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_column_kept_is_dense_attention(kernel, union_heads):
    """Every key a kept column (vertical_size >= the context): the block pass holds the diagonals' blocks and
    the column pass every other key, so the joined output is exact dense attention."""
    got, dense, _ = _run(_plan(vertical=10_000, slash=8), kernel, union_heads)
    assert not got.isnan().any()
    torch.testing.assert_close(got, dense, **_tol(kernel))


@pytest.mark.parametrize("kernel", KERNELS)
def test_columns_read_token_by_token_equal_masked_attention(kernel):
    """A few kept columns: the output is exact attention over the kept diagonals' blocks plus the kept
    columns (not their blocks), as the estimator chose them."""
    from vllm_sparse.backend.sparse_path import chunk_block_mask
    from vllm_sparse.estimators.base import ChunkContext

    plan = _plan(vertical=12, slash=16)
    got, _, b = _run(plan, kernel, seed=3)
    seq, q_len = 300, 120
    ctx = ChunkContext(b.q, torch.arange(HQ) // (HQ // HKV), b.kv, b.block_table[0], seq - q_len, BS, D**-0.5,
                       tuple(h // (HQ // HKV) for h in range(HQ)), False)
    mask = chunk_block_mask(ctx, [plan] * HQ)  # [q heads, query blocks, kv blocks]
    cols = ctx.extras["columns"]
    assert cols.shape == (HQ, 12)
    group = HQ // HKV
    q_pos = torch.arange(seq - q_len, seq)
    for kvh in range(HKV):
        heads = range(kvh * group, (kvh + 1) * group)
        union_blocks = mask[list(heads)].any(0)  # [query blocks, kv blocks]: the union over the group
        union_cols = torch.zeros(seq, dtype=torch.bool)
        union_cols[cols[list(heads)].flatten()[cols[list(heads)].flatten() < seq].long()] = True
        row_block = (q_pos // BS) - (seq - q_len) // BS
        keys = union_blocks[row_block].repeat_interleave(BS, dim=1)[:, :seq] | union_cols[None, :]
        seen = keys & (torch.arange(seq)[None, :] <= q_pos[:, None])
        for h in heads:
            logits = (b.q[:, h].float() @ b.keys[0][:, kvh].float().T) * D**-0.5
            want = logits.masked_fill(~seen, float("-inf")).softmax(-1) @ b.values[0][:, kvh].float()
            torch.testing.assert_close(got[:, h], want, **_tol(kernel))
    # The same plan in blocks (`crossed`) reads every block a column lies in: more than the columns alone.
    crossed = chunk_block_mask(ctx, [_plan(12, 16, "crossed")] * HQ)
    assert int(crossed.sum()) > int(mask.sum())


def test_fa3_forced_with_column_layers_is_refused_at_start(monkeypatch):
    from vllm_sparse.backend.checks import check_forced_kernel
    from vllm_sparse.config.errors import SparseConfigError
    from vllm_sparse.config.loader import parse_config
    from vllm_sparse.config.plan import ModelShape, resolve_plan

    shape = ModelShape("m", ("LlamaForCausalLM",), 3, 4, 2)

    def plan(blocks):
        est = {"name": "vertical_slash", "vertical_size": 64, "slash_size": 64, "blocks": blocks}
        return resolve_plan(parse_config({"version": 1, "models": [{
            "match": {"architectures": ["LlamaForCausalLM"]},
            "layers": [{"layers": "1-2", "estimator": est, "budget": {"top_p": 1.0}}]}]}, "t.yaml"), shape, "t.yaml")

    monkeypatch.setenv("VLLM_SPARSE_KERNEL", "fa3")
    with pytest.raises(SparseConfigError) as e:
        check_forced_kernel(plan("columns"), "fa3")
    assert "VLLM_SPARSE_KERNEL=fa3, but layers [1, 2] keep key columns token by token" in str(e.value)
    check_forced_kernel(plan("crossed"), "fa3")  # blocks only: FA3 runs them
    monkeypatch.setenv("VLLM_SPARSE_KERNEL", "fa2")
    with pytest.raises(SparseConfigError, match="VLLM_SPARSE_KERNEL=fa2, but layers"):
        check_forced_kernel(plan("columns"), "fa2")
    monkeypatch.delenv("VLLM_SPARSE_KERNEL")
    check_forced_kernel(plan("columns"), "fa3")  # chosen by device: the column layers go to Triton, as designed
    check_forced_kernel(plan("columns"), "fa2")
