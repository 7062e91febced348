#!/bin/bash
# Issue 14 on a two-GPU device machine (nvidia-h100-x2), once vLLM 0.26.0 is staged in /tmp/site
# (../shared/device/README.md: three calls, the last also runs .stage/bin/unpack.sh).
#
#   bash scripts/device-tp.sh SECONDS STEP...     (run from the checkout's root; call carries .whl)
#
# Steps, in the order given, each skipped when already done on this warm machine (/tmp/tp-done) or
# when fewer seconds are left of SECONDS than it needs (so the same command can be sent again):
#   tests  GPU tests: kernels (GPU 1) beside the one-GPU engine test (GPU 0), then the TP=2 test
#   serve  benchmarks/serve_tp_check.py: vllm serve at TP=2, a 64K completion, both ranks sparse
#   e2e2   benchmarks/e2e.py at --tensor-parallel-size 2 (dense, shipped plan, 10% plan)
#   e2e1   the same at --tensor-parallel-size 1 (GPU 0)
#   tp1m   issue 29, item 6: the Qwen2.5-7B-1M shape at TP=2 (2 KV heads a rank, each rank's estimator workspace and
#          temporaries sized by its own heads): the page-list-per-q-head plan at 256K and 1M, then dense at 256K;
#          TP=1 figures of the same plan and shape: RESULTS.md (one H200: 256K 8.85 s / 27.61 s dense, 1M 76.28 s)
#   tps1m  `vllm serve --tensor-parallel-size 2 --max-model-len 1048576` with that plan: a 1,048,000-token completion,
#          then the same + 8 tokens from the prefix cache; both ranks sparse, no out-of-memory
# Logs and JSON go to $OUT (tee'd, so a killed command still returns them).
set -o pipefail
budget=${1:?seconds}; shift
DONE_DIR=/tmp/tp-done
# NVLink multicast stays off (device KINDS.md); vLLM 0.26's all-reduce would otherwise try torch
# symmetric memory (multimem) first, so it is switched off here and vLLM uses its custom all-reduce / NCCL.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0 \
  VLLM_ALLREDUCE_USE_FLASHINFER=0
source scripts/device-common.sh

tptest() {  # tests/test_engine_tp.py on both GPUs
  timeout $(( $(left) - 5 )) python3 -m pytest -q -s -rfE -o faulthandler_timeout=200 tests/test_engine_tp.py 2>&1 \
    | tee "$OUT/tests_engine_tp.log"; echo "exit $?" >> "$OUT/tests_engine_tp.log"
}
gputest() {  # the one-GPU engine test and the plugin tests
  CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 5 )) python3 -m pytest -q -s -rfE tests/test_engine_gpu.py tests/test_plugin.py \
    2>&1 | tee "$OUT/tests_engine_gpu.log"; echo "exit $?" >> "$OUT/tests_engine_gpu.log"
}
e2equick() {  # 128K only, dense vs the 10% plan, TP=2 then TP=1 (same machine)
  for tp in 2 1; do
    ( [ $tp = 1 ] && export CUDA_VISIBLE_DEVICES=0
      timeout $(( $(left) - 3 )) python3 benchmarks/e2e.py --tensor-parallel-size $tp --lengths 131072 --decode-batch 0 \
        --config benchmarks/configs/llama-3-8b-antidiagonal-10.yaml --out "$OUT/e2e_tp${tp}_128k.json" 2>&1 \
        | grep -v "^\[.*\] \(WARNING\|INFO\)" | tee "$OUT/e2e_tp${tp}_128k.log" )
  done
}

tests() {
  local l=$(( $(left) - 10 ))
  ( CUDA_VISIBLE_DEVICES=1 timeout $l python3 -m pytest -q -s -rfE tests/test_sparse_kernel.py tests/test_row_scores.py \
      tests/test_selection_kernels.py tests/test_plugin.py > /tmp/tests_kernels.log 2>&1; echo "exit $?" >> /tmp/tests_kernels.log ) &
  CUDA_VISIBLE_DEVICES=0 timeout $l python3 -m pytest -q -s -rfE tests/test_engine_gpu.py 2>&1 | tee /tmp/tests_engine_gpu.log
  echo "exit $?" >> /tmp/tests_engine_gpu.log
  wait
  echo "---- kernels (GPU 1):"; tail -25 /tmp/tests_kernels.log
  timeout $(( $(left) - 5 )) python3 -m pytest -q -s -rfE -o faulthandler_timeout=300 tests/test_engine_tp.py 2>&1 \
    | tee /tmp/tests_engine_tp.log
  echo "exit $?" >> /tmp/tests_engine_tp.log
  for f in kernels engine_gpu engine_tp; do echo "######## tests_$f"; cat /tmp/tests_$f.log; done > "$OUT/gpu_tests.log"
}

