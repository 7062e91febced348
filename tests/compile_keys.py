"""The key Triton compiles a kernel launch under (its constexprs, each integer argument's class unless
`do_not_specialize`, each pointer's dtype and 16-byte alignment, num_warps / num_stages), as Triton's own argument
binder computes it: for the tests that check the engine-start warm-ups against serving's launches
(`test_prefill_warmup.py`, `test_decode_warmup.py`) and for the GPU compile check that compiles their launches
(`gpu_compile.py`); and `forget_compiled`, for the GPU twins."""

from __future__ import annotations

import importlib

from triton.runtime.jit import JITFunction, create_function_from_signature

try:  # the specialisation Triton's CUDA backend computes (the same rules as the base backend's)
    from triton.backends.nvidia.compiler import CUDABackend as BACKEND
except ImportError:
    from triton.backends.compiler import BaseBackend as BACKEND

_BINDERS: dict[int, tuple] = {}
# When a dict: the first launch of each key, `LAUNCHES.setdefault(key, (kernel, args, kwargs))`, kept for
# `gpu_compile.py` to compile (its dict adds the test that launched it).
LAUNCHES: dict | None = None


def binder(kernel):
    """(Triton's argument binder of `kernel`: call arguments -> (arguments by name, specialisation, launch
    options); the names of its parameters). Made once per kernel."""
    if id(kernel) not in _BINDERS:
        jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)  # (interpreter)
        bind = create_function_from_signature(jit.signature, jit.params, BACKEND)
        _BINDERS[id(kernel)] = (bind, [p.name for p in jit.params], kernel)  # (the kernel kept: its id stays its own)
    return _BINDERS[id(kernel)][:2]


def launch_key(kernel, name: str, args, kwargs) -> tuple[tuple, dict]:
    """-> (the key a launch of `kernel` (called `name`) compiles under, its arguments by name)."""
    params, specialization, options = binder(kernel)[0](*args, **kwargs)
    key = (name, tuple(specialization), tuple(sorted(options.items())))
    if LAUNCHES is not None:
        LAUNCHES.setdefault(key, (kernel, args, kwargs))
    return key, params


def forget_compiled(*modules: str) -> None:
    """Empty Triton's in-memory kernel caches of every kernel in these modules (`vllm_sparse.` names), so that what
    earlier tests in the process compiled or loaded cannot stand in for a warm-up."""
    for name in modules:
        for fn in vars(importlib.import_module(name)).values():
            if isinstance(fn, JITFunction):
                fn.device_caches.clear()
