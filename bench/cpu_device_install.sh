#!/usr/bin/env bash
# On the device: join what bench/cpu_device_carry.sh made, check it, unpack Python 3.11 and the venv at
# the paths they were built at, and put this working tree at /work/main (where the editable install
# points). Prints the line to source for the session.
#   bash bench/cpu_device_install.sh PIECES_DIR
set -euo pipefail
src=$1; repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p /opt/invariant-extra && tar -xf "$src/extra.tar" -C /opt/invariant-extra
want=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['sha256'])" "$src/MANIFEST.json")
cat "$src"/cpu.tzst.[0-9][0-9][0-9] > "$src/cpu.tzst"
got=$(sha256sum "$src/cpu.tzst" | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "cpu.tzst: sha256 $got, manifest says $want (a piece is missing or broken)" >&2; exit 1; }
zstd=$(command -v zstd || echo "env LD_LIBRARY_PATH=/opt/invariant-extra /opt/invariant-extra/zstd")
$zstd -d -q -c "$src/cpu.tzst" | tar -x -C /
rm "$src/cpu.tzst"
if [ "$repo" != /work/main ]; then
  mkdir -p /work/main && tar -C "$repo" -cf - --exclude=./.carry --exclude=./.venv . | tar -x -C /work/main
fi
env_file=/opt/invariant-extra/env.sh; : > "$env_file"
py=/root/.pyenv/versions/3.11.7
if ldd $py/bin/python3.11 $py/lib/python3.11/lib-dynload/*.so 2>/dev/null | grep -q "not found"; then
  echo "export LD_LIBRARY_PATH=/opt/invariant-extra\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" >> "$env_file"
fi
. "$env_file"
PYTHONSAFEPATH=1 /work/main/.venv/bin/python -c 'import torch, vllm; print("installed: vllm", vllm.__version__, "torch", torch.__version__, "threads", torch.get_num_threads())'
echo "ready: . $env_file; cd /work/main"
