"""Stopping the child processes that `invariant up` and the benchmarks start."""

from __future__ import annotations

import signal
import subprocess
from typing import Sequence


def stop_all(procs: Sequence[subprocess.Popen], timeout: float = 30.0) -> None:
    """SIGTERM the still-running ones, last started first (the front door before its backends);
    kill whatever has not exited within ``timeout`` seconds."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
