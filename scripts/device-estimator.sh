#!/bin/bash
# Issue 26 (a cheaper estimator) and issue 28 (MInference plans timed) on one GPU, once vLLM 0.26.0 is staged in
# /tmp/site (../shared/device/README.md).
#
#   bash scripts/device-estimator.sh SECONDS STEP...     (run from the checkout's root)
#
# Steps, each run once per warm machine and skipped when fewer seconds are left than it needs:
#   est    benchmarks/estimators.py: antidiagonal stride 8 with bf16 operands and with int8 ones (bits: 8), torch
#          path and kernels, kept blocks compared, tile sweep; with a 10% budget and with tau 0.9
#   ktest  the fused estimators' tests compiled (bf16, head dims 64/128/256, 32K memory), and the engine oracle
#          test (the sparse engine's tokens through the kernels vs through the torch reference path)
#   ttft   benchmarks/e2e.py with CUDA graphs at 32K/64K/128K, Llama-3.1-8B shape: dense, the 10% antidiagonal
#          plan in bf16 and int8, MInference's published Llama-3.1-8B-Instruct plan
#   qwen   the same for the Qwen2.5-7B shape: dense and MInference's Qwen2.5-7B-Instruct plan
#   fid    gemma-3-270m (GEMMA_WHEELS: the staged gemma wheels), 20 prompts per cell, passkey and multikey at
#          16K and 29K: the shipped plan (tau 0.9) in bf16 and int8, the 10% plan in int8, a page list per q head,
#          a vertical_slash plan at MInference-like budgets scaled to gemma's length
set -o pipefail
budget=${1:?seconds}; shift
DONE_DIR=/tmp/estimator-done
source scripts/device-common.sh

keep_log() { engine_lines; }
est() {
  timeout $(( $(left) - 5 )) python3 benchmarks/estimators.py --only antidiagonal_s8,antidiagonal_s8_int8 --sweep \
    --out "$OUT/est_int8_keep10.json" 2>&1 | tail -30
  timeout $(( $(left) - 5 )) python3 benchmarks/estimators.py --only antidiagonal_s8,antidiagonal_s8_int8 \
    --skip-torch antidiagonal_s8,antidiagonal_s8_int8 --budget top_p:0.9 --out "$OUT/est_int8_tau90.json" 2>&1 | tail -8
}
ktest() {
  timeout $(( $(left) - 5 )) python3 -m pytest -q -rfE -p no:cacheprovider tests/test_row_scores.py \
    "tests/test_engine_gpu.py::test_sparse_engine_equals_its_torch_reference_path" 2>&1 | tail -15
}
e2e() {  # e2e NAME SHAPE PLAN...
  local name=$1 shape=$2 flag=--config p args=(); shift 2
  for p in "$@"; do args+=($flag benchmarks/configs/$p.yaml); flag=--extra-config; done
  timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --graphs --shape "$shape" --decode-batch 0 --repeats 2 \
    --lengths 32768,65536,131072 "${args[@]}" --out "$OUT/$name.json" 2>&1 | keep_log | tail -40
}
ttft() { e2e e2e_llama llama-3.1-8b llama-3-8b-antidiagonal-10 llama-3-8b-antidiagonal-10-int8 llama-3.1-8b-minference; }
qwen() { e2e e2e_qwen qwen2.5-7b qwen2.5-7b-minference; }
fid() {
  timeout $(( $(left) - 5 )) bash benchmarks/fidelity_gpu.sh "$OUT/fid" 16384,29696 \
    benchmarks/configs/gemma-3-antidiagonal-tau90.yaml benchmarks/configs/gemma-3-antidiagonal-tau90-int8.yaml \
    benchmarks/configs/gemma-3-antidiagonal-10-int8.yaml benchmarks/configs/gemma-3-antidiagonal-tau90-own-heads.yaml \
    benchmarks/configs/gemma-3-vertical_slash-minference.yaml \
    -- --tasks passkey,multikey --samples 20 --max-tokens 8 --max-num-batched-tokens 4096 2>&1 | tail -80
}

run_steps "est:100 ktest:150 ttft:300 qwen:200 fid:240" "$@"
