#!/bin/bash
# Issue 28 (plans for the models people serve) on one GPU, once vLLM 0.26.0 is staged in /tmp/site
# (../shared/device/README.md).
#
#   bash scripts/device-plans.sh SECONDS STEP...     (run from the checkout's root)
#
# Steps, each run once per warm machine and skipped when fewer seconds are left than it needs:
#   mcol   benchmarks/e2e.py, Llama-3.1-8B shape, CUDA graphs, 32K/64K/128K: dense, MInference's Llama-3.1-8B
#          plan with its columns read token by token (`blocks: columns`) and at block granularity, and the
#          stride-16 int8 XAttention plan, in one run, each engine in a timeout
#   mcolq  the same for the Qwen2.5-7B shape: dense and MInference's Qwen2.5-7B plan, columns token by token
set -o pipefail
budget=${1:?seconds}; shift
DONE_DIR=/tmp/plans-done
source scripts/device-common.sh

e2e() {  # e2e NAME E2E_ARGS...
  local name=$1 t=$(( $(left) - 10 )); shift
  timeout $t python3 benchmarks/e2e.py --graphs --decode-batch 0 --repeats 2 --engine-timeout $(( t / 3 )) "$@" \
    --out "$OUT/$name.json" 2>&1 | engine_lines | tee "$OUT/$name.log" | tail -14
}
mcol() {
  e2e e2e_minference_llama --shape llama-3.1-8b --lengths 32768,65536,131072 \
    --config benchmarks/configs/llama-3.1-8b-minference-columns.yaml \
    --extra-config benchmarks/configs/llama-3.1-8b-minference.yaml \
    --extra-config benchmarks/configs/llama-3-8b-antidiagonal-10-s16-int8.yaml
}
mcolq() {
  e2e e2e_minference_qwen --shape qwen2.5-7b --lengths 32768,131072 \
    --config benchmarks/configs/qwen2.5-7b-minference-columns.yaml
}

run_steps "mcol:200 mcolq:120" "$@"
