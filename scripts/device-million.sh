#!/bin/bash
# Issue 29 (a million tokens on one GPU) and issue 26's stride-16 estimator, on one GPU, once vLLM 0.26.0 is
# staged in /tmp/site (../shared/device/README.md; four calls after scripts/stage-vllm-resplit.sh). The gemma steps
# read GEMMA_WHEELS=/tmp/gg, carried by scripts/stage-gemma.sh (five calls).
#
#   bash scripts/device-million.sh SECONDS STEP...     (run from the checkout's root)
#
# Steps, each run once per warm machine and skipped when fewer seconds are left than it needs:
#   est    benchmarks/estimators.py, one 16K chunk-layer, 32 q / 8 KV heads: antidiagonal at stride 8 (bf16, int8)
#          and stride 16 (int8), kept blocks against stride 8 bf16, at 128K; then stride 16 int8 alone at
#          256K, 512K and 1M (its time per chunk-layer: the estimator's share at long contexts)
#   ktest  the fused estimators' tests compiled (stride 16 int8 and fp8 caches included), the fp8 tests of the
#          prefill and decode kernels, the column-attention kernel, the compile log, no compile after the warm-up,
#          and the engine oracle test
#   fid    gemma-3-270m (GEMMA_WHEELS), 20 prompts per cell, passkey and multikey at 16K and 29K: the stride-16
#          int8 estimator with the 10% budget and with tau 0.9
#   fidr   gemma-3-270m (GEMMA_WHEELS), 20 prompts per cell, passkey and multikey at 16K and 29K: fixed budgets above
#          10% (15% and 20% at stride 16, 15% at stride 8, int8), and the 10% stride-16 plan again in the same call:
#          the smallest fixed budget that gives dense's answers, for a timing plan whose speed a twin backs
#          (the 10% twins lose 4-5 of 80; device-workload.sh `ratios` times these budgets' Llama twins)
#   fidt   gemma-3-270m (GEMMA_WHEELS), 20 prompts per cell, passkey and multikey at 16K and 29K: the 10% and 15%
#          stride-16 int8 budgets with `dense_tail: 128` (the rows of each chunk's last 128 tokens dense; `fidr`
#          2026-12-05 H100, the same prompts: 10-20% without it lose the same multi-key answers), and the 1M plan's
#          twin (a page list per q head) with the tail, in one call (device-workload.sh `tailr` times the Llama
#          twins; `LONG_PLANS=qwen2.5-7b-1m-antidiagonal-10-s16-int8-own-heads-tail ... m1s` the 1M one)
#   fidt2  the 10% stride-16 int8 tail plan and the 1M plan's tail twin on 80 other prompts (`--seed 20`: prompts 20-39
#          of each cell; `fidt` lost one borderline prompt of its 80): how often a tail plan differs from dense
#   fidt5  on fidt's 80 prompts (seed 0): the 5% and 7.5% stride-16 int8 budgets with `dense_tail: 128`, the 1M plan's
#          twin at 5% with the tail, and 5% + tail with dense rows below 4K: whether a budget below 10% keeps the 10%
#          tail twin's answers (device-workload.sh `tail5r` times the Llama twins). fidt5b: the 5% and 7.5% tail twins
#          on fidt2's (seed 20); the other two lost 8-16 pass keys in fidt5 (H100, 2026-12-06) and were left out
#   fidtw  the 10% and 5% tail twins on fidt's prompts (seed 0) with `eval --dense-twin-chunk 2048`: dense again in
#          2048-token chunks (the plans' dense runs 4096), whose lost / gained against the first dense run are the
#          spread of dense's own answers on these 80 prompts (is the 29K multi-key #12 the plans lose borderline for
#          dense too?); fidtwb: the same on fidt2's (seed 20); fidtwc, fidtwd: 80 prompts more each (seeds 40, 60;
#          fidtwd's 130 s is its time right after fidtwc, caches warm: alone it needs ~300 s)
#   fidt75 the 7.5% tail twin on fidtwc's and fidtwd's prompts (seeds 40, 60; on seeds 0 and 20 it lost as many as the 10%
#          twin: is it as close to dense as the 10% plan, whose Llama twin reaches 128K 2.67x?)
#   fidfp8 gemma-3-270m (GEMMA_WHEELS) with --kv-cache-dtype fp8, dense fp8 against each plan, 20 prompts per cell,
#          passkey and multikey at 16K and 29K: the shipped configs/gemma-3.yaml (sparse prefill reads fp8 pages)
#          and the TidalDecode 4K plan (decode selection and attention read fp8 pages)
#   fid1m  gemma-3-270m (GEMMA_WHEELS), 20 prompts per cell, passkey and multikey at 16K and 29K: the fidelity twins of
#          the 1M timing plans (10%, int8, a page list per q head, stride 16 and stride 32)
#   est32  the estimator at stride 32 (int8) beside stride 16, one 16K chunk-layer at 128K, 256K, 512K and 1M: its
#          time per chunk-layer (the estimator's share of a 1M prefill) and the blocks it keeps against stride 8;
#          then stride 16 at 1M under a 2 GiB workspace cap (one slab) against the default 512 MiB (slabs); per-kernel
#          times in the JSON (where selection, union and tables spend their 8 ms a chunk-layer at 1M)
#   fidq64 gemma-3-270m (GEMMA_WHEELS), 20 prompts per cell, 16K and 29K: Quest 4K and TidalDecode 4K decode in
#          64-token blocks (the block size decode at 1M needs) against dense decode
#   long   benchmarks/e2e.py, Qwen2.5-7B-Instruct-1M shape (dummy weights), CUDA graphs, --gpu-memory-utilization
#          0.9: dense and the 10% stride-16 int8 plan at 256K and 512K (LONG_LENGTHS), each engine in a timeout
#   longd  the same shape, the dense engine alone (a dense 512K prefill takes minutes: a call of its own)
#   longpack the same shape at 256K (LONG_LENGTHS), the page list per q head plan alone, VLLM_SPARSE_FA_PACK_LISTS=1
#          then =0 (one FlashAttention call for the chunk's 28 lists, then a call per list; benchmarks/host_path.py
#          on CPU: 371 vs 1118 us of host time a chunk-layer)
#   longs  the same shape, each plan in LONG_PLANS alone (default: the 10% stride-16 int8 plan with a union per KV
#          head and with a page list per q head)
#   m1d    the Qwen2.5-7B-1M shape, dense alone, one 1,048,576-token prompt (whole: ~400 s expected from 512K's
#          99.6 s; a call of its own)
#   m1s    the same prompt, each plan in LONG_PLANS alone (default: the page list per q head at stride 16, then at
#          stride 32), the call's time split between them
#   l1m    the Llama-3-8B shape with 1M positions and an fp8 KV cache (the only way 1M fits it on one H200): the 10%
#          stride-16 int8 plan alone at 1M (a dense 1M prefill of this shape is ~2x Qwen's: its per-chunk times come
#          from m1d's method at 256K and 512K, LLAMA_DENSE_LENGTHS, in the same call when time is left)
#   s1m    `vllm serve` at 1M (issue 29, item 1): Qwen2.5-7B-1M shape, --max-model-len 1048576, CUDA graphs, prefix
#          caching on, --gpu-memory-utilization 0.9, the page-list plan; one 1,048,000-token completion through the
#          OpenAI API, then the same prompt + 8 tokens (served from the prefix cache); the log checked for
#          tracebacks and out-of-memory (benchmarks/serve_tp_check.py --tp 1)
#   s1ml   the same through `vllm serve` for the Llama-3-8B shape with 1M positions and an fp8 KV cache (item 1's second
#          shape; its e2e run: l1m), the 10% stride-16 int8 plan with a union per KV head
#   d1md   decode at 1M (issue 29, item 4), Qwen2.5-7B-1M shape, the baseline engine alone: vLLM's decode over a cache
#          filled by the page-list-per-q-head plan (`e2e.py --only dense --dense-config`: a dense 1M prefill takes
#          ~7 minutes), one 1,048,448-token request (the longest whose max_model_len stays within 16,384 decode
#          blocks of 64) and one 4,096-token request (dense decode at the Quest budget's length: the issue's "within
#          15%" reference), 64 tokens each, one repeat
#   d1ms   the same cases, the Quest 4K plan's engine alone (its 4K request decodes densely: under dense_below).
#          D1M_CASES overrides the cases, D1M_KV the KV dtype, D1M_UTIL the memory share (0.9). Batch 4 x 1M needs
#          4.19M tokens of KV: in fp8 at 0.97 the plugin leaves ~4.27M (benchmarks/memory_table.py --util 0.97; 3.92M
#          at 0.9): D1M_CASES=4x1048448 D1M_KV=fp8 D1M_UTIL=0.97, each engine a call of its own (4 x 1M of sparse
#          prefill, ~5 minutes, before the decode)
#   d1mt   the same cases, the TidalDecode 4K plan's engine alone (64-token blocks; layers 0-1 dense, 2 and 13 select,
#          the rest read: no page summaries read; Quest measured 1.95x dense at 1M, 2026-12-04)
#   d1m0   the same cases, TidalDecode with no dense decode layers (layers 0 and 13 select: the whole context read in
#          two of 28 layers instead of four; a timing plan, see its config)
#   d1m1   the same cases, TidalDecode with one selector (layer 0 selects, the 27 layers after it read: the whole context
#          read in one layer of 28; the gemma twin's shape, one selector and no re-selection; a timing plan, see its
#          config)
#   d1mp   the Quest engine's decode at 1M under the torch profiler (--profile-decode; D1M_CONFIG=...-tidal-4k for
#          TidalDecode's): where its time above a 4K step goes (scoring the page summaries or the selectors' full
#          passes, the two selection stages, attention). The profiled steps decode the timed request's prompt again
#          (prefix cache: no second 1M prefill)
#   est7   the scorer with 7 q heads per KV head (Qwen2.5-7B: 28/4) beside 8 (32/4), stride 16 int8, one 16K chunk-layer
#          at 128K and 1M: its (row, q head) pairs are no longer padded to 8 per row, so 28/4 should take ~7/8 of
#          32/4's product time (it took the same before); then 28/4 at 1M under a 2 GiB cap (one slab) against the
#          default 512 MiB (slabs, each KV head's key columns now quantized once); first the tests of the row
#          scorer and of the Triton attention kernel (both pack unpadded (row, q head) pairs since 2026-12-04); then
#          the Triton attention kernel at 28/4 and 32/4 (benchmarks/kernels.py, 10% of a 16K chunk at 128K)
#   tsel   tests/test_decode_kernels.py, then one TidalDecode selector layer of the Qwen layout at 1M and 256K,
#          batch 1 (benchmarks/decode_kernels.py --tidal --sweep): the selector's full pass with exact scores against
#          the same pass without them and against FA3's decode over the same pages (with vLLM staged), the selection,
#          a reader; the split-K settings swept at 1M (the selectors' ~1.1 ms each at 1M, derived from the engine's
#          steps, against FA3's ~0.49 ms a layer)
#   d4md   batch 4 at 1M over one shared document (cases 1x1048448s,4x1048448s: the prompts share all but their last
#          64 tokens, so the 1M prefill runs once and the prefix cache serves the rest, in bf16 KV at 0.9; every
#          request's decode still reads the whole 1M), the baseline engine, with dense decode at 1 and 4 x 4K
#   d4mt   the same shared cases, TidalDecode's recipe (64-token blocks; layers 0-1 dense, 2 and 13 select)
#   d4m1   the same shared cases, the one-selector timing plan; its batch-1 decode also under the torch profiler
#          (where the step's time above a 4K step goes)
#   sched  vLLM's scheduler host time per decode step at 4K-1M on this machine's CPU, stock vs SPARSE (no GPU work:
#          the per-step common-prefix walk the plugin skips since 2026-12-04, benchmarks/scheduler_step.py); run it
#          before d4mt/d4m1, which re-measure 1M decode without the walk
set -o pipefail
budget=${1:?seconds}; shift
DONE_DIR=/tmp/million-done
source scripts/device-common.sh

