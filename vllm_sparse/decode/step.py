"""One layer's sparse decode for a step: Quest scores -> top blocks per KV head -> attention; or a
TidalDecode selector (full attention that scores blocks exactly -> top blocks) or reader.

The metadata builder gives every step's `DecodeRows` (device tensors of the whole batch, plus the
host's count of sparse decode rows); the dense backend has already attended every row, the sparse
decode rows over one token only (the builder shortened them), and this overwrites those rows.
On CUDA the kernels read the row facts on the device, so a captured graph replays them for any
batch; on CPU the torch reference runs row by row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from vllm_sparse import compat, envs
from vllm_sparse.config.plan import DecodeHeadPlan
from vllm_sparse.decode.attention import decode_attention, reference_decode_attention
from vllm_sparse.decode.memory import decode_workspace, reserve_at_load
from vllm_sparse.decode.select import (
    MAX_ROW_BLOCKS,
    quest_select,
    reference_block_scores,
    reference_select,
    select_top_blocks,
)
from vllm_sparse.decode.summaries import PageSummaries, check_against_cache
from vllm_sparse.decode.tidal import tidal_choices
from vllm_sparse.kernels.paged import PagedKV

# Debug: on the CPU path, check every sparse decode row's page summaries against its keys in the cache.
CHECK_SUMMARIES = envs.flag("VLLM_SPARSE_CHECK_SUMMARIES")


@dataclass(frozen=True)
class DecodeRows:
    query_start_loc: torch.Tensor  # [rows + 1] (device) of the whole batch
    seq_lens: torch.Tensor  # [rows] (device): true lengths (the dense backend's were shortened)
    host_sparse: int  # rows that decode sparsely by the host's lengths (upper bounds: never too few)
    step: int = 0  # the builder's step count (the CPU path keys a tidal selection by it)

    @property
    def any_sparse(self) -> bool:
        return self.host_sparse > 0

    def sparse_mask(self, dense_below: int) -> torch.Tensor:
        """Rows that decode sparsely: one query token and at least `dense_below` tokens of context."""
        n = self.seq_lens.shape[0]
        q_lens = self.query_start_loc[1:n + 1] - self.query_start_loc[:n]
        return (q_lens == 1) & (self.seq_lens >= dense_below)


@dataclass(frozen=True)
class DecodeHeads:
    """Per local KV head, as device tensors the kernels read."""

    kept: torch.Tensor  # int32: blocks kept (top-k + sink + local)
    sink: torch.Tensor
    local: torch.Tensor
    dense: torch.Tensor  # int32 1: reads every block

    @classmethod
    def build(cls, plans: tuple[DecodeHeadPlan | None, ...], device) -> DecodeHeads:
        def t(values):
            return torch.tensor(values, dtype=torch.int32, device=device)

        return cls(t([p.kept_blocks if p else 0 for p in plans]), t([p.sink_blocks if p else 0 for p in plans]),
                   t([p.local_blocks if p else 0 for p in plans]), t([0 if p else 1 for p in plans]))


def row_blocks(max_model_len: int, block_tokens: int) -> int:
    """Width of a row's score vector: the context's blocks, to a power of two."""
    return triton.next_power_of_2(-(-max_model_len // block_tokens))


def check_row_blocks(max_model_len: int, block_tokens: int) -> str | None:
    n = -(-max_model_len // block_tokens)
    if n > MAX_ROW_BLOCKS:
        need = triton.next_power_of_2(-(-max_model_len // MAX_ROW_BLOCKS))
        return (f"max_model_len {max_model_len} is {n} blocks of decode block_tokens {block_tokens}; decode "
                f"selection takes up to {MAX_ROW_BLOCKS}: set decode block_tokens to {need} or more")
    return None


def decode_row_limit(vllm_config) -> int:
    """Most rows a step can have: requests, or a captured graph's padded batch."""
    return max(vllm_config.scheduler_config.max_num_seqs, compat.max_cudagraph_capture_size(vllm_config))


def reserve_decode(vllm_config, plan, q_heads: int, kv_heads: int, head_size: int,
                   cache_itemsize: int | None = None) -> None:
    """While vLLM builds the model (counted with the weights): the decode workspace for the plan's
    largest budget at this engine's row limit and context, and the page summaries' reservation.
    `cache_itemsize`: bytes per cached element (1 for an fp8 cache; default: the model's dtype's)."""
    device = torch.device("cuda", torch.cuda.current_device())
    plan_workspace(vllm_config, plan, q_heads, kv_heads, head_size, device)
    reserve_at_load(vllm_config, plan, kv_heads, head_size, vllm_config.model_config.dtype, device, cache_itemsize)


def plan_workspace_sizes(plan, rows: int, q_heads: int, kv_heads: int, head_size: int,
                         max_model_len: int) -> tuple[int, int, int, int, int, int]:
    """`decode_workspace`'s sizes for the plan's largest budget at a row limit and context."""
    kept = max((d.kept_blocks for lp in plan.layers for d in lp.decode if d), default=1)
    return rows, q_heads, kv_heads, head_size, row_blocks(max_model_len, plan.decode_block_tokens), kept


def plan_workspace(vllm_config, plan, q_heads: int, kv_heads: int, head_size: int, device: torch.device):
    """The process's decode workspace, sized for the plan's largest budget at this engine's row limit and context
    (made while vLLM builds the model, `reserve_decode`; later calls get the same one)."""
    return decode_workspace(*plan_workspace_sizes(plan, decode_row_limit(vllm_config), q_heads, kv_heads, head_size,
                                                  vllm_config.model_config.max_model_len), device)


