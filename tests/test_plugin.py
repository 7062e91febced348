"""Registration: entry point, idempotence, pickling into fresh processes, and the CPU selection hook."""

from __future__ import annotations

import logging
import pickle
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
import vllm  # noqa: F401  (a broken vLLM install fails here rather than skipping)

from vllm_sparse import compat
from vllm_sparse.plugin import register


def test_entry_point_is_installed():
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.value == "vllm_sparse.plugin:register"]
    assert len(eps) == 1 and eps[0].load() is register


def test_register_is_idempotent_and_selectable():
    register()
    register()
    enum = compat.attention_backend_enum()
    assert list(enum.__members__).count("SPARSE") == 1
    from vllm.config import AttentionConfig

    assert AttentionConfig(backend="sparse").backend is enum["SPARSE"]
    assert enum["SPARSE"].get_class().get_name() == "SPARSE"


def test_member_unpickles_in_a_process_that_never_loaded_plugins():
    register()
    blob = pickle.dumps(compat.attention_backend_enum()["SPARSE"])
    # SPARSE is its own member, or (vLLM releases without AttentionBackendEnum.register) an alias of CUSTOM.
    code = ("import pickle, sys; m = pickle.loads(sys.stdin.buffer.read()); "
            "print(m is type(m)['SPARSE'], m.get_path())")
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().split() == ["True", compat.BACKEND_PATH]


def test_cpu_hook_changes_only_the_sparse_selection():
    register()
    import torch
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.selector import AttentionSelectorConfig

    enum = compat.attention_backend_enum()
    cfg = AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=None)
    assert CpuPlatform.get_attn_backend_cls(enum["SPARSE"], attn_selector_config=cfg) == compat.BACKEND_PATH
    cpu_path = enum.CPU_ATTN.get_path()
    assert CpuPlatform.get_attn_backend_cls(None, attn_selector_config=cfg) == cpu_path
    assert CpuPlatform.get_attn_backend_cls(enum.FLASH_ATTN, attn_selector_config=cfg) == cpu_path
    mla = cfg._replace(use_mla=True)
    try:  # MLA goes to vLLM's own selection (which older releases refuse on CPU)
        assert CpuPlatform.get_attn_backend_cls(enum["SPARSE"], attn_selector_config=mla) != compat.BACKEND_PATH
    except NotImplementedError:
        pass


def test_sparse_backend_subclasses_the_platform_backend():
    """SPARSE is the platform's dense backend (FlashAttention on CUDA, the CPU backend on CPUs) with
    the sparse path in front: vLLM's isinstance checks and block-size answers hold."""
    register()
    if torch.cuda.is_available():
        from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend as Dense
        from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl as DenseImpl
    else:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend as Dense
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl as DenseImpl

    backend = compat.attention_backend_enum()["SPARSE"].get_class()
    assert issubclass(backend, Dense)
    assert issubclass(backend.get_impl_cls(), DenseImpl)

    def sizes(b):  # MultipleOf(16) objects compare by identity in some releases: compare their fields
        return [vars(x) if hasattr(x, "__dict__") else x for x in b.get_supported_kernel_block_sizes()]

    assert sizes(backend) == sizes(Dense)


def test_sparse_backend_classes_are_module_level():
    """vLLM's own backends are module-level classes; so are ours, and the step's metadata is a
    subclass of the dense metadata with a `sparse_batch` field (no attribute riding on the dense one)."""
    import dataclasses
    import importlib

    register()
    from vllm_sparse.backend.batch import SparseBatch
    from vllm_sparse.backend.builder import with_sparse_batch

    backend = compat.attention_backend_enum()["SPARSE"].get_class()
    for cls in (backend, backend.get_impl_cls(), backend.get_builder_cls()):
        assert getattr(importlib.import_module(cls.__module__), cls.__qualname__) is cls
    sparse_md_cls = backend.get_builder_cls().metadata_cls
    dense_md_cls = sparse_md_cls.__mro__[1]  # the platform's metadata dataclass
    assert dataclasses.is_dataclass(dense_md_cls)
    assert "sparse_batch" in {f.name for f in dataclasses.fields(sparse_md_cls)}
    dense_md = dense_md_cls.__new__(dense_md_cls)
    dense_md.__dict__.update(num_actual_tokens=5, max_query_len=5, query_start_loc=torch.tensor([0, 5]))
    batch = SparseBatch((), None, None)
    md = with_sparse_batch(sparse_md_cls, dense_md, batch)
    assert isinstance(md, dense_md_cls) and md.sparse_batch is batch
    assert {k: getattr(md, k) for k in vars(dense_md)} == vars(dense_md)


