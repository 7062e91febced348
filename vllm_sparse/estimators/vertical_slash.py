"""`vertical_slash`: MInference's vertical-slash pattern (Jiang et al., 2024).

The chunk's last `last_q` queries are scored against every key. Summing their attention by key
column gives the vertical lines (keys every query reads: sinks, separators); summing along
diagonals (query - key = const) gives the slash lines (fixed relative offsets: locality,
periodic structure). The top `vertical_size` columns and top `slash_size` diagonals are kept,
and each block is scored by the attention mass of the kept lines that cross it; blocks no kept
line crosses score lowest. With `blocks: crossed` every crossed block scores alike and the others not at
all, so a `top_p: 1.0` budget keeps exactly the crossed blocks: MInference's selection in blocks
(`config/minference.py`). With `blocks: columns` the blocks are those the kept diagonals cross, and the
kept columns go to the attention as token positions (`chunk.extras["columns"]`), read one by one
(`kernels/column_attention.py`): MInference's selection without rounding columns up to blocks.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from pydantic import Field

from vllm_sparse.estimators.base import COLUMN_PAD, ChunkContext, _sum_last_dim_in_blocks
from vllm_sparse.estimators.registry import EstimatorParams, register_estimator
from vllm_sparse.estimators.row_scores import line_masses
from vllm_sparse.transfer import constant_on


class VerticalSlashParams(EstimatorParams):
    last_q: int = Field(64, ge=1, le=1024, description="query rows (the chunk's last) that score the lines")
    vertical_size: int = Field(1024, ge=1, description="key columns kept")
    slash_size: int = Field(2048, ge=1, description="diagonals kept")
    sink_columns: int = Field(0, ge=0, description="the first key columns, always among the kept ones "
                              "(MInference keeps 30)")
    local_diagonals: int = Field(0, ge=0, description="the diagonals nearest the query (offsets 0..n-1), always "
                                 "among the kept ones (MInference keeps 100)")
    blocks: Literal["mass", "crossed", "columns"] = Field(
        "mass", description="mass: each block scores the attention mass of the kept lines crossing it, and the "
        "budget chooses; crossed: every block a kept line crosses scores alike, the others not at all, so a "
        "top_p: 1.0 budget keeps exactly the blocks the kept lines cross (MInference's selection in blocks); "
        "columns: as crossed for the diagonals only, and the kept columns are read token by token beside the "
        "kept blocks (MInference's selection, not rounded up to blocks)")


def _ranked(x: torch.Tensor, always: int) -> torch.Tensor:
    """x with its first `always` entries ranked first (a copy only then: the line sums stay as they are)."""
    if not always:
        return x
    rank = x.clone()
    rank[:, :always] = float("inf")
    return rank


def _topk_only(x: torch.Tensor, k: int, always: int = 0) -> torch.Tensor:
    """A [h, n] mask of the k largest entries of each row of x, the first `always` entries counted among
    them whatever their value (k at most n)."""
    k = min(k, x.shape[-1])
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, _ranked(x, always).topk(k, dim=-1).indices, True)


def line_masses_ref(chunk: ChunkContext, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last n queries' softmax mass by key column and by diagonal (query - key), [h, seq] each."""
    q_pos = torch.arange(chunk.seq_len - n, chunk.seq_len, device=chunk.q.device)
    k_pos = torch.arange(chunk.seq_len, device=chunk.q.device)
    q = chunk.q[-n:].float().permute(1, 0, 2)  # [h, n, d]
    logits = chunk.qk(q) * chunk.scale  # [h, n, seq]
    causal = k_pos[None, :] <= q_pos[:, None]
    probs = torch.softmax(logits.masked_fill(~causal[None], float("-inf")), dim=-1)
    # Diagonal of each (query, key) pair; non-causal pairs carry probability 0, parked on offset 0.
    offset = (q_pos[:, None] - k_pos[None, :]).clamp_min(0).flatten()
    slash = torch.zeros_like(probs[:, 0]).index_add_(1, offset, probs.flatten(1))
    return probs.sum(1), slash


@functools.lru_cache(maxsize=64)
def _positions(n: int, device: torch.device) -> torch.Tensor:
    """[n] 0..n-1 on `device`, made once per length (each layer asks for its largest line count)."""
    return torch.arange(n, device=device)


