#!/bin/bash
# Issue 26 (the serving workload) on one GPU, once vLLM 0.26.0 is staged in /tmp/site
# (../shared/device/README.md).
#
#   bash scripts/device-workload.sh SECONDS STEP...     (run from the checkout's root)
#
# Steps, each run once per warm machine and skipped when fewer seconds are left than it needs:
#   wl     benchmarks/workload.py, enforce_eager: dense, then each plan in PLANS (default: the 10% antidiagonal
#          plan with the work floor `auto`, then the same plan with it off), the same traffic to each; one
#          follow-up turn (PROFILE, default follow:32768+256) profiled in every engine
#   wlg    the same with CUDA graphs (--graphs)
#   wl8k   wlg with 8192-token chunks: `vllm serve`'s own max_num_batched_tokens on an H100 or H200 (vLLM's
#          OPENAI_API_SERVER default for GPUs of >= 70 GiB; `LLM(...)` and the other steps take 16384)
#   floor8k the work floor with 8192-token chunks: first 32K, 12 concurrent 32K prompts, 16K and 32K cached + 2048,
#          2560 and 4096 new tokens, with PLANS="antidiagonal-7.5-s16-int8-tail antidiagonal-7.5-s16-int8-tail-w64m"
#          (then the auto floor, 96M, and 64M: which sends the concurrent prompts' [8K, 16K) chunks sparse, and
#          32K + 2048 / 16K + 4096 too; ran H100 2026-12-07: none below dense beyond 1%, and `auto` became 64M) (~450 s)
#   ktest  the sparse attention kernels' tests, compiled (FA3 and Triton, a page list per KV head and per q head)
#   kern   benchmarks/kernels.py --head-lists: a page list per q head, heads keeping different blocks, vs the
#          same blocks (deliverable 4's target), 128K prompt and a 16K chunk after 112K
#   packk  benchmarks/kernels.py --packed at 64K and 32K, a 16K chunk, 128-token blocks and tiles (the timing plans'
#          geometry), 7.5% and 12.5% kept: the lists' calls one per list (what a 16K chunk runs) and in one call, against
#          dense FA3 over the same chunk: how much of the sparse attention's cost per block over dense's is the calls'
#          last waves (eight calls a layer, ~4 waves each). H100 2026-12-07: the one call, copies included, 1.02-1.20x
#          the calls per list (its copies were not timed alone then; the benchmark now times them), the lists' calls
#          1.13-1.25x dense's time per kept pair
#   pagek  benchmarks/kernels.py as packk (no packed call), with KV pages of 16 tokens (vLLM 0.26's default on CUDA) and
#          of 128 (one per selection block, FA3's key tile: its TMA loads), in one call: dense FA3 and the lists' calls
#          at both page sizes (whether a larger page is a lever for either, and how much of it dense takes too; H100
#          2026-12-07: dense 8-11% faster at 128, the lists 6-9%: no lever against dense)
#   stages benchmarks/e2e.py with CUDA graphs at 32K/64K/128K, dense and PLANS' first plan, every prefill
#          profiled: time to first token and where its GPU time goes (linear, estimation, selection, attention)
#   gtest  the GPU engine tests (tests/test_engine_gpu.py): chats beside a sparse prefill with CUDA graphs, keep-all
#          and dense plans against the stock backend, the sparse engine against its torch reference (~300 s)
#   resv   the decode page summaries' reservation, taken again once the weights are loaded: its GPU test
#          (tests/test_decode_reservation.py) and one Quest engine beside the stock one (~150 s)
#   dtest  the GPU decode engine tests (tests/test_engine_decode_gpu.py): sparse decode, prefix-cache hits (~510 s:
#          9 passed in 505 s, H100 2026-12-07; a call of 420 s cut it)
#   pagesz the KV page size SPARSE asks vLLM for (vLLM 0.34 defaults to 64 on CUDA): the unit test, then the Quest
#          engine with vLLM's default page set to 64 beside the same plan at --block-size 16 (two engines, ~280 s)
#   pair   128K + 8 and + 256 follow-ups with `--paired`: dense and the first plan's engine alive in one process,
#          each turn on both back to back in alternating order, 11 steady turns each (host-bound turns then share
#          the host's drift, which two processes do not); PAIR_DOCS / PAIR_FOLLOW: other cached lengths / new tokens;
#          PAIR_KV_GIB: each engine's KV cache (default 24 GiB on an H200; 17 on an H100, where 24 ran out of memory
#          and 17 holds the 128K document: ran, H100 2026-12-06)
#   fp8    an fp8 KV cache through the sparse paths (issue 29): the fp8 tests against the torch reference (FA3 with
#          vLLM's descales included), no compile after the warm-up with fp8 pages, the engine tests with
#          kv_cache_dtype fp8 (tests/test_engine_fp8_gpu.py) (~300 s)
#   fp8b   the fp8 engine tests left out of `fp8`: scales vLLM computes from the data (calculate_kv_scales, vLLM 0.26)
#          and the fp8 decode path in CUDA graphs (tests/test_engine_fp8_scales_graphs_gpu.py, four engines, ~300 s)
#   fp8e2e benchmarks/e2e.py with --kv-cache-dtype fp8 at 32K and 128K, dense and PLANS' first plan, CUDA graphs
#   conc   12 concurrent 32K prompts alone, CUDA graphs, with CUDA_SCALE_LAUNCH_QUEUES=4x (a deeper launch queue: the
#          batch's first tokens waited behind a sparse step's ~1,000 launches), dense and PLANS' first plan
#   cprof  12 concurrent 32K prompts, CUDA graphs, dense and PLANS' first plan: the two measured rounds, then a third
#          under the profiler in each engine (where the sparse engine's ~15 ms a request over its single 32K
#          prompt goes: the mixed steps' decode rows, their sub-batch, chunks cut off the block grid)
#   rtime  benchmarks/refusal_time.py: how long a bad config takes to stop an engine of the Llama-3.1-8B shape,
#          refused as its config is made vs in the worker (~120 s)
#   selcmp the block selection kernel's time per chunk-layer (per-kernel times of benchmarks/estimators.py, 16K queries,
#          stride-16 int8 scores) at 64K, 128K and 1M (2026-12-04: 76.6 us at 64K and 128K, 846 us at 1M: ~0.5% of a
#          64K prefill, so the branch select-multiway, a 16-way level search, cannot move 32K or 64K; it ran with
#          the checkout's package, which the benchmark puts first on sys.path). Since 2026-12-04 (fifteenth session)
#          the kernel's score levels are int32 (were int64): 55.4 / 55.7 / 714 us (H200, 2026-12-05).
#          Tables here are the Llama layout (a list per KV head, 4 q heads unioned)
#   fa2    the opt-in FA2 path (VLLM_SPARSE_KERNEL=fa2; the shared staging drops FA2's library, so carry it first
#          with scripts/stage-fa2.sh, two more calls): its tests against the torch reference and the warm-up's, then
#          benchmarks/kernels.py --fa-version 2 (sparse FA2 over compacted tables vs dense FA2, a 16K chunk after
#          112K and the whole 128K prompt). First run 2026-12-05 (H100): 50 cases passed before its time ran out
#   fa2e   benchmarks/e2e.py with every engine on FA2 (--flash-attn-version 2) at 32K and 128K, dense and PLANS'
#          first plan, CUDA graphs (2026-12-05: dense 1.66 s / 18.2 s; the sparse engine was cut while starting)
#   temps  benchmarks/estimators.py at 128K-1M contexts: one 16K chunk-layer's temporaries (peak GPU memory above
#          the inputs) beside the bound the engine counts for them in vLLM's memory profile
#   probe  the sparse engine alone with VLLM_SPARSE_LOG_COMPILES=1: a 32K prompt, then follow-ups of 2048 and 3072
#          tokens on a cached 128K document (the first 128K + 2048 turn took 457 ms against 170-240 ms later): which
#          Triton kernel, if any, a turn waited for
#   sstages the first plan's prefills at 32K and 64K profiled, the sparse engine alone: where its time goes
#   seltest the selection kernels' and FA3-compact tests compiled, and no kernel compiles after the warm-up
#   hostgap dense-routed 128K + 8 and + 256 follow-ups, each engine in its own process (dense, PLANS' first plan, dense
#          again), 5 steady turns each, with workload.py's host probes (each turn's host speed, its thread's time on a
#          CPU and waiting, other threads' CPU, Python's collections); then the host's speed alone (host_speed.py) and
#          the turns compared at equal probe times (host_matched.py). 2026-12-04: two dense processes differed by
#          0.74x, the probe alone by 2x on one idle CPU; at equal probe times SPARSE 0.96-0.99x (+8), 0.99-1.04x
#          (+256). On a machine with more than one NUMA node and numactl, the engines again bound to node 0
#   hostpath one sparse chunk-layer's host work and GPU time on the real kernels, a call per page list and one call
#          for all (VLLM_SPARSE_FA_PACK_LISTS), dense FA3 over the same chunk beside (benchmarks/host_path.py --device
#          cuda: 128K + 2048 and + 8192, 32K + 8192, 48K + 16K), then the packed call's GPU tests
#   wlpack the follow-up classes WLPACK_DOCS + WLPACK_FOLLOW, CUDA graphs, dense and PLANS' first plan, with
#          VLLM_SPARSE_FA_PACK_LISTS=1, then =0, in one call (two runs of two engines). Default 16K and 32K + 2048 and
#          + 4096: 16K + 4096 and 32K + 2048 / + 4096 sparse at the 64M floor (16K + 2048 under it: the dense path's
#          control), 32K + 2048 host-bound (its first step() back after 60-65 ms on one host, 96-113 on a slower one,
#          against dense's ~20-30; GPU ~59 ms against ~98: 1.53x / 1.09x, H100 2026-12-07), where a list's call
#          each costs the most host time; the 2026-12-05 run (32K and 128K + 2048 and + 8192: 128K + 2048 170.9 vs
#          171.1 ms) had none of them sparse. Packing works under a dense tail since 2026-12-07 (before, it declined:
#          the 7.5% + tail timing plan never packed): PLANS=antidiagonal-7.5-s16-int8-tail. First, tests/test_dense_tail.py's
#          GPU tests (FA3 over the packed call's sequences without queries) (~520 s in all)
#   hostprof where a host-bound sparse follow-up's host time goes: 32K + 2048 with 8K chunks, dense and PLANS' first
#          plan, one more turn under the torch profiler with Python stacks (its table's last section: the plugin's,
#          Triton's and FlashAttention's Python frames by host time, where the profiler recorded Python frames) and one
#          under cProfile (`--pyprofile`: every Python function of the engine's thread by own and total time,
#          `*.cprofile.txt`, which needs no profiler support), with the torch profile's timeline (`--trace`,
#          `*.trace.json.gz`: whether the GPU idles while the host launches); the six profile files in
#          workload_hostprof_profiles.tgz (~220 s)
#   ftrace  where a first turn's time outside the GPU's kernels goes: a fresh 32K prompt, dense and PLANS' first plan,
#          under the torch profiler with its timeline, summarised by benchmarks/trace_summary.py (the host's lead
#          before the first kernel, the GPU's idle gaps, the trail after the last; the traces themselves are not
#          kept), then 32K and 64K first turns measured (~400 s on a fresh machine; H100 2026-12-07: the 7.5% + tail
#          plan's 32K turn ~50 ms beyond its kernels, dense's ~32 ms)
#   packtest the GPU tests of packing as the default (2026-12-07): the fp8 path with FA3 packed (`fa3-packed`; passed
#          on an H100 2026-12-07, so an fp8 cache packs too), the dense tail's FA3 tests, the warm-up (no kernel compiled
#          after it, packing now on), the packed FlashAttention cases over compacted tables (~3 min)
#   splits  FA3 over compacted tables under the num_splits rule vs FA3's own split heuristic vs a capped split count:
#          time and temporaries (16K, 4K and 2K-token chunks at 64K and 128K, 10% of blocks)
#   guard  the `dense_above` rule (2026-12-05 H100, first chunks not yet counted: 0.97x / 0.99x; counted since):
#          tests/test_density_guard.py on the GPU,
#          then benchmarks/e2e.py with CUDA graphs at 32K and 128K: dense, the shipped configs/llama-3.yaml (its tau
#          0.9 keeps ~90% of the blocks on dummy weights: the rule's case) and the same plan with dense_above 1 (off)
#   ratios benchmarks/e2e.py with CUDA graphs at 32K, 64K and 128K: dense and fixed budgets above 10%, the 15% stride-16
#          plan and RATIO_PLAN (default antidiagonal-20-s16-int8; or antidiagonal-15-int8, stride 8), whose gemma twins
#          device-million.sh `fidr` measures: the speed of the sparsest fixed budget that gives dense's answers
#   tailr  benchmarks/e2e.py with CUDA graphs at 32K, 64K and 128K: dense, the 10% stride-16 int8 plan with
#          `dense_tail: 128` and without it, in one run (what the tail costs; 2026-12-06 H100, the tail's rows in the
#          per-list calls: 1.23x / 1.52x / 1.94x against 1.43x / 1.85x / 2.57x; in one dense call, the same day:
#          1.41x / 1.80x / 2.53x against 1.42x / 1.84x / 2.58x);
#          then `python3 -m pytest tests/test_dense_tail.py` (FA3's dense call on the GPU). The follow-up turns,
#          where a tail costs most (a 2K-token chunk's 128 dense rows): `PLANS=antidiagonal-10-s16-int8-tail ... wlg`
#   tail5r benchmarks/e2e.py with CUDA graphs at 32K, 64K and 128K: dense, the 5% and 7.5% stride-16 int8 plans with
#          `dense_tail: 128` (device-million.sh `fidt5` / `fidt5b` their twins; 5% + tail with dense rows below 4K was
#          left out: its twin lost 8 passkeys of 20 at 16K and at 29K, H100 2026-12-06)
#   tail75r the 7.5% and 10% stride-16 int8 tail plans beside dense in one run (tail5r timed 7.5% in a run whose dense
#          was 1.5-2.3% slower than tailr's: the two plans' ratios from one dense); device-million.sh `fidt75` its twin
#   suite  the README's test command on the GPU host, engine tests left to their own steps (-m "not engine"): the files
#          after tests/test_prefill_warmup.py first (2026-12-05 H100: ~555 non-engine tests passed, none failed, up to
#          that file before the call's time ended; 2026-12-06: ~260 from the other end in 300 s, two CPU twins failed
#          there, fixed); SUITE_FILES="tests/a.py tests/b.py": those files instead (the ones a cut call left)
# WL_ARGS: more workload.py arguments (e.g. a shorter traffic where one call's time is short); DENSE_AGAIN=1: a
# second dense engine last (the spread between two engines of the same kind); SPARSE_FIRST=1: the plans' engines
# before the dense one.
set -o pipefail
budget=${1:?seconds}; shift
DONE_DIR=/tmp/workload-done
source scripts/device-common.sh

