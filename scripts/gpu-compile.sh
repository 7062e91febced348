#!/usr/bin/env bash
# Compile every Triton kernel launch of the shipped and benchmark plans (the warm-up tests' launches) for GPU
# architectures, on a machine without a GPU, under a chosen Triton release (default: 3.6.0, the GPU image's):
# each variant must compile and fit the architecture's shared memory. A table per architecture is printed; the
# variants' registers, spills and shared memory go to benchmarks/results/gpu_compile_sm<ARCH>_triton<VERSION>.json.
# The CI subset (shipped plans, sm_90 and sm_89, the installed Triton) is tests/test_gpu_compile.py.
#
#   bash scripts/gpu-compile.sh [TRITON_VERSION] [ARCH...]
#   bash scripts/gpu-compile.sh 3.6.0 90 89 86 80 100
#
# fp8 caches are compiled for sm_90 and sm_100 only: vLLM's FlashAttention backend (whose kv-cache check SPARSE
# inherits) takes fp8 pages on Hopper (FA3) and, from vLLM 0.32, Blackwell (FA4) only, and refuses them elsewhere
# before the plugin runs (Triton has no fp8 e4m3 before sm_89). About 2 minutes per architecture.
set -uo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.6.0}; shift || true
archs=("$@"); [ ${#archs[@]} -gt 0 ] || archs=(90 89 86 80 100)
python=${PYTHON:-.venv/bin/python}
site=.stage/triton-$version  # (git-ignored)
if [ "$($python -c 'import triton; print(triton.__version__)')" != "$version" ]; then
  [ -d "$site/triton" ] || $python -m pip install -q --no-deps --target "$site" "triton==$version" || exit 1
  export PYTHONPATH="$PWD/$site${PYTHONPATH:+:$PYTHONPATH}"
fi
status=0
for arch in "${archs[@]}"; do
  select="not runs_its_kernels"
  # (FA3 runs on Hopper only: elsewhere FA2's tables and the Triton attention path)
  [ "$arch" = 90 ] || select="$select and not fa3"
  case $arch in 90|100) ;; *) select="$select and not fp8" ;; esac
  out=benchmarks/results/gpu_compile_sm${arch}_triton${version}.json
  $python -m pytest -q -p tests.gpu_compile -p no:cacheprovider --gpu-arch "$arch" --gpu-compile-json "$out" \
    tests/test_prefill_warmup.py tests/test_decode_warmup.py -k "$select" > "/tmp/gpu-compile-sm$arch.log" 2>&1 \
    || status=1
  sed -n '/^GPU compile for/,/^$/p' "/tmp/gpu-compile-sm$arch.log"
  grep -E '^(FAILED|ERROR) ' "/tmp/gpu-compile-sm$arch.log"  # (compile failures, and tests that failed)
  grep -q '^GPU compile for' "/tmp/gpu-compile-sm$arch.log" || tail -20 "/tmp/gpu-compile-sm$arch.log"
done
exit $status
