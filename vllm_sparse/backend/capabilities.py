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
And one preference: the KV cache page size vLLM takes when `--block-size` is not given is the dense backend's
unless the plan selects in blocks that are not whole pages of it (vLLM 0.34 defaults to 64-token pages on CUDA, 16
before; the shipped Llama plan's decode selects 16-token blocks), or decodes with Quest, whose page bounds loosen
with the page (measured over 16-token pages): then the largest size that divides them all, where the dense backend
pages it (else its answer stands, and the builder names the plan's block against it at start). vLLM asks after the
model is built; reservations made before count the same answer (`SparsePlan.page_size_at_start`).

Settings the sparse path cannot read but a plan that keeps every layer dense can (a quantized KV cache other
than fp8 e4m3 with per-tensor scales on CUDA, KV connectors and offloading, context parallelism) are refused
at start by the builder when the plan has sparse layers (`checks.kv_problems`), each naming its setting.
"""

from __future__ import annotations

from vllm_sparse import compat
from vllm_sparse.backend.plan_cache import plan_for
from vllm_sparse.config.plan import QUEST_PAGE_TOKENS
from vllm_sparse.log import logger


class SparseBackendCapabilities:
    """Put in front of the dense backend class."""

    supports_kv_cache_update_bypass = False

    @classmethod
    def supports_device_cpu_query_lens_mismatch(cls) -> bool:
        return False

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        """Asked only when the user gave no --block-size (vLLM keeps a size the user gave; the builder then checks
        it against the plan at start, naming the plan's field)."""
        preferred = super().get_preferred_block_size(default_block_size)
        config = compat.current_vllm_config_or_none()
        if config is None or getattr(config, "model_config", None) is None:
            return preferred
        plan = plan_for(config)
        size = next((s for s in plan.page_sizes_within(preferred) if cls.supports_block_size(s)), preferred)
        if size != preferred:  # (else kept: where the dense backend cannot page the plan's blocks, the builder's
            #                     check names both at start)
            why = [f"selects in {b}-token blocks" for b in plan.selection_blocks if b % preferred]
            why += [f"decodes with Quest, measured over {QUEST_PAGE_TOKENS}-token pages"] \
                if plan.needs_summaries and size <= QUEST_PAGE_TOKENS else []
            logger.info("vllm-sparse: KV cache block size %d, not vLLM's %d: the plan (%s) %s", size, preferred,
                        plan.source, "; ".join(why))
        return size