def test_backend_declares_what_it_supports(monkeypatch):
    """Full CUDA graphs only for decode-only batches when the plan is sparse (the dense backend's own
    support otherwise); a dense backend that writes the KV cache inside forward is refused; GPU head
    sizes the sparse kernels do not take stop the engine at start."""
    from vllm.v1.attention.backend import AttentionCGSupport

    from vllm_sparse.backend import builder, checks
    from vllm_sparse.config.errors import SparseConfigError

    class DenseBuilder:
        @classmethod
        def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
            return AttentionCGSupport.ALWAYS

    class Builder(builder.SparseBuilderMixin, DenseBuilder):
        pass

    sparse_plan = type("Plan", (), {"is_sparse": True, "source": "x.yaml"})()
    monkeypatch.setattr(builder, "plan_for", lambda vllm_config: sparse_plan)
    assert Builder.get_cudagraph_support(None, None) == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    sparse_plan.is_sparse = False
    assert Builder.get_cudagraph_support(None, None) == AttentionCGSupport.ALWAYS
    writes_in_forward = type("Dense", (), {"forward_includes_kv_cache_update": True})
    with pytest.raises(RuntimeError, match="Dense writes the KV cache inside forward"):
        checks.check_kv_written_before_forward(writes_in_forward)
    checks.check_kv_written_before_forward(type("Dense", (), {"forward_includes_kv_cache_update": False}))
    checks.check_head_size(sparse_plan, 128)
    with pytest.raises(SparseConfigError, match="model: attention head size 96: the sparse GPU kernels take"):
        checks.check_head_size(sparse_plan, 96)


def test_layers_the_sparse_path_cannot_take_are_named_at_start(caplog):
    """A layer the plan makes sparse whose attention has a sliding window (say) runs dense, and the
    metadata builder says so when the engine starts, not at the first long prompt."""
    import logging
    from types import SimpleNamespace

    from vllm.model_executor.layers.attention import Attention

    from vllm_sparse.backend.checks import warn_dense_layers
    from vllm_sparse.backend.impl import unsupported_features
    from vllm_sparse.config.errors import SparseConfigError

    def layer(**attention_args):
        a = Attention.__new__(Attention)  # only .impl is read
        object.__setattr__(a, "impl", SimpleNamespace(unsupported=unsupported_features(attention_args)))
        return a

    names = [f"model.layers.{i}.self_attn.attn" for i in range(4)]
    context = dict(zip(names, [layer(sliding_window=512), layer(), layer(alibi_slopes=[1.0]),
                               layer(kv_sharing_target_layer_name="model.layers.1.self_attn.attn")]))
    vllm_config = SimpleNamespace(compilation_config=SimpleNamespace(static_forward_context=context))
    plan = SimpleNamespace(layer=lambda i: SimpleNamespace(is_sparse=i != 2))  # layer 2 is dense anyway
    with caplog.at_level(logging.WARNING, logger="vllm.sparse"):
        assert warn_dense_layers(vllm_config, names, plan) == {1}  # layer 1 alone runs sparse
    # A group whose sparse layers all run dense: none left (its builder then splits no step).
    assert warn_dense_layers(vllm_config, [names[0], names[2], names[3]], plan) == frozenset()
    lines = [r.getMessage() for r in caplog.records if "sparse path does not support" in r.getMessage()][:2]
    assert lines == ["vllm-sparse: layer 0 (model.layers.0.self_attn.attn) has sliding window, which the sparse "
                     "path does not support: it runs dense",
                     "vllm-sparse: layer 3 (model.layers.3.self_attn.attn) has KV shared with another layer, which "
                     "the sparse path does not support: it runs dense"]
    # A config the user named: what it asks must run, so the start stops, naming every such layer.
    named = SimpleNamespace(layer=plan.layer, explicit=True, source="mine.yaml")
    with pytest.raises(SparseConfigError) as e:
        warn_dense_layers(vllm_config, names, named)
    assert [field for field, _ in e.value.problems] == ["layer 0", "layer 3"]
    assert "layer 0 (model.layers.0.self_attn.attn) has sliding window, which the sparse path does not support: " \
        "leave it out of the sparse layers" in e.value.problems[0][1]


