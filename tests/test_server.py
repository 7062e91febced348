"""The OpenAI-compatible server started with --attention-backend sparse (API server + engine processes)."""

from __future__ import annotations

import json
import time

import pytest
import requests
import yaml

from tests.engines import CPU_ENGINE
from tests.server import run_server_until_exit, vllm_server

pytestmark = [pytest.mark.engine, CPU_ENGINE]

SERVE = ["--kv-cache-memory-bytes", str(1 << 30), "--dtype", "float32", "--max-model-len", "4096", "--block-size", "32",
         "--max-num-batched-tokens", "512", "--enforce-eager", "--attention-backend", "sparse"]


def _config(path, layers):
    path.write_text(yaml.safe_dump({"version": 1, "models": [{
        "match": {"architectures": ["LlamaForCausalLM"]}, "min_chunk_work": 0, "min_query_tokens": 16,
        "block_size": 64, "dense_below": 300,
        "layers": layers}]}))
    return json.dumps({"sparse": {"config": str(path)}})


def test_server_answers_completions_and_chat(tiny_llama, tmp_path):
    extra = _config(tmp_path / "sparse.yaml", [{"layers": "all", "budget": {"top_k": 4}}])
    model = str(tiny_llama)
    with vllm_server([model, *SERVE, "--additional-config", extra], tmp_path / "server.log",
                     env={"VLLM_SPARSE_LOG_STEPS": "1"}) as (url, _):
        long_prompt = "def parse(self, args):\n    return self.parser.parse_args(args)\n" * 60
        r = requests.post(url + "/v1/completions", json={
            "model": model, "prompt": long_prompt, "max_tokens": 5, "temperature": 0}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["prompt_tokens"] > 300  # long enough for the sparse path
        assert body["usage"]["completion_tokens"] == 5 and isinstance(body["choices"][0]["text"], str)
        long_tokens = body["usage"]["prompt_tokens"]

        r = requests.post(url + "/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 5,
            "temperature": 0}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["completion_tokens"] == 5
        tokens = _sparse_metrics(url, long_tokens + body["usage"]["prompt_tokens"])
    # Every prefill token is counted once; the long prompt's chunks that reach dense_below went sparse,
    # the chat prompt is short: dense.
    assert tokens["sparse"] + tokens["dense"] == long_tokens + body["usage"]["prompt_tokens"]
    assert 0 < tokens["sparse"] <= long_tokens
    log = (tmp_path / "server.log").read_text()
    assert "vllm-sparse: plan from" in log
    # The long prompt's later chunks went through the sparse path (the chat prompt is short: dense).
    sparse_steps = [line for line in log.splitlines() if "vllm-sparse: step goes sparse" in line]
    assert sparse_steps and all("tokens after" in line for line in sparse_steps)


def _sparse_metrics(url: str, prefill_tokens: int, timeout: float = 30) -> dict[str, float]:
    """/metrics once the workers' snapshots (written about once a second) hold every prefill token."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout
    while True:
        text = requests.get(url + "/metrics", timeout=30).text
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name.startswith("vllm_sparse:")}
        tokens = {path: samples.get(("vllm_sparse:prefill_tokens_total", (("path", path), ("rank", "0"))), 0)
                  for path in ("sparse", "dense")}
        if tokens["sparse"] + tokens["dense"] >= prefill_tokens or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "vllm:num_requests_running" in text  # vLLM's own metrics are still served
    assert samples.get(("vllm_sparse:sparse_chunks_total", (("rank", "0"),)), 0) >= 1
    # The first completion's tokens were decoded (densely: the plan has no decode setting) before the
    # last request's prefill, which the wait above saw counted.
    assert samples.get(("vllm_sparse:decode_tokens_total", (("path", "dense"), ("rank", "0"))), 0) >= 1
    assert samples.get(("vllm_sparse:decode_tokens_total", (("path", "sparse"), ("rank", "0"))), 0) == 0
    # Every sparse chunk-layer (2 layers) observed a kept density, in the 0-1 layer group.
    density = (("layers", "0-1"), ("rank", "0"))
    assert samples[("vllm_sparse:kept_density_count", density)] >= 2
    assert 0 < samples[("vllm_sparse:kept_density_sum", density)] <= samples[("vllm_sparse:kept_density_count",
                                                                               density)]
    assert samples[("vllm_sparse:estimation_seconds_count", (("rank", "0"),))] >= 2
    return tokens


def test_server_refuses_bad_config(tiny_llama, tmp_path):
    extra = _config(tmp_path / "bad.yaml", [{"layers": "all", "estimator": {"name": "sink_local", "sinks": 2}}])
    proc = run_server_until_exit([str(tiny_llama), *SERVE, "--additional-config", extra])
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert f"invalid sparse-attention config {tmp_path / 'bad.yaml'}" in out
    assert "models[0].layers[0].estimator: unknown field(s) 'sinks'; allowed: local_blocks, name, sink_blocks" in out
    assert "EngineCore" not in out  # (refused in the API server, before it started the engine's process)
