#!/usr/bin/env bash
# On the device: join the pieces that bench/gpu_vllm_carry.py made, check them, unpack.
#   bash bench/gpu_vllm_install.sh PIECES_DIR TARGET   then: export PYTHONPATH=TARGET/site
set -euo pipefail
src=$1; dst=$2
want=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['sha256'])" "$src/MANIFEST.json")
cat "$src"/vllm.tgz.[0-9][0-9][0-9] > "$src/vllm.tgz"
got=$(sha256sum "$src/vllm.tgz" | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "vllm.tgz: sha256 $got, manifest says $want (a piece is missing or broken)" >&2; exit 1; }
mkdir -p "$dst" && tar -xzf "$src/vllm.tgz" -C "$dst"
echo "unpacked to $dst/site; export PYTHONPATH=$dst/site VLLM_USE_FLASHINFER_SAMPLER=0"
