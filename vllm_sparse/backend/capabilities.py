"""What SPARSE declares to vLLM, on the backend and builder classes, where vLLM's selection, validation and
model runner read it: `SparseBackendCapabilities` goes in front of a dense backend class (`cuda.py`,
`cpu.py`); the builder's declaration is on `builder.SparseBuilderMixin`.

SPARSE serves every layer: the ones its plan makes sparse through the sparse path, the others (and every
layer feature the sparse path lacks: sliding window, sinks, ALiBi, soft-capping, bidirectional
multimodal ranges, non-decoder attention) through the dense backend it wraps. So those capabilities
stay the dense backend's. Declared "no" here:
- device query lengths that disagree with the host's (vLLM's adaptive verification): the builder plans
  each step's sparse chunks from the host query lengths;
- one KV cache group's metadata reused for another by swapping its block table: each group builds its
  own step, its sparse chunks (its layers' plan) and its dense requests' metadata over its own table;
- a model's fused KV write that skips `do_kv_cache_update` (vLLM 0.33): decode's page summaries follow
  the writes there.

Settings the sparse path cannot read but a plan that keeps every layer dense can (a quantized KV cache other
than fp8 e4m3 with per-tensor scales on CUDA, KV connectors and offloading, context parallelism) are refused
at start by the builder when the plan has sparse layers (`checks.kv_problems`), each naming its setting.
"""

from __future__ import annotations


class SparseBackendCapabilities:
    """Put in front of the dense backend class."""

    supports_kv_cache_update_bypass = False

    @classmethod
    def supports_device_cpu_query_lens_mismatch(cls) -> bool:
        return False
