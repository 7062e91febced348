"""TidalDecode at block granularity: a selector layer attends to every block and, per KV head, keeps
the blocks with the highest exact scores; the tidal layers after it read those blocks without scoring,
until the next selector re-selects (Yang et al., 2024, "TidalDecode: Fast and Accurate LLM Decoding
with Position Persistent Sparse Attention").

A block's exact score is the largest scaled q.k over its keys and the group's q heads: the quantity
Quest's page summaries bound from above, here computed by the selector's full attention itself (the
split-K kernel writes it beside its output, `attention.decode_attention(scores=...)`). The kept
blocks are the top `top_k` by that score plus the sink and local ones, chosen by the same selection
as Quest's (`select.select_top_blocks`). KV head h of a later layer reads KV head h's choice, as
TidalDecode's reuse layers read head h's positions.
"""

from __future__ import annotations

import torch

from vllm_sparse.decode.select import reference_select


def reference_exact_block_scores(q: torch.Tensor, k: torch.Tensor, seq_len: int, block_tokens: int,
                                 sink: torch.Tensor, local: torch.Tensor, scale: float) -> torch.Tensor:
    """One row. q [q_heads, D]; k [seq_len, kv_heads, D] (the row's keys in order); sink/local [kv_heads].
    -> [kv_heads, blocks] float32: per block the largest q.k * scale of the KV head's q heads, +inf for
    the sink and local blocks."""
    kv_heads = k.shape[1]
    group = q.shape[0] // kv_heads
    nb = -(-seq_len // block_tokens)
    logits = torch.einsum("hgd,thd->hgt", q.float().view(kv_heads, group, -1), k[:seq_len].float()) * scale
    padded = logits.amax(1).new_full((kv_heads, nb * block_tokens), float("-inf"))
    padded[:, :seq_len] = logits.amax(1)
    scores = padded.view(kv_heads, nb, block_tokens).amax(-1)
    j = torch.arange(nb, device=scores.device)
    forced = (j[None, :] < sink[:, None].to(j.device)) | (j[None, :] >= nb - local[:, None].to(j.device))
    return torch.where(forced, torch.full_like(scores, float("inf")), scores)


class TidalChoices:
    """The CPU path's record of the last selector's blocks, per decode row of one step (the CUDA path
    keeps them in the decode workspace). A selector runs before the layers that read it in every step
    (the plan checks the order); a reader finds its selector's record of this very step, or fails."""

    def __init__(self):
        self._rows: dict[int, list[torch.Tensor]] = {}
        self._key: tuple[int, int] | None = None  # (selector layer, step) the record belongs to

    def select(self, layer: int, step: int, row: int, q: torch.Tensor, k: torch.Tensor, seq_len: int,
               block_tokens: int, heads, scale: float) -> list[torch.Tensor]:
        if self._key != (layer, step):  # a new selector, or a new step: earlier choices are stale
            self._rows.clear()
            self._key = (layer, step)
        scores = reference_exact_block_scores(q, k, seq_len, block_tokens, heads.sink, heads.local, scale)
        self._rows[row] = reference_select(scores, heads.kept.cpu())
        return self._rows[row]

    def chosen(self, layer: int, selector: int, step: int, row: int) -> list[torch.Tensor]:
        if self._key != (selector, step) or row not in self._rows:
            raise RuntimeError(f"vllm-sparse: layer {layer} reads the tidal selection of layer {selector} for decode "
                               f"row {row}, but that layer did not select in this step")
        return self._rows[row]


tidal_choices = TidalChoices()
