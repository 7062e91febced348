"""The `decode:` settings: schema, inheritance into per-KV-head decode plans, and the errors."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from tests.test_config import GEMMA, LLAMA, entry, plan_of, problems_of
from vllm_sparse.config.errors import SparseConfigError
from vllm_sparse.config.loader import parse_config
from vllm_sparse.config.plan import DecodeHeadPlan, resolve_plan
from vllm_sparse.config.sharding import head_shard


def test_decode_is_dense_unless_asked():
    plan = plan_of(entry(layers=[{"layers": "all"}]))
    assert plan.decode == "dense" and not plan.is_sparse_decode
    assert all(not layer.decode for layer in plan.layers)


def test_model_decode_applies_to_every_full_attention_layer_and_rules_override_it():
    data = entry(decode={"top_k_tokens": 1000, "block_tokens": 128, "sink_blocks": 2},
                 layers=[{"layers": 1, "dense": True, "decode": "dense"},
                         {"layers": 2, "dense": True, "heads": [{"heads": "4-7", "decode": {"top_k_tokens": 256}}]}])
    plan = plan_of(data)
    model_rule = DecodeHeadPlan("quest", 8, 2, 1)  # 1000 tokens -> 8 blocks of 128
    assert plan.decode == "quest" and plan.decode_block_tokens == 128
    assert plan.layer(0).decode == (model_rule,) * 8 and plan.layer(3).decode == (model_rule,) * 8
    assert not plan.layer(1).is_sparse_decode
    assert plan.layer(2).decode == (model_rule,) * 4 + (DecodeHeadPlan("quest", 2, 1, 1),) * 4
    assert not plan.layer(2).is_sparse  # prefill and decode are independent
    # kept blocks 8 + 2 + 1 = 11 of 128 tokens: dense_below defaults to 16384 (more than twice that)
    assert plan.decode_dense_below == 16384
    # per rank: rank 1 of 2 holds KV head 1 (q heads 4-7)
    assert plan.layer(2).decode_for(head_shard(8, 2, 1, 2)) == (DecodeHeadPlan("quest", 2, 1, 1),)


def test_decode_shorthand_and_defaults():
    cfg = parse_config({"version": 1, "defaults": {"decode": "quest"},
                        "models": [{"match": {"names": ["x"]}}]}, "t.yaml")
    assert cfg.defaults.decode.estimator == "quest" and cfg.defaults.decode.top_k_tokens == 4096
    plan = plan_of({"version": 1, "defaults": {"decode": {"top_k_tokens": 8192}},
                    "models": [{"match": {"architectures": ["LlamaForCausalLM"]}}]})
    assert plan.layer(0).decode[0] == DecodeHeadPlan("quest", 128, 1, 1)
    assert plan.decode_dense_below == 2 * 130 * 64  # twice what a step reads, above the 16384 floor


def test_sliding_window_layers_keep_dense_decode():
    plan = plan_of({"version": 1, "models": [{"match": {"architectures": ["Gemma3ForCausalLM"]},
                                              "decode": {"top_k_tokens": 2048}}]}, GEMMA)
    assert [i for i, layer in enumerate(plan.layers) if layer.is_sparse_decode] == [5, 11, 17]


@pytest.mark.parametrize("bad, where, words", [
    ({"decode": "fast"}, "decode", "decode must be one of quest, tidal, dense or a mapping"),
    ({"decode": {"block_tokens": 48}}, "block_tokens", "must be a power of two in 16..1024"),
    ({"decode": {"top_k_tokens": 0}}, "top_k_tokens", "greater than or equal to 1"),
    ({"decode": {"local_blocks": 0}}, "local_blocks", "greater than or equal to 1"),
    ({"decode": {"estimator": "tidewater"}}, "estimator", "'quest', 'tidal' or 'dense'"),
    ({"decode": {"selector": True}}, "models[0].decode", "selector: true is a tidal setting; estimator is 'quest'"),
    ({"decode": {"top_k_tokens": 64, "budget": 3}}, "models[0].decode", "unknown field(s) 'budget'"),
])
def test_bad_decode_settings_name_the_field(bad, where, words):
    with pytest.raises((ValidationError, Exception)) as e:
        parse_config(entry(**bad), "test.yaml")
    assert where in str(e.value) and words in str(e.value)


def test_q_heads_of_one_kv_head_must_agree():
    problems = problems_of(entry(layers=[{"layers": 0, "heads": [{"heads": "0-2", "decode": "quest"}]}]))
    assert problems == [("models[0].layers[0].heads[0].decode",
                         "layer 0: q heads 0-3 share KV head 0 and must have one decode setting (set by "
                         "defaults.decode, models[0].layers[0].heads[0].decode)")]


def test_one_block_size_and_threshold_per_model():
    problems = problems_of(entry(decode={"block_tokens": 64},
                                 layers=[{"layers": 0, "decode": {"block_tokens": 32, "dense_below": 9000}},
                                         {"layers": 1, "decode": {"dense_below": 8000}}]))
    assert problems == [
        ("models[0].decode", "decode block_tokens 64 differs from 32 (models[0].layers[0].decode): a model has one "
         "decode block_tokens"),
        ("models[0].layers[1].decode", "decode dense_below 8000 differs from 9000 (models[0].layers[0].decode): a "
         "model has one decode dense_below")]


TIDAL = {"estimator": "tidal", "top_k_tokens": 512}


def test_tidal_selectors_and_readers():
    """TidalDecode's layout: dense first layers, a selector, readers, a re-selector, readers."""
    plan = plan_of(entry(decode=TIDAL, layers=[{"layers": 0, "decode": "dense"},
                                              {"layers": [1, 3], "decode": {**TIDAL, "selector": True}}]))
    reader, selector = DecodeHeadPlan("tidal", 8, 1, 1), DecodeHeadPlan("tidal", 8, 1, 1, selector=True)
    assert plan.decode == "tidal" and not plan.needs_summaries  # no page summaries: nothing scores them
    assert [layer.decode[:1] for layer in plan.layers] == [(), (selector,), (reader,), (selector,)]
    assert [plan.tidal_selector_of(i) for i in range(4)] == [None, None, 1, None]
    assert "selector" in selector.describe()
    mixed = plan_of(entry(decode=TIDAL, layers=[{"layers": 0, "decode": {**TIDAL, "selector": True}},
                                               {"layers": 2, "decode": "quest"}]))
    assert mixed.decode == "quest+tidal" and mixed.needs_summaries and mixed.layer(2).needs_summaries
    assert mixed.tidal_selector_of(3) == 0 and mixed.tidal_selector_of(2) is None