est() {
  timeout $(( $(left) - 5 )) python3 benchmarks/estimators.py --only antidiagonal_s8,antidiagonal_s8_int8,antidiagonal_s16_int8 \
    --skip-torch antidiagonal_s8,antidiagonal_s8_int8,antidiagonal_s16_int8 --sweep --out "$OUT/est_s16.json" 2>&1 | tail -20
  local ctx
  for ctx in 262144 524288 1048576; do
    timeout $(( $(left) - 5 )) python3 benchmarks/estimators.py --ctx $ctx --only antidiagonal_s16_int8 \
      --skip-torch antidiagonal_s16_int8 --out "$OUT/est_s16_$ctx.json" 2>&1 | tail -3
  done
}
ktest() {  # (the oracle engine test last: it starts an engine)
  timeout $(( $(left) - 5 )) python3 -m pytest -q -rfE -p no:cacheprovider tests/test_row_scores.py \
    "tests/test_sparse_kernel.py::test_fp8_cache_matches_the_dequantized_reference" \
    "tests/test_decode_kernels.py::test_decode_kernels_read_fp8_caches" tests/test_column_attention.py \
    tests/test_compile_log.py tests/test_warmup_gpu.py "tests/test_engine_gpu.py::test_sparse_engine_equals_its_torch_reference_path" 2>&1 | tail -15
}
fid() {
  timeout $(( $(left) - 5 )) bash benchmarks/fidelity_gpu.sh "$OUT/fid" 16384,29696 \
    benchmarks/configs/gemma-3-antidiagonal-10-s16-int8.yaml benchmarks/configs/gemma-3-antidiagonal-tau90-s16-int8.yaml \
    -- --tasks passkey,multikey --samples 20 --max-tokens 8 --max-num-batched-tokens 4096 2>&1 | tail -60
}
fidr() {
  timeout $(( $(left) - 5 )) bash benchmarks/fidelity_gpu.sh "$OUT/fidr" 16384,29696 \
    benchmarks/configs/gemma-3-antidiagonal-{15,20,10}-s16-int8.yaml benchmarks/configs/gemma-3-antidiagonal-15-int8.yaml \
    -- --tasks passkey,multikey --samples 20 --max-tokens 8 --max-num-batched-tokens 4096 2>&1 | tail -60
}
fidt() {
  timeout $(( $(left) - 5 )) bash benchmarks/fidelity_gpu.sh "$OUT/fidt" 16384,29696 \
    benchmarks/configs/gemma-3-antidiagonal-{10,15}-s16-int8-tail.yaml \
    benchmarks/configs/gemma-3-antidiagonal-10-s16-int8-own-heads-tail.yaml \
    -- --tasks passkey,multikey --samples 20 --max-tokens 8 --max-num-batched-tokens 4096 2>&1 | tail -60
}
tail_twins() {  # tail_twins OUT_NAME SEED GEMMA_PLAN...: 20 prompts per cell from SEED, passkey and multikey, 16K and 29K
  local name=$1 seed=$2 p plans=(); shift 2
  for p in "$@"; do plans+=("benchmarks/configs/gemma-3-antidiagonal-$p.yaml"); done
  timeout $(( $(left) - 5 )) bash benchmarks/fidelity_gpu.sh "$OUT/$name" 16384,29696 "${plans[@]}" \
    -- --tasks passkey,multikey --samples 20 --seed "$seed" --max-tokens 8 --max-num-batched-tokens 4096 ${TWIN_ARGS:-} \
    2>&1 | tail -40
}
fidt2() { tail_twins fidt2 20 10-s16-int8-tail 10-s16-int8-own-heads-tail; }
BELOW10="5-s16-int8-tail 7.5-s16-int8-tail 5-s16-int8-own-heads-tail 5-s16-int8-tail-db4k"
fidt5() { tail_twins fidt5 0 $BELOW10; }
fidt5b() { tail_twins fidt5b 20 5-s16-int8-tail 7.5-s16-int8-tail; }
fidtw() { TWIN_ARGS="--dense-twin-chunk 2048" tail_twins fidtw 0 10-s16-int8-tail 5-s16-int8-tail; }
fidtwb() { TWIN_ARGS="--dense-twin-chunk 2048" tail_twins fidtwb 20 10-s16-int8-tail 5-s16-int8-tail; }
fidtwc() { TWIN_ARGS="--dense-twin-chunk 2048" tail_twins fidtwc 40 10-s16-int8-tail 5-s16-int8-tail; }
fidtwd() { TWIN_ARGS="--dense-twin-chunk 2048" tail_twins fidtwd 60 10-s16-int8-tail 5-s16-int8-tail; }
fidt75() { tail_twins fidt75c 40 7.5-s16-int8-tail; tail_twins fidt75d 60 7.5-s16-int8-tail; }
fidfp8() {
  timeout $(( $(left) - 5 )) bash benchmarks/fidelity_gpu.sh "$OUT/fidfp8" 16384,29696 \
    configs/gemma-3.yaml benchmarks/configs/gemma-3-decode-tidal-4k.yaml \
    -- --kv-cache-dtype fp8 --tasks passkey,multikey --samples 20 --max-tokens 8 --max-num-batched-tokens 4096 2>&1 | tail -60
}
fid1m() {
  timeout $(( $(left) - 5 )) bash benchmarks/fidelity_gpu.sh "$OUT/fid1m" 16384,29696 \
    benchmarks/configs/gemma-3-antidiagonal-10-s16-int8-own-heads.yaml benchmarks/configs/gemma-3-antidiagonal-10-s32-int8-own-heads.yaml \
    -- --tasks passkey,multikey --samples 20 --max-tokens 8 --max-num-batched-tokens 4096 2>&1 | tail -40
}
est32() {
  timeout $(( $(left) - 5 )) python3 benchmarks/estimators.py --only antidiagonal_s8,antidiagonal_s16_int8,antidiagonal_s32_int8 \
    --skip-torch antidiagonal_s8,antidiagonal_s16_int8,antidiagonal_s32_int8 --out "$OUT/est_s32.json" 2>&1 | tail -12
  local ctx
  for ctx in 262144 524288 1048576; do
    timeout $(( $(left) - 5 )) python3 benchmarks/estimators.py --ctx $ctx --only antidiagonal_s16_int8,antidiagonal_s32_int8 \
      --skip-torch antidiagonal_s16_int8,antidiagonal_s32_int8 --kernel-times --out "$OUT/est_s32_$ctx.json" 2>&1 | tail -4
  done
  # the workspace cap's effect at 1M: stride 16's 16K-row chunk needs ~1 GiB of block scores (two or three slabs
  # under the default 512 MiB), the same in one slab under a 2 GiB cap
  VLLM_SPARSE_WORKSPACE_MIB=2048 timeout $(( $(left) - 5 )) python3 benchmarks/estimators.py --ctx 1048576 \
    --only antidiagonal_s16_int8 --skip-torch antidiagonal_s16_int8 --out "$OUT/est_s16_1m_ws2048.json" 2>&1 | tail -3
}
fidq64() {
  timeout $(( $(left) - 5 )) bash benchmarks/fidelity_gpu.sh "$OUT/fidq64" 16384,29696 \
    benchmarks/configs/gemma-3-decode-quest-4k-b64.yaml benchmarks/configs/gemma-3-decode-tidal-4k-b64.yaml \
    -- --tasks passkey,multikey --samples 20 --max-tokens 8 --max-num-batched-tokens 4096 2>&1 | tail -30
}
long() {
  local t=$(( $(left) - 10 ))
  timeout $t python3 benchmarks/e2e.py --graphs --shape qwen2.5-7b-1m --decode-batch 0 --repeats 1 \
    --lengths "${LONG_LENGTHS:-262144,524288}" --gpu-memory-utilization 0.9 --engine-timeout $(( t / 2 - 5 )) \
    --config benchmarks/configs/qwen2.5-7b-1m-antidiagonal-10-s16-int8.yaml --out "$OUT/e2e_long.json" 2>&1 \
    | engine_lines | tee "$OUT/e2e_long.log" | tail -30
}

