#!/usr/bin/env bash
# The whole GPU-worker session on the device, in the background (docs/gpu-vllm.md):
#   setsid bash bench/gpu_session.sh /tmp/work &     after bench/gpu_vllm_install.sh put vLLM on PYTHONPATH
# Steps, each under its own time limit so one hang does not cost the rest; progress in WORK/progress,
# each step's log in WORK/, WORK/DONE at the end. Fetch WORK with: tar -czf $OUT/work.tgz -C WORK .
# A short lease runs part of it: STEPS="make pytest_vllm" PYTEST_K="chunked or eager" bash bench/gpu_session.sh
set -u
STEPS=${STEPS:-make gemm_canary attention profile sampler probe pytest_vllm cost canary_cost pytest_worker pytest_kernels determinism}
PYTEST_K=${PYTEST_K:-}
PYTEST_K_VLLM=${PYTEST_K_VLLM:-$PYTEST_K}  # -k for tests/test_gpu_vllm.py alone
PYTEST_K_WORKER=${PYTEST_K_WORKER:-$PYTEST_K}
cd "$(dirname "$0")/.."
W=${1:-/tmp/work}; mkdir -p "$W"
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1
. bench/session_step.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >"$W/gpu.txt"
step make 120 python3 -m invariant.cli model make --size medium --quiet "$W/medium"
export INVARIANT_GPU_MODEL=$W/medium
# The GEMM canary alone, early (~1-2 min): its seconds per shape, 1 thread vs the worker's 8, and the controls
step gemm_canary 400 python3 -m pytest -m gpu -v -rP -p no:cacheprovider tests/test_kernel_canary.py -k "gemm_canary"
step attention 300 env OUT="$W/attention" bash bench/device_attention.sh
step profile 600 python3 bench/gpu_decode_profile.py "$W/medium" --out "$W/profile"
step sampler 120 python3 bench/gpu_sampler_probe.py --out "$W/sampler"
step probe 120 python3 bench/gpu_leak_probe.py --out "$W/probe"
step pytest_vllm 900 python3 -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu_vllm.py ${PYTEST_K_VLLM:+-k "$PYTEST_K_VLLM"}
step cost 900 python3 bench/gpu_worker_cost.py "$W/medium" --out "$W/cost" --modes "${COST_MODES:-stock,invariant,invariant+vllm-gemm,invariant+our-gemm}" --waves "${COST_WAVES:-7}"
step canary_cost 600 python3 bench/canary_cost.py --models medium --reps ${CANARY_REPS:-2} --name canary_cost_h200 --out "$W"
step pytest_worker 840 python3 -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu_worker.py ${PYTEST_K_WORKER:+-k "$PYTEST_K_WORKER"}
step pytest_kernels 600 python3 -m pytest -m gpu -v -rP -p no:cacheprovider tests/test_kernel_canary.py \
  tests/test_kernels_triton.py tests/test_kernels_override.py tests/test_gpu_sampler.py
step determinism 900 python3 -m invariant.cli bench determinism --model "$W/medium" --n 1000 --out "$W/determinism" \
  --stem determinism_h200 --note "GPU session: invariant worker (our RMSNorm, Triton attention) vs --no-invariance"
touch "$W/DONE"
