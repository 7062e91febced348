"""An fp8 KV cache through the sparse prefill path (issue 29, item 3): as vLLM serves it on CUDA, fp8 queries
(quantized with the layer's per-tensor `_q_scale`) and fp8 pages (with `_k_scale` / `_v_scale`). The estimators
and the Triton and torch attention paths read the queries dequantized and fold the pages' scales in; FA3 reads
both in fp8 with vLLM's descales. On CPU the reference and Triton (interpreter) paths; on a GPU FA3 too.
Random paged GQA chunks with context, output poisoned first."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.fixtures.paged import dequantized, random_paged_batch, to_fp8
from vllm_sparse.backend.batch import SparseChunk
from vllm_sparse.backend.sparse_path import attend_sparse_chunks, dequantize_queries
from vllm_sparse.config.plan import HeadPlan
from vllm_sparse.estimators.registry import get_estimator
from vllm_sparse.kernels.paged import PagedKV
from vllm_sparse.kernels.reference import dense_causal_attention_ref
from vllm_sparse.selection.budget import Budget

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float16  # (the interpreter's tl.dot is wrong on bf16)
FP8 = torch.float8_e4m3fn
HQ, HKV, D, PAGE, BS = 8, 2, 64, 16, 32
SEQ, Q_LEN = 300, 120
# `fa3-packed`: FA3 in one call for every page list (the default where a chunk's lists pack; `fa3`: a call per list)
KERNELS = ["reference", "triton"] + (["fa3", "fa3-packed"] if GPU and torch.cuda.get_device_capability()[0] == 9
                                     else [])


def _kernel(monkeypatch, kernel: str) -> str:
    """The attention kernel `kernel` names; for `fa3-packed`, FA3 with the page lists packed into one call (a
    workspace reserved for the copies), which the test then checks took place."""
    from vllm_sparse.backend import attend
    from vllm_sparse.kernels import flash_compact
    from vllm_sparse.kernels.workspace import WORKSPACE

    pack = kernel == "fa3-packed"
    monkeypatch.setattr(flash_compact, "PACK_LISTS", pack)
    if pack:
        monkeypatch.setattr(WORKSPACE, "_buffers", {})
        WORKSPACE.reserve(1 << 20, torch.device(DEVICE, torch.cuda.current_device()))
        original = attend.list_packing

        def counted(*args):
            packing = original(*args)
            assert packing is not None, "the fp8 case's page lists did not pack"
            return packing

        monkeypatch.setattr(attend, "list_packing", counted)
    return kernel.removesuffix("-packed")


def _plan(budget: Budget, bits: int | None = None) -> HeadPlan:
    est = get_estimator("antidiagonal")
    return HeadPlan("antidiagonal", est.params(stride=4, bits=bits), budget)


def _flash_layout(kv: PagedKV) -> PagedKV:
    """The same pages stored as vLLM's FlashAttention cache ([pages, page_size, kv_heads, D]), viewed as pages."""
    key, value = (t.permute(0, 2, 1, 3).contiguous().to(DEVICE).transpose(1, 2) for t in (kv.key, kv.value))
    return PagedKV(key, value, kv.k_scale, kv.v_scale)


def _quantized_case(seed: int):
    """(fp8 queries, their scale [1], fp8 cache with scales, the dequantized queries and cache, the batch)."""
    b = random_paged_batch([SEQ], [Q_LEN], HQ, HKV, D, PAGE, dtype=torch.float32, seed=seed)
    q_scale = float(b.q.abs().max()) / (torch.finfo(FP8).max * 0.5)
    q8 = (b.q / q_scale).to(FP8).to(DEVICE)
    kv8 = _flash_layout(to_fp8(b.kv))
    # 0-dim device scales, as vLLM's layers register them (`_k_scale`, `_v_scale`, `_q_scale`)
    k_s, v_s, q_s = (torch.tensor(x, dtype=torch.float32, device=DEVICE) for x in (kv8.k_scale, kv8.v_scale, q_scale))
    kv8 = PagedKV(kv8.key, kv8.value, kv8.k_scale, kv8.v_scale, k_s, v_s)
    plain = PagedKV(*(t.to(DTYPE) for t in (lambda d: (d.key, d.value))(dequantized(kv8))))
    return q8, (q_s, float(q_s)), kv8, dequantize_queries(q8, float(q_s), DTYPE), plain, b