PLANS=${PLANS:-"antidiagonal-10 antidiagonal-10-every-chunk"}
DENSE_AGAIN=${DENSE_AGAIN:+--dense-again}
SPARSE_FIRST=${SPARSE_FIRST:+--sparse-first}
plan_args() {  # --config the first plan, --extra-config the others
  local flag=--config p
  for p in $PLANS; do printf '%s benchmarks/configs/llama-3-8b-%s.yaml ' $flag "$p"; flag=--extra-config; done
}
workload() {  # workload OUT_NAME [--graphs]
  local name=$1; shift
  timeout $(( $(left) - 5 )) python3 benchmarks/workload.py "$@" $(plan_args) --profile "${PROFILE:-follow:32768+256}" $DENSE_AGAIN $SPARSE_FIRST \
    --timeout $(( $(left) - 15 )) ${WL_ARGS:-} --out "$OUT/$name.json" 2>&1 \
    | engine_lines | tee "$OUT/$name.log"
}
wl() { workload workload_eager; }
wlg() { workload workload_graphs --graphs; }
wl8k() { workload workload_graphs_chunk8k --graphs --chunk 8192; }
floor8k() {
  PROFILE=${PROFILE:-follow:32768+2048} workload workload_graphs_floor8k --graphs --chunk 8192 --first 32768 \
    --docs 16384,32768 --follow 2048,2560,4096 --beside 0 --concurrent 12 --reserve 120
}
ktest() { timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider tests/test_sparse_kernel.py 2>&1 | tail -15; }
kern() {
  timeout $(( $(left) - 5 )) python3 benchmarks/kernels.py --contexts 131072 --modes prompt,chunk --densities "" \
    --head-lists 0.1,0.05 --out "$OUT/kernels_head_lists.json" 2>&1 | tail -12
}
stages() {
  local first=${PLANS%% *}
  timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --graphs --decode-batch 0 --repeats 2 \
    --lengths 32768,65536,131072 --profile 32768,65536,131072 --config "benchmarks/configs/llama-3-8b-$first.yaml" \
    --out "$OUT/e2e_stages.json" 2>&1 | engine_lines | grep -v "^stages " \
    | tee "$OUT/e2e_stages.log" | tail -30
}

