"""Compile every Triton kernel launch of the warm-up tests for real GPUs, on a machine without one (a pytest plugin).

    python -m pytest -p tests.gpu_compile --gpu-arch 89 tests/test_prefill_warmup.py tests/test_decode_warmup.py \\
        -k "not runs_its_kernels and not fp8 and not fa3"

The warm-up tests (`test_prefill_warmup.py`, `test_decode_warmup.py`) see every launch serving and the engine-start
warm-ups make, over the shipped and benchmark plans, and record each launch's compile key (`compile_keys.py`). With
this plugin the first launch of each key is kept, and after the tests each one is compiled by Triton's own
`JITFunction.warmup` for the `--gpu-arch` (Triton's CUDA backend needs no GPU to compile: a driver that only names
the target stands in); the launch choices that follow the device's shared memory (`launch.shared_memory_per_block`)
take that architecture's. So GPU-only failures the interpreter cannot show become visible here: a kernel Triton
cannot compile for the architecture, or one needing more shared memory per block than it has (the GPU refuses the
launch: Triton's `OutOfResources` at engine start). Each variant's registers, spills and shared memory (ptxas's own
report, from the ptxas run that built the cubin) go to `--gpu-compile-json`; a table by kernel is printed. The run
fails if any variant does. One process only (no `-n`).

Triton must be imported without its interpreter (this module sets `TRITON_INTERPRET=0` before conftest's default),
so tests that run kernels in the interpreter cannot run beside it. `scripts/gpu-compile.sh` runs it under another
Triton release (the GPU image's); `test_gpu_compile.py` runs it in CI.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
from collections import defaultdict

os.environ["TRITON_INTERPRET"] = "0"  # (before triton is imported: conftest's default would choose the interpreter)

import pytest  # noqa: E402


class _Launches(dict):
    """compile_keys.LAUNCHES: also remembers which test made each key's first launch."""

    test = ""

    def setdefault(self, key, value):
        if key not in self:
            super().__setitem__(key, (*value, self.test))
        return self[key]


def pytest_addoption(parser):
    group = parser.getgroup("gpu-compile")
    group.addoption("--gpu-arch", default="90", type=int, help="the compute capability to compile for, e.g. 89")
    group.addoption("--gpu-compile-json", default="", help="write every variant's resources here")


_LAUNCHES = _Launches()


def _shared_bytes(arch: int) -> int:
    from vllm_sparse.kernels.launch import OPTIN_SHARED_BYTES

    if divmod(arch, 10) not in OPTIN_SHARED_BYTES:
        raise pytest.UsageError(f"--gpu-arch {arch}: no shared-memory limit known for it (kernels/launch.py "
                                f"OPTIN_SHARED_BYTES: {sorted(a * 10 + b for a, b in OPTIN_SHARED_BYTES)})")
    return OPTIN_SHARED_BYTES[divmod(arch, 10)]


def pytest_configure(config):
    from tests import compile_keys
    from vllm_sparse.kernels import launch

    if config.getoption("numprocesses", None):  # (each worker would compile its share and write the report)
        raise pytest.UsageError("tests.gpu_compile runs in one process: drop -n")
    compile_keys.LAUNCHES = _LAUNCHES
    shared = _shared_bytes(config.getoption("--gpu-arch"))
    launch.shared_memory_per_block = lambda device: shared  # (for the whole session: this process only compiles)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _LAUNCHES.test = item.nodeid  # (setup, call and teardown)
    return (yield)