def test_kv_caches_the_sparse_paths_cannot_read_are_refused_at_start():
    """A quantized KV cache the sparse path cannot read (fp8 e5m2; fp8 e4m3 on CPU); KV connectors and
    offloading, which move pages outside the attention's writes; context parallelism, which shards a request's
    KV by token across ranks. The sparse path and decode's page summaries read and follow one rank's own cache,
    so with a sparse plan (prefill or decode alike) these stop the engine at start, each named."""
    from types import SimpleNamespace

    from vllm_sparse.backend.checks import kv_problems

    def config(kv_transfer=None, dtype="auto", **parallel):
        sizes = {"decode_context_parallel_size": 1, "prefill_context_parallel_size": 1, **parallel}
        return SimpleNamespace(kv_transfer_config=kv_transfer, parallel_config=SimpleNamespace(**sizes),
                               cache_config=SimpleNamespace(cache_dtype=dtype))

    assert kv_problems(config()) == [] and kv_problems(config(dtype="bfloat16")) == []
    (setting, why), = kv_problems(config(dtype="fp8_e5m2"))  # (fp8 e4m3 is read on CUDA: tests/test_fp8_path.py)
    assert setting == "kv_cache_dtype" and "kv_cache_dtype=fp8_e5m2" in why and "--kv-cache-dtype auto" in why
    problems = kv_problems(config(kv_transfer=object()))
    assert [p for p, _ in problems] == ["kv_transfer_config"] and "--kv-offloading-size" in problems[0][1]
    problems = kv_problems(config(decode_context_parallel_size=2))
    assert [p for p, _ in problems] == ["decode_context_parallel_size"] and "=2 shards" in problems[0][1]
    both = kv_problems(config(kv_transfer=object(), prefill_context_parallel_size=4))
    assert [p for p, _ in both] == ["kv_transfer_config", "prefill_context_parallel_size"]


