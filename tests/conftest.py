"""Shared fixtures: models built locally and cached on disk, random paged KV inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Engines in tests size their KV cache explicitly (kv_cache_memory_bytes), which also skips vLLM CPU's
# check that 92% of the node's memory is free; and they never reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# vLLM CPU reserves a core for the front end by default; on 2 cores that halves the model's speed.
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter, which must be chosen
# before triton is first imported. Engine subprocesses drop it again (tests/engines.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (README's `-n 2 --dist loadfile`) each worker takes its own share of the cores: the engines it
# starts bind their OpenMP threads there and its own torch ops use that many threads, so the workers never run
# more threads than cores (OpenMP teams spinning on shared cores crawl). Tests that bind cores themselves (the
# CPU tensor-parallel test: a core per rank) still see every core.
_WORKER, _WORKERS = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKER and _WORKERS > 1 and not torch.cuda.is_available():
    _cores = sorted(os.sched_getaffinity(0))
    _per = max(1, len(_cores) // _WORKERS)
    _mine = [_cores[(int(_WORKER.removeprefix("gw")) * _per + i) % len(_cores)] for i in range(_per)]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, _mine)))
    torch.set_num_threads(_per)

# The longest files first (each ~2-5 minutes on 2 cores): with a file per worker at a time, one started last
# would keep a single worker busy alone at the end.
SLOW_FILES = ("test_gemma_passkey.py", "test_engine_tp.py", "test_eval.py", "test_engine_decode.py",
              "test_engine_cpu.py", "test_server.py", "test_engine_scheduling.py", "test_server_load.py",
              "test_gpu_compile.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


# The estimators' workspace is one per process: what a test reserves would decide for every later test whether a
# FlashAttention call packs its page lists (`flash_compact.list_packing` packs only within a reservation), so a
# test's outcome would hang on the order tests ran in. Each test (and each module, whose engine fixtures keep theirs
# for the module's tests) gives back what it reserved.
def _gives_back_the_workspace():
    from vllm_sparse.kernels.workspace import WORKSPACE

    buffers, key_tokens = dict(WORKSPACE._buffers), dict(WORKSPACE._key_tokens)
    yield
    WORKSPACE._buffers, WORKSPACE._key_tokens = buffers, key_tokens


_module_gives_back_its_workspace = pytest.fixture(autouse=True, scope="module")(_gives_back_the_workspace)
_test_gives_back_its_workspace = pytest.fixture(autouse=True)(_gives_back_the_workspace)

MODEL_CACHE = Path(os.environ.get("VLLM_SPARSE_MODEL_CACHE", Path.home() / ".cache" / "vllm-sparse" / "models"))


@pytest.fixture(scope="session")
def model_cache() -> Path:
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    return MODEL_CACHE


@pytest.fixture(scope="session")
def tiny_llama(model_cache) -> Path:
    from tests.fixtures.tiny_llama import build_tiny_llama

    return build_tiny_llama(model_cache)


@pytest.fixture(scope="session")
def gemma3_270m(model_cache) -> Path:
    from tests.fixtures.gemma3 import build_gemma3_270m

    return build_gemma3_270m(model_cache)
