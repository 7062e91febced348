"""Block union (CompactAttention): one sorted page list per (request, KV head).

The blocks kept for every query block row of a chunk, and for every q head that shares a
KV head, are merged, so a kernel reads each selected KV page once per GQA group, in place,
through the request's block table. Rows then attend to the whole union (causally masked):
union never drops a selected block, it may only add some.
"""

from __future__ import annotations

import torch


def union_blocks(mask: torch.Tensor, kv_head_of: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """mask [q_heads, rows, kv_blocks] -> [num_kv_heads, kv_blocks] bool, kept by any row or head."""
    per_head = mask.any(dim=1).to(torch.int32)  # [q_heads, kv_blocks]
    grouped = torch.zeros(num_kv_heads, mask.shape[-1], dtype=torch.int32, device=mask.device)
    grouped.index_add_(0, kv_head_of.long(), per_head)
    return grouped > 0


def blocks_to_pages(blocks: torch.Tensor, block_size: int, page_size: int, seq_len: int) -> torch.Tensor:
    """Sorted selection-block ids -> sorted logical page ids that hold tokens below seq_len."""
    per_block = block_size // page_size
    pages = (blocks[:, None] * per_block + torch.arange(per_block, device=blocks.device)[None, :]).reshape(-1)
    return pages[pages < (seq_len + page_size - 1) // page_size]

