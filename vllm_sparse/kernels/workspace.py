"""Device memory the sparse path reserves at engine start, so a long prompt never allocates it.

The per-row estimators (`antidiagonal`, sampled `lowbit`, `vertical_slash`) keep one float per
(scored row, KV block) between their two kernels. That grows with the chunk and the context, so
it is not allocated per request: the backend reserves one buffer while vLLM loads the model (vLLM
counts it with the weights, before it sizes the KV cache), sized for the largest chunk at
`max_model_len` and capped at `VLLM_SPARSE_WORKSPACE_MIB` (default 512); a chunk that needs more
is scored in slabs of whole query blocks that fit. Without a reservation (tests, benchmarks) each
call allocates what it needs, up to the same cap. Once a chunk is selected its scores are spent, so
the same memory then holds the head-major queries and output of a packed FlashAttention call
(`flash_compact.list_packing`, which packs only where a reservation holds them).
"""

from __future__ import annotations

import torch

from vllm_sparse import envs
from vllm_sparse.log import logger


def cap_bytes() -> int:
    raw = envs.get("VLLM_SPARSE_WORKSPACE_MIB")
    try:
        mib = int(raw)
    except ValueError:
        raise ValueError(f"VLLM_SPARSE_WORKSPACE_MIB={raw!r} is not a whole number of MiB") from None
    if mib < 1:
        raise ValueError(f"VLLM_SPARSE_WORKSPACE_MIB={mib}: give at least 1")
    return mib * 2**20


def _key(device) -> torch.device:
    """"cuda" and "cuda:N" (the current device) name one buffer."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class Workspace:
    """One fp32 buffer per device, handed out whole to one kernel pair at a time (one stream)."""

    def __init__(self) -> None:
        self._buffers: dict[torch.device, torch.Tensor] = {}
        self._key_tokens: dict[torch.device, int] = {}

    def count_key_columns(self, tokens: int, device: torch.device) -> None:
        """vLLM's memory profile counted one KV head's int8 key columns at `tokens` of context (`reserve.py`)."""
        self._key_tokens[_key(device)] = tokens

    def key_column_heads(self, kv_heads: int, seq_len: int, bytes_per_token: int, device: torch.device) -> int:
        """KV heads whose int8 key columns one launch may hold at `seq_len`: as many as the bytes counted for
        one head at the longest context cover (at 32K of a 128K engine, four), else as many as the cap holds
        (tests, benchmarks); one at least."""
        counted = self._key_tokens.get(_key(device))
        fit = counted // max(seq_len, 1) if counted else cap_bytes() // max(seq_len * bytes_per_token, 1)
        return max(1, min(kv_heads, fit))

    def reserve(self, nbytes: int, device: torch.device) -> int:
        """Reserve min(nbytes, cap) on `device` (once; a larger later request grows it). -> bytes held."""
        device = _key(device)
        nbytes = min(nbytes, cap_bytes())
        held = self._buffers.get(device)
        if held is None or held.numel() * 4 < nbytes:
            self._buffers[device] = torch.empty(-(-nbytes // 4), dtype=torch.float32, device=device)
            logger.info("vllm-sparse: reserved %.1f MiB on %s for estimator workspaces", nbytes / 2**20, device)
        return self._buffers[device].numel() * 4

    def reserved(self, device: torch.device) -> int:
        held = self._buffers.get(_key(device))
        return 0 if held is None else held.numel() * 4

    def floats(self, numel: int, device: torch.device) -> torch.Tensor:
        """A flat fp32 tensor of `numel` elements: the reservation's head when it fits, else a new one."""
        held = self._buffers.get(_key(device))
        if held is not None and held.numel() >= numel:
            return held[:numel]
        return torch.empty(numel, dtype=torch.float32, device=device)

    def tail(self, offset: int, numel: int, device: torch.device) -> torch.Tensor | None:
        """Floats [offset, offset + numel) of the reservation (offset 16-byte aligned by the caller), None where
        there is no reservation or it ends sooner: room a chunk's rows leave for other temporaries."""
        held = self._buffers.get(_key(device))
        if held is None or held.numel() < offset + numel:
            return None
        return held[offset:offset + numel]

    def capacity(self, device: torch.device) -> int:
        """Floats one kernel pair may use on `device`: the reservation where there is one (a chunk
        that needs more runs in more slabs, never allocating), else the cap."""
        return (self.reserved(device) or cap_bytes()) // 4


WORKSPACE = Workspace()
