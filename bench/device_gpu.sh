#!/usr/bin/env bash
# The GPU half of the test suite and the kernel benchmark, in one device call (docs/gpu-kernels.md):
#   bash bench/device_gpu.sh [tests|bench|all]   (results under $OUT, or ./device-out)
# Runs under the device image's python3 (torch 2.11 + Triton 3.6); installs this checkout without deps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
what=${1:-all}
python3 -m pip install -q --no-deps --no-build-isolation --ignore-requires-python -e . >"$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"
status=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout 400 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels_triton.py tests/test_kernels_override.py \
    2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
  status=${PIPESTATUS[0]}
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 585 python3 bench/gpu_kernels.py --out "$OUT" ${QUICK:+--quick} 2>&1 | tee "$OUT/bench.log" | tail -80
fi
exit "$status"