@pytest.mark.parametrize("layers, where, words", [
    ([], "models[0].decode", "layer 0 reuses a tidal selection, but no layer before it selects: set "
     "`selector: true` on the first tidal layer"),
    ([{"layers": 0, "decode": {**TIDAL, "selector": True}}, {"layers": 2, "decode": {**TIDAL, "top_k_tokens": 1024}}],
     "models[0].layers[1].decode", "layer 2 reads the blocks selector layer 0 chose, so its budget must be that "
     "layer's: top_k 16, sink 1, local 1 blocks vs 8, 1, 1"),
    ([{"layers": 0, "decode": {**TIDAL, "selector": True}},
      {"layers": 1, "heads": [{"heads": "0-3", "decode": "dense"}]}],
     "models[0].layers[1].heads[0].decode", "layer 1: tidal decode is set per layer, and its heads have different "
     "decode settings"),
])
def test_bad_tidal_layouts_name_the_layer(layers, where, words):
    problems = problems_of(entry(decode=TIDAL, layers=layers))
    assert any(p == where and words in w for p, w in problems), problems


def test_a_tidal_selector_on_a_sliding_window_layer_is_an_error():
    """Gemma's layer 9 keeps a 512-token window: as a selector it would be skipped, and layers 11 and
    17 would read layer 5's choice without anyone asking for that."""
    sel = {**TIDAL, "selector": True}
    problems = problems_of({"version": 1, "models": [{"match": {"architectures": ["Gemma3ForCausalLM"]},
                                                      "decode": TIDAL, "layers": [{"layers": 5, "decode": sel},
                                                                                  {"layers": 9, "decode": sel}]}]},
                           GEMMA)
    assert problems == [("models[0].layers[1].decode", "layer 9 is a sliding-window layer: it cannot be a tidal "
                         "selector (its decode stays dense); choose a full-attention layer")]


