"""Where decode selection's memory comes from, so that it can never take an engine out of memory.

- The workspace (scores, selected blocks, split partials) is bounded by the batch's row limit and the
  budget, and is allocated while vLLM builds the model: it counts with the weights.
- Page summaries grow with the KV cache (1/page_size of each sparse-decode layer's share). While
  vLLM builds the model (before it measures memory and sizes the KV cache) the summaries' share of
  the most memory the KV cache could get is reserved, so vLLM counts it with the weights. The first
  reservation is made before the weights load, so it is taken again once they are in memory (vLLM
  calls each attention layer's `process_weights_after_loading` then, still inside the load it
  measures): the weights' memory is no longer counted as the cache's. Once the metadata builders know
  the real number of pages, the reservation is released and the summaries take its place (they fit
  in it: the cache got less than the most it could have).
"""

from __future__ import annotations

import torch

from vllm_sparse import compat
from vllm_sparse.decode.attention import split_slots
from vllm_sparse.decode.select import candidate_width
from vllm_sparse.decode.summaries import PageSummaries
from vllm_sparse.log import logger

_summaries: dict[str, PageSummaries] = {}
_reservation: dict[str, object] = {}


def summaries_share(plan, page_size: int, num_kv_heads: int, head_size: int, dtype: torch.dtype,
                    cache_itemsize: int, memory: int, explicit: bool) -> int:
    """Bytes the page summaries take of `memory`: the KV cache's memory when `explicit` (kv_cache_memory_bytes),
    else the memory that cache and summaries share. Every full-attention layer holds a KV page per block of
    `cache_itemsize`-byte elements (1 for an fp8 cache: summaries are kept in the model's `dtype` and so take
    twice the share they take beside a bf16 cache); each Quest layer adds a summary (tidal layers need none)."""
    kv_bytes = sum(2 * page_size * num_kv_heads * head_size * cache_itemsize
                   for lp in plan.layers if lp.full_attention)
    sum_bytes = sum(PageSummaries.bytes_per_page(num_kv_heads, head_size, dtype)
                    for lp in plan.layers if lp.needs_summaries)
    if explicit:
        return int(memory * sum_bytes / kv_bytes)
    return max(0, int(memory * sum_bytes / (kv_bytes + sum_bytes)))


def reserve_at_load(vllm_config, plan, num_kv_heads: int, head_size: int, dtype: torch.dtype,
                    device: torch.device, cache_itemsize: int | None = None) -> None:
    """Once per process, while vLLM builds the model: hold the page summaries' share of the most memory
    the KV cache could get (an explicit kv_cache_memory_bytes, else gpu_memory_utilization of the GPU
    less what is in use now). `cache_itemsize`: bytes per cached element (default: the model's dtype's)."""
    if device.type != "cuda" or ("tensor" in _reservation and _reservation.get("engine") is vllm_config):
        return  # (this engine's first layer reserved already)
    stale = "tensor" in _reservation  # another engine's, whose start failed before its builders took it: replaced
    _reservation.clear()
    if stale:
        _release_cached(device)
    inputs = (vllm_config, plan, num_kv_heads, head_size, dtype, device, cache_itemsize)
    _hold(_share_of_cache_memory(*inputs), device)
    _reservation["engine"] = vllm_config
    _reservation["inputs"] = inputs  # for `refit_after_load`
    logger.info("vllm-sparse: reserved %.1f MiB for decode page summaries before vLLM sizes the KV cache",
                _reservation["bytes"] / 2**20)


def refit_after_load() -> None:
    """Once the weights are in memory (the first sparse-decode layer's `process_weights_after_loading`): the
    reservation made before they loaded counted their memory as the cache's, ~1/17 of the weights' bytes
    too much with Quest's 16-token pages. Take the share again of what the weights left. Nothing to do for
    an explicit kv_cache_memory_bytes (the share does not depend on what is free) or off CUDA."""
    inputs = _reservation.pop("inputs", None)
    if inputs is None or "tensor" not in _reservation or compat.kv_cache_memory_bytes(inputs[0].cache_config):
        return
    before = _reservation.pop("bytes")
    del _reservation["tensor"]
    # The old block back to the GPU: torch's reserved memory, read next as what is in use, would still count it.
    _release_cached(inputs[5])
    _hold(_share_of_cache_memory(*inputs), inputs[5])
    logger.info("vllm-sparse: decode page summaries' reservation %.1f MiB, was %.1f MiB before the weights loaded",
                _reservation["bytes"] / 2**20, before / 2**20)


def _share_of_cache_memory(vllm_config, plan, num_kv_heads, head_size, dtype, device, cache_itemsize) -> int:
    cache = vllm_config.cache_config
    itemsize = cache_itemsize or torch.empty(0, dtype=dtype).element_size()
    explicit = compat.kv_cache_memory_bytes(cache)
    memory = explicit or compat.gpu_memory_utilization(cache) * _total_memory(device) - _memory_in_use(device)
    page = plan.page_size_at_start(cache.block_size, cache.user_specified_block_size)
    return summaries_share(plan, page, num_kv_heads, head_size, dtype, itemsize, memory, bool(explicit))