def _attend(q, kv, b, plan, kernel, q_scale=None):
    out = torch.full((Q_LEN, HQ, D), float("nan"), dtype=DTYPE, device=DEVICE)
    attend_sparse_chunks(q, out, kv, b.block_table.to(DEVICE), (SparseChunk(0, 0, Q_LEN, SEQ - Q_LEN),), [plan] * HQ,
                         BS, D**-0.5, union_tile=1, kernel=kernel, q_scale=q_scale)
    assert not out.isnan().any()
    return out.float().cpu()


def _dense(q, kv, b) -> torch.Tensor:
    """Causal attention of the chunk over its whole context, fp32 math, from the pages in position order."""
    pages = b.block_table[0, :-(-SEQ // PAGE)].to(DEVICE)
    k, v = kv.gather(pages, SEQ)
    return dense_causal_attention_ref(q.cpu(), k.cpu(), v.cpu(), D**-0.5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_block_kept_over_fp8_is_dense_attention_over_the_dequantized_values(monkeypatch, kernel):
    """Density 1.0: the fp8 path's output is dense attention over the dequantized queries and pages."""
    q8, q_scale, kv8, _, _, b = _quantized_case(seed=5)
    kernel = _kernel(monkeypatch, kernel)
    got = _attend(q8, kv8, b, _plan(Budget(keep_ratio=1.0)), kernel, q_scale)
    want = _dense(q8.float() * q_scale[1], dequantized(kv8), b)  # (the exact fp32 values FA3 reads)
    # FA3's fp8 path rounds the softmax probabilities to e4m3 for the PV product (one element of 61,440 was 0.022
    # off on an H200); the Triton and torch paths keep them in 16 / 32 bits.
    tol = 4e-2 if kernel == "fa3" else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("bits", [None, 8], ids=["bf16-scores", "int8-scores"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_sparse_path_over_fp8_equals_it_over_the_dequantized_values(monkeypatch, kernel, bits):
    """A real budget: the fp8 queries and pages select and attend as their dequantized values do (scales folded
    into the kernels' logit and output scales, not multiplied into a copy), and the output is not dense."""
    q8, q_scale, kv8, q, plain, b = _quantized_case(seed=7)
    plan = _plan(Budget(top_k=3, sink_blocks=1, local_blocks=1), bits)
    kernel = _kernel(monkeypatch, kernel)
    got = _attend(q8, kv8, b, plan, kernel, q_scale)
    ref_kernel = "triton" if kernel == "fa3" else kernel  # FA3 reads fp8 queries with fp8 pages only
    want = _attend(q, plain, b, plan, ref_kernel)
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    assert (got - _dense(q.float(), dequantized(kv8), b)).abs().max() > 0.1


def test_dequantized_queries_are_the_fp8_values_times_their_scale():
    q8 = (torch.randn(5, 4, 8) * 40).to(FP8)
    scale = 0.0137  # not a power of two: one rounding, of the fp32 product (not of a 16-bit scale first)
    for dtype in (torch.float16, torch.bfloat16):
        got = dequantize_queries(q8, scale, dtype)
        assert got.dtype == dtype and got.shape == q8.shape
        torch.testing.assert_close(got, (q8.float() * scale).to(dtype), atol=0, rtol=0)


def test_an_fp8_cache_viewed_from_bytes_carries_its_layers_scales():
    """vLLM allocates an fp8 cache as bytes: the sparse path views it as e4m3 with the layer's per-tensor scales
    (floats for the kernels' folded scales, device tensors for FA3's descales)."""
    raw = torch.randint(0, 120, (3, 2, 16, 8), dtype=torch.uint8)  # (0..119: finite e4m3 values)
    layer = SimpleNamespace(_k_scale_float=0.5, _v_scale_float=0.25, _k_scale=torch.tensor([0.5]),
                            _v_scale=torch.tensor([0.25]))
    kv = PagedKV(raw, raw).as_fp8(FP8, layer)
    assert kv.quantized and kv.key.dtype == FP8 and kv.key.data_ptr() == raw.data_ptr()
    assert (kv.k_scale, kv.v_scale) == (0.5, 0.25) and kv.k_descale is layer._k_scale
    k, v = kv.gather(torch.tensor([2, 0]), 20)
    torch.testing.assert_close(k, raw.view(FP8)[[2, 0]].permute(0, 2, 1, 3).reshape(-1, 2, 8)[:20].float() * 0.5)


def test_fp8_caches_are_read_on_cuda_and_refused_elsewhere_at_start():
    from vllm_sparse.backend.checks import kv_cache_problem

    def config(dtype):
        return SimpleNamespace(cache_config=SimpleNamespace(cache_dtype=dtype))

    assert kv_cache_problem(config("fp8"), cuda=True) is None
    assert kv_cache_problem(config("fp8_e4m3"), cuda=True) is None
    assert "not kv_cache_dtype=fp8_e5m2" in kv_cache_problem(config("fp8_e5m2"), cuda=True)
    assert "on CPU" in kv_cache_problem(config("fp8"), cuda=False)
    assert kv_cache_problem(config("auto"), cuda=False) is None


def test_a_kv_cache_groups_dtype_is_its_layers_not_the_global_setting():
    """`--kv-cache-dtype-skip-layers` keeps some layers in 16 bits under a global fp8 setting (vLLM resolves it per
    layer and builds metadata per layer spec, dtype included): the builder's checks and the warm-up read its own
    layers' dtype. Their refusals follow it too."""
    from vllm.model_executor.layers.attention import Attention

    from vllm_sparse.backend.checks import group_cache_dtype, kv_cache_problem

    def layer(dtype):
        a = Attention.__new__(Attention)  # (only the attribute vLLM resolves per layer is read)
        a.__dict__["kv_cache_dtype"] = dtype
        return a

    layers = {"model.layers.0.self_attn.attn": layer("auto"), "model.layers.1.self_attn.attn": layer("fp8"),
              "model.layers.2.self_attn.attn": layer("fp8")}
    config = SimpleNamespace(cache_config=SimpleNamespace(cache_dtype="fp8"),
                             compilation_config=SimpleNamespace(static_forward_context=layers))
    skipped, quantized = ["model.layers.0.self_attn.attn"], ["model.layers.1.self_attn.attn",
                                                               "model.layers.2.self_attn.attn"]
    assert group_cache_dtype(config, skipped) == "auto" and group_cache_dtype(config, quantized) == "fp8"
    assert group_cache_dtype(config, ["not.a.layer"]) == "fp8"  # no layer says: the engine's setting
    assert kv_cache_problem(config, cuda=False, cache_dtype="auto") is None  # (fp8 is refused on CPU)
    assert "on CPU" in kv_cache_problem(config, cuda=False, cache_dtype="fp8")


def test_fa3_over_an_fp8_cache_without_quantized_queries_stops_the_engine_at_start():
    from tests.test_config import entry, plan_of
    from vllm_sparse.backend.checks import check_fp8_query_input
    from vllm_sparse.config.errors import SparseConfigError

    plan = plan_of(entry(layers=[{"layers": "all", "estimator": {"name": "sink_local"},
                                  "budget": {"keep_ratio": 0.5}}]))
    check_fp8_query_input(plan, "fa3", "fp8", quantizes_queries=True)
    check_fp8_query_input(plan, "triton", "fp8", quantizes_queries=False)  # (Triton reads 16-bit queries)
    check_fp8_query_input(plan, "fa3", "auto", quantizes_queries=False)
    with pytest.raises(SparseConfigError, match="kv_cache_dtype.*supports_quant_query_input is false"):
        check_fp8_query_input(plan, "fa3", "fp8_e4m3", quantizes_queries=False)
    # FA2 (GPUs without FA3, or VLLM_SPARSE_KERNEL=fa2) reads no fp8 pages, quantized queries or not.
    check_fp8_query_input(plan, "fa2", "auto", quantizes_queries=False)
    with pytest.raises(SparseConfigError, match="kv_cache_dtype=fp8: FA2 over the compacted tables reads no fp8"):
        check_fp8_query_input(plan, "fa2", "fp8", quantizes_queries=True)


def test_the_warm_up_over_fp8_pages_needs_the_models_query_dtype():
    from tests.test_config import entry, plan_of
    from vllm_sparse.backend.checks import rank_shard
    from vllm_sparse.backend.warmup import run_dummy_sparse_steps

    plan = plan_of(entry(layers=[{"layers": "all", "estimator": {"name": "sink_local"},
                                  "budget": {"keep_ratio": 0.5}}]))
    with pytest.raises(ValueError, match="fp8 kv_dtype needs the model's q_dtype"):
        run_dummy_sparse_steps(plan, rank_shard(plan, 8, 2), 2, 16, 16, FP8, torch.device("cpu"))


def test_fp8_queries_dequantized_are_counted_in_the_step_temporaries():
    """The dequantized chunk queries (the model's dtype) are part of the bound vLLM's memory profile reserves."""
    from vllm_sparse.backend.reserve import step_temporaries_bytes
    from vllm_sparse.config.loader import load_config
    from vllm_sparse.config.plan import ModelShape, resolve_plan

    llama = ModelShape("llama-3.1-8b", ("LlamaForCausalLM",), 32, 32, 8)
    plan = resolve_plan(load_config("configs/llama-3.yaml"), llama, "shipped")
    plain = step_temporaries_bytes(plan, 32, 8, 16384, 1 << 17, 16, 128)
    fp8 = step_temporaries_bytes(plan, 32, 8, 16384, 1 << 17, 16, 128, query_itemsize=2)
    assert fp8 == plain + 32 * 16384 * 128 * 2


def test_eval_and_calibrate_pass_the_kv_cache_dtype_to_their_engines():
    """`vllm-sparse eval --kv-cache-dtype fp8` (gemma's fp8 fidelity against fp8 dense) sets both engines' cache."""
    from vllm_sparse.cli.main import _engine_args, build_parser

    args = build_parser().parse_args(["eval", "--model", "m", "--config", "c.yaml", "--kv-cache-dtype", "fp8"])
    assert _engine_args(args)["kv_cache_dtype"] == "fp8"
    args = build_parser().parse_args(["eval", "--model", "m", "--config", "c.yaml"])
    assert "kv_cache_dtype" not in _engine_args(args)


def test_decode_page_summaries_reserve_their_share_of_an_fp8_cache():
    """Quest's page summaries stay in the model's dtype (2 x head_size values per KV head and 16-token page):
    beside a bf16 cache they are 1/16 of its bytes, beside an fp8 cache 1/8. The reservation vLLM's memory
    profile sees must follow the cache's element size, or the summaries allocated after it overshoot the
    profile (by ~5 GiB for a 1M-token Qwen2.5-7B cache)."""
    from tests.test_config import entry, plan_of
    from vllm_sparse.decode.memory import summaries_share

    plan = plan_of(entry(decode={"estimator": "quest", "top_k_tokens": 4096, "block_tokens": 16}))
    memory = 100 * 2**30
    bf16 = summaries_share(plan, 16, 2, 128, torch.bfloat16, 2, memory, explicit=False)
    fp8 = summaries_share(plan, 16, 2, 128, torch.bfloat16, 1, memory, explicit=False)
    assert bf16 == int(memory * 1 / 17) and fp8 == int(memory * 2 / 18)  # (share of cache + summaries)
    assert summaries_share(plan, 16, 2, 128, torch.bfloat16, 1, memory, explicit=True) == int(memory / 8)
    dense = plan_of(entry())
    assert summaries_share(dense, 16, 2, 128, torch.bfloat16, 1, memory, explicit=False) == 0
