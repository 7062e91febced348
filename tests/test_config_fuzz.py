"""Fuzzing the config stage: any YAML gives a plan or one SparseConfigError, never another exception.

Three sources of input: arbitrary text, arbitrary YAML values, and valid configs with one field
replaced by an arbitrary value (the inputs that reach deepest into validation and plan resolution).
Hypothesis derandomised: the same examples every run.
"""

from __future__ import annotations

import copy

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_sparse.config.errors import SparseConfigError
from vllm_sparse.config.loader import load_config, parse_config
from vllm_sparse.config.plan import ModelShape, SparsePlan, resolve_plan

SHAPES = [ModelShape("org/llama-3-8b", ("LlamaForCausalLM",), 4, 8, 2),
          ModelShape("google/gemma-3-270m", ("Gemma3ForCausalLM",), 6, 4, 1,
                     ("sliding_attention",) * 5 + ("full_attention",))]
FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=12)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)

VALID = {"version": 1, "defaults": {"block_size": 64, "dense_below": 1024},
         "models": [{"match": {"architectures": ["LlamaForCausalLM"], "names": ["*llama*"]}, "union_tile": 2,
                     "layers": [{"layers": "0-1", "dense": True},
                                {"layers": [2, "3-"], "estimator": {"name": "antidiagonal", "stride": 8},
                                 "budget": {"top_p": 0.9, "sink_blocks": 1, "local_blocks": 1, "share": "group"},
                                 "heads": [{"heads": [0, 1], "budget": {"top_k": 3}}]}]},
                    {"match": {"architectures": ["Gemma3ForCausalLM"]},
                     "layers": [{"layers": "full_attention",
                                 "estimator": {"name": "lowbit", "sample_stride": 16}}]}]}
# Every place a value can sit in VALID, as a path of keys and indices.
PATHS = [("version",), ("defaults",), ("defaults", "block_size"), ("models",), ("models", 0, "match"),
         ("models", 0, "match", "architectures"), ("models", 0, "union_tile"), ("models", 0, "layers"),
         ("models", 0, "layers", 0, "layers"), ("models", 0, "layers", 1, "estimator"),
         ("models", 0, "layers", 1, "estimator", "stride"), ("models", 0, "layers", 1, "budget"),
         ("models", 0, "layers", 1, "budget", "top_p"), ("models", 0, "layers", 1, "budget", "share"),
         ("models", 0, "layers", 1, "heads", 0, "heads"), ("models", 0, "layers", 1, "heads", 0, "budget"),
         ("models", 1, "layers", 0, "estimator", "name"), ("models", 1, "layers", 0, "layers"),
         ("models", 1, "match", "architectures")]


def _plan_or_config_error(data) -> None:
    try:
        cfg = parse_config(data, "fuzz.yaml")
        for shape in SHAPES:
            assert isinstance(resolve_plan(cfg, shape, "fuzz.yaml", explicit=False), SparsePlan)
    except SparseConfigError as e:
        assert str(e).startswith("vllm-sparse: invalid sparse-attention config fuzz.yaml:")


def test_the_valid_base_config_resolves():
    cfg = parse_config(VALID, "base")
    assert all(resolve_plan(cfg, shape, "base").is_sparse for shape in SHAPES)


@FUZZ
@given(text=st.text(max_size=200))
def test_any_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "fuzz.yaml"
    path.write_text(text)
    try:
        cfg = load_config(path)
        for shape in SHAPES:
            resolve_plan(cfg, shape, str(path))
    except SparseConfigError:
        pass


@FUZZ
@given(data=values)
def test_any_yaml_value(data):
    yaml.safe_dump(data)  # representable as YAML
    _plan_or_config_error(data)


@FUZZ
@given(where=st.sampled_from(PATHS), value=values)
def test_a_valid_config_with_one_field_replaced(where, value):
    data = copy.deepcopy(VALID)
    node = data
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    _plan_or_config_error(data)