def test_sparse_declares_what_it_cannot_serve_on_its_classes():
    """Where vLLM asks the classes: no device/host query-length mismatch (chunks are planned from host
    lengths), no metadata reuse across KV cache groups (each group's builder builds its own step), no
    fused KV write past `do_kv_cache_update`; the dense backend's answers elsewhere."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from vllm_sparse.backend.cpu import SparseCPUAttentionBackend, SparseCPUAttentionMetadataBuilder

    assert SparseCPUAttentionBackend.supports_device_cpu_query_lens_mismatch() is False
    assert SparseCPUAttentionMetadataBuilder.supports_update_block_table is False
    assert SparseCPUAttentionBackend.supports_kv_cache_update_bypass is False
    assert SparseCPUAttentionBackend.supports_sliding_window() == CPUAttentionBackend.supports_sliding_window()
    from vllm_sparse.backend.cuda import SparseFlashAttentionBackend, SparseFlashAttentionMetadataBuilder

    assert SparseFlashAttentionBackend.supports_device_cpu_query_lens_mismatch() is False
    assert SparseFlashAttentionMetadataBuilder.supports_update_block_table is False


def test_the_kv_page_size_vllm_picks_holds_the_plans_blocks(tiny_llama, tmp_path, caplog):
    """vLLM asks the backend for its KV page size when --block-size is not given (0.34 defaults to 64-token pages on
    CUDA, 0.26 and 0.32 to 16): a plan whose selection blocks are not whole pages of that size would stop the engine
    at start. SPARSE answers the largest size that divides the dense backend's answer and every selection block
    (prefill's and decode's), on a real engine config as vLLM sets it around the call; the dense backend's answer
    where the plan's blocks are whole pages of it, where the plan is dense, and where the dense backend cannot page
    the smaller size. With Quest decode also at most Quest's 16-token pages: its page bounds loosen with the page."""
    import logging
    import math

    import yaml
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    from vllm_sparse.backend.cpu import SparseCPUAttentionBackend
    from vllm_sparse.backend.cuda import SparseFlashAttentionBackend

    def config(name: str, **entry):
        # (floors at zero: sparse prefill reachable at this max_model_len on a GPU too, where the auto floors are not)
        plan = {"version": 1, "models": [{"match": {"names": ["*"]}, "dense_below": 256, "min_query_tokens": 16,
                                          "min_chunk_work": 0, **entry}]}
        (tmp_path / name).write_text(yaml.safe_dump(plan))
        return VllmConfig(model_config=ModelConfig(model=str(tiny_llama), dtype="float32", skip_tokenizer_init=True,
                                                   max_model_len=4096),
                          additional_config={"sparse": {"config": str(tmp_path / name)}})

    prefill = {"layers": [{"layers": "all", "estimator": {"name": "antidiagonal", "stride": 8},
                           "budget": {"top_p": 0.9}}]}
    quest = {"estimator": "quest", "top_k_tokens": 256, "dense_below": 512}
    tidal = {"estimator": "tidal", "top_k_tokens": 256, "block_tokens": 64, "dense_below": 512}
    cases = {  # name: (plan entry, its selection blocks, Quest?, {vLLM's default: FlashAttention's answer})
        # the shipped Llama plan's block sizes (128-token prefill, 16-token decode; it decodes with TidalDecode)
        "llama": ({"block_size": 128, "decode": {**quest, "block_tokens": 16}, **prefill}, (128, 16), True,
                  {16: 16, 64: 16, 128: 16}),
        "b64": ({"block_size": 64, "decode": {**quest, "block_tokens": 32}, **prefill}, (64, 32), True,
                {16: 16, 64: 16, 128: 16}),
        # TidalDecode scores blocks from attention, not page bounds: 64-token pages where its blocks are whole ones
        "tidal": ({"block_size": 128, "decode": tidal,
                   "layers": [{**prefill["layers"][0], "layers": [0], "decode": {**tidal, "selector": True}},
                              {**prefill["layers"][0], "layers": [1]}]}, (128, 64), False, {16: 16, 64: 64, 128: 64}),
        "prefill_only": ({"block_size": 64, "decode": "dense", **prefill}, (64,), False, {16: 16, 64: 64, 128: 64}),
        "dense": ({"block_size": 32, "decode": "dense", "layers": [{"layers": "all", "dense": True}]}, (), False,
                  {16: 16, 64: 64, 128: 128}),
    }

    def cpu_answer(default: int, blocks: tuple, quest: bool) -> int:
        # The CPU backend pages in sizes that differ by release (16 in 0.26, multiples of 32 in 0.32): the largest
        # size dividing its answer and the blocks (at most 16 with Quest, else without that), where it pages it.
        dense = CPUAttentionBackend.get_preferred_block_size(default)
        fits = math.gcd(dense, *blocks)
        return next((s for s in (math.gcd(fits, 16),) * quest + (fits,) if CPUAttentionBackend.supports_block_size(s)),
                    dense)

    for name, (entry, blocks, with_quest, expected) in cases.items():
        vllm_config = config(f"{name}.yaml", **entry)
        with set_current_vllm_config(vllm_config):
            for default, fa in expected.items():
                got = (SparseFlashAttentionBackend.get_preferred_block_size(default),
                       SparseCPUAttentionBackend.get_preferred_block_size(default))
                assert got == (fa, cpu_answer(default, blocks, with_quest)), (name, default)
                # never a size the dense backend cannot page, and never larger than its own answer
                assert FlashAttentionBackend.supports_block_size(fa) and CPUAttentionBackend.supports_block_size(got[1])
                assert fa <= FlashAttentionBackend.get_preferred_block_size(default)
                assert got[1] <= CPUAttentionBackend.get_preferred_block_size(default)
    # What reservations made while vLLM builds the model count (it asks only after): the plan's answer for vLLM's
    # default then, or a --block-size the user gave.
    from vllm_sparse.backend.plan_cache import plan_for

    quest_plan = plan_for(config("q.yaml", **cases["b64"][0]))
    tidal_plan = plan_for(config("t.yaml", **cases["tidal"][0]))
    assert quest_plan.page_size_at_start(64, False) == 16 and quest_plan.page_size_at_start(64, True) == 64
    assert tidal_plan.page_size_at_start(64, False) == 64 and tidal_plan.page_size_at_start(128, False) == 64
    llama = config("l.yaml", **cases["llama"][0])
    with caplog.at_level(logging.INFO, logger="vllm.sparse"), set_current_vllm_config(llama):
        assert SparseFlashAttentionBackend.get_preferred_block_size(64) == 16
    assert "KV cache block size 16, not vLLM's 64" in caplog.text and "selects in 16-token blocks" in caplog.text


