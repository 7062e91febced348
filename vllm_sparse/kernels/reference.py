"""Exact attention over selected KV pages, in torch: the reference for every sparse kernel.

Inputs follow the layout the kernels use: the queries of one or more prefill chunks packed
varlen (`query_start_loc`), vLLM's paged cache read in place through each sequence's block
table, and per (sequence, KV head) a sorted list of *logical* page indices (CSR:
`page_indptr[seq * num_kv_heads + kv_head]` .. next) into that sequence's block table; or, with
`lists_per_q_head`, one list per (sequence, q head), `page_indptr[seq * num_q_heads + q_head]`.
Within the chunk attention is causal: query at absolute position p sees keys at positions <= p.
"""

from __future__ import annotations

import torch

from vllm_sparse.kernels.paged import PagedKV


def attend_visible(qs: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of queries qs [T, heads, D] over keys k, v [n, D] where visible [T, n] (fp32 math).
    -> (out [T, heads, Dv] fp32, lse [T, heads]); a row that sees no key: 0 and -inf."""
    logits = torch.einsum("tgd,kd->tgk", qs.float(), k) * scale
    logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
    m = logits.amax(dim=-1, keepdim=True)
    safe_m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(logits - safe_m)
    denom = p.sum(dim=-1, keepdim=True)
    o = torch.einsum("tgk,kd->tgd", p, v) / denom.clamp_min(1e-30)
    return o, (safe_m + torch.log(denom)).squeeze(-1)


def sparse_paged_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
    kv: PagedKV,
    block_table: torch.Tensor,  # [num_seqs, max_pages] physical page ids
    query_start_loc: torch.Tensor,  # [num_seqs + 1]
    seq_lens: torch.Tensor,  # [num_seqs] tokens in the cache, this chunk included
    page_indptr: torch.Tensor,  # [num_seqs * num_kv_heads + 1]
    page_indices: torch.Tensor,  # logical page ids, sorted per (seq, kv head)
    scale: float,
    out: torch.Tensor | None = None,  # written in place when given
    return_lse: bool = False,
    lists_per_q_head: bool = False,  # a page list per q head (each attends to its own), not per KV head
):
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, page = kv.num_kv_heads, kv.page_size
    group = num_q_heads // num_kv_heads
    if out is None:
        out = torch.empty(q.shape[0], num_q_heads, kv.value.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[0], num_q_heads), float("-inf"), dtype=torch.float32, device=q.device)
    qsl, lens, indptr = query_start_loc.tolist(), seq_lens.tolist(), page_indptr.tolist()
    offsets = torch.arange(page, device=q.device)
    for s in range(len(lens)):
        q0, q1, seq_len = qsl[s], qsl[s + 1], lens[s]
        if q1 == q0:
            continue
        q_pos = torch.arange(seq_len - (q1 - q0), seq_len, device=q.device)
        lists = num_q_heads if lists_per_q_head else num_kv_heads
        for i in range(lists):
            r = s * lists + i
            logical = page_indices[indptr[r] : indptr[r + 1]].to(q.device, torch.long)
            h = i // group if lists_per_q_head else i  # the list's KV head
            heads = slice(i, i + 1) if lists_per_q_head else slice(h * group, (h + 1) * group)
            if logical.numel() == 0:  # nothing selected: no key visible, as a fully masked row
                out[q0:q1, heads] = 0
                continue
            k_pos = (logical[:, None] * page + offsets[None, :]).reshape(-1)
            phys = block_table[s].to(q.device)[logical].long()
            k = kv.key[phys, h].reshape(-1, head_dim).float() * kv.k_scale  # [n_pages*page, D]
            v = kv.value[phys, h].reshape(-1, kv.value.shape[-1]).float() * kv.v_scale
            visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < seq_len)
            o, lse[q0:q1, heads] = attend_visible(q[q0:q1, heads], k, v, visible, scale)
            out[q0:q1, heads] = o.to(out.dtype)
    return (out, lse) if return_lse else out


def dense_causal_attention_ref(
    q: torch.Tensor,  # [q_len, num_q_heads, D] the chunk's queries, at positions seq_len-q_len..seq_len-1
    k: torch.Tensor,  # [seq_len, num_kv_heads, D] all keys of the sequence so far
    v: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain masked causal attention of one chunk against its whole context (fp32 math)."""
    q_len, seq_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    logits = torch.einsum("thd,khd->htk", q.float(), kf) * scale
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
    mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
    logits = logits.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("htk,khd->thd", logits.softmax(-1), vf).to(q.dtype)
