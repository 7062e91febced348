"""Config layer: schema, resolution into a plan, discovery order, and the errors a user sees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vllm_sparse.config.build import build_plan
from vllm_sparse.config.discovery import ENV_VAR, find_config, shipped_configs
from vllm_sparse.config.errors import SparseConfigError
from vllm_sparse.config.loader import load_config, parse_config
from vllm_sparse.config.plan import ModelShape, resolve_plan
from vllm_sparse.config.schema import json_schema

REPO = Path(__file__).resolve().parents[1]

LLAMA = ModelShape("org/llama-3-tiny", ("LlamaForCausalLM",), num_layers=4, num_q_heads=8, num_kv_heads=2)
GEMMA = ModelShape(
    "google/gemma-3-270m", ("Gemma3ForCausalLM",), num_layers=18, num_q_heads=4, num_kv_heads=1,
    layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)),
)


def entry(**kw):
    base = {"match": {"architectures": ["LlamaForCausalLM"]}}
    base.update(kw)
    return {"version": 1, "models": [base]}


def plan_of(data, shape=LLAMA):
    return resolve_plan(parse_config(data, "test.yaml"), shape, "test.yaml")


def problems_of(data, shape=LLAMA) -> list[tuple[str, str]]:
    with pytest.raises(SparseConfigError) as e:
        plan_of(data, shape)
    assert "test.yaml" in str(e.value)
    return e.value.problems


# --- resolution -----------------------------------------------------------------------------


def test_rules_inherit_from_layer_entry_and_defaults():
    data = entry(
        block_size=64, dense_below=1000,
        estimator={"name": "sink_local", "sink_blocks": 2, "local_blocks": 3},
        budget={"top_k": 6},
        layers=[
            {"layers": [0, "2-3"], "heads": [{"heads": "0-1", "dense": True},
                                           {"heads": 7, "budget": {"keep_ratio": 0.5, "local_blocks": 2}}]},
        ],
    )
    plan = plan_of(data)
    assert (plan.block_size, plan.dense_below, plan.decode) == (64, 1000, "dense")
    assert not plan.layer(1).is_sparse  # no rule selects layer 1: dense
    layer0 = plan.layer(0)
    assert layer0.heads[0] is None and layer0.heads[1] is None
    h2 = layer0.heads[2]
    assert h2.estimator == "sink_local" and h2.params.sink_blocks == 2 and h2.params.local_blocks == 3
    assert h2.budget.top_k == 6
    assert layer0.heads[7].budget.keep_ratio == 0.5 and layer0.heads[7].budget.local_blocks == 2
    assert layer0.heads[7].budget.top_k is None  # a budget replaces the inherited one whole
    assert plan.layer(3) == plan.layer(0).__class__(3, True, layer0.heads)


def test_file_defaults_and_builtin_defaults():
    data = {"version": 1, "defaults": {"dense_below": 123},
            "models": [{"match": {"architectures": ["LlamaForCausalLM"]}, "layers": [{"layers": "all"}]}]}
    plan = plan_of(data)
    assert plan.dense_below == 123 and plan.block_size == 128
    head = plan.layer(2).heads[5]
    assert head.estimator == "sink_local" and head.budget.keep_ratio == 0.25


def test_dense_estimator_means_dense_head():
    plan = plan_of(entry(layers=[{"layers": "all", "estimator": {"name": "dense"}}]))
    assert not plan.is_sparse


def test_full_attention_on_hybrid_model_keeps_sliding_layers_dense():
    data = {"version": 1, "models": [{"match": {"architectures": ["Gemma3ForCausalLM"]},
                                      "layers": [{"layers": "full_attention", "budget": {"top_k": 4}}]}]}
    plan = plan_of(data, GEMMA)
    assert [layer.index for layer in plan.layers if layer.is_sparse] == [5, 11, 17]


def test_explicit_sliding_layer_stays_dense_with_a_note():
    data = {"version": 1, "models": [{"match": {"architectures": ["Gemma3ForCausalLM"]},
                                      "layers": [{"layers": [0, 5]}]}]}
    plan = plan_of(data, GEMMA)
    assert [layer.index for layer in plan.layers if layer.is_sparse] == [5]
    assert any("layer 0" in n and "sliding" in n for n in plan.notes)
    # named beside `full_attention`, a sliding layer gets its note too; the keyword's own layers none
    data["models"][0]["layers"] = [{"layers": ["full_attention", 3]}]
    plan = plan_of(data, GEMMA)
    assert [layer.index for layer in plan.layers if layer.is_sparse] == [5, 11, 17]
    assert [n for n in plan.notes if "sliding" in n] == [n for n in plan.notes if "layer 3 " in n] and plan.notes


def test_llama4s_chunked_local_layers_stay_dense_and_the_note_says_what_they_are():
    """Llama 4's config names its local layers `chunked_attention` (vLLM builds them as ChunkedLocalAttention):
    like sliding-window layers they stay dense, and the note calls them what they are."""
    llama4 = ModelShape("org/llama-4-tiny", ("Llama4ForCausalLM",), num_layers=4, num_q_heads=8, num_kv_heads=2,
                        layer_types=("chunked_attention",) * 3 + ("full_attention",))
    data = {"version": 1, "models": [{"match": {"architectures": ["Llama4ForCausalLM"]},
                                      "layers": [{"layers": [1, 3]}]}]}
    plan = plan_of(data, llama4)
    assert [layer.index for layer in plan.layers if layer.is_sparse] == [3]
    assert plan.notes == ("layer 1 is a chunked local attention layer (models[0].layers[0]): it stays dense",)


def test_full_attention_on_non_hybrid_model_is_every_layer():
    plan = plan_of(entry(layers=[{"layers": "full_attention"}]))
    assert all(layer.is_sparse for layer in plan.layers)


def test_open_range_runs_to_the_last_layer():
    plan = plan_of(entry(layers=[{"layers": "0", "dense": True}, {"layers": "1-"}]))
    assert [layer.is_sparse for layer in plan.layers] == [False, True, True, True]


def test_name_glob_match_and_no_match_runs_dense():
    data = {"version": 1, "models": [{"match": {"names": ["*llama-3*"]}, "layers": [{"layers": "all"}]}]}
    assert plan_of(data).is_sparse
    other = ModelShape("org/mistral", ("MistralForCausalLM",), 2, 4, 4)
    plan = plan_of(data, other)
    assert not plan.is_sparse and "no model entry" in plan.notes[0]


# --- errors ---------------------------------------------------------------------------------


def test_unknown_estimator_names_the_allowed_ones():
    (path, msg), = problems_of(entry(layers=[{"layers": 0, "estimator": {"name": "magic"}}]))
    assert path == "models[0].layers[0].estimator"
    assert "magic" in msg and "sink_local" in msg and "dense" in msg


def test_unknown_parameter_names_the_allowed_ones():
    (path, msg), = problems_of(entry(layers=[{"layers": 0, "estimator": {"name": "sink_local", "window": 3}}]))
    assert path == "models[0].layers[0].estimator"
    assert "'window'" in msg and "local_blocks" in msg and "sink_blocks" in msg


def test_bad_parameter_value():
    (path, msg), = problems_of(entry(layers=[{"layers": 0, "estimator": {"name": "sink_local", "local_blocks": 0}}]))
    assert path == "models[0].layers[0].estimator.local_blocks" and "greater than or equal to 1" in msg


def test_bad_range():
    (path, msg), = problems_of(entry(layers=[{"layers": "5-2"}]))
    assert path == "models[0].layers[0].layers" and "5-2" in msg


def test_layer_beyond_model():
    (path, msg), = problems_of(entry(layers=[{"layers": [1, 9]}]))
    assert path == "models[0].layers[0].layers"
    assert "layer 9 is beyond the model" in msg and "4 layers (0-3)" in msg


def test_head_beyond_model():
    (path, msg), = problems_of(entry(layers=[{"layers": 0, "heads": [{"heads": "6-8"}]}]))
    assert path == "models[0].layers[0].heads[0].heads" and "head 8" in msg and "8 heads" in msg


def test_conflicting_layer_rules():
    (path, msg), = problems_of(entry(layers=[{"layers": "0-2"}, {"layers": [2, 3], "dense": True}]))
    assert path == "models[0].layers[1].layers"
    assert "conflicting" in msg and "layer 2" in msg and "models[0].layers[0]" in msg


def test_conflicting_head_rules():
    (path, msg), = problems_of(entry(layers=[{"layers": 0, "heads": [{"heads": "all"}, {"heads": 3}]}]))
    assert path == "models[0].layers[0].heads[1].heads" and "head 3" in msg


def test_every_problem_is_reported_at_once():
    problems = problems_of(entry(layers=[{"layers": 99}, {"layers": 0, "heads": [{"heads": 50}]}]))
    assert [p for p, _ in problems] == ["models[0].layers[0].layers", "models[0].layers[1].heads[0].heads"]


@pytest.mark.parametrize("budget, needle", [
    ({"top_k": 4, "top_p": 0.9}, "exactly one of"),
    ({"min_blocks": 2}, "exactly one of"),
    ({"top_p": 1.5}, "less than or equal to 1"),
    ({"top_k": 4, "max_blocks": 2, "sink_blocks": 1, "local_blocks": 2}, "always kept"),
    ({"top_k": 4, "max_bloks": 2}, "allowed: keep_ratio, local_blocks, max_blocks"),
    ({"top_p": float("nan")}, "finite number"),
    ({"keep_ratio": float("inf")}, "finite number"),
    ({"top_k": "8"}, "valid integer"),  # a string or a bool is not taken for a number
    ({"top_k": True}, "valid integer"),
    # counts the other settings would override (kept 5, 8 and 3 blocks where top_k asked 1, 2 and 8)
    ({"top_k": 1, "sink_blocks": 2, "local_blocks": 3}, "top_k 1 < sink_blocks + local_blocks (5), which are always"),
    ({"top_k": 2, "min_blocks": 8}, "top_k 2 < min_blocks 8: give one count"),
    ({"top_k": 8, "max_blocks": 3}, "max_blocks 3 < top_k 8: give one count"),
])
def test_bad_budget(budget, needle):
    (path, msg), = problems_of(entry(budget=budget))
    assert path == "models[0].budget" or path.startswith("models[0].budget.")
    assert needle in msg


def test_block_size_must_be_power_of_two():
    (path, msg), = problems_of(entry(block_size=96))
    assert path == "models[0].block_size" and "power of two" in msg


@pytest.mark.parametrize("value", [-5, "lots", True, "12X", "0.5", 0.5])  # (0.5 pairs read as 0: off)
def test_bad_min_chunk_work_names_the_field(value):
    (path, msg), = problems_of(entry(min_chunk_work=value))
    assert path == "models[0].min_chunk_work" and "auto" in msg


@pytest.mark.parametrize("value", [1, "many", True, -3])
def test_bad_min_query_tokens_names_the_field(value):
    (path, msg), = problems_of(entry(min_query_tokens=value))
    assert path == "models[0].min_query_tokens" and "auto" in msg


def test_min_chunk_work_sizes():
    for given, pairs in ((0, 0), (123, 123), ("96M", 96 * 2**20), ("512k", 512 * 2**10), ("auto", None)):
        assert plan_of(entry(min_chunk_work=given)).min_chunk_work == pairs
    assert plan_of({**entry(), "defaults": {"min_chunk_work": "2G"}}).min_chunk_work == 2 * 2**30


def test_unknown_top_level_key_and_missing_models():
    (path, msg), = problems_of({"version": 1, "models": [{"match": {"names": ["x"]}}], "modles": []})
    assert path == "" or path == "<top level>"
    assert "'modles'" in msg and "models" in msg
    (path, msg), = problems_of({"version": 1})
    assert path == "models" and "required" in msg.lower()


def test_match_needs_something():
    (path, msg), = problems_of({"version": 1, "models": [{"match": {}}]})
    assert path == "models[0].match" and "architectures" in msg


def test_yaml_syntax_error_names_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("version: 1\nmodels:\n  - match: {architectures: [Llama\n")
    with pytest.raises(SparseConfigError) as e:
        load_config(f)
    assert str(f) in str(e.value) and "YAML syntax error at line" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(SparseConfigError, match="cannot read the file"):
        load_config(tmp_path / "nope.yaml")


# --- discovery ------------------------------------------------------------------------------


def test_discovery_order(tmp_path, monkeypatch):
    explicit, env = tmp_path / "a.yaml", tmp_path / "b.yaml"
    for f in (explicit, env):
        f.write_text(yaml.safe_dump(entry(layers=[{"layers": "all"}])))
    monkeypatch.setenv(ENV_VAR, str(env))
    assert find_config({"sparse": {"config": str(explicit)}}, LLAMA) == (explicit, "--additional-config")
    assert find_config({}, LLAMA) == (env, ENV_VAR)
    monkeypatch.delenv(ENV_VAR)
    path, how = find_config(None, LLAMA)
    assert how == "shipped config" and path.name == "llama-3.yaml"
    path, how = find_config(None, GEMMA)
    assert how == "shipped config" and path.name == "gemma-3.yaml"
    assert find_config(None, ModelShape("x/y", ("FooForCausalLM",), 2, 2, 2)) == (None, "none")


def test_no_config_runs_dense_with_one_warning(caplog, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    caplog.set_level("WARNING", logger="vllm.sparse")
    plan = build_plan(None, ModelShape("x/y", ("FooForCausalLM",), 2, 2, 2))
    assert not plan.is_sparse
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "every layer runs dense" in warnings[0].getMessage()


def test_a_named_config_that_keeps_every_layer_dense_says_so(caplog, tmp_path):
    path = tmp_path / "no-rules.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "models": [{"match": {"architectures": ["LlamaForCausalLM"]},
                                                              "estimator": {"name": "sink_local"}}]}))
    caplog.set_level("WARNING", logger="vllm.sparse")
    plan = build_plan({"sparse": {"config": str(path)}}, LLAMA)
    assert not plan.is_sparse
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(said) == 1 and "keeps every layer dense" in said[0] and "no-rules.yaml" in said[0]


def test_shipped_configs_resolve_for_their_models():
    names = {p.name for p in shipped_configs()}
    assert {"gemma-3.yaml", "llama-3.yaml"} <= names
    gemma = resolve_plan(load_config(REPO / "configs/gemma-3.yaml"), GEMMA, "gemma")
    assert [layer.index for layer in gemma.layers if layer.is_sparse] == [5, 11, 17]
    llama = resolve_plan(load_config(REPO / "configs/llama-3.yaml"), LLAMA, "llama")
    assert all(layer.is_sparse for layer in llama.layers)  # XAttention's setting: every layer
    plan = llama.layers[0].heads[0]
    assert (plan.estimator, plan.params.stride, plan.budget.top_p, llama.block_size) == ("antidiagonal", 8, 0.9, 128)


def test_equal_head_plans_are_one_object():
    """Every step groups a layer's heads by plan (`sparse_path.chunk_block_mask`); equal plans are interned at
    resolution, so the common case, one plan for every head, is found by identity, not by pydantic equality."""
    mixed = plan_of(entry(layers=[{"layers": "all", "heads": [{"heads": "0-1", "dense": True},
                                                              {"heads": 7, "budget": {"keep_ratio": 0.5}}]}]))
    heads = [hp for layer in mixed.layers for hp in layer.heads if hp is not None]
    assert len(set(heads)) == 2 and len({id(hp) for hp in heads}) == 2  # two plans, two objects
    llama = resolve_plan(load_config(REPO / "configs/llama-3.yaml"), LLAMA, "llama")
    assert all(hp is llama.layers[0].heads[0] for layer in llama.layers for hp in layer.heads)


def test_exported_schema_is_current():
    assert json.loads((REPO / "configs/schema.json").read_text()) == json_schema(), \
        "configs/schema.json is stale: run `vllm-sparse schema -o configs/schema.json`"


def test_explicit_config_that_matches_no_model_is_an_error(tmp_path, monkeypatch):
    """Only discovery may fall back to dense: a config the user named must have an entry for the model."""
    path = tmp_path / "mistral.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "models": [{"match": {"architectures": ["MistralForCausalLM"]},
                                                              "layers": [{"layers": "all"}]}]}))
    with pytest.raises(SparseConfigError, match=r"no entry matches the model .*LlamaForCausalLM.*MistralForCausalLM"):
        build_plan({"sparse": {"config": str(path)}}, LLAMA)
    monkeypatch.setenv(ENV_VAR, str(path))
    with pytest.raises(SparseConfigError, match=f"{path}.*VLLM_SPARSE_CONFIG"):
        build_plan(None, LLAMA)


def test_speculative_decoding_with_a_sparse_plan_is_refused_at_start(tmp_path):
    from types import SimpleNamespace

    from vllm_sparse.backend import plan_cache

    # (a 4-layer Llama 3: the shipped plan's general entry; its 8B entry names 32-layer models)
    hf = SimpleNamespace(architectures=["LlamaForCausalLM"], num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2)
    config = SimpleNamespace(model_config=SimpleNamespace(hf_config=hf, model="org/llama-3-tiny"),
                             additional_config={"sparse": {"config": str(REPO / "configs/llama-3.yaml")}},
                             speculative_config=object())
    with pytest.raises(SparseConfigError, match="speculative_config: speculative decoding"):
        plan_cache.plan_for(config)
    config.speculative_config = None
    assert plan_cache.plan_for(config).is_sparse


# --- provenance -----------------------------------------------------------------------------


def test_provenance_is_validated():
    ok = plan_of(entry(provenance={"kind": "published", "source": "XAttention, RULER table"},
                       layers=[{"layers": "all"}]))
    assert ok.is_sparse
    (path, msg), = problems_of(entry(provenance={"kind": "calibrated", "source": "x"}))
    assert path == "models[0].provenance" and "names the command" in msg
    (path, msg), = problems_of(entry(provenance={"kind": "guessed", "source": "x"}))
    assert path == "models[0].provenance.kind" and "'measured', 'published' or 'calibrated'" in msg


def test_every_shipped_config_says_what_backs_it():
    for path in shipped_configs():
        text = path.read_text()
        assert text.startswith("# Backed by: "), f"{path.name}: first line must say what backs it"
        for model in load_config(path).models:
            assert model.provenance is not None and model.provenance.kind in ("measured", "published"), path.name
            assert model.provenance.source
            if model.provenance.kind == "measured":
                assert "benchmarks/RESULTS.md" in model.provenance.source and model.provenance.command


def test_discovery_applies_only_measured_or_published_plans(tmp_path, monkeypatch, caplog):
    from vllm_sparse.config import discovery

    monkeypatch.delenv(ENV_VAR, raising=False)
    plans = {}
    for name, prov in (("a-calibrated.yaml", {"kind": "calibrated", "source": "s", "command": "vllm-sparse calibrate"}),
                       ("b-none.yaml", None),
                       ("c-published.yaml", {"kind": "published", "source": "paper, table 1"})):
        data = entry(layers=[{"layers": "all"}], match={"architectures": ["LlamaForCausalLM"], "names": ["*llama-3*"]})
        if prov:
            data["models"][0]["provenance"] = prov
        plans[name] = tmp_path / name
        plans[name].write_text(yaml.safe_dump(data))
    monkeypatch.setattr(discovery, "shipped_configs", lambda: sorted(plans.values()))
    caplog.set_level("INFO", logger="vllm.sparse")
    assert find_config(None, LLAMA) == (plans["c-published.yaml"], "shipped config")
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 2 and all("not applied on its own" in m for m in skipped)
    assert "a-calibrated.yaml" in skipped[0] and "calibrated" in skipped[0] and "additional-config" in skipped[0]
    assert "no provenance" in skipped[1]
    # Named by path, a calibrated plan applies.
    plan = build_plan({"sparse": {"config": str(plans["a-calibrated.yaml"])}}, LLAMA)
    assert plan.is_sparse and "a-calibrated.yaml" in plan.source
    monkeypatch.setattr(discovery, "shipped_configs", lambda: [plans["a-calibrated.yaml"]])
    assert find_config(None, LLAMA) == (None, "none")


def test_shipped_plans_apply_to_the_families_they_name(monkeypatch, capsys, tmp_path, caplog):
    """Issue 28, item 5: a shipped plan applies to a model its names match (and whose architecture, where it
    names some, it lists), not to every model of an architecture; a model no shipped plan names runs dense
    with one note that says how to get a plan; `vllm-sparse plan --model M` says which plan applied and why."""
    import json

    from vllm_sparse.cli.main import main

    monkeypatch.delenv(ENV_VAR, raising=False)
    llama_31 = ModelShape("meta-llama/Llama-3.1-8B-Instruct", ("LlamaForCausalLM",), 32, 32, 8)
    assert find_config(None, llama_31)[0].name == "llama-3.yaml"
    for other in ("01-ai/Yi-9B-200K", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "codellama/CodeLlama-7b-hf"):
        shape = ModelShape(other, ("LlamaForCausalLM",), 32, 32, 8)
        assert find_config(None, shape) == (None, "none"), other
        plan = build_plan(None, shape)
        assert not plan.is_sparse and len(plan.notes) == 1
        assert "no shipped plan names" in plan.notes[0] and "import minference" in plan.notes[0] \
            and "calibrate" in plan.notes[0]
    # A name the plan gives, on an architecture it does not list: not its family either.
    assert find_config(None, ModelShape("someone/llama-3-moe", ("MixtralForCausalLM",), 32, 32, 8)) == (None, "none")

    model = tmp_path / "Meta-Llama-3.1-8B-Instruct"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096, "vocab_size": 128256}))
    assert main(["plan", "--model", str(model)]) == 0
    out = capsys.readouterr().out
    # The 8B entry (TidalDecode's published selection layers are the 8B model's) before the family's entry.
    assert "shipped plan llama-3.yaml applies: its name glob '*Llama-3.1-8B*' matches" in out and "published" in out
    assert "decode=tidal" in out
    # The `dense_above` rule as it applies (every sparse chunk counted, a first chunk's dense rows included).
    assert "rows below dense_below, which read every block, included" in out and "on CUDA 0.8, on CPU off" in out
    seventy = ModelShape("meta-llama/Llama-3.1-70B-Instruct", ("LlamaForCausalLM",), 80, 64, 8)
    plan = build_plan(None, seventy)
    assert plan.is_sparse and not plan.is_sparse_decode  # no selection layers published for 70B: dense decode
    assert find_config(None, seventy)[0].name == "llama-3.yaml"
    yi = tmp_path / "Yi-9B-200K"
    yi.mkdir()
    (yi / "config.json").write_text((model / "config.json").read_text())
    assert main(["plan", "--model", str(yi)]) == 0
    assert "no shipped plan names" in capsys.readouterr().out


def test_every_environment_variable_is_declared_in_envs():
    """One place declares what the package reads from the environment (vllm_sparse/envs.py): every
    `VLLM_SPARSE_*` name in the source is there, and reading an undeclared one is an error."""
    import os
    import re

    from vllm_sparse import envs

    used = set()
    for path in (REPO / "vllm_sparse").rglob("*.py"):
        used |= set(re.findall(r"VLLM_SPARSE_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    assert used - set(envs.VARIABLES) == set()
    assert envs.get("VLLM_SPARSE_WORKSPACE_MIB") == (os.environ.get("VLLM_SPARSE_WORKSPACE_MIB") or "512")
    with pytest.raises(KeyError, match="VLLM_SPARSE_WORKSPACE_MB is not a declared"):
        envs.get("VLLM_SPARSE_WORKSPACE_MB")


@pytest.mark.parametrize("name, unset", [("VLLM_SPARSE_FA_PACK_LISTS", True), ("VLLM_SPARSE_LOG_STEPS", False)])
@pytest.mark.parametrize("value", ["1", "0", ""])
def test_a_flag_is_0_or_1_and_anything_else_an_error_naming_it(monkeypatch, name, unset, value):
    """An empty value is the declared default (packing on, step logging off)."""
    from vllm_sparse import envs

    monkeypatch.setenv(name, value)
    assert envs.flag(name) is {"1": True, "0": False, "": unset}[value]
    for typo in ("true", "yes", "on", " 1"):
        monkeypatch.setenv(name, typo)
        with pytest.raises(ValueError, match=f"{name}={typo!r}: give 0 or 1"):
            envs.flag(name)


def test_the_metrics_interval_is_a_finite_number_above_zero(monkeypatch):
    """A negative or NaN interval made the metrics thread's sleep raise and the counters freeze, silently."""
    from vllm_sparse import envs

    monkeypatch.setenv("VLLM_SPARSE_METRICS_INTERVAL_S", "0.5")
    assert envs.positive_float("VLLM_SPARSE_METRICS_INTERVAL_S") == 0.5
    for bad in ("abc", "0", "-1", "nan", "inf"):
        monkeypatch.setenv("VLLM_SPARSE_METRICS_INTERVAL_S", bad)
        with pytest.raises(ValueError, match=f"VLLM_SPARSE_METRICS_INTERVAL_S={bad!r}: give"):
            envs.positive_float("VLLM_SPARSE_METRICS_INTERVAL_S")