def _top_lines(x: torch.Tensor, sizes: list[int], always: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(each row's top-k positions for the largest k, by descending rank [h, k_max]; which of them each head keeps,
    its own k first [h, k_max] bool): one top-k for every size. A head's prefix is a top-k of its own size: the
    same lines a top-k at that size keeps, but where lines tie at its boundary."""
    k_max = min(max(sizes), x.shape[-1])
    top = _ranked(x, always).topk(k_max, dim=-1).indices
    own = constant_on(tuple(min(k, x.shape[-1]) for k in sizes), x.device)
    return top, _positions(k_max, x.device)[None, :] < own[:, None]


def _kept_columns(x: torch.Tensor, sizes: list[int], always: int) -> torch.Tensor:
    """Each head's kept lines as positions: [h, max size] int32, sorted, padded with COLUMN_PAD (the same
    choice as `_keep_lines`)."""
    top, kept = _top_lines(x, sizes, always)
    return top.masked_fill(~kept, COLUMN_PAD).sort(-1).values.int()


def _keep_lines(x: torch.Tensor, sizes: list[int], always: int) -> torch.Tensor:
    """`_topk_only` with each head's own k: one top-k at the largest (a top-k per distinct size was ~7 ops each,
    ~200 a chunk-layer with MInference's published per-head sizes)."""
    if len(set(sizes)) == 1:
        return _topk_only(x, sizes[0], always)
    top, kept = _top_lines(x, sizes, always)
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, top, kept)


def score_vertical_slash_heads(chunk: ChunkContext, per_head: list[VerticalSlashParams]) -> torch.Tensor:
    """Scores of heads whose parameters differ only in their sizes, from one pass of line sums."""
    params = per_head[0]
    n = min(params.last_q, chunk.q_len)
    # On GPUs the line sums come from the cache in two Triton launches, without [heads, n, seq] logits.
    vertical, slash = (line_masses if chunk.use_kernels else line_masses_ref)(chunk, n)
    keep_s = _keep_lines(slash, [p.slash_size for p in per_head], params.local_diagonals)  # [h, seq] by offset
    if params.blocks == "columns":  # the columns go to the attention as positions; the blocks hold the diagonals
        chunk.extras["columns"] = _kept_columns(vertical, [p.vertical_size for p in per_head], params.sink_columns)
        vertical, slash = torch.zeros_like(vertical), keep_s.float()
    else:
        keep_v = _keep_lines(vertical, [p.vertical_size for p in per_head], params.sink_columns)  # [h, seq] by key
        if params.blocks == "crossed":  # count the kept lines crossing each block, not their mass
            vertical, slash = keep_v.float(), keep_s.float()
        else:
            vertical, slash = vertical * keep_v, slash * keep_s

    bs, heads, dev = chunk.block_size, vertical.shape[0], vertical.device
    # Vertical mass per KV block; slash mass crossing (row, block) from prefix sums over offsets.
    v_block = _sum_last_dim_in_blocks(vertical, bs, chunk.num_kv_blocks)
    prefix = torch.nn.functional.pad(slash.cumsum(-1), (1, 0))  # prefix[:, o] = sum of offsets < o
    rows = chunk.query_block_ids()
    q_lo = torch.clamp(rows * bs, min=chunk.context_len)  # first query of the row in this chunk
    q_hi = torch.clamp((rows + 1) * bs, max=chunk.seq_len) - 1
    kb = torch.arange(chunk.num_kv_blocks, device=dev)
    k_lo, k_hi = kb * bs, torch.clamp((kb + 1) * bs, max=chunk.seq_len) - 1
    o_lo = (q_lo[:, None] - k_hi[None, :]).clamp(0, chunk.seq_len)
    o_hi = (q_hi[:, None] - k_lo[None, :] + 1).clamp(0, chunk.seq_len)
    flat = lambda idx: prefix.gather(1, idx.reshape(1, -1).expand(heads, -1)).view(heads, *idx.shape)  # noqa: E731
    s_block = (flat(o_hi) - flat(o_lo)).clamp_min(0)
    mass = v_block[:, None, :] + s_block
    if params.blocks != "mass":  # a kept line crosses it (0) or none does (-inf): top_p 1.0 keeps the first
        return chunk.mask_noncausal(torch.where(mass > 0, 0.0, float("-inf")))
    return chunk.mask_noncausal(torch.log(mass.clamp_min(1e-30)))


@register_estimator("vertical_slash", VerticalSlashParams, "top vertical columns and slash diagonals (MInference)",
                    workspace_rows=lambda p, tokens: min(p.last_q, tokens),
                    per_head_fields=("vertical_size", "slash_size"), score_heads=score_vertical_slash_heads)
def score_vertical_slash(chunk: ChunkContext, params: VerticalSlashParams) -> torch.Tensor:
    return score_vertical_slash_heads(chunk, [params] * chunk.q.shape[1])
