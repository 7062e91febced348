#!/bin/bash
# After ../shared/device/stage-vllm.sh: its three ~57 MB pieces (.stage/p1..p3) no longer fit a device call's 64 MiB
# carry beside this checkout (~9 MB tracked and growing), so the same archive is cut again into four ~41 MB pieces,
# .stage/p1 ... .stage/p4 (same checksum; the shared recv.sh / unpack.sh take any number of pieces). On the GPU
# machine: four calls, carry [".stage/bin", ".stage/pN"] with `bash .stage/bin/recv.sh`, the fourth followed by
# `bash .stage/bin/unpack.sh` as the shared README's third call is.
set -euo pipefail
tmp=$(mktemp -d)
cat .stage/p*/site.tar.xz.* > "$tmp/site.tar.xz"
echo "$(cat .stage/bin/sha256)  $tmp/site.tar.xz" | sha256sum -c - >/dev/null
rm -rf .stage/p[0-9]*
(cd "$tmp" && split -n 4 -d -a 2 site.tar.xz site.tar.xz. && rm site.tar.xz)
i=0
for piece in "$tmp"/site.tar.xz.*; do i=$((i + 1)); mkdir -p ".stage/p$i" && mv "$piece" ".stage/p$i/"; done
rmdir "$tmp"
du -sh .stage/p*
