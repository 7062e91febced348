"""The shipped plans against real models' shapes: each model's published config.json (the values that shape a
plan, as the model cards' files give them), read by transformers as vLLM reads it, then `vllm-sparse plan`
and discovery. Llama 3.1 and Gemma 3 have shipped plans; Qwen 2.5, Qwen 3 and Mistral do not (no published
setting this plugin's estimators reproduce: docs/config.md, "Shipped plans"), so discovery leaves them dense."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_sparse.cli.main import main
from vllm_sparse.config.discovery import find_config
from vllm_sparse.config.plan import ModelShape

REPO = Path(__file__).resolve().parents[1]

CONFIGS = {
    "Llama-3.1-8B-Instruct": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "Qwen2.5-7B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "max_position_embeddings": 32768, "max_window_layers": 28, "sliding_window": 131072,
        "use_sliding_window": False, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "vocab_size": 152064,
        "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": "bfloat16"},
    "Qwen3-8B": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096, "head_dim": 128,
        "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 40960, "max_window_layers": 36, "sliding_window": None,
        "use_sliding_window": False, "rms_norm_eps": 1e-06, "rope_theta": 1000000, "rope_scaling": None,
        "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
        "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "Mistral-7B-Instruct-v0.3": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 32768, "sliding_window": None, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
        "vocab_size": 32768, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "gemma-3-1b-it": {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 1152, "head_dim": 256,
        "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1,
        "max_position_embeddings": 32768, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000, "rope_theta": 1000000, "rope_scaling": None, "sliding_window": 512,
        "sliding_window_pattern": 6, "vocab_size": 262144, "bos_token_id": 2, "eos_token_id": [1, 106],
        "pad_token_id": 0, "hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": None,
        "final_logit_softcapping": None, "torch_dtype": "bfloat16"},
    "gemma-3-4b-it": {  # a multimodal checkpoint: the text model's shape sits in text_config
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "boi_token_index": 255999,
        "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
        "mm_tokens_per_image": 256, "torch_dtype": "bfloat16",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                          "patch_size": 14, "vision_use_head": False}},
}

# model -> (shipped plan discovery applies, its sparse layers, q heads, KV heads)
EXPECTED = {
    "Llama-3.1-8B-Instruct": ("llama-3.yaml", list(range(32)), 32, 8),
    "Qwen2.5-7B-Instruct": (None, [], 28, 4),
    "Qwen3-8B": (None, [], 32, 8),
    "Mistral-7B-Instruct-v0.3": (None, [], 32, 8),
    "gemma-3-1b-it": ("gemma-3.yaml", [5, 11, 17, 23], 4, 1),
    "gemma-3-4b-it": ("gemma-3.yaml", [5, 11, 17, 23, 29], 8, 4),
}


def _model_dir(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIGS[name]))
    return d


def _shape(d: Path) -> ModelShape:
    from transformers import AutoConfig

    return ModelShape.from_hf_config(AutoConfig.from_pretrained(d), str(d))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shipped_plans_against_real_model_shapes(name, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VLLM_SPARSE_CONFIG", raising=False)
    d = _model_dir(tmp_path, name)
    shipped, sparse_layers, q_heads, kv_heads = EXPECTED[name]
    shape = _shape(d)
    assert (shape.num_q_heads, shape.num_kv_heads) == (q_heads, kv_heads)
    path, how = find_config(None, shape)
    if shipped is None:
        assert (path, how) == (None, "none")  # no shipped plan: dense, with the one warning build_plan gives
        assert main(["validate", str(REPO / "configs/llama-3.yaml"), "--model", str(d)]) == 2  # named: an error
        assert "no entry matches the model" in capsys.readouterr().err
        return
    assert path.name == shipped and how == "shipped config"
    assert main(["plan", str(path), "--model", str(d)]) == 0
    out = capsys.readouterr().out
    assert f"q_heads={q_heads} kv_heads={kv_heads}" in out
    rows = [line.split() for line in out.splitlines()[2:] if line and line.split()[0].isdigit()]
    assert sorted({int(r[0]) for r in rows if r[3] != "dense"}) == sparse_layers
    # Llama 3: XAttention's bf16 product; Gemma 3: the same with int8 operands (measured, RESULTS.md)
    estimator = "antidiagonal(stride=8,bits=8)" if shipped == "gemma-3.yaml" else "antidiagonal(stride=8)"
    assert all(r[3] == estimator and r[4].startswith("top_p=0.9") for r in rows if r[3] != "dense")
    assert main(["validate", str(path), "--model", str(d)]) == 0
    assert f"{len(sparse_layers)} of {shape.num_layers} layers sparse" in capsys.readouterr().out
