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
