"""Host time of vLLM's scheduler per decode step at long contexts, stock vs an engine on SPARSE (no GPU).

Builds vLLM's own scheduler (the class its engine core asks SchedulerConfig for) with prefix caching on, adds
BATCH requests of CONTEXT prompt tokens (distinct prompts, and for batches above 1 also one document with each
request's own last 64 tokens), drives their prefills with made-up model outputs, then times --steps pure decode
steps: schedule() + update_from_output() in async scheduling's order (a step's outputs are applied after the next
step is scheduled). vLLM 0.26's scheduler walks a running request's every block per step for cascade attention's
common prefix (`get_num_common_prefix_blocks`); the plugin skips that walk on SPARSE engines with cascade attention
off (`compat.install_scheduler_hook`). Under async scheduling this host time overlaps the GPU's step until it is
longer: then it is the step.

    python benchmarks/scheduler_step.py --contexts 4096,131072,1048576 --batches 1,4 --out $OUT/scheduler_step.json
    # another release's Python code, on a machine without a GPU: PYTHONPATH=<its site-packages> ... --cpu-platform

Table last; JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import SHARED_SUFFIX as SUFFIX  # noqa: E402  (the shared-document cases of e2e.py's decode runs)


def model_dir() -> str:
    """A config.json is all ModelConfig reads with skip_tokenizer_init (no weights, no tokenizer)."""
    root = Path(tempfile.mkdtemp(prefix="scheduler-step-"))
    (root / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 512,
        "max_position_embeddings": 1 << 22, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16"}))
    return str(root)


def build(model: str, backend: str | None, max_len: int, blocks: int, chunk: int = 16384, max_seqs: int = 8,
          **model_kw):
    """-> (VllmConfig, vLLM's scheduler as its engine core builds it: the class from SchedulerConfig), prefix
    caching on, one full-attention KV cache group of `blocks` 16-token blocks, `chunk` tokens a step (its
    max_num_batched_tokens), at most `max_seqs` requests; `model_kw` to ModelConfig."""
    import torch
    from vllm.config import AttentionConfig, CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    config = VllmConfig(
        model_config=ModelConfig(model=model, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=max_len,
                                 **model_kw),
        scheduler_config=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=chunk, max_model_len=max_len,
                                         enable_chunked_prefill=True, is_encoder_decoder=False),
        cache_config=CacheConfig(block_size=16, enable_prefix_caching=True),
        attention_config=AttentionConfig(backend=backend))
    config.cache_config.num_gpu_blocks = blocks
    # What a GPU engine resolves the default to (a config without an executor here resolves it off).
    config.scheduler_config.async_scheduling = True
    kv = KVCacheConfig(num_blocks=blocks, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["layer"], FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=1,
                                                      dtype=torch.float32))])
    cls = config.scheduler_config.get_scheduler_cls()
    scheduler = cls(vllm_config=config, kv_cache_config=kv, log_stats=True,
                    structured_output_manager=StructuredOutputManager(config), block_size=16)
    return config, scheduler


def block_hasher(config):
    """vLLM's block hasher for a request's prompt (prefix caching), as its engine core makes it."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    hash_fn = get_hash_fn_by_name(config.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    return get_request_block_hasher(16, hash_fn)


class AsyncSteps:
    """The scheduler's steps in async scheduling's order: a step's made-up outputs (a token for each request whose
    prompt is done) are applied after the next step is scheduled."""

    def __init__(self, scheduler):
        self.scheduler, self.pending = scheduler, None

    def step(self):
        """-> (the step's SchedulerOutput, each scheduled request's computed tokens, this step's counted in),
        read before the last step's outputs may finish a request."""
        from vllm_sparse import compat

        out = self.scheduler.schedule()
        requests = self.scheduler.requests
        computed = {r: requests[r].num_computed_tokens for r in out.num_scheduled_tokens}
        result = compat.model_runner_output(list(computed), [[7] if n >= requests[r].num_prompt_tokens else []
                                                             for r, n in computed.items()])
        self.flush()
        self.pending = (out, result)
        return out, computed

    def flush(self) -> None:
        """Apply the last step's outputs."""
        if self.pending is not None:
            self.scheduler.update_from_output(*self.pending)
            self.pending = None


def decode_step_ms(backend: str | None, context: int, batch: int, shared: bool, steps: int, model: str) -> dict:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    max_len = context + 4096
    config, scheduler = build(model, backend, max_len, blocks=batch * max_len // 16 + 1024)
    hasher = block_hasher(config)
    rng = random.Random(0)
    doc = [rng.randrange(3, 500) for _ in range(context - SUFFIX)]
    params = SamplingParams(max_tokens=1 << 20, ignore_eos=True, temperature=0.0)
    for i in range(batch):
        head = doc if shared or i == 0 else [rng.randrange(3, 500) for _ in range(context - SUFFIX)]
        ids = head + [rng.randrange(3, 500) for _ in range(SUFFIX)]
        scheduler.add_request(Request(request_id=str(i), prompt_token_ids=ids, sampling_params=params,
                                      pooling_params=None, block_hasher=hasher))
    driver = AsyncSteps(scheduler)
    while any(scheduler.requests[str(i)].num_output_tokens < 2 for i in range(batch)):
        driver.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out, _ = driver.step()
        times.append((time.perf_counter() - t0) * 1e3)
        if out.total_num_scheduled_tokens != batch:
            raise SystemExit(f"a step scheduled {out.total_num_scheduled_tokens} tokens, not {batch} decode tokens")
    walk = getattr(scheduler.kv_cache_manager, "get_num_common_prefix_blocks", None)  # (none in vLLM 0.34)
    return {"median_ms": statistics.median(times), "mean_ms": statistics.mean(times),
            "scheduler": type(scheduler).__name__, "hooked": bool(getattr(walk, "_vllm_sparse_hook", False))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="4096,131072,1048576")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--cpu-platform", action="store_true",
                    help="make vLLM's current platform its CPU platform (a release built for CUDA, without a GPU)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.cpu_platform:
        import vllm.platforms
        from vllm.platforms.cpu import CpuPlatform

        vllm.platforms._current_platform = CpuPlatform()
    from vllm import __version__

    from vllm_sparse.plugin import register

    register()  # as vLLM's engine core does before it asks for its scheduler class
    model = model_dir()
    rows = []
    for context in (int(x) for x in args.contexts.split(",")):
        for batch in (int(x) for x in args.batches.split(",")):
            for shared in ([False, True] if batch > 1 else [False]):
                row = {"context": context, "batch": batch, "shared": shared}
                for name, backend in (("stock", None), ("sparse", "sparse")):
                    row[name] = decode_step_ms(backend, context, batch, shared, args.steps, model)
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"vllm": __version__, "argv": sys.argv, "rows": rows}, indent=1))
    print(f"\nvLLM {__version__}: scheduler host ms per decode step (median), prefix caching on")
    print(f"{'context':>9} {'batch':>5} {'prompts':>9} {'stock':>8} {'SPARSE':>8}")
    for r in rows:
        print(f"{r['context']:>9} {r['batch']:>5} {'shared' if r['shared'] else 'distinct':>9} "
              f"{r['stock']['median_ms']:>8.3f} {r['sparse']['median_ms']:>8.3f}")


if __name__ == "__main__":
    main()
