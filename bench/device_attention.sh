#!/usr/bin/env bash
# One device call for decode attention (issue 16, item 4; docs/gpu-kernels.md): the shape sweep of
# bench/gpu_attention.py first (results written per case), then the attention tests compiled.
#   OUT=dir bash bench/device_attention.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
python3 -m pip install -q --no-deps --no-build-isolation --ignore-requires-python -e . >"$OUT/install.log" 2>&1 \
  || { tail -5 "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "${BENCH_S:-210}" python3 bench/gpu_attention.py --out "$OUT" >"$OUT/attention.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/attention.log"
grep -v "^  sdpa" "$OUT/attention.log" | tail -30
timeout "${TEST_S:-40}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels_triton.py \
  -k "attention or kv_split or fold" >"$OUT/pytest_attention.log" 2>&1
echo "pytest rc=$?" | tee -a "$OUT/pytest_attention.log"
tail -6 "$OUT/pytest_attention.log"
