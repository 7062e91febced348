"""The sparse prefill path's CUDA host code run on CPU tensors: every Triton kernel of the path replaced by a
recorder that computes the key Triton would compile the launch under (Triton's own argument binder, `compile_keys`)
and launches nothing, and the path's device choices made as on CUDA. For the warm-up tests
(`test_prefill_warmup.py`: what serving launches, the engine start compiled) and the host-time benchmark
(`benchmarks/host_path.py`: what a sparse chunk-layer costs the host).

On CPU the sparse path takes torch references where CUDA launches kernels; `on_cuda_path` patches them to the CUDA
choices:
- `selected_kernel`: "fa3" (Hopper) or "fa2" (opt-in from compute capability 8.0; FlashAttention itself is vLLM's
  CUDA kernel, stubbed, over `_tile_tables_kernel`'s tables) or "triton" (GPUs without FA3, and plans that keep key
  columns on any GPU); the estimators' fused kernels follow the choice;
- the selection (`select_blocks_triton`) and the block key means (`block_key_means_triton`), chosen by `q.is_cuda`;
- `row_bucket` and the mass kernel's `_kv_block_tile`, whose CPU rule (no floor: the interpreter pays per
  element) gives other constexprs than CUDA's;
- the plans' `auto` floors of the chunks that go sparse (`AUTO_MIN_QUERY_TOKENS`, `AUTO_MIN_CHUNK_WORK`), by device:
  CUDA's.
The metrics' density kernel is chosen by `WorkerMetrics.use_kernel`, the `dense_above` count's by
`DensityGuard.use_kernel` (set on CUDA only): callers set them.
"""

from __future__ import annotations

import torch

from tests.compile_keys import launch_key
from vllm_sparse.backend import attend, kernel_choice, sparse_path, warmup
from vllm_sparse.config import plan as config_plan
from vllm_sparse.estimators import base, block_means, row_scores
from vllm_sparse.kernels import column_attention, flash_compact, launch, page_count, sparse_attention
from vllm_sparse.metrics import density_kernel
from vllm_sparse.selection import select_kernel, tile_tables

KERNELS = [(density_kernel, "_record_density_kernel"), (page_count, "_add_page_count_kernel"),
           (sparse_attention, "_sparse_paged_attention_kernel"),
           (column_attention, "_column_attention_kernel"), (block_means, "_block_key_means_kernel"),
           (row_scores, "_quantize_rows_kernel"), (row_scores, "_quantize_columns_kernel"),
           (row_scores, "_row_block_lse_int_kernel"), (row_scores, "_row_block_lse_kernel"),
           (row_scores, "_block_mass_kernel"), (row_scores, "_line_mass_kernel"),
           (select_kernel, "_select_blocks_kernel"), (tile_tables, "_tile_tables_kernel")]
ORIGINAL = {name: getattr(module, name) for module, name in KERNELS}


class Recorder:
    """A Triton kernel that records the key each launch would compile under (with where it came from), and
    launches nothing. `counts` (when given): launches per kernel name."""

    def __init__(self, name, seen, where, counts=None):
        self.name, self.seen, self.where, self.counts = name, seen, where, counts

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            key, params = launch_key(ORIGINAL[self.name], self.name, args, kwargs)
            self.seen.setdefault(key, self.where[0])
            if self.counts is not None:
                self.counts[self.name] = self.counts.get(self.name, 0) + 1
            if self.name == "_select_blocks_kernel":  # every block kept: a mask the later steps can take
                params["OUT"].fill_(True)
        return record


def record_into(monkeypatch, seen, where, counts=None):
    for module, name in KERNELS:
        monkeypatch.setattr(module, name, Recorder(name, seen, where, counts))


def on_cuda_path(monkeypatch, kernel, flash=None, dense=None):
    """The CPU path's choices made as on CUDA (module docstring); `flash` and `dense` stand in for the sparse and the
    dense-tail FlashAttention calls (default: ones that do nothing)."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(kernel_choice, "selected_kernel", lambda device: kernel)  # (warm_up's)
    monkeypatch.setattr(sparse_path, "selected_kernel", lambda device: kernel)
    monkeypatch.setattr(sparse_path, "select_blocks", select_kernel.select_blocks_triton)
    monkeypatch.setattr(base, "block_key_means_ref", block_means.block_key_means_triton)
    monkeypatch.setattr(select_kernel, "row_bucket", lambda n, device: launch.row_bucket(n, cuda))
    monkeypatch.setattr(tile_tables, "row_bucket", lambda n, device: launch.row_bucket(n, cuda))
    kv_block_tile = row_scores._kv_block_tile
    monkeypatch.setattr(row_scores, "_kv_block_tile", lambda n, device: kv_block_tile(n, cuda))
    for floors in (config_plan.AUTO_MIN_QUERY_TOKENS, config_plan.AUTO_MIN_CHUNK_WORK):  # (the warm-up reads them)
        monkeypatch.setitem(floors, "cpu", floors["cuda"])
    monkeypatch.setattr(attend, "sparse_attention_flash", flash or (lambda *args, **kwargs: None))
    monkeypatch.setattr(attend, "dense_flash", dense or (lambda *args, **kwargs: None))  # (a dense tail's tiles)
    monkeypatch.setattr(flash_compact, "num_sms", lambda device: 132)  # (an H100's: whether a short chunk packs)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # (the attention wrappers' check for CPU tensors; nothing runs)
    warmup._compile.cache_clear()  # (once per engine and process: each test is an engine start)
