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


def describe() -> str:
    cpu = f"{cpu_model()}, {os.cpu_count()} cores"
    gpu = gpus()
    return f"{', '.join(gpu)}; {cpu}" if gpu else cpu