def decode_kind(plans: tuple[DecodeHeadPlan | None, ...]) -> tuple[bool, bool, bool]:
    """(Quest heads, a tidal selector, a tidal reader) among one layer's decode head plans: which kernels it runs."""
    return (any(p is not None and p.estimator == "quest" for p in plans),
            any(p is not None and p.estimator == "tidal" and p.selector for p in plans),
            any(p is not None and p.estimator == "tidal" and not p.selector for p in plans))


class DecodeLayer:
    """One attention layer's decode selection on one rank: Quest (score page summaries, select, attend),
    a tidal selector (attend to every block, writing exact block scores; select into the tidal
    blocks), a tidal reader (attend to the tidal blocks), or none (every head reads every block)."""

    def __init__(self, plans: tuple[DecodeHeadPlan | None, ...], summaries: PageSummaries | None, block_tokens: int,
                 dense_below: int, max_rows: int, max_model_len: int, q_heads: int, head_size: int,
                 device: torch.device, layer: int = -1, selector: int | None = None):
        self.plans = plans
        self.layer = layer
        self.selector = selector  # a tidal reader: the layer whose choice it reads
        self.block_tokens = block_tokens
        self.dense_below = dense_below
        quest, self.selects, self.reads_tidal = decode_kind(plans)
        if (self.selects or self.reads_tidal) and quest:
            raise ValueError(f"layer {layer}: tidal and quest heads in one layer")
        self.summaries = summaries if quest else None  # Quest heads score their pages' key summaries
        if self.reads_tidal and selector is None:
            raise ValueError(f"layer {layer}: a tidal layer that does not select needs its selector layer")
        self.heads = DecodeHeads.build(plans, device)
        # A selector attends with every head dense; self.heads then says what it keeps.
        self.attend_heads = DecodeHeads.build((None,) * len(plans), device) if self.selects else self.heads
        kept = max((p.kept_blocks for p in plans if p), default=1)
        self.workspace = None
        if device.type == "cuda":
            self.workspace = decode_workspace(max_rows, q_heads, len(plans), head_size,
                                              row_blocks(max_model_len, block_tokens), kept, device)

    def attend(self, query: torch.Tensor, output: torch.Tensor, paged: PagedKV, block_table: torch.Tensor,
               rows: DecodeRows, scale: float) -> None:
        if query.is_cuda:
            self._attend_kernels(query, output, paged, block_table, rows, scale)
        else:
            self._attend_reference(query, output, paged, block_table, rows, scale)

    def _attend_kernels(self, query, output, paged, block_table, rows, scale) -> None:
        ws = self.workspace
        n = rows.seq_lens.shape[0]
        if n > ws.rows:
            raise RuntimeError(f"vllm-sparse: a step with {n} requests; the decode workspace was sized for "
                               f"{ws.rows} (max_num_seqs)")
        selected, counts = ws.selected[:n], ws.counts[:n]
        if self.summaries is not None:
            quest_select(query, self.summaries.mins, self.summaries.maxs, block_table, rows.query_start_loc,
                         rows.seq_lens, self.heads, ws.scores[:n], ws.candidates[:, :n], selected, counts,
                         page_size=paged.page_size, block_tokens=self.block_tokens, dense_below=self.dense_below)
        elif self.reads_tidal:
            selected, counts = ws.tidal_selected[:n], ws.tidal_counts[:n]
        decode_attention(query, paged, block_table, rows.query_start_loc, rows.seq_lens, self.attend_heads,
                         selected, counts, ws.partial_out, ws.partial_ml, output, block_tokens=self.block_tokens,
                         scale=scale, dense_below=self.dense_below, scores=ws.scores[:n] if self.selects else None,
                         score_heads=self.heads)
        if self.selects:
            select_top_blocks(ws.scores[:n], ws.candidates[:, :n], rows.query_start_loc, rows.seq_lens, self.heads,
                              ws.tidal_selected[:n], ws.tidal_counts[:n], block_tokens=self.block_tokens,
                              dense_below=self.dense_below)

    def select_row(self, query_row: torch.Tensor, pages: torch.Tensor, seq_len: int, paged: PagedKV, row: int,
                   step: int, scale: float) -> list:
        """The reference selection for one row: per KV head, the blocks it reads (None: every block)."""
        h = self.heads
        if self.selects:
            k, _ = paged.gather(pages, seq_len)
            tidal_choices.select(self.layer, step, row, query_row, k, seq_len, self.block_tokens, h, scale)
            return [None] * len(self.plans)
        if self.reads_tidal:
            return tidal_choices.chosen(self.layer, self.selector, step, row)
        if self.summaries is None:
            return [None] * len(self.plans)
        mins, maxs = self.summaries.mins[pages], self.summaries.maxs[pages]
        scores = reference_block_scores(query_row, mins, maxs, seq_len, paged.page_size, self.block_tokens,
                                        h.sink.cpu(), h.local.cpu())
        chosen = reference_select(scores, h.kept.cpu())
        return [None if p is None else c for p, c in zip(self.plans, chosen)]

    def _attend_reference(self, query, output, paged, block_table, rows, scale) -> None:
        qsl = rows.query_start_loc
        for b in torch.nonzero(rows.sparse_mask(self.dense_below)).flatten().tolist():
            seq = int(rows.seq_lens[b])
            pages = block_table[b, : -(-seq // paged.page_size)].long()
            tok = int(qsl[b])
            if CHECK_SUMMARIES and self.summaries is not None:
                check_against_cache(self.summaries, paged.gather(pages, seq)[0], pages, seq)
            blocks = self.select_row(query[tok], pages, seq, paged, b, rows.step, scale)
            out = reference_decode_attention(query[tok], paged, pages, seq, blocks, self.block_tokens, scale)
            output[tok] = out.to(output.dtype)