def test_a_builder_made_before_the_cache_has_pages_leaves_decode_to_the_real_one(monkeypatch):
    """vLLM 0.32's CUDA-graph memory profile builds the attention builders over a minimal cache before it sets
    `num_gpu_blocks`: decode selection then sits out (no page summaries sized for nothing) and joins in the
    builders made for the real cache."""
    from types import SimpleNamespace

    from vllm_sparse.backend import builder as builder_mod
    from vllm_sparse.decode import memory

    plan = resolve_plan(parse_config(entry(decode={"estimator": "quest", "top_k_tokens": 256, "dense_below": 1024},
                                           layers=[{"layers": "all", "estimator": {"name": "sink_local"}}]), "t"),
                        LLAMA, "t")
    monkeypatch.setattr(builder_mod, "check_decode_layers", lambda *a: None)  # (reads a live engine's layers)
    made = []
    monkeypatch.setattr(builder_mod, "allocate_summaries", lambda *a: made.append(a))
    spec = SimpleNamespace(block_size=16, num_kv_heads=2, head_size=64)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(4)]

    def engine(pages):
        return SimpleNamespace(cache_config=SimpleNamespace(num_gpu_blocks=pages),
                               model_config=SimpleNamespace(max_model_len=4096, dtype=torch.float16),
                               scheduler_config=SimpleNamespace(max_num_seqs=8, max_num_batched_tokens=512),
                               compilation_config=SimpleNamespace(max_cudagraph_capture_size=8))

    holder = SimpleNamespace(_plan=plan)
    assert builder_mod.SparseBuilderMixin._prepare_decode(holder, spec, names, engine(None), torch.device("cpu")) \
        is None and not made
    rows = builder_mod.SparseBuilderMixin._prepare_decode(holder, spec, names, engine(64), torch.device("cpu"))
    assert rows is not None and made and made[0][1] == 64  # the real cache's pages
    assert memory.summaries_for(names[0]) is None  # (allocation stubbed: nothing left behind)


def test_quest_summaries_under_pipeline_parallelism_are_refused_at_start():
    from types import SimpleNamespace

    from vllm_sparse.backend.checks import check_summaries
    from vllm_sparse.config.errors import SparseConfigError

    def plan(estimator):
        spec = {"estimator": estimator, "top_k_tokens": 256, "dense_below": 1024}
        if estimator == "tidal":
            return resolve_plan(parse_config(entry(decode=spec, layers=[
                {"layers": 0, "decode": {**spec, "selector": True}}]), "t"), LLAMA, "t")
        return resolve_plan(parse_config(entry(decode=spec), "t"), LLAMA, "t")

    def engine(pp):
        return SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=pp))

    with pytest.raises(SparseConfigError, match=r"quest decode on layers \[0, 1, 2, 3\] keeps page summaries, "
                       r"which are not supported with pipeline_parallel_size=2"):
        check_summaries(plan("quest"), engine(2))
    check_summaries(plan("quest"), engine(1))
    check_summaries(plan("tidal"), engine(2))  # tidal keeps no summaries


def test_quest_summaries_with_a_hybrid_models_page_copies_are_refused_at_start():
    """A hybrid (Mamba) model's prefix hits may end mid-page: vLLM copies the page without the write the summaries
    follow."""
    from types import SimpleNamespace

    from vllm_sparse.backend.checks import check_summaries

    spec = {"estimator": "quest", "top_k_tokens": 256, "dense_below": 1024}
    quest = resolve_plan(parse_config(entry(decode=spec), "t"), LLAMA, "t")
    tidal = resolve_plan(parse_config(entry(decode={**spec, "estimator": "tidal"}, layers=[
        {"layers": 0, "decode": {**spec, "estimator": "tidal", "selector": True}}]), "t"), LLAMA, "t")

    def engine(prefix_caching, mode):
        return SimpleNamespace(cache_config=SimpleNamespace(enable_prefix_caching=prefix_caching,
                                                            mamba_cache_mode=mode))

    with pytest.raises(SparseConfigError, match=r"mamba_cache_mode='align'\) copies partly hit pages"):
        check_summaries(quest, engine(True, "align"))
    check_summaries(quest, engine(False, "align"))
    check_summaries(quest, engine(True, "none"))  # (attention-only models: hits end on pages)
    check_summaries(tidal, engine(True, "align"))  # tidal keeps no summaries