def test_vllms_own_page_size_question_takes_the_plans_answer(tiny_llama, tmp_path, monkeypatch):
    """Through vLLM's own call (`Platform.update_block_size_for_backend`, which the executor runs once the model is
    built), with its default page set to 64 as vLLM 0.34's on CUDA and the model's layers on SPARSE's CUDA class: the
    Quest plan gets 16-token pages; a --block-size the user gave stays; the default stays for a dense plan."""
    import yaml
    from vllm.config import CacheConfig, ModelConfig, VllmConfig
    from vllm.platforms.interface import Platform

    from vllm_sparse.backend.cuda import SparseFlashAttentionBackend

    # The layers' backend classes, as vLLM finds them on a built model (0.26 asks for one, later releases a list).
    many = hasattr(Platform, "_find_non_ssm_backends")
    monkeypatch.setattr(Platform, "_find_non_ssm_backends" if many else "_find_non_ssm_backend",
                        classmethod(lambda cls, config: [SparseFlashAttentionBackend] if many
                                    else SparseFlashAttentionBackend))
    monkeypatch.setattr(CacheConfig, "DEFAULT_BLOCK_SIZE", 64)

    def engine(name: str, decode, **cache):
        plan = {"version": 1, "models": [{"match": {"names": ["*"]}, "block_size": 128, "dense_below": 256,
                                          "min_query_tokens": 16, "min_chunk_work": 0, "decode": decode,
                                          "layers": [{"layers": "all", "dense": True}]}]}
        (tmp_path / name).write_text(yaml.safe_dump(plan))
        config = VllmConfig(model_config=ModelConfig(model=str(tiny_llama), dtype="float32", skip_tokenizer_init=True,
                                                     max_model_len=4096), cache_config=CacheConfig(**cache),
                            additional_config={"sparse": {"config": str(tmp_path / name)}})
        config.cache_config.block_size = cache.get("block_size", 64)  # (a CPU platform resolves its own first)
        Platform.update_block_size_for_backend(config)
        return config.cache_config.block_size

    quest = {"estimator": "quest", "top_k_tokens": 256, "block_tokens": 64, "dense_below": 512}
    assert engine("quest.yaml", quest) == 16
    assert engine("given.yaml", quest, block_size=64) == 64  # (the builder then checks it against the plan)
    assert engine("dense.yaml", "dense") == 64


def _scheduler(model: str, backend: str | None, **model_kw):
    """(VllmConfig, vLLM's scheduler as its engine core builds it), prefix caching on
    (benchmarks/scheduler_step.py's builder)."""
    from tests.benchmark_modules import load_benchmark

    return load_benchmark("scheduler_step").build(model, backend, 4096, 1024, **model_kw)


def _hooked(scheduler) -> bool:
    return getattr(getattr(scheduler.kv_cache_manager, "get_num_common_prefix_blocks", None), "_vllm_sparse_hook",
                   False)