# The device calls, apart so that tests can stand in for a GPU.
def _total_memory(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[1]


def _memory_in_use(device: torch.device) -> int:
    return torch.cuda.memory_reserved(device)


def _release_cached(device: torch.device) -> None:
    with torch.cuda.device(device):
        torch.cuda.empty_cache()


def _hold(nbytes: int, device: torch.device) -> None:
    _reservation["tensor"] = torch.empty(nbytes, dtype=torch.uint8, device=device)
    _reservation["bytes"] = nbytes


def allocate_summaries(layer_names: list[str], num_pages: int, num_kv_heads: int, head_size: int, page_size: int,
                       dtype: torch.dtype, device: torch.device) -> None:
    """The sparse-decode layers' summaries, once the cache's page count is known (metadata builders; one
    per KV cache group, each taking its share of what was reserved)."""
    if "tensor" in _reservation:  # the first group: the reservation goes back to the allocator for them
        del _reservation["tensor"]
        _reservation["left"] = _reservation.pop("bytes")
    left = _reservation.get("left")
    need = 0
    for name in layer_names:  # (a new engine in the same process replaces an earlier engine's)
        _summaries[name] = PageSummaries(num_pages, num_kv_heads, head_size, page_size, dtype, device)
        need += _summaries[name].nbytes
    if need:
        kv = 2 * num_pages * page_size * num_kv_heads * head_size * torch.empty(0, dtype=dtype).element_size()
        logger.info("vllm-sparse: decode page summaries for %d layers: %.1f MiB (%.2f%% of their KV cache)%s",
                    len(layer_names), need / 2**20, 100 * need / (kv * len(layer_names)),
                    "" if left is None else f", in the {left / 2**20:.1f} MiB left of the reservation made at load")
        if device.type == "cuda" and (left is None or need > left):
            logger.warning("vllm-sparse: decode page summaries (%.1f MiB) exceed the %.1f MiB reserved before vLLM "
                           "sized the KV cache", need / 2**20, (left or 0) / 2**20)
        if left is not None:
            _reservation["left"] = max(0, left - need)


def drop_summaries(layer_names: list[str]) -> None:
    """A new engine's KV cache group forgets an earlier engine's summaries (same process), so a layer that
    keeps none in this plan finds none."""
    for name in layer_names:
        _summaries.pop(name, None)


def summaries_for(layer_name: str) -> PageSummaries | None:
    return _summaries.get(layer_name)


class DecodeWorkspace:
    """Per process, shared by the layers (they run one after another): bounded by rows x budget."""

    def __init__(self, rows: int, q_heads: int, kv_heads: int, head_size: int, row_blocks: int, kept_blocks: int,
                 device: torch.device):
        slots = split_slots(rows, kv_heads) * q_heads
        self.scores = torch.empty(rows, kv_heads, row_blocks, dtype=torch.float32, device=device)
        self.candidates = torch.zeros(2, rows, kv_heads, candidate_width(row_blocks, kept_blocks),
                                      dtype=torch.int32, device=device)  # blocks and keys
        self.selected = torch.zeros(rows, kv_heads, max(1, kept_blocks), dtype=torch.int32, device=device)
        self.counts = torch.zeros(rows, kv_heads, dtype=torch.int32, device=device)
        # The last tidal selector's blocks: they outlive the layers between it and its readers.
        self.tidal_selected = torch.zeros(rows, kv_heads, max(1, kept_blocks), dtype=torch.int32, device=device)
        self.tidal_counts = torch.zeros(rows, kv_heads, dtype=torch.int32, device=device)
        self.partial_out = torch.empty(slots, head_size, dtype=torch.float32, device=device)  # split partials
        self.partial_ml = torch.empty(slots, 2, dtype=torch.float32, device=device)

    @property
    def rows(self) -> int:
        return self.counts.shape[0]

    def fits(self, rows: int, q_heads: int, kv_heads: int, head_size: int, row_blocks: int, kept: int) -> bool:
        return (rows <= self.rows and kv_heads <= self.counts.shape[1] and head_size == self.partial_out.shape[1]
                # (room for every row count up to the workspace's own, which warm-up and the step guard go by)
                and split_slots(self.rows, kv_heads) * q_heads <= self.partial_out.shape[0]
                and row_blocks <= self.scores.shape[2] and kept <= self.selected.shape[2]
                and candidate_width(row_blocks, kept) <= self.candidates.shape[3])


_workspace: dict[str, DecodeWorkspace] = {}


def decode_workspace_bytes(rows: int, q_heads: int, kv_heads: int, head_size: int, row_blocks: int,
                           kept_blocks: int) -> int:
    """What `decode_workspace` allocates for these sizes, counted without allocating (on the meta device)."""
    ws = DecodeWorkspace(rows, q_heads, kv_heads, head_size, row_blocks, kept_blocks, torch.device("meta"))
    return sum(t.nbytes for t in vars(ws).values() if isinstance(t, torch.Tensor))


def decode_workspace(rows: int, q_heads: int, kv_heads: int, head_size: int, row_blocks: int, kept_blocks: int,
                     device: torch.device) -> DecodeWorkspace:
    ws = _workspace.get(str(device))
    if ws is None or not ws.fits(rows, q_heads, kv_heads, head_size, row_blocks, kept_blocks):
        ws = _workspace[str(device)] = DecodeWorkspace(rows, q_heads, kv_heads, head_size, row_blocks, kept_blocks,
                                                       device)
    return ws