long_one() {  # long_one NAME E2E_ARGS...: one engine of the long-context shape, its own JSON and log
  local name=$1 t=$(( $(left) - 10 )); shift
  timeout $t python3 benchmarks/e2e.py --graphs --shape qwen2.5-7b-1m --decode-batch 0 --repeats 1 \
    --lengths "${LONG_LENGTHS:-262144,524288}" --gpu-memory-utilization 0.9 --engine-timeout $(( t - 5 )) ${NO_KEPT:+--no-kept} "$@" \
    --out "$OUT/$name.json" 2>&1 | engine_lines | tee "$OUT/$name.log" | tail -12
}
longd() { long_one e2e_long_dense --only dense; }
longpack() {  # the page list per q head plan (28 lists a layer) at 256K: one FlashAttention call a chunk-layer, then 28
  local flag n=2
  for flag in 1 0; do
    VLLM_SPARSE_FA_PACK_LISTS=$flag LONG_LENGTHS=${LONG_LENGTHS:-262144} \
      budget=$(( $(date +%s) - start + ($(left) - 10) / n + 10 )) long_one "e2e_long_pack$flag" --only sparse \
      --config benchmarks/configs/qwen2.5-7b-1m-antidiagonal-10-s16-int8-own-heads.yaml
    n=1
  done
}
m1d() { LONG_LENGTHS=1048576 long_one e2e_1m_dense --only dense; }  # (a call of its own: timeout_s 590 or more)
m1s() {  # each plan alone at 1M, the call's time split between them
  local p plans=(${LONG_PLANS:-qwen2.5-7b-1m-antidiagonal-10-s16-int8-own-heads qwen2.5-7b-1m-antidiagonal-10-s32-int8-own-heads})
  local n=${#plans[@]} share
  for p in "${plans[@]}"; do
    share=$(( ($(left) - 10) / n )); n=$(( n - 1 ))
    NO_KEPT=1 LONG_LENGTHS=1048576 budget=$(( $(date +%s) - start + share + 10 )) long_one "e2e_1m_$p" --only sparse \
      --config "benchmarks/configs/$p.yaml"  # (no second 1M prefill for the kept density: 10% by the plan's rule)
  done
}
serve_1m() {  # serve_1m NAME SHAPE PLAN [SERVE_CHECK_ARGS...]: `vllm serve` at 1M, one completion and a cached follow-up
  local name=$1 shape=$2 plan=$3; shift 3
  timeout $(( $(left) - 5 )) python3 benchmarks/serve_tp_check.py --tp 1 --shape "$shape" --max-model-len 1048576 \
    --tokens 1048000 --graphs --follow 8 --config "benchmarks/configs/$plan.yaml" "$@" \
    --serve-arg=--gpu-memory-utilization=0.9 --serve-arg=--enable-prompt-tokens-details --serve-arg=--max-num-seqs=8 \
    --startup-timeout 240 --request-timeout 200 --out "$OUT/$name.json" --log "$OUT/$name.log" 2>&1 | tail -25
  echo "out-of-memory lines: $(grep -c "OutOfMemory\|out of memory" "$OUT/$name.log" || true)"
}
s1m() { serve_1m serve_1m qwen2.5-7b-1m qwen2.5-7b-1m-antidiagonal-10-s16-int8-own-heads; }
s1ml() {
  serve_1m serve_1m_llama_fp8 llama-3-8b-1m llama-3-8b-antidiagonal-10-s16-int8 --serve-arg=--kv-cache-dtype=fp8
}
decode_1m() {  # decode_1m NAME E2E_ARGS...: one engine of the decode-at-1M comparison
  local name=$1 t=$(( $(left) - 10 )); shift
  timeout $t python3 benchmarks/e2e.py --graphs --shape qwen2.5-7b-1m --lengths "" \
    --decode-cases "${D1M_CASES:-1x1048448,1x4096}" --decode-tokens 64 --decode-repeats 1 \
    --gpu-memory-utilization "${D1M_UTIL:-0.9}" \
    --engine-timeout $(( t - 5 )) ${D1M_KV:+--kv-cache-dtype $D1M_KV} \
    --dense-config benchmarks/configs/qwen2.5-7b-1m-antidiagonal-10-s16-int8-own-heads.yaml \
    --config "benchmarks/configs/${D1M_CONFIG:-qwen2.5-7b-1m-own-heads-decode-quest-4k}.yaml" "$@" --out "$OUT/$name.json" 2>&1 \
    | engine_lines | grep -v "Capturing CUDA" | tee "$OUT/$name.log" | tail -8
}
d1md() { decode_1m e2e_decode_1m_baseline --only dense; }
d1ms() { decode_1m e2e_decode_1m_quest --only sparse; }
d1mt() { D1M_CONFIG=qwen2.5-7b-1m-own-heads-decode-tidal-4k decode_1m e2e_decode_1m_tidal --only sparse; }
d1m0() { D1M_CONFIG=qwen2.5-7b-1m-own-heads-decode-tidal-4k-l0 decode_1m e2e_decode_1m_tidal_l0 --only sparse; }
d1m1() { D1M_CONFIG=qwen2.5-7b-1m-own-heads-decode-tidal-4k-one decode_1m e2e_decode_1m_tidal_one --only sparse; }
SHARED_1M=1x1048448s,4x1048448s
d4md() { D1M_CASES=$SHARED_1M,1x4096,4x4096 decode_1m e2e_decode_1m_shared_baseline --only dense; }
d4mt() {
  D1M_CASES=$SHARED_1M D1M_CONFIG=qwen2.5-7b-1m-own-heads-decode-tidal-4k decode_1m e2e_decode_1m_shared_tidal --only sparse
}
d4m1() {
  D1M_CASES=$SHARED_1M D1M_CONFIG=qwen2.5-7b-1m-own-heads-decode-tidal-4k-one \
    decode_1m e2e_decode_1m_shared_tidal_one --only sparse --profile-decode 1x1048448s
}
sched() {
  timeout $(( $(left) - 5 )) python3 benchmarks/scheduler_step.py --out "$OUT/scheduler_step_h200.json" 2>&1 | tail -11
}
d1mp() {  # (D1M_CONFIG picks the plan, as for d1ms)
  D1M_CASES=1x1048448 decode_1m "e2e_decode_1m_profiled_${D1M_CONFIG:-quest}" --only sparse --profile-decode 1x1048448
}
est7() {
  timeout $(( $(left) / 3 )) python3 -m pytest -q -p no:cacheprovider -rfE tests/test_row_scores.py \
    tests/test_sparse_kernel.py 2>&1 | tee "$OUT/row_scores_tests.log" | tail -4
  local ctx heads
  for ctx in 131072 1048576; do
    for heads in 28/4 32/4; do
      timeout $(( $(left) - 5 )) python3 benchmarks/estimators.py --ctx $ctx --heads $heads --only antidiagonal_s16_int8 \
        --skip-torch antidiagonal_s16_int8 --kernel-times --out "$OUT/est_s16_${ctx}_heads${heads/\//x}.json" 2>&1 | tail -3
    done
  done
  # the slabs' cost at 1M now that each KV head's key columns are quantized once (was 7%: 15.20 vs 14.09 ms)
  VLLM_SPARSE_WORKSPACE_MIB=2048 timeout $(( $(left) - 5 )) python3 benchmarks/estimators.py --ctx 1048576 --heads 28/4 \
    --only antidiagonal_s16_int8 --skip-torch antidiagonal_s16_int8 --kernel-times \
    --out "$OUT/est_s16_1048576_heads28x4_ws2048.json" 2>&1 | tail -3
  # the Triton attention kernel's unpadded (token, q head) tiles: 28/4 against 32/4, 10% of a 16K chunk at 128K
  for heads in 28/4 32/4; do
    timeout $(( $(left) - 5 )) python3 benchmarks/kernels.py --contexts 131072 --modes chunk --densities 0.1 \
      --heads $heads --out "$OUT/kernels_128k_heads${heads/\//x}.json" 2>&1 | tail -4
  done
}
tsel() {  # (the decode kernel tests first: the split merge changed since they last ran on a GPU)
  timeout $(( $(left) / 3 )) python3 -m pytest -q -p no:cacheprovider -rfE tests/test_decode_kernels.py 2>&1 \
    | tee "$OUT/decode_kernel_tests.log" | tail -4
  timeout $(( $(left) - 5 )) python3 benchmarks/decode_kernels.py --tidal --sweep --cases 1x1048576,1x262144 \
    --out "$OUT/decode_tidal.json" 2>&1 | tail -32
}
l1m() {
  local t=$(( $(left) - 10 ))
  timeout $t python3 benchmarks/e2e.py --graphs --shape llama-3-8b-1m --kv-cache-dtype fp8 --decode-batch 0 --repeats 1 \
    --lengths 1048576 --gpu-memory-utilization 0.9 --engine-timeout $(( t - 5 )) --only sparse --no-kept \
    --config benchmarks/configs/llama-3-8b-antidiagonal-10-s16-int8.yaml --out "$OUT/e2e_1m_llama_fp8.json" 2>&1 \
    | engine_lines | tee "$OUT/e2e_1m_llama_fp8.log" | grep -v '"layers"' | tail -12
  [ -n "${LLAMA_DENSE_LENGTHS:-}" ] || return 0
  t=$(( $(left) - 10 ))
  timeout $t python3 benchmarks/e2e.py --graphs --shape llama-3-8b-1m --kv-cache-dtype fp8 --decode-batch 0 --repeats 1 \
    --lengths "$LLAMA_DENSE_LENGTHS" --gpu-memory-utilization 0.9 --engine-timeout $(( t - 5 )) --only dense \
    --out "$OUT/e2e_llama1m_fp8_dense.json" 2>&1 | engine_lines \
    | tee "$OUT/e2e_llama1m_fp8_dense.log" | tail -6
}
longs() {
  local p
  for p in ${LONG_PLANS:-qwen2.5-7b-1m-antidiagonal-10-s16-int8 qwen2.5-7b-1m-antidiagonal-10-s16-int8-own-heads}; do
    long_one "e2e_long_$p" --only sparse --config "benchmarks/configs/$p.yaml"
  done
}

run_steps "est:80 ktest:120 fid:240 fidr:240 fidt:270 fidt2:250 fidt5:250 fidt5b:250 fidtw:320 fidtwb:320 fidtwc:320 fidtwd:130 fidt75:300 fidfp8:240 fidq64:300 fid1m:240 est32:150 long:300 longd:300 longpack:360 longs:240 m1d:500 m1s:400 l1m:300 s1m:360 s1ml:380 d1md:300 d1ms:300 d1mt:300 d1m0:300 d1m1:300 d1mp:300 d4md:200 d4mt:200 d4m1:220 sched:60 tsel:300 est7:300" "$@"
