"""Starting, waiting for and stopping the worker processes that `invariant up`-style tools and the
benchmarks start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence
from invariant.contract import routes
from invariant.contract.worker_argv import worker_argv


class WorkerStartError(RuntimeError):
    """A worker exited, failed its canary, or was not ready in time; the message names its log."""


def start_worker(model: Path | str, port: int, log: Path, *extra: str, name: str = "bench",
                 max_model_len: int = 2048) -> subprocess.Popen:
    """``invariant worker`` on loopback in its own session, output into ``log``."""
    cmd = [sys.executable, "-m", "invariant",
           *worker_argv(str(model), port=port, served_model_name=name, max_model_len=max_model_len), *extra]
    with Path(log).open("wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONSAFEPATH": "1"})


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 600) -> dict:
    """Poll /invariant/ready until 200 (returns its body); fail fast on exit or a failed canary."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise WorkerStartError(f"worker exited ({proc.returncode}); log: {log}")
        try:
            res = httpx.get(f"{url}{routes.READY}", timeout=2)
            body = res.json()
            if res.status_code == 200:
                return body
            for verdict in ("kernel_canary", "canary"):
                if (body.get(verdict) or {}).get("ok") is False:
                    raise WorkerStartError(f"{body[verdict]['message']}; log: {log}")
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise WorkerStartError(f"worker not ready in {timeout:.0f} s; log: {log}")


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