def test_sparse_engines_skip_the_schedulers_common_prefix_walk(tiny_llama):
    """vLLM 0.26 walks the first running request's every block per step for cascade attention's common prefix
    (~3.5 ms a step at 1M tokens); with cascade attention off nothing reads it, so SPARSE engines answer 0."""
    from types import SimpleNamespace

    from vllm_sparse import compat

    register()
    register()  # (once per process, however often vLLM loads the plugin)
    _, sparse = _scheduler(str(tiny_llama), "sparse")
    if not hasattr(type(sparse.kv_cache_manager), "get_num_common_prefix_blocks"):  # vLLM 0.34: no walk to skip
        assert not hasattr(sparse.kv_cache_manager, "get_num_common_prefix_blocks")
        return
    get = sparse.kv_cache_manager.get_num_common_prefix_blocks
    assert _hooked(sparse) and get("any-request") == [0]
    _, stock = _scheduler(str(tiny_llama), None)  # another backend: vLLM's own method
    assert not _hooked(stock)
    # Cascade attention asked for: vLLM's own count stays, unless vLLM turned cascade off for this engine itself
    # (its CPU platform does in 0.26-0.31), when nothing reads the count.
    config, asked = _scheduler(str(tiny_llama), "sparse", disable_cascade_attn=False)
    assert _hooked(asked) == config.model_config.disable_cascade_attn
    sparse_enum, other_enum = config.attention_config.backend, SimpleNamespace(name="FLASH_ATTN")
    for cascade_off in (True, False):  # the rule itself, on every release
        cfg = SimpleNamespace(model_config=SimpleNamespace(disable_cascade_attn=cascade_off),
                              attention_config=config.attention_config)
        assert compat.skips_common_prefix_walk(cfg) is cascade_off
        # (0.32's per-kind override naming SPARSE counts as well; another backend everywhere does not)
        per_kind = SimpleNamespace(backend=None, backend_per_kind={"full_attention": sparse_enum})
        assert compat.skips_common_prefix_walk(SimpleNamespace(model_config=cfg.model_config,
                                                               attention_config=per_kind)) is cascade_off
        neither = SimpleNamespace(backend=other_enum, backend_per_kind={"full_attention": other_enum})
        assert not compat.skips_common_prefix_walk(SimpleNamespace(model_config=cfg.model_config,
                                                                   attention_config=neither))


def test_a_plan_given_to_an_engine_that_does_not_attend_on_sparse_is_said_at_start(tiny_llama, monkeypatch, caplog):
    """A plan named by VLLM_SPARSE_CONFIG or --additional-config, with vLLM's own attention backend (the flag
    --attention-backend sparse forgotten), would do nothing: the engine says so as it starts, once."""
    import logging

    from vllm_sparse.config.discovery import ENV_VAR

    register()
    monkeypatch.setenv(ENV_VAR, "configs/llama-3.yaml")
    with caplog.at_level(logging.WARNING, logger="vllm.sparse"):
        _scheduler(str(tiny_llama), None)
        _scheduler(str(tiny_llama), "sparse")  # (on SPARSE: nothing to say)
    said = [r.getMessage() for r in caplog.records if "not SPARSE" in r.getMessage()]
    assert len(said) == 1 and "a sparse plan is given (VLLM_SPARSE_CONFIG)" in said[0] \
        and "--attention-backend sparse" in said[0], said
    caplog.clear()
    monkeypatch.delenv(ENV_VAR)
    with caplog.at_level(logging.WARNING, logger="vllm.sparse"):
        _scheduler(str(tiny_llama), None)  # no plan given: a stock engine hears nothing from the plugin
    assert not [r for r in caplog.records if "not SPARSE" in r.getMessage()]
    from types import SimpleNamespace

    from vllm_sparse.config.discovery import warn_unused_config

    with caplog.at_level(logging.WARNING, logger="vllm.sparse"):
        warn_unused_config(SimpleNamespace(attention_config=SimpleNamespace(backend=None),
                                           additional_config={"sparse": {"config": "plan.yaml"}}))
    assert [r.getMessage() for r in caplog.records if "not SPARSE" in r.getMessage()][0].startswith(
        "vllm-sparse: a sparse plan is given (--additional-config's sparse.config), but this engine attends on "
        "vLLM's default backend")
    caplog.clear()
    from vllm_sparse import compat

    with caplog.at_level(logging.WARNING, logger="vllm.sparse"):
        # SPARSE for one KV cache kind (vLLM 0.32's backend_per_kind) is an engine on SPARSE
        warn_unused_config(SimpleNamespace(
            attention_config=SimpleNamespace(backend=None, backend_per_kind={"full": compat.sparse_backend_member()}),
            additional_config={"sparse": {"config": "plan.yaml"}}))
        # another plugin's additional_config object (vLLM types it dict | SupportsHash): nothing to read, no error
        warn_unused_config(SimpleNamespace(attention_config=SimpleNamespace(backend=None), additional_config=(1, 2)))
    assert not [r for r in caplog.records if "not SPARSE" in r.getMessage()]

    def broken(vllm_config):
        raise RuntimeError("a check that fails")

    compat.on_engine_start(broken)  # advice only: a failing check does not stop an engine
    try:
        _scheduler(str(tiny_llama), None)
    finally:
        compat._engine_start_callbacks.remove(broken)

