"""What machine a measurement ran on, for benchmark and experiment reports."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def gpus() -> list[str]:
    """GPU names and drivers from nvidia-smi (no torch needed); empty where there is none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [f"{name.strip()} (driver {driver.strip()})" for name, driver in
            (line.split(",", 1) for line in out.splitlines() if "," in line)]


# The flags that choose kernel paths (ours: avx2 / avx512; oneDNN's and vLLM's: AVX-512 bf16, AMX).
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_kernel_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in KERNEL_FLAGS if f in have]
    except OSError:
        pass
    return []


def describe() -> str:
    cpu = f"{cpu_model()} ({' '.join(cpu_kernel_flags()) or 'flags unknown'}), {os.cpu_count()} cores"
    gpu = gpus()
    return f"{', '.join(gpu)}; {cpu}" if gpu else cpu
