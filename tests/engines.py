"""Helpers to run an engine (tests/engine_runner.py) in a subprocess and read its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.engine_runner import RESULT_MARK

REPO = Path(__file__).resolve().parents[1]


def engine_env() -> dict[str, str]:
    """The test process's environment for vLLM subprocesses, without the Triton interpreter switch
    that CPU-hosted kernel tests turn on (conftest.py): vLLM runs as a user runs it."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


# The LLM's engine core in the runner's own process rather than a second one: the same scheduler,
# workers and backend, ~25 s less start-up per engine on 2 cores (a second vLLM import). The server
# tests keep vLLM's own process layout (API server, engine core, workers).
IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def run_engine(spec: dict, timeout: int = 600, expect_ok: bool = True,
               env: dict[str, str] | None = None) -> tuple[dict | None, str]:
    """-> (result or None, combined output). Raises with the engine's output if expect_ok and it failed.
    `env`: variables set for this engine only."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.engine_runner", json.dumps(spec)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**engine_env(), **IN_PROCESS, **(env or {})},
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        if expect_ok:
            raise AssertionError(f"engine failed (rc={proc.returncode}):\n{output[-6000:]}")
        return None, output
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith(RESULT_MARK))
    return json.loads(line[len(RESULT_MARK):]), output
