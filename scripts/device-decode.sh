#!/bin/bash
# Issue 16 (sparse decode) on one GPU, once vLLM 0.26.0 is staged in /tmp/site (../shared/device/README.md).
#
#   bash scripts/device-decode.sh SECONDS STEP...     (run from the checkout's root; call carries .whl)
#
# Steps, each run once per warm machine and skipped when fewer seconds are left than it needs:
#   tests  the decode kernels against their references (bf16, 128K), and the CUDA-graph engine twin
#   bench  benchmarks/e2e.py, CUDA graphs: decode tok/s dense vs the Quest 4K plan at 2x128K, 16x32K
#          (10x32K where the GPU has under 100 GiB: 16 x 32K of KV does not fit beside 8B weights) and 32x8K
#   prof   the 32x8K case under dense_below, dense and sparse, profiled (e2e.py --profile-decode): per step
#          wall, GPU kernel and builder host time, and the top host and GPU ops of each engine
#   fid    gemma-3-270m, vllm-sparse eval with the same decode plan: passkey and multikey at 16K and 29K,
#          8-token answers, dense vs sparse decode (GEMMA_WHEELS: the staged gemma wheels)
#   eager  the first plan's engine alone, enforce_eager, VLLM_SPARSE_LOG_COMPILES=1: decode at 1 x 32K and 3 x 32K;
#          the log's compiles after "decode kernels ready" are the variants a request waited for (none expected
#          since warm_up_decode, 2026-12-04, not run on a GPU yet), then tests/test_warmup_gpu.py
# PLANS (default quest-4k): the plans, by the name between llama-3-8b-decode-/gemma-3-decode- and .yaml in
# benchmarks/configs; bench and prof run them all beside dense in one run, fid evaluates them side by side.
set -o pipefail
budget=${1:?seconds}; shift
DONE_DIR=/tmp/decode-done
source scripts/device-common.sh

keep_log() {  # engine INFO/WARNING lines out, the plugin's own (memory reservation, summaries) kept
  engine_lines
}
PLANS=${PLANS:-quest-4k}
plan_args() {  # --config the first plan, --extra-config the others
  local flag=--config p
  for p in $PLANS; do printf '%s benchmarks/configs/llama-3-8b-decode-%s.yaml ' $flag "$p"; flag=--extra-config; done
}
tests() {
  timeout $(( $(left) - 5 )) python3 -m pytest -q -s -rfE tests/test_decode_kernels.py tests/test_engine_decode_gpu.py \
    tests/test_engine_gpu.py 2>&1 | tee "$OUT/decode_gpu_tests.log"
}
bench() {
  local mem cases
  mem=$(python3 -c "import torch; print(torch.cuda.get_device_properties(0).total_memory >> 30)")
  cases=2x131072,16x32768,32x8192; [ "$mem" -lt 100 ] && cases=2x131072,10x32768,32x8192
  cases=${DECODE_CASES:-$cases}  # (a subset where one call's time is short)
  timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --graphs --lengths "" --decode-cases $cases \
    --decode-tokens 64 --repeats ${REPEATS:-2} $(plan_args) \
    --out "$OUT/e2e_decode.json" 2>&1 | keep_log | tee "$OUT/e2e_decode.log"
}
prof() {
  timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --graphs --lengths "" --decode-cases 32x8192 \
    --decode-tokens 64 --repeats 2 --profile-decode 32x8192 $(plan_args) \
    --out "$OUT/e2e_decode_profile.json" 2>&1 | keep_log | tee "$OUT/e2e_decode_profile.log"
}
fid() {  # the plans side by side on the GPU
  timeout $(( $(left) - 5 )) bash benchmarks/fidelity_gpu.sh "$OUT/fid" 16384,29696 \
    $(printf 'benchmarks/configs/gemma-3-decode-%s.yaml ' $PLANS) -- --tasks passkey,multikey --samples 5 \
    --max-tokens 8 --max-num-batched-tokens 4096 2>&1 | tail -60
}

eager() {
  local log="$OUT/e2e_decode_eager.log" e2e rc
  VLLM_SPARSE_LOG_COMPILES=1 timeout $(( $(left) - 60 )) python3 benchmarks/e2e.py --only sparse --lengths "" \
    --decode-cases 1x32768,3x32768 --decode-tokens 16 --no-kept \
    --config "benchmarks/configs/llama-3-8b-decode-${PLANS%% *}.yaml" --out "$OUT/e2e_decode_eager.json" 2>&1 \
    | keep_log > "$log"
  e2e=${PIPESTATUS[0]}
  grep -E "decode kernels ready|compiled at|tok/s|Error" "$log" | tail -20
  if grep -q "decode kernels ready" "$log"; then
    echo "compiles logged after the decode warm-up: $(sed -n '/decode kernels ready/,$p' "$log" \
      | grep -c 'Triton kernel vllm_sparse')"
  else
    echo "no 'decode kernels ready' line: the decode warm-up did not run, or its line did not reach the log (e2e exit $e2e)"
  fi
  timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider -rfE tests/test_warmup_gpu.py 2>&1 | tail -4
  rc=${PIPESTATUS[0]}
  [ "$e2e" -eq 124 ] && return 124
  return "$rc"
}

run_steps "tests:240 bench:300 prof:300 fid:200 eager:240" "$@"