probe() {
  VLLM_SPARSE_LOG_COMPILES=1 timeout $(( $(left) - 5 )) python3 benchmarks/workload.py --graphs --only sparse \
    --config "benchmarks/configs/llama-3-8b-${PLANS%% *}.yaml" --first 32768 --first-repeats 1 --docs 131072 \
    --follow 2048,3072 --follow-repeats 2 --beside 0 --concurrent 0 --timeout $(( $(left) - 15 )) \
    --out "$OUT/probe.json" 2>&1 | grep -v "Capturing CUDA" | tee "$OUT/probe.log" | grep -v '^\[.*\] {' | tail -40
}
sstages() {
  timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --graphs --decode-batch 0 --repeats 2 --only sparse \
    --lengths 32768,65536 --profile 32768,65536 --config "benchmarks/configs/llama-3-8b-${PLANS%% *}.yaml" \
    --out "$OUT/e2e_sstages.json" 2>&1 | grep -v "Capturing CUDA" | tee "$OUT/e2e_sstages.log" | tail -30
}
seltest() {
  timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider tests/test_selection_kernels.py \
    tests/test_sparse_kernel.py tests/test_warmup_gpu.py 2>&1 | tee "$OUT/seltest.log" | tail -15
}
splits() {
  local chunk
  for chunk in 16384 4096 2048; do
    timeout $(( $(left) - 5 )) python3 benchmarks/kernels.py --contexts 65536,131072 --modes chunk --densities 0.1 \
      --chunk $chunk --out "$OUT/kernels_splits_$chunk.json" 2>&1 | tee "$OUT/kernels_splits_$chunk.log" | tail -6
  done
}
gtest() {
  timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider -rfE tests/test_engine_gpu.py 2>&1 \
    | tee "$OUT/gpu_engine_tests.log" | tail -15
}
resv() {  # the page summaries' reservation taken again after the weights load: its GPU test, then a Quest engine
  timeout $(( $(left) - 5 )) python3 -m pytest -q -s -p no:cacheprovider -rfE tests/test_decode_reservation.py \
    "tests/test_engine_decode_gpu.py::test_sparse_decode_selects_pages_for_long_contexts_only" 2>&1 \
    | tee "$OUT/resv.log" | grep -E "page summaries|passed|failed|rror" | tail -20
}
dtest() {
  timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider -rfE tests/test_engine_decode_gpu.py 2>&1 \
    | tee "$OUT/gpu_engine_decode_tests.log" | tail -15
}
pagesz() {
  timeout 120 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_plugin.py -k page_size 2>&1 | tail -2
  timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider -rfE tests/test_engine_decode_gpu.py \
    -k larger_default 2>&1 | tee "$OUT/page_size_gpu.log" | tail -6
}
pair() {
  # Two engines of 15 GiB weights each: 24 GiB of KV each fits an H200 (139 GiB); on an H100 (79 GiB) 24 ran out of
  # memory (2026-12-06); 17 GiB holds a 128K document (16 GiB) and its follow-ups.
  local gib=$(( $(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1) > 100000 ? 24 : 17 ))
  timeout $(( $(left) - 5 )) python3 benchmarks/workload.py --graphs --paired \
    --config "benchmarks/configs/llama-3-8b-${PLANS%% *}.yaml" --first= --docs "${PAIR_DOCS:-131072}" \
    --follow "${PAIR_FOLLOW:-8,256}" --follow-repeats 11 --beside 0 --concurrent 0 --engine "{\"kv_cache_memory_bytes\": $(( ${PAIR_KV_GIB:-$gib} << 30 )), \"gpu_memory_utilization\": 0.45}" \
    --timeout $(( $(left) - 15 )) --out "$OUT/workload_paired.json" 2>&1 \
    | engine_lines | grep -v "Capturing CUDA" | tee "$OUT/workload_paired.log" | tail -12
}
fp8() {
  timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider -rfE tests/test_fp8_path.py tests/test_warmup_gpu.py \
    tests/test_engine_fp8_gpu.py 2>&1 | tee "$OUT/fp8_tests.log" | tail -15
}
fp8b() {
  timeout $(( $(left) - 5 )) python3 -m pytest -q -s -p no:cacheprovider -rfE tests/test_engine_fp8_scales_graphs_gpu.py 2>&1 \
    | grep -v "^\[\|Capturing CUDA" | tee "$OUT/fp8b_tests.log" | tail -15
}
fp8e2e() {
  timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --graphs --decode-batch 0 --repeats 2 --kv-cache-dtype fp8 \
    --lengths 32768,131072 --config "benchmarks/configs/llama-3-8b-${PLANS%% *}.yaml" --out "$OUT/e2e_fp8.json" 2>&1 \
    | engine_lines | grep -v "Capturing CUDA" | tee "$OUT/e2e_fp8.log" | tail -20
}
conc() {
  CUDA_SCALE_LAUNCH_QUEUES=4x timeout $(( $(left) - 5 )) python3 benchmarks/workload.py --graphs \
    --config "benchmarks/configs/llama-3-8b-${PLANS%% *}.yaml" --first= --docs= --follow= --beside 0 --concurrent 12 \
    --concurrent-len 32768 --timeout $(( $(left) - 15 )) --out "$OUT/workload_conc_queues4x.json" 2>&1 \
    | engine_lines | grep -v "Capturing CUDA" | tee "$OUT/workload_conc_queues4x.log" | tail -12
}
cprof() {
  timeout $(( $(left) - 5 )) python3 benchmarks/workload.py --graphs \
    --config "benchmarks/configs/llama-3-8b-${PLANS%% *}.yaml" --first= --docs= --follow= --beside 0 --concurrent 12 \
    --concurrent-len 32768 --profile concurrent:12x32768 --timeout $(( $(left) - 15 )) \
    --out "$OUT/workload_conc_profile.json" 2>&1 \
    | engine_lines | grep -v "Capturing CUDA" | tee "$OUT/workload_conc_profile.log" | tail -14
}
rtime() {
  timeout $(( $(left) - 5 )) python3 benchmarks/refusal_time.py --out "$OUT/refusal_time.json" 2>&1 \
    | grep -v "Capturing CUDA" | tee "$OUT/refusal_time.log" | tail -8
}
selcmp() {
  local ctx
  for ctx in 65536 131072 1048576; do
    timeout $(( $(left) - 5 )) python3 benchmarks/estimators.py --ctx $ctx --only antidiagonal_s16_int8 \
      --skip-torch antidiagonal_s16_int8 --kernel-times --out "$OUT/selcmp_$ctx.json" 2>&1 | tail -2
    python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['rows'][0]; print($ctx, 'kernels ms', round(r['kernels_ms'],3), {k: round(v,1) for k, v in r.get('kernel_us', {}).items() if 'select' in k or 'table' in k or 'union' in k})" "$OUT/selcmp_$ctx.json"
  done
}
guard() {
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_density_guard.py -k "not engine" 2>&1 | tail -3
  python3 -c "import yaml; c = yaml.safe_load(open('configs/llama-3.yaml')); [m.update(dense_above=1) for m in c['models']]; yaml.safe_dump(c, open('/tmp/llama-3-dense-above-off.yaml', 'w'))"
  timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --graphs --decode-batch 0 --repeats 2 --no-kept \
    --lengths 32768,131072 --config configs/llama-3.yaml --extra-config /tmp/llama-3-dense-above-off.yaml \
    --out "$OUT/e2e_guard.json" 2>&1 | engine_lines | grep -v "Capturing CUDA" \
    | tee "$OUT/e2e_guard.log" | tail -20
}
fa2_ready() {
  # The shared staging leaves FA2's library out (2026-12-05: this step's tests then skipped and its engines stopped
  # at start, dense ones included): stage it with scripts/stage-fa2.sh (two more calls), or say so and stop.
  [ -f /tmp/stage/fa2.so.sha256 ] && ls /tmp/stage/fa2.so.xz.01 >/dev/null 2>&1 && bash scripts/stage-fa2.sh --unpack
  if ! python3 -c "import sys; from vllm.vllm_flash_attn import FA2_AVAILABLE; sys.exit(not FA2_AVAILABLE)" 2>/dev/null; then
    echo "fa2: this vLLM has no FA2 library (vllm_flash_attn/_vllm_fa2_C.abi3.so): carry it, scripts/stage-fa2.sh"
    return 1
  fi
}
fa2() {
  fa2_ready || return 1
  # (2026-12-05, H100: 50 cases passed in 140 s and were cut there, the kernels' last row in its 140 s: each part
  # now has its own share, and the engines their own step, fa2e)
  timeout $(( $(left) / 2 )) python3 -m pytest -q -p no:cacheprovider -rfE tests/test_sparse_kernel.py \
    tests/test_warmup_gpu.py -k fa2 2>&1 | tee "$OUT/fa2_tests.log" | tail -6
  timeout $(( $(left) - 5 )) python3 benchmarks/kernels.py --fa-version 2 --contexts 131072 --modes chunk,prompt \
    --densities 0.1,1.0 --out "$OUT/kernels_fa2.json" 2>&1 | tee "$OUT/kernels_fa2.log" | tail -10
}
fa2e() {
  local first=${PLANS%% *}
  fa2_ready || return 1
  VLLM_SPARSE_KERNEL=fa2 timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --graphs --decode-batch 0 --repeats 2 \
    --lengths 32768,131072 --flash-attn-version 2 --config "benchmarks/configs/llama-3-8b-$first.yaml" \
    --out "$OUT/e2e_fa2.json" 2>&1 | engine_lines | tee "$OUT/e2e_fa2.log" | tail -12
}
temps() {
  local ctx
  for ctx in 131072 262144 524288 1048576; do
    timeout $(( $(left) - 5 )) python3 benchmarks/estimators.py --ctx $ctx --block 128 --budget keep:0.1 \
      --only antidiagonal_s8,vertical_slash --skip-torch antidiagonal_s8,vertical_slash \
      --out "$OUT/temporaries_$ctx.json" 2>&1 | tail -3
  done
}
hostpath() {
  local rc=0
  # (2026-12-05, H100: the first chunk-layers compile; four cases x two settings took over 94 s)
  timeout $(( $(left) - 60 )) python3 benchmarks/host_path.py --device cuda --pack-lists both --repeats 10 \
    --cases 131072+2048,131072+8192,32768+8192 --out "$OUT/host_path_cuda.json" 2>&1 \
    | tee "$OUT/host_path_cuda.log" | tail -12 || rc=$?
  timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider -rfE tests/test_sparse_kernel.py -k packed 2>&1 \
    | tee "$OUT/packed_tests.log" | tail -4 || rc=$?
  return $rc
}
wlpack() {  # (two processes: compare each run's dense / SPARSE ratio, not SPARSE's times across runs)
  local flag rc=0
  # FA3 itself over the packed call's sequences without queries (a dense tail's tiles), before timing it
  timeout 120 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_dense_tail.py -k gpu 2>&1 | tail -3
  for flag in 1 0; do
    VLLM_SPARSE_FA_PACK_LISTS=$flag timeout $(( $(left) / (flag + 1) - 5 )) python3 benchmarks/workload.py --graphs \
      --config "benchmarks/configs/llama-3-8b-${PLANS%% *}.yaml" --first= --docs "${WLPACK_DOCS:-16384,32768}" \
      --follow "${WLPACK_FOLLOW:-2048,4096}" \
      --follow-repeats 4 --beside 0 --concurrent 0 --reserve 75 --timeout $(( $(left) / (flag + 1) - 15 )) \
      --out "$OUT/workload_pack$flag.json" 2>&1 | engine_lines \
      | grep -v "Capturing CUDA" | tee "$OUT/workload_pack$flag.log" | grep -v '^\[.*\] {"class": "follow' | tail -14 \
      || rc=$?
  done
  return $rc
}
packtest() {
  timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider -rfE tests/test_fp8_path.py \
    "tests/test_dense_tail.py" tests/test_warmup_gpu.py "tests/test_sparse_kernel.py" -k "fp8 or warm or packed or attends_the_tail" \
    2>&1 | tee "$OUT/packtest.log" | tail -15
}
hostprof() {  # (dense and the first plan only; the profiles packed into one file: $OUT returns at most 8)
  local rc=0
  timeout $(( $(left) - 5 )) python3 benchmarks/workload.py --graphs --chunk 8192 \
    --config "benchmarks/configs/llama-3-8b-${PLANS%% *}.yaml" --first= --docs 32768 --follow 2048 --beside 0 \
    --concurrent 0 --profile follow:32768+2048 --pyprofile --trace --reserve 110 --timeout $(( $(left) - 15 )) \
    --out "$OUT/workload_hostprof.json" 2>&1 | engine_lines \
    | grep -v "Capturing CUDA" | tee "$OUT/workload_hostprof.log" | tail -8 || rc=$?
  (cd "$OUT" && tar czf workload_hostprof_profiles.tgz workload_hostprof.profile-* && rm -f workload_hostprof.profile-*)
  return $rc
}
ftrace() {  # (dense and the first plan: a fresh 32K turn profiled with its timeline, then 32K / 64K measured)
  local rc=0 t
  timeout $(( $(left) - 20 )) python3 benchmarks/workload.py --graphs \
    --config "benchmarks/configs/llama-3-8b-${PLANS%% *}.yaml" --first 32768,65536 --docs= --follow= --beside 0 \
    --concurrent 0 --profile first:32768 --trace --reserve 100 --timeout $(( $(left) - 30 )) \
    --out "$OUT/workload_ftrace.json" 2>&1 | engine_lines \
    | grep -v "Capturing CUDA" | tee "$OUT/workload_ftrace.log" | tail -8 || rc=$?
  for t in "$OUT"/workload_ftrace.profile-*.trace.json.gz; do
    [ -e "$t" ] && python3 benchmarks/trace_summary.py "$t" --top 25
  done 2>&1 | tee "$OUT/workload_ftrace_timeline.txt"
  rm -f "$OUT"/workload_ftrace.profile-*.trace.json.gz  # (tens of MB each: the summary above is what returns)
  (cd "$OUT" && tar czf workload_ftrace_profiles.tgz workload_ftrace.profile-* && rm -f workload_ftrace.profile-*)
  return $rc
}
hostgap() {
  local pass nodes runs=()
  nodes=$(ls -d /sys/devices/system/node/node[0-9]* 2>/dev/null | wc -l)
  echo "NUMA nodes: $nodes; numactl: $(command -v numactl || echo absent)"
  for pass in all node0; do
    local pin=()
    if [ $pass = node0 ]; then
      [ "$nodes" -gt 1 ] && command -v numactl > /dev/null || break
      pin=(numactl --cpunodebind=0 --membind=0)
    fi
    # (--reserve 75: a warm engine here starts in 20-55 s and runs its turns in ~15 s; the first, cold, in >100 s)
    timeout $(( $(left) - 40 )) "${pin[@]}" python3 benchmarks/workload.py --graphs --dense-again --reserve 75 \
      --config "benchmarks/configs/llama-3-8b-${PLANS%% *}.yaml" --first= --docs 131072 --follow 8,256 \
      --follow-repeats 5 --beside 0 --concurrent 0 --timeout $(( $(left) - 50 )) --out "$OUT/workload_hostgap_$pass.json" \
      2>&1 | engine_lines | grep -v "Capturing CUDA" \
      | tee "$OUT/workload_hostgap_$pass.log" | grep -v '^\[.*\] {"class": "follow' | tail -8
    runs+=("$OUT/workload_hostgap_$pass.json")
  done
  timeout 30 python3 benchmarks/host_speed.py --probes 300 --out "$OUT/host_speed.json"
  python3 benchmarks/host_matched.py "${runs[@]}" --out "$OUT/host_matched.json"
}

