#!/bin/bash
# vLLM's FlashAttention-2 build for the GPU machine, which the shared staging leaves out
# (../shared/device/stage-vllm.sh removes vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so to fit its three chunks), so that
# the opt-in FA2 path (VLLM_SPARSE_KERNEL=fa2) can run there: `bash scripts/device-workload.sh 430 fa2`.
# Run from the checkout's root after stage-vllm.sh (it reuses its wheel in $STAGE_WORK, else downloads vLLM's).
# Writes .stage/f1 and .stage/f2 (~43 MB each: the 305 MB library, xz-compressed, in two pieces; .stage/ is
# git-ignored). On the GPU machine, after the three calls of ../shared/device/README.md, two more calls:
#   carry [".stage/f1"]:  mkdir -p /tmp/stage && cp .stage/f1/* /tmp/stage/
#   carry [".stage/f2"]:  cp .stage/f2/* /tmp/stage/ && bash scripts/stage-fa2.sh --unpack; <command>
set -euo pipefail
so=vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so
if [ "${1:-}" = --unpack ]; then  # on the GPU machine: put the library where vLLM 0.26 imports it from
  [ -f "/tmp/site/$so" ] && exit 0
  cat /tmp/stage/fa2.so.xz.* | xz -dc > "/tmp/site/$so.part"
  if ! echo "$(cat /tmp/stage/fa2.so.sha256)  /tmp/site/$so.part" | sha256sum -c - >/dev/null; then
    rm -f "/tmp/site/$so.part"; echo "stage-fa2: the carried FA2 library fails its checksum (a chunk missing or cut)"; exit 1
  fi
  mv "/tmp/site/$so.part" "/tmp/site/$so"
  PYTHONPATH=/tmp/site python3 -c "from vllm.vllm_flash_attn import FA2_AVAILABLE; print('FA2_AVAILABLE', FA2_AVAILABLE)"
  exit 0
fi
VLLM_VERSION=${VLLM_VERSION:-0.26.0}
work=${STAGE_WORK:-/tmp/vllm-stage}
mkdir -p "$work/wheels"
wheel=$(ls "$work"/wheels/vllm-"$VLLM_VERSION"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    -d "$work/wheels" "vllm==$VLLM_VERSION"
  wheel=$(ls "$work"/wheels/vllm-"$VLLM_VERSION"-*.whl | head -1)
fi
tmp=$(mktemp -d)
python3 -c "import sys, zipfile; open(sys.argv[3], 'wb').write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))" \
  "$wheel" "$so" "$tmp/fa2.so"
sha256sum "$tmp/fa2.so" | cut -c1-64 > "$tmp/fa2.so.sha256"
xz -T2 -6 "$tmp/fa2.so"
rm -rf .stage/f1 .stage/f2 && mkdir -p .stage/f1 .stage/f2
split -n 2 -d -a 2 "$tmp/fa2.so.xz" "$tmp/fa2.so.xz."
mv "$tmp/fa2.so.xz.00" "$tmp/fa2.so.sha256" .stage/f1/ && mv "$tmp/fa2.so.xz.01" .stage/f2/
rm -rf "$tmp"
du -sh .stage/f1 .stage/f2