def test_gpu_memory_utilization_is_read_as_each_release_holds_it():
    """vLLM 0.34 leaves `gpu_memory_utilization` None unless set (its default resolved by the sizing mode):
    the decode summaries' reservation multiplied None by the GPU's memory at start. Earlier releases hold the
    default in the field; this vLLM's own config gives a number either way."""
    from types import SimpleNamespace

    from vllm.config import CacheConfig

    from vllm_sparse import compat

    assert compat.gpu_memory_utilization(SimpleNamespace(gpu_memory_utilization=0.9)) == 0.9  # 0.26-0.33
    unset = SimpleNamespace(gpu_memory_utilization=None, resolved_gpu_memory_utilization=0.92)  # 0.34, unset
    assert compat.gpu_memory_utilization(unset) == 0.92
    asked = SimpleNamespace(gpu_memory_utilization=0.5, resolved_gpu_memory_utilization=0.5)
    assert compat.gpu_memory_utilization(asked) == 0.5
    assert 0 < compat.gpu_memory_utilization(CacheConfig()) <= 1


def test_a_bad_plan_stops_the_engine_as_its_config_is_made(tiny_llama, tmp_path):
    """vLLM makes an engine's config from its arguments (`EngineArgs.create_engine_config`) before it starts any
    engine process: the plan is checked there, so `vllm serve` exits from its API server and `LLM(...)` raises the
    plugin's own error. Its warnings are the engine's to say, once: none is said there, and nothing is cached for
    the engine's own resolution of the plan (which in-process engines do on the same config object)."""
    import yaml
    from vllm.engine.arg_utils import EngineArgs

    from vllm_sparse.backend import plan_cache
    from vllm_sparse.config.errors import SparseConfigError

    register()
    register()  # (the method is wrapped once)
    assert not getattr(EngineArgs.create_engine_config.__wrapped__, "_vllm_sparse_hook", False)

    def plan_file(name: str, **entry) -> dict:
        (tmp_path / name).write_text(yaml.safe_dump({"version": 1, "models": [{
            "match": {"architectures": ["LlamaForCausalLM"]}, **entry}]}))
        return {"sparse": {"config": str(tmp_path / name)}}

    def engine_config(backend: str | None, additional_config: dict):
        return EngineArgs(model=str(tiny_llama), dtype="float32", max_model_len=4096, skip_tokenizer_init=True,
                          attention_backend=backend, additional_config=additional_config).create_engine_config()

    bad = plan_file("bad.yaml", layers=[{"layers": [0, 5], "estimator": {"name": "sink_local"}}])
    with pytest.raises(SparseConfigError, match=r"layers\[0\].layers: layer 5 is beyond the model, which has 2 layers"):
        engine_config("sparse", bad)
    engine_config(None, bad)  # another backend's engine: the plan is not read (the engine says so as it starts)
    # A plan the engine can only partly honour (decode selection from 100K tokens, max_model_len 4096): a warning.
    short = plan_file("short.yaml", layers=[], decode={
        "estimator": "quest", "top_k_tokens": 64, "block_tokens": 32, "dense_below": 100_000})
    said = _Said()  # (on the plugin's logger itself: vLLM's config sets its "vllm" logger not to propagate)
    logging.getLogger("vllm.sparse").addHandler(said)
    try:
        config = engine_config("sparse", short)
        assert said.messages == []
        assert id(config) not in plan_cache._cache
        plan = plan_cache.plan_for(config)  # the engine's own resolution, as its layers are built: said there
    finally:
        logging.getLogger("vllm.sparse").removeHandler(said)
    assert not plan.is_sparse_decode
    assert len([m for m in said.messages if "decode selection (quest, from 100000 tokens" in m]) == 1, said.messages


