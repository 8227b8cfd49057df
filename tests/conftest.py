"""Shared fixtures: made models and real workers on loopback.

Workers are real ``invariant worker`` processes (vLLM's engine and server); they take tens of
seconds to start on 2 cores, so they are session-scoped and shared.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from invariant.modelmaker import ModelSpec, make_model

WORKER_START_TIMEOUT = 300
BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    """A benchmark script of bench/ as a module (the scripts are not a package), to test its parts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HERE_HOOKS = Path(__file__).resolve().parent / "hooks"  # test-only sitecustomize (see its docstring)


def hooked_env(**extra: str) -> dict:
    """A worker's environment with the test hooks (tests/hooks/sitecustomize.py) on its path.
    No empty PYTHONPATH entry: that would put the checkout root (and its operator/) on sys.path."""
    path = os.pathsep.join(p for p in (str(HERE_HOOKS), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(proc: subprocess.Popen, port: int, what: str, timeout: float = 10) -> None:
    """Until something accepts on 127.0.0.1:``port``; RuntimeError with the process's output (when
    it was captured) if ``proc`` exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"{what} exited with status {proc.returncode}: {out.strip()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def invariant_cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invariant", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@dataclass
class RunningWorker:
    url: str
    port: int
    model_dir: Path
    name: str
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_worker(model_dir: Path, log_dir: Path, *extra: str, name: str | None = None,
                 env: dict | None = None) -> RunningWorker:
    port = free_port()
    name = name or model_dir.name
    log = log_dir / f"worker-{port}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "invariant", "worker", "--model", str(model_dir), "--port", str(port),
             "--served-model-name", name, "--max-model-len", "1024", *extra],
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})},
        )
    return RunningWorker(f"http://127.0.0.1:{port}", port, model_dir, name, proc, log)


def wait_ready(worker: RunningWorker, timeout: float = WORKER_START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            raise RuntimeError(f"worker exited ({worker.proc.returncode}):\n{worker.log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{worker.url}/invariant/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    worker.stop()
    raise RuntimeError(f"worker not ready in {timeout}s:\n{worker.log.read_text()[-4000:]}")


def wait_verdict(worker: RunningWorker, timeout: float = WORKER_START_TIMEOUT) -> dict:
    """/invariant/ready's body once the worker has decided: ready, or failed with its reasons."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert worker.proc.poll() is None, f"worker exited:\n{worker.log.read_text()[-3000:]}"
        try:
            body = httpx.get(f"{worker.url}/invariant/ready", timeout=2).json()
            if body["ready"] or not body["reasons"][0].startswith("starting"):
                return body
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"worker undecided after {timeout}s:\n{worker.log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The default tiny Qwen3 model (bf16, seed 0)."""
    return make_model(tmp_path_factory.mktemp("models") / "tiny-qwen3", ModelSpec())


@pytest.fixture(scope="session")
def gpu_model(tmp_path_factory) -> Path:
    """The GPU suite's model: the one in ``INVARIANT_GPU_MODEL`` (made once per device session), or a
    made Qwen3 medium (hidden 2048, 8 layers, bf16: big enough to keep an H100 busy)."""
    given = os.environ.get("INVARIANT_GPU_MODEL")
    if given:
        return Path(given)
    return make_model(tmp_path_factory.mktemp("gpu-model") / "medium", ModelSpec(size="medium"))


@pytest.fixture(scope="session")
def worker_pair(tiny_model, tmp_path_factory):
    """Two workers started side by side: one on the model, one on a byte-identical copy elsewhere."""
    copy = tmp_path_factory.mktemp("copy") / "tiny-qwen3-copy"
    shutil.copytree(tiny_model, copy)
    logs = tmp_path_factory.mktemp("logs")
    workers = [start_worker(tiny_model, logs, name="tiny"), start_worker(copy, logs, name="tiny")]
    try:
        for w in workers:
            wait_ready(w)
        yield workers
    finally:
        for w in workers:
            w.stop()


@pytest.fixture(scope="session")
def worker(worker_pair) -> RunningWorker:
    return worker_pair[0]
