"""Which attention kernel runs the sparse chunks, checked at engine start.

FA3 over compacted tables on Hopper with vLLM's FA3 build, the Triton kernel on other GPUs (and for layers that
keep key columns), the exact torch reference on CPU. `VLLM_SPARSE_KERNEL` overrides; a value that is not one of the
kernels, or a kernel that cannot run on the engine's device, stops the engine at start. `fa2` (FA2 over the same
tables: the kernel vLLM's FlashAttention backend attends densely with on Ampere and Ada) is opt-in until its path
has run on a GPU; it is meant to become the default where FA3 is not.
"""

from __future__ import annotations

import functools

import torch

from vllm_sparse import envs

KERNELS = ("fa3", "fa2", "triton", "reference")  # fa3 / fa2: `kernels.flash_compact` (FLASH_VERSIONS)
ENV_VAR = "VLLM_SPARSE_KERNEL"


def selected_kernel(device: torch.device) -> str:
    """The kernel for chunks on `device`: the override if set (validated), else by device."""
    forced = envs.get(ENV_VAR)
    if forced:
        return check_kernel_choice(device)
    if device.type != "cuda":
        return "reference"
    return "fa3" if flash_attention_available(device, 3) else "triton"


def check_kernel_choice(device: torch.device) -> str:
    """The kernel `selected_kernel` gives on `device`, or a ValueError naming the setting and why it
    cannot be honoured there (called when the engine starts)."""
    forced = envs.get(ENV_VAR)
    if not forced:
        return selected_kernel(device)
    if forced not in KERNELS:
        raise ValueError(f"vllm-sparse: {ENV_VAR}={forced!r} is not a kernel; allowed: {', '.join(KERNELS)}")
    if forced != "reference" and device.type != "cuda":
        raise ValueError(f"vllm-sparse: {ENV_VAR}={forced} needs a CUDA device; on {device.type} only 'reference' "
                         "runs (the CPU KV cache keeps keys transposed)")
    if forced == "fa3" and not flash_attention_available(device, 3):
        raise ValueError(f"vllm-sparse: {ENV_VAR}=fa3 needs a Hopper GPU (compute capability 9.x) and vLLM's FA3 "
                         f"build; {torch.cuda.get_device_name(device)} has neither: use 'fa2' or 'triton'")
    if forced == "fa2" and not flash_attention_available(device, 2):
        raise ValueError(f"vllm-sparse: {ENV_VAR}=fa2 needs a GPU of compute capability 8.0 or more and vLLM's FA2 "
                         f"build; {torch.cuda.get_device_name(device)} has not: use 'triton'")
    return forced


@functools.cache
def flash_attention_available(device: torch.device, version: int) -> bool:
    """vLLM's FlashAttention build runs `version` (2 or 3) on `device` (a CUDA device)."""
    major = torch.cuda.get_device_capability(device)[0]
    if (version == 3 and major != 9) or major < 8:
        return False
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func  # noqa: F401
        from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported
    except ImportError:
        return False
    return is_fa_version_supported(version)