def test_a_kv_connector_or_dtype_stops_a_sparse_engine_as_its_config_is_made(tiny_llama, tmp_path):
    """A KV connector loads and stores pages the sparse path does not follow: where every layer attends on SPARSE,
    the engine's config refuses it, naming the setting, before any engine process starts; an engine on another
    backend, or one whose plan keeps every layer dense, starts. So is a KV cache dtype the sparse paths cannot
    read, where no layer is kept apart from it."""
    import yaml
    from vllm.engine.arg_utils import EngineArgs

    from vllm_sparse.config.errors import SparseConfigError

    register()
    connector = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                 "kv_connector_extra_config": {"shared_storage_path": str(tmp_path / "kv")}}

    def engine_config(backend: str | None, name: str, kv=connector, dtype="auto", skip=(), **entry):
        (tmp_path / name).write_text(yaml.safe_dump({"version": 1, "models": [{
            "match": {"architectures": ["LlamaForCausalLM"]}, **entry}]}))
        more = {"kv_cache_dtype_skip_layers": list(skip)} if skip else {}
        return EngineArgs(model=str(tiny_llama), dtype="float32", max_model_len=4096, skip_tokenizer_init=True,
                          attention_backend=backend, kv_transfer_config=kv, kv_cache_dtype=dtype,
                          additional_config={"sparse": {"config": str(tmp_path / name)}}, **more
                          ).create_engine_config()

    decode = {"estimator": "quest", "top_k_tokens": 64, "block_tokens": 32, "dense_below": 1024}
    with pytest.raises(SparseConfigError, match=r"kv_transfer_config: a KV connector or KV offloading"):
        engine_config("sparse", "decode.yaml", layers=[], decode=decode)
    assert engine_config(None, "decode.yaml", layers=[], decode=decode).kv_transfer_config is not None
    assert engine_config("sparse", "dense.yaml", layers=[]).kv_transfer_config is not None
    # A KV cache dtype no sparse path reads (e5m2: neither the CPU's nor FA3's), refused as the config is made where
    # every layer has it; with a layer kept in 16 bits, the layers' builders decide (they know each group's dtype).
    with pytest.raises(SparseConfigError, match=r"kv_cache_dtype: .*kv_cache_dtype=fp8_e5m2: use --kv-cache-dtype"):
        engine_config("sparse", "decode.yaml", kv=None, dtype="fp8_e5m2", layers=[], decode=decode)
    if "kv_cache_dtype_skip_layers" in EngineArgs.__dataclass_fields__:  # (vLLM releases that have the setting)
        assert engine_config("sparse", "decode.yaml", kv=None, dtype="fp8_e5m2", skip=["1"], layers=[],
                             decode=decode).cache_config.kv_cache_dtype_skip_layers == ["1"]


def test_the_config_says_every_layer_attends_on_sparse_only_where_it_can_know():
    """The front end refuses engine-wide KV settings only where every layer the plan numbers attends on SPARSE;
    hybrid, attention-free and MLA models, SPARSE for one KV cache kind only, or a model config that cannot say,
    leave it to the layers' builders."""
    from types import SimpleNamespace

    from vllm_sparse.compat import every_attention_layer_on_sparse

    register()
    sparse = compat.attention_backend_enum()["SPARSE"]

    def config(backend=sparse, **model):
        flags = {"is_hybrid": False, "is_attention_free": False, "use_mla": False, **model}
        return SimpleNamespace(attention_config=SimpleNamespace(backend=backend, backend_per_kind={}),
                               model_config=SimpleNamespace(**flags))

    assert every_attention_layer_on_sparse(config())
    assert not every_attention_layer_on_sparse(config(backend=None))
    assert not every_attention_layer_on_sparse(config(is_hybrid=True))
    assert not every_attention_layer_on_sparse(config(is_attention_free=True))
    assert not every_attention_layer_on_sparse(config(use_mla=True))
    assert not every_attention_layer_on_sparse(SimpleNamespace(
        attention_config=SimpleNamespace(backend=sparse), model_config=SimpleNamespace(is_hybrid=False)))


class _Said(logging.Handler):
    def __init__(self):
        super().__init__(level=0)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())