ttft_plans() {  # ttft_plans OUT_NAME PLAN...: benchmarks/e2e.py, CUDA graphs, TTFT_LENGTHS (32K-128K), dense and each llama-3-8b-PLAN
  local name=$1 flag=--config p args=(); shift
  for p in "$@"; do args+=("$flag" "benchmarks/configs/llama-3-8b-$p.yaml"); flag=--extra-config; done
  timeout $(( $(left) - 5 )) python3 benchmarks/e2e.py --graphs --decode-batch 0 --repeats 2 \
    --lengths "${TTFT_LENGTHS:-32768,65536,131072}" "${args[@]}" --out "$OUT/$name.json" 2>&1 \
    | engine_lines | grep -v "Capturing CUDA" | tee "$OUT/$name.log" | tail -20
}
packk() {
  VLLM_SPARSE_WORKSPACE_MIB=1024 timeout $(( $(left) - 5 )) python3 benchmarks/kernels.py --contexts 65536,32768 \
    --modes chunk --densities 0.075,0.125 --block 128 --tile 128 --packed --out "$OUT/kernels_packed.json" 2>&1 \
    | tee "$OUT/kernels_packed.log" | tail -16
}
pagek() {  # (each page size a run of its own, half the time each; a failed run's exit status returned)
  local page rc=0 t
  for page in 16 128; do
    t=$(( page == 16 ? ($(left) - 10) / 2 : $(left) - 5 ))
    [ "$t" -ge 20 ] || { echo "pagek: $t s left for pages of $page: not run"; rc=124; continue; }
    timeout $t python3 benchmarks/kernels.py --contexts 65536,32768 --modes chunk \
      --densities 0.075,0.125 --block 128 --tile 128 --page $page --out "$OUT/kernels_page$page.json" 2>&1 \
      | tee "$OUT/kernels_page$page.log" | tail -14 || rc=$?
  done
  return $rc
}
ratios() { ttft_plans e2e_ratios antidiagonal-15-s16-int8 "${RATIO_PLAN:-antidiagonal-20-s16-int8}"; }
tailr() {
  ttft_plans e2e_tail antidiagonal-10-s16-int8-tail antidiagonal-10-s16-int8
  timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider -rfE tests/test_dense_tail.py 2>&1 | tail -4
}
tail5r() { ttft_plans e2e_tail5 antidiagonal-5-s16-int8-tail antidiagonal-7.5-s16-int8-tail; }
tail75r() { ttft_plans e2e_tail75 antidiagonal-7.5-s16-int8-tail antidiagonal-10-s16-int8-tail; }
suite() {
  local files=${SUITE_FILES:-}
  [ -n "$files" ] || files="$(ls tests/test_*.py | awk '$0 > "tests/test_prefill_warmup.py"') $(ls tests/test_*.py | awk '$0 <= "tests/test_prefill_warmup.py"')"
  # shellcheck disable=SC2086
  timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider -rfE -m "not engine" $files 2>&1 \
    | tee "$OUT/suite_tests.log" | grep -v "^[0-9.]*s \(call\|setup\|teardown\)" | tail -15
}

run_steps "packk:60 pagek:100 hostpath:240 wlpack:520 packtest:240 hostprof:260 ftrace:420 hostgap:420 seltest:60 splits:90 probe:200 sstages:90 wl:300 wlg:300 wl8k:300 floor8k:400 ktest:60 kern:60 stages:300 gtest:400 resv:200 dtest:520 pagesz:300 pair:300 fp8:300 fp8b:360 fp8e2e:240 conc:240 cprof:420 rtime:150 selcmp:120 temps:60 fa2:400 fa2e:420 guard:420 ratios:480 tailr:480 tail5r:480 tail75r:480 suite:300" "$@"
