"""The OpenAI server with a sparse plan under load, cancellation and bad input (CPU, tiny model).

40 concurrent completions of mixed lengths (a third streamed and dropped after their first chunk),
beside requests that must be refused: a prompt over max_model_len, an empty prompt, a negative
max_tokens, a body that is not JSON. Every kept request gets its tokens, every bad one a 4xx, the
log holds no traceback, /health stays OK and a long request afterwards is answered.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from tests.engines import CPU_ENGINE
from tests.server import vllm_server

pytestmark = [pytest.mark.engine, CPU_ENGINE]

SERVE = ["--kv-cache-memory-bytes", str(1 << 30), "--dtype", "float32", "--max-model-len", "2048",
         "--block-size", "32", "--max-num-batched-tokens", "512", "--max-num-seqs", "16", "--enforce-eager",
         "--attention-backend", "sparse"]


def _text(tokens_wanted: int, offset: int) -> str:
    """Real text of roughly `tokens_wanted` tokens for the tiny model's tokenizer (about 3.5 chars each)."""
    source = (Path(os.__file__).parent / "argparse.py").read_text()
    start = (offset * 997) % (len(source) // 2)
    return source[start: start + int(tokens_wanted * 3.5)]


def test_concurrent_mixed_streamed_dropped_and_bad_requests(tiny_llama, tmp_path):
    config = tmp_path / "sparse.yaml"
    config.write_text(yaml.safe_dump({"version": 1, "models": [{
        "match": {"architectures": ["LlamaForCausalLM"]}, "min_chunk_work": 0, "min_query_tokens": 16,
        "block_size": 64, "dense_below": 300,
        "layers": [{"layers": "all", "estimator": {"name": "sink_local"}, "budget": {"top_k": 4}}]}]}))
    model, log = str(tiny_llama), tmp_path / "server.log"
    extra = json.dumps({"sparse": {"config": str(config)}})
    with vllm_server([model, *SERVE, "--additional-config", extra], log, env={"VLLM_SPARSE_LOG_STEPS": "1"}) as (
            url, _):
        def complete(i: int) -> tuple[str, int, object]:
            length = (40, 150, 700, 1300)[i % 4]  # two of four over dense_below: sparse chunks
            body = {"model": model, "prompt": _text(length, i), "max_tokens": 8 + i % 5, "temperature": 0,
                    "ignore_eos": True}
            if i % 3 == 0:  # streamed, and the client goes away after the first chunk
                with requests.post(url + "/v1/completions", json={**body, "stream": True}, stream=True,
                                   timeout=300) as r:
                    first = next(line for line in r.iter_lines() if line)
                    return "dropped", r.status_code, first
            r = requests.post(url + "/v1/completions", json=body, timeout=300)
            return "kept", r.status_code, (r.json() if r.ok else r.text, body["max_tokens"])

        def bad(kind: str) -> tuple[str, int, str]:
            body = {"model": model, "prompt": "hello", "max_tokens": 4}
            if kind == "too_long":
                body["prompt"] = _text(4000, 7)
            elif kind == "empty":
                body["prompt"] = ""
            elif kind == "negative":
                body["max_tokens"] = -3
            if kind == "not_json":
                r = requests.post(url + "/v1/completions", data="{not json", timeout=60,
                                  headers={"Content-Type": "application/json"})
            else:
                r = requests.post(url + "/v1/completions", json=body, timeout=60)
            return kind, r.status_code, r.text[:300]

        with ThreadPoolExecutor(max_workers=44) as pool:
            good = [pool.submit(complete, i) for i in range(40)]
            wrong = [pool.submit(bad, k) for k in ("too_long", "empty", "negative", "not_json")]
            good, wrong = [f.result() for f in good], [f.result() for f in wrong]

        for what, status, payload in good:
            assert status == 200, payload
            if what == "kept":
                body, max_tokens = payload
                assert body["usage"]["completion_tokens"] == max_tokens
            else:
                assert payload.startswith(b"data: ")
        for kind, status, text in wrong:
            assert 400 <= status < 500, f"{kind}: {status} {text}"
        assert requests.get(url + "/health", timeout=10).status_code == 200
        r = requests.post(url + "/v1/completions", json={"model": model, "prompt": _text(1300, 3), "max_tokens": 4,
                                                         "temperature": 0, "ignore_eos": True}, timeout=300)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        text = log.read_text()  # while serving (stopping the server afterwards logs its own teardown)
    assert "Traceback" not in text, text[text.find("Traceback") - 2000: text.find("Traceback") + 3000]
    assert "vllm-sparse: step goes sparse" in text
