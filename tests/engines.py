"""Helpers to run an engine (tests/engine_runner.py) in a subprocess and read its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.engine_runner import RESULT_MARK, SPEC_MARK

REPO = Path(__file__).resolve().parents[1]

# Tests of vLLM's CPU engine (float32 tiny models): a GPU host's vLLM is its CUDA build, whose attention backends
# refuse float32 at start; there the GPU engine tests (tests/test_engine*_gpu.py) run in their place.
CPU_ENGINE = pytest.mark.skipif(torch.cuda.is_available(), reason="vLLM's CPU engine: on a GPU host the GPU engine "
                                "tests (tests/test_engine*_gpu.py) run instead")


def engine_env() -> dict[str, str]:
    """The test process's environment for vLLM subprocesses, without the Triton interpreter switch
    that CPU-hosted kernel tests turn on (conftest.py): vLLM runs as a user runs it."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


# The LLM's engine core in the runner's own process rather than a second one: the same scheduler,
# workers and backend, ~25 s less start-up per engine on 2 cores (a second vLLM import). The server
# tests keep vLLM's own process layout (API server, engine core, workers).
IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def _runner(arg, timeout: int, env: dict[str, str] | None, one_stream: bool) -> subprocess.CompletedProcess:
    """tests/engine_runner.py on one spec or a list of them; `one_stream`: stderr into stdout, in order (so a
    list's output splits by engine), else apart."""
    return subprocess.run(
        [sys.executable, "-m", "tests.engine_runner", json.dumps(arg)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if one_stream else subprocess.PIPE, text=True,
        timeout=timeout, env={**engine_env(), **IN_PROCESS, **(env or {})},
    )


def run_engine(spec: dict, timeout: int = 600, expect_ok: bool = True,
               env: dict[str, str] | None = None) -> tuple[dict | None, str]:
    """-> (result or None, combined output). Raises with the engine's output if expect_ok and it failed.
    `env`: variables set for this engine only."""
    proc = _runner(spec, timeout, env, one_stream=False)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        if expect_ok:
            raise AssertionError(f"engine failed (rc={proc.returncode}):\n{output[-6000:]}")
        return None, output
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith(RESULT_MARK))
    return json.loads(line[len(RESULT_MARK):]), output


def run_engines(specs: dict[str, dict], timeout: int = 900,
                env: dict[str, str] | None = None) -> dict[str, tuple[dict, str]]:
    """Several engines one after the other in one process (vLLM imported once; tests/engine_runner.py):
    name -> (result, that engine's output). Raises with the output if any failed."""
    names = list(specs)
    proc = _runner([specs[n] for n in names], timeout, env, one_stream=True)
    if proc.returncode != 0:
        raise AssertionError(f"engines failed (rc={proc.returncode}):\n{proc.stdout[-6000:]}")
    parts = ("\n" + proc.stdout).split("\n" + SPEC_MARK)[1:]  # each engine's output, after its mark
    assert len(parts) == len(names), proc.stdout[-6000:]
    out = {}
    for name, part in zip(names, parts):
        line = next(x for x in reversed(part.splitlines()) if x.startswith(RESULT_MARK))
        out[name] = json.loads(line[len(RESULT_MARK):]), part  # null for a spec that was to fail, and did
    return out


def run_each(specs: dict[str, dict], one_process: bool,
             env: dict[str, str] | None = None) -> dict[str, tuple[dict, str]]:
    """name -> (result, output): the engines one after the other in one process (`run_engines`), or a
    process each (`run_engine`; what the GPU twins do)."""
    if one_process:
        return run_engines(specs, env=env)
    return {name: run_engine(spec, env=env) for name, spec in specs.items()}


def run_specs(specs: dict[str, dict], one_process: bool) -> dict[str, dict]:
    """name -> result (`run_each`)."""
    return {name: result for name, (result, _) in run_each(specs, one_process).items()}