class _TargetDriver:
    """Triton's active driver as far as compiling needs it: the target, device 0, stream 0 (nothing launches)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


def _resources(ptxas_log: str) -> dict:
    """Registers, stack and spills from ptxas's `-v` report."""
    regs = re.search(r"Used (\d+) registers", ptxas_log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    if not regs or not frame:
        raise RuntimeError(f"ptxas gave no resource report:\n{ptxas_log[-2000:]}")
    return {"registers": int(regs.group(1)), "stack_bytes": int(frame.group(1)),
            "spill_store_bytes": int(frame.group(2)), "spill_load_bytes": int(frame.group(3))}


def compile_variant(kernel, name, args, kwargs, arch: int) -> dict:
    """Compile one launch for `arch` (the active driver names it) -> its resources, or the error. The resources are
    those of the cubin Triton builds: its own ptxas run, with its flags, reports them (compiled afresh, never loaded
    from Triton's cache, which would skip ptxas)."""
    import triton
    from triton import knobs

    from tests.compile_keys import launch_key

    key = launch_key(kernel, name, args, kwargs)[0]
    log = io.StringIO()
    try:
        with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
            compiled = kernel.warmup(*args, grid=(1,), **kwargs)
        res = {"ok": True, "key": repr(key), "num_warps": compiled.metadata.num_warps,
               "num_stages": compiled.metadata.num_stages, "shared_bytes": compiled.metadata.shared,
               **_resources(log.getvalue())}
    except Exception as e:  # (reported per variant; the run fails below)
        return {"ok": False, "key": repr(key), "error": f"{type(e).__name__}: {str(e)[:600]}"}
    limit = _shared_bytes(arch)
    if res["shared_bytes"] > limit:
        res.update(ok=False, error=f"needs {res['shared_bytes']} bytes of shared memory per block; sm_{arch} has "
                                   f"{limit} (triton {triton.__version__})")
    return res


def _table(rows: list[dict]) -> str:
    by = defaultdict(list)
    for r in rows:
        by[(r["arch"], r["kernel"])].append(r)
    lines = ["| arch | kernel | variants | failed | registers | spilling variants (max bytes stored) | shared max |",
             "|---|---|---|---|---|---|---|"]
    for (arch, name), rs in sorted(by.items()):
        ok = [r for r in rs if "registers" in r]
        spills = [r["spill_store_bytes"] for r in ok if r["spill_store_bytes"]]
        regs = f"{min(r['registers'] for r in ok)}-{max(r['registers'] for r in ok)}" if ok else "-"
        lines.append(f"| sm_{arch} | {name} | {len(rs)} | {sum(not r['ok'] for r in rs)} | {regs} | "
                     f"{len(spills)} ({max(spills, default=0)}) | {max((r['shared_bytes'] for r in ok), default=0)} |")
    return "\n".join(lines)


def pytest_sessionfinish(session, exitstatus):
    if not _LAUNCHES:
        return
    import triton
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    rows, start = [], time.time()
    arch = session.config.getoption("--gpu-arch")
    driver.set_active(_TargetDriver(arch))
    for key, (kernel, args, kwargs, test) in _LAUNCHES.items():
        assert isinstance(kernel, JITFunction), f"{key[0]} is {type(kernel).__name__}: run with TRITON_INTERPRET=0"
        row = {"arch": arch, "kernel": key[0], "first_launched_by": test,
               **compile_variant(kernel, key[0], args, kwargs, arch)}
        if row["key"] != repr(key):  # (an argument changed after its launch was recorded: not what was launched)
            row.update(ok=False, error=f"the recorded launch's arguments no longer give its key {key!r}")
        rows.append(row)
    failed = [r for r in rows if not r["ok"]]
    report = {"triton": triton.__version__, "arch": arch, "shared_bytes_per_block": _shared_bytes(arch),
              "variants": len(_LAUNCHES), "seconds": time.time() - start, "rows": rows}
    if session.config.getoption("--gpu-compile-json"):
        with open(session.config.getoption("--gpu-compile-json"), "w") as f:
            json.dump(report, f, indent=1)
    writer = session.config.pluginmanager.get_plugin("terminalreporter")
    say = writer.write_line if writer else print
    say(f"\nGPU compile for sm_{arch} (triton {triton.__version__}): {len(_LAUNCHES)} launch variants in "
        f"{report['seconds']:.0f} s, {len(failed)} failed")
    say(_table(rows))
    for r in failed:
        say(f"FAILED sm_{r['arch']} {r['kernel']} (first launched by {r['first_launched_by']}): {r['error']}")
    if failed:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