serve() {
  timeout $(( $(left) - 5 )) python3 benchmarks/serve_tp_check.py --tp 2 --tokens 65536 --out "$OUT/serve_tp2.json" \
    --log "$OUT/serve_tp2.log" --startup-timeout 300
}

e2e() {  # e2e TP
  timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --tensor-parallel-size $1 --lengths 32768,65536,131072 \
    --decode-batch 0 --extra-config benchmarks/configs/llama-3-8b-antidiagonal-10.yaml \
    --out "$OUT/e2e_tp$1.json" 2>&1 | tee "$OUT/e2e_tp$1.log"
}
e2e1() { ( export CUDA_VISIBLE_DEVICES=0; e2e 1 ); }
TEN=benchmarks/configs/llama-3-8b-antidiagonal-10.yaml
e2e2q() {  # TP=2, dense and the 10% plan only (the shipped tau-0.9 plan keeps ~90% on dummy weights)
  timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --tensor-parallel-size 2 --lengths 32768,65536,131072 \
    --decode-batch 0 --config $TEN --out "$OUT/e2e_tp2.json" 2>&1 | tee "$OUT/e2e_tp2.log"
}
e2e1par() {  # TP=1 on the same machine: dense on GPU 0 beside the 10% plan on GPU 1, one engine each
  local l=$(( $(left) - 5 ))
  ( CUDA_VISIBLE_DEVICES=1 timeout $l python3 benchmarks/e2e.py --only sparse --config $TEN --decode-batch 0 \
      --lengths 32768,65536,131072 --out "$OUT/e2e_tp1_sparse.json" > /tmp/e2e_tp1_sparse.log 2>&1 ) &
  CUDA_VISIBLE_DEVICES=0 timeout $l python3 benchmarks/e2e.py --only dense --decode-batch 0 \
    --lengths 32768,65536,131072 --out "$OUT/e2e_tp1_dense.json" 2>&1 | tee "$OUT/e2e_tp1_dense.log"
  wait; cp /tmp/e2e_tp1_sparse.log "$OUT/"; tail -5 /tmp/e2e_tp1_sparse.log
}
Q1M=benchmarks/configs/qwen2.5-7b-1m-antidiagonal-10-s16-int8-own-heads.yaml
tp1m() {
  local t=$(( $(left) - 10 ))
  timeout $t python3 benchmarks/e2e.py --graphs --shape qwen2.5-7b-1m --tensor-parallel-size 2 --decode-batch 0 \
    --repeats 1 --lengths 262144,1048576 --gpu-memory-utilization 0.9 --engine-timeout $(( t * 2 / 3 )) --only sparse \
    --no-kept --config $Q1M --out "$OUT/e2e_tp2_1m_sparse.json" 2>&1 | grep -v "^\[.*\] \(WARNING\|INFO\)" \
    | tee "$OUT/e2e_tp2_1m_sparse.log" | tail -8
  t=$(( $(left) - 10 ))
  timeout $t python3 benchmarks/e2e.py --graphs --shape qwen2.5-7b-1m --tensor-parallel-size 2 --decode-batch 0 \
    --repeats 1 --lengths 262144 --gpu-memory-utilization 0.9 --engine-timeout $(( t - 5 )) --only dense \
    --out "$OUT/e2e_tp2_256k_dense.json" 2>&1 | grep -v "^\[.*\] \(WARNING\|INFO\)" \
    | tee "$OUT/e2e_tp2_256k_dense.log" | tail -6
}
tps1m() {
  timeout $(( $(left) - 5 )) python3 benchmarks/serve_tp_check.py --tp 2 --shape qwen2.5-7b-1m --max-model-len 1048576 \
    --tokens 1048000 --graphs --follow 8 --config $Q1M --serve-arg=--gpu-memory-utilization=0.9 \
    --serve-arg=--enable-prompt-tokens-details --serve-arg=--max-num-seqs=8 --startup-timeout 300 --request-timeout 200 \
    --out "$OUT/serve_tp2_1m.json" --log "$OUT/serve_tp2_1m.log" 2>&1 | tail -25
  echo "out-of-memory lines: $(grep -c "OutOfMemory\|out of memory" "$OUT/serve_tp2_1m.log" || true)"
}
metricstest() {
  CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q -rfE tests/test_metrics.py tests/test_plugin.py 2>&1 \
    | tee "$OUT/gpu_metrics_tests.log"
}
e2e2() { e2e 2; }

run_steps "tests:300 tptest:150 gputest:120 e2equick:150 serve:150 e2e2:280 e2e1:240 e2e2q:170 e2e1par:110 metricstest:60 tp1m:420 tps1m:420" "$@"
