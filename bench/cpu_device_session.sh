#!/usr/bin/env bash
# The CPU suite and benchmarks on the device machine's Intel Xeon (AVX-512, AMX), in the background:
#   . /opt/invariant-extra/env.sh; cd /work/main; setsid bash bench/cpu_device_session.sh /tmp/work &
# after bench/cpu_device_install.sh. Three tracks run side by side on their own cores (vLLM's CPU
# worker binds its threads to VLLM_CPU_OMP_THREADS_BIND): A the engine and kernel tests, B the
# throughput benchmark, C the determinism benchmark without any test hook. Progress in WORK/progress,
# each step's log in WORK/, WORK/DONE.<track> at each track's end.
set -u
cd "$(dirname "$0")/.."
W=${1:-/tmp/work}; mkdir -p "$W"
TRACKS=${TRACKS:-A B C}
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 VLLM_NO_USAGE_STATS=1
PY=.venv/bin/python
. bench/session_step.sh  # step NAME SECONDS CMD...
{ lscpu; grep -m1 flags /proc/cpuinfo; nproc; } >"$W/cpu.txt" 2>&1
track_a() {
  export VLLM_CPU_OMP_THREADS_BIND=${A_CORES:-4-15}
  step kernels 300 $PY -m pytest -v -p no:cacheprovider tests/test_cpu_isa.py tests/test_kernels_cpu.py \
    tests/test_kernels_attention.py tests/test_worker_plugin.py tests/test_fingerprint.py
  step batch_invariance 600 $PY -m pytest -v -p no:cacheprovider tests/test_batch_invariance.py
  step worker_invariance 600 $PY -m pytest -v -p no:cacheprovider tests/test_worker_invariance.py tests/test_kernel_canary.py
  step worker_rest 600 $PY -m pytest -v -p no:cacheprovider tests/test_worker_serving.py tests/test_worker_pins.py \
    tests/test_worker_errors.py tests/test_trainer.py tests/test_rl_loop.py tests/test_bench_determinism.py \
    tests/test_up.py tests/test_modelmaker.py tests/test_worker_streaming.py
  touch "$W/DONE.A"
}
track_b() {
  export VLLM_CPU_OMP_THREADS_BIND=${B_CORES:-0-1}
  step throughput 900 $PY bench/cpu_throughput.py --models tiny,small --passes 2 --reps 3 \
    --name cpu_throughput_xeon_amx_2threads
  touch "$W/DONE.B"
}
track_c() {
  export VLLM_CPU_OMP_THREADS_BIND=${C_CORES:-2-3}
  step determinism 900 $PY -m invariant bench determinism --n 1000 --port 8199 --out "$W/determinism" \
    --stem determinism_xeon_amx_tiny_bf16 \
    --note "Intel Xeon (device CPU, AVX-512 + AMX), 2 threads; stock is --no-invariance on vLLM-cpu's default kernels, no test hook"
  touch "$W/DONE.C"
}
for t in $TRACKS; do
  case $t in A) track_a & ;; B) track_b & ;; C) track_c & ;; esac
done
wait
touch "$W/DONE"