def test_plan_prints_where_decode_selection_runs(tmp_path, capsys):
    import json

    import yaml

    from vllm_sparse.cli.main import main

    model = tmp_path / "llama-3-tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 4, "hidden_size": 256,
        "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 512}))
    cfg = tmp_path / "decode.yaml"
    cfg.write_text(yaml.safe_dump(entry(decode={"estimator": "quest", "top_k_tokens": 256, "dense_below": 8192})))
    assert main(["plan", str(cfg), "--model", str(model)]) == 0
    out = capsys.readouterr().out
    assert "decode: block_tokens=64 dense_below=8192" in out  # (the default decode block)
    assert "an engine whose max_model_len is under 8192 decodes on vLLM's attention and keeps no summaries" in out


def test_decode_selection_over_pages_the_plugin_cannot_read_is_refused_at_start(monkeypatch):
    """A decode-only plan asks the builder for a KV layout it reads, as prefill does: a CPU builder on AMX switches
    its layers to the vec layout; one that cannot (ARM's layout) stops the start, naming decode, instead of
    sparse decode rows read from a layout the plugin does not know."""
    from types import SimpleNamespace

    from vllm_sparse.backend import builder as builder_mod

    plan = resolve_plan(parse_config(entry(decode={"estimator": "quest", "top_k_tokens": 256, "dense_below": 1024},
                                           layers=[{"layers": "all", "dense": True}]), "t"), LLAMA, "t")
    assert not any(layer.is_sparse for layer in plan.layers) and plan.is_sparse_decode  # (decode only)
    monkeypatch.setattr(builder_mod, "plan_for", lambda vllm_config: plan)

    class CPUBuilder:  # a dense builder: the CPU backend's, as far as the mixin asks
        def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
            self.isa = "amx"

    asked = []

    class Builder(builder_mod.SparseBuilderMixin, CPUBuilder):
        metadata_cls = object

        def _prepare_decode(self, *args):
            return SimpleNamespace()  # (decode rows: summaries and checks are tested apart)

        def prepare_sparse_layers(self, layer_names):
            asked.append(self.isa)
            return None if self.isa == "amx" else f"the CPU sparse path does not read the {self.isa!r} KV page layout"

    vllm_config = SimpleNamespace(
        cache_config=SimpleNamespace(cache_dtype="auto"), kv_transfer_config=None,
        parallel_config=SimpleNamespace(decode_context_parallel_size=1, prefill_context_parallel_size=1),
        compilation_config=SimpleNamespace(static_forward_context={}), model_config=SimpleNamespace(max_model_len=4096))
    names = [f"model.layers.{i}.self_attn.attn" for i in range(4)]
    Builder(SimpleNamespace(block_size=16), names, vllm_config, "cpu")
    assert asked == ["amx"]  # asked once, for decode alone (a layout it can switch: no error)
    monkeypatch.setattr(CPUBuilder, "__init__", lambda self, *a: setattr(self, "isa", "neon"))
    with pytest.raises(SparseConfigError, match=r"decode.*'neon' KV page layout: decode selection for layers 0-3"):
        Builder(SimpleNamespace(block_size=16), names, vllm_config, "cpu")


def test_summaries_that_do_not_cover_the_caches_pages_stop_before_the_first_write():
    """Summaries are sized from vLLM's block count and page size; where vLLM splits its blocks into smaller kernel
    pages the cache holds more, smaller pages, and the update would write past the summaries."""
    from types import SimpleNamespace

    from vllm_sparse.backend.impl import SparseImplMixin
    from vllm_sparse.decode.summaries import PageSummaries
    from vllm_sparse.kernels.paged import PagedKV

    def cache(pages, page):  # [pages, kv heads, page, head dim]
        return PagedKV(torch.randn(pages, 2, page, 16), torch.randn(pages, 2, page, 16))

    summaries = PageSummaries(64, 2, 16, 32, torch.float32, torch.device("cpu"))
    layer = SimpleNamespace(layer_name="model.layers.3.self_attn.attn")
    for kv, fits in ((cache(64, 32), True), (cache(40, 32), True), (cache(128, 16), False), (cache(65, 32), False)):
        impl = SimpleNamespace(kv_view=lambda kv_cache: kv_cache, _plan=SimpleNamespace(source="t.yaml"),
                               _summaries_cover_cache=False)
        if fits:
            SparseImplMixin._check_summaries_cover(impl, layer, summaries, kv)
            assert impl._summaries_cover_cache
        else:
            with pytest.raises(SparseConfigError, match=r"layers.3.*summaries cover 64 pages of 32 tokens, the KV "
                                                        rf"cache holds {kv.key.shape[0]} of {kv.page_size}"):
                SparseImplMixin._check_summaries_cover(impl, layer, summaries, kv)