def test_variables_set_for_a_block_are_as_they_were_after_it(monkeypatch):
    """An eval or calibration run in a process sets its counters for its own engines only: an eval left
    VLLM_SPARSE_STATS=1 behind, and the engines started after it in that process ran without the `dense_above` rule
    (found as two tests that failed only after tests/test_eval.py had run in the same process)."""
    import os

    from vllm_sparse import envs

    monkeypatch.delenv("VLLM_SPARSE_STATS", raising=False)
    monkeypatch.setenv("VLLM_SPARSE_AUDIT", "0")
    with pytest.raises(RuntimeError, match="inside"):
        with envs.set_for(VLLM_SPARSE_STATS="1", VLLM_SPARSE_AUDIT="1"):
            assert envs.flag("VLLM_SPARSE_STATS") and envs.flag("VLLM_SPARSE_AUDIT")
            raise RuntimeError("inside")
    assert "VLLM_SPARSE_STATS" not in os.environ and os.environ["VLLM_SPARSE_AUDIT"] == "0"
    with pytest.raises(KeyError, match="VLLM_SPARSE_STAT is not a declared"):
        with envs.set_for(VLLM_SPARSE_STAT="1"):
            pass
    assert "VLLM_SPARSE_STAT" not in os.environ
    # vLLM's own variables a block needs (the eval's collective_rpc with a function), undeclared here, restored too
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "0")
    with envs.set_for(vllm={"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}, VLLM_SPARSE_STATS="1"):
        assert os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1" and envs.flag("VLLM_SPARSE_STATS")
    assert os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "0" and "VLLM_SPARSE_STATS" not in os.environ
    with pytest.raises(TypeError, match="strings"):  # checked before any is set
        with envs.set_for(vllm={"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}, VLLM_SPARSE_STATS=1):
            pass
    assert os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "0"


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    f = tmp_path / "twice.yaml"
    f.write_text("version: 1\nmodels:\n  - match: {architectures: [LlamaForCausalLM]}\n"
                 "    layers:\n      - {layers: all, estimator: {name: sink_local}}\n"
                 "    layers:\n      - {layers: 0, dense: true}\n")
    with pytest.raises(SparseConfigError) as e:
        load_config(f)
    assert "'layers' appears twice" in str(e.value) and "first at line 4" in str(e.value) and "line 6" in str(e.value)


def test_an_open_range_starting_beyond_the_model_is_an_error():
    (path, msg), = problems_of(entry(layers=[{"layers": "7-"}]))
    assert path == "models[0].layers[0].layers" and "layer 7 is beyond the model" in msg
    (path, msg), = problems_of(entry(layers=[{"layers": 0, "heads": [{"heads": "9-"}]}]))
    assert path == "models[0].layers[0].heads[0].heads" and "head 9 is beyond the model" in msg
    assert resolve_plan(parse_config(entry(layers=[{"layers": "2-", "estimator": {"name": "sink_local"}}]), "t"),
                        LLAMA, "t").layers[3].is_sparse  # (an open range still runs to the last layer)


def test_a_budget_beside_an_estimator_that_keeps_every_block_is_an_error():
    (path, msg), = problems_of(entry(layers=[{"layers": 0, "estimator": {"name": "dense"}, "budget": {"top_k": 4}}]))
    assert path == "models[0].layers[0]" and "estimator dense keeps every block" in msg


def test_lowbit_rows_sampled_more_sparsely_than_a_block_are_refused_at_start():
    (path, msg), = problems_of(entry(block_size=64, layers=[
        {"layers": 0, "estimator": {"name": "lowbit", "sample_stride": 128}}]))
    assert path == "models[0].layers[0].estimator" and "sample_stride 128 exceeds the block size 64" in msg


def test_a_setting_of_another_mode_is_an_error_not_ignored():
    (path, msg), = problems_of(entry(layers=[
        {"layers": 0, "estimator": {"name": "lowbit", "rows": "pooled", "sample_stride": 4}}]))
    assert path == "models[0].layers[0].estimator" and "sample_stride applies to rows: sampled" in msg
    (path, msg), = problems_of(entry(decode={"estimator": "dense", "top_k_tokens": 100, "block_tokens": 128}))
    assert path == "models[0].decode" and "block_tokens, top_k_tokens would be ignored" in msg
    plan_of(entry(decode="dense", layers=[{"layers": 0, "estimator": {"name": "lowbit", "rows": "pooled"}}]))


def test_an_antidiagonal_stride_that_does_not_divide_the_block_is_refused_at_start():
    cfg = entry(defaults={"block_size": 64}, layers=[
        {"layers": 0, "estimator": {"name": "antidiagonal", "stride": 16}},
        {"layers": 1, "heads": [{"heads": "0-3", "estimator": {"name": "antidiagonal", "stride": 32}},
                                {"heads": "4-7", "estimator": {"name": "antidiagonal", "stride": 3}}]}])
    cfg["defaults"] = cfg["models"][0].pop("defaults")
    (path, msg), = problems_of(cfg)
    assert path == "models[0].layers[1].heads[1].estimator"
    assert "layer 1 head 4: antidiagonal stride 3 must divide the block size 64" in msg


@pytest.mark.parametrize("sparse, needle", [
    ({"confg": "plan.yaml"}, "sparse.confg: unknown key 'confg'"),
    ({"config": ""}, "sparse.config: expected the path of a plan (YAML), got ''"),
    ({"config": 123}, "sparse.config: expected the path of a plan (YAML), got 123"),
    ({}, "sparse.config: expected the path of a plan (YAML), got None"),
    ("plan.yaml", "sparse: expected {\"config\": PATH}, got str"),
])
def test_an_unusable_additional_config_is_an_error_not_discovery(sparse, needle, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(SparseConfigError) as e:
        find_config({"sparse": sparse}, LLAMA)
    assert needle in str(e.value) and "--additional-config" in str(e.value)


def test_decode_selection_is_off_on_an_engine_shorter_than_its_threshold(tmp_path, caplog):
    """A plan's decode selection starts at decode.dense_below tokens of context: on an engine whose max_model_len is
    shorter it could never run, so the engine's plan keeps decode on vLLM's attention (no page summaries, no
    workspace) and says so once."""
    from types import SimpleNamespace

    from vllm_sparse.backend import plan_cache

    f = tmp_path / "decode.yaml"
    f.write_text(yaml.safe_dump(entry(decode={"estimator": "quest", "top_k_tokens": 1024, "dense_below": 8192},
                                      layers=[{"layers": "all", "estimator": {"name": "sink_local"}}])))
    hf = SimpleNamespace(architectures=["LlamaForCausalLM"], num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2)

    def engine(max_len):
        return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf, model="org/llama-3-tiny",
                                                            max_model_len=max_len),
                               additional_config={"sparse": {"config": str(f)}}, speculative_config=None)

    caplog.set_level("INFO", logger="vllm.sparse")
    short = plan_cache.plan_for(engine(4096))
    assert not short.is_sparse_decode and not short.needs_summaries and short.is_sparse  # prefill stays sparse
    said = [r.getMessage() for r in caplog.records if "decode selection" in r.getMessage()]
    assert len(said) == 1 and "(quest, from 8192 tokens of context) is off on this engine: max_model_len 4096" \
        in said[0]
    assert [r.levelname for r in caplog.records if "decode selection" in r.getMessage()] == ["WARNING"]
    assert plan_cache.plan_for(engine(8192)).decode == "quest"  # reached at 8192: on



@pytest.mark.parametrize("rules", [["all"], [[0, 1]], [[0, 1], [2, 3]], [[2, 3], [0, 1]]])
@pytest.mark.parametrize("explicit", [True, False])
def test_a_plan_is_explicit_as_its_config_is_whatever_its_layer_rules_name(rules, explicit):
    """`explicit` (a config the user named: what it asks must run, or the start stops) is the config's, not the last
    layer rule's: a shipped plan naming layers by index stays a discovery plan, a named `layers: all` stays named."""
    data = entry(layers=[{"layers": r, "estimator": {"name": "sink_local"}} for r in rules])
    assert resolve_plan(parse_config(data, "test.yaml"), LLAMA, "test.yaml", explicit=explicit).explicit is explicit

def _prefill_engine(tmp_path, max_len: int, budget: int, device: str = "cuda", **entry_kw):
    """A stand-in for vLLM's config of one engine: a 4-layer Llama, the plan's file, the scheduler's token budget."""
    from types import SimpleNamespace

    f = tmp_path / f"plan-{max_len}-{budget}-{device}.yaml"
    f.write_text(yaml.safe_dump(entry(**entry_kw)))
    hf = SimpleNamespace(architectures=["LlamaForCausalLM"], num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2)
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf, model="org/llama-3-tiny", max_model_len=max_len),
                           scheduler_config=SimpleNamespace(max_num_batched_tokens=budget),
                           device_config=SimpleNamespace(device_type=device),
                           additional_config={"sparse": {"config": str(f)}}, speculative_config=None)


SPARSE_LAYERS = [{"layers": "all", "estimator": {"name": "sink_local"}, "budget": {"top_k": 4}}]


@pytest.mark.parametrize("max_len, budget, extra, said", [
    # the auto floor (2048 query tokens on CUDA) above the engine's token budget
    (131072, 1024, {},
     "no prefill chunk has min_query_tokens (2048, auto) query tokens: a token budget of 1024 a step"),
    # the auto work floor (64M token pairs) above the largest chunk: 2048 tokens at 32K of context
    (32768, 2048, {}, "no prefill chunk reaches min_chunk_work (67108864 token pairs, auto): the largest, 2048 query "
                      "tokens at 32768 tokens of context, has 65012736"),
    # no prompt reaches dense_below
    (4096, 8192, {"dense_below": 8192}, "no prompt reaches dense_below (8192 tokens): max_model_len is 4096"),
])
def test_an_engine_where_no_prefill_chunk_can_go_sparse_says_so_once_and_prefills_dense(
        tmp_path, caplog, max_len, budget, extra, said):
    """The chunk rule (`batch.classify`) could never send a chunk of this engine sparse: its prefill is planned dense
    (no estimator workspace, no per-step split), its decode setting kept, and one warning at start says why."""
    from vllm_sparse.backend import plan_cache

    caplog.set_level("INFO", logger="vllm.sparse")
    cfg = _prefill_engine(tmp_path, max_len, budget, layers=SPARSE_LAYERS, decode={"estimator": "quest",
                          "top_k_tokens": 1024, "dense_below": 2048}, **extra)
    plan = plan_cache.plan_for(cfg)
    assert not plan.is_sparse_prefill and plan.is_sparse_decode  # decode unchanged
    assert plan_cache.plan_for(cfg) is plan
    warned = [r for r in caplog.records if "sparse prefill is off" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING" and said in warned[0].getMessage(), \
        [r.getMessage() for r in warned]


def test_an_engine_whose_chunks_clear_the_floors_keeps_its_sparse_prefill(tmp_path, caplog):
    from vllm_sparse.backend import plan_cache

    caplog.set_level("INFO", logger="vllm.sparse")
    for max_len, budget, device in ((131072, 2048, "cuda"), (65536, 16384, "cuda"), (4096, 256, "cpu")):
        plan = plan_cache.plan_for(_prefill_engine(tmp_path, max_len, budget, device, layers=SPARSE_LAYERS,
                                                   dense_below=1024))
        assert plan.is_sparse_prefill, (max_len, budget, device)
    assert not [r for r in caplog.records if "sparse prefill is off" in r.getMessage()]


@pytest.mark.parametrize("floor, needle", [
    ({"min_query_tokens": 4096}, "min_query_tokens: no prefill chunk has min_query_tokens (4096) query tokens: "
                                 "a token budget of 2048 a step (the engine's most a step gives one request): lower "
                                 "min_query_tokens or raise --max-num-batched-tokens"),
    ({"min_chunk_work": 1 << 40},
     "min_chunk_work: no prefill chunk reaches min_chunk_work (1099511627776 token pairs)"),
])
def test_a_floor_the_config_sets_above_every_chunk_is_an_error_at_start(tmp_path, floor, needle):
    from vllm_sparse.backend import plan_cache

    with pytest.raises(SparseConfigError) as e:
        plan_cache.plan_for(_prefill_engine(tmp_path, 131072, 2048, layers=SPARSE_LAYERS, **floor))
    assert needle in str(e.value), str(e.value)

@pytest.mark.parametrize("rule, needle", [
    ({"layers": 0, "dense": True, "estimator": {"name": "sink_local"}}, "dense: true keeps these layers' prefill"),
    ({"layers": 0, "heads": [{"heads": 1, "dense": True, "budget": {"top_k": 2}}]},
     "dense: true keeps these heads' prefill"),
    ({"layers": 0, "dense": True, "heads": [{"heads": 0}, {"heads": 1, "estimator": {"name": "sink_local"}}]},
     "heads[1] sets an estimator or budget, but the layer rule says dense: true"),
])
def test_dense_beside_an_estimator_or_budget_is_an_error(rule, needle):
    (path, msg), = problems_of(entry(layers=[rule]))
    assert path.startswith("models[0].layers[0]") and needle in msg, (path, msg)
    # dense prefill with a decode setting stays allowed
    assert plan_of(entry(layers=[{"layers": 0, "dense": True, "decode": "dense"}]))


def test_vertical_slash_crossed_or_columns_needs_a_top_p_one_budget():
    est = {"name": "vertical_slash", "vertical_size": 64, "slash_size": 64, "blocks": "crossed"}
    (path, msg), = problems_of(entry(layers=[{"layers": "all", "estimator": est, "budget": {"keep_ratio": 0.2}}]))
    assert path == "models[0].layers[0].budget" and "layer 0 head 0: vertical_slash blocks: crossed" in msg
    assert "top_p: 1.0" in msg
    assert plan_of(entry(layers=[{"layers": "all", "estimator": est, "budget": {"top_p": 1.0}}])).layers[0].is_sparse


def test_env_lists_every_variable_with_its_value_or_default(capsys, monkeypatch):
    from vllm_sparse.cli.main import main
    from vllm_sparse.envs import VARIABLES

    monkeypatch.setenv("VLLM_SPARSE_WORKSPACE_MIB", "1024")
    monkeypatch.delenv("VLLM_SPARSE_METRICS", raising=False)
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}=" in out for name in VARIABLES)
    assert "VLLM_SPARSE_WORKSPACE_MIB=1024\n" in out and "VLLM_SPARSE_METRICS=1  (default)" in out
