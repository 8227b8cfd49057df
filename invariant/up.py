"""``invariant up``: everything on one machine, no cluster.

The worker runs as a child process (``invariant worker``) so that ``up`` can supervise it: wait
for real readiness, show its log on failure, and stop it cleanly on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from invariant.processes import stop_all
from invariant.contract import routes
from invariant.contract.worker_argv import worker_argv

DEFAULT_MODEL_NAME = "qwen3-tiny-bf16-seed0"
# Children run `python -m invariant`: keep the current directory off sys.path, so a checkout's
# top-level operator/ folder can never shadow the standard library's operator module.
CHILD_ENV = {**os.environ, "PYTHONSAFEPATH": "1"}


class UpError(RuntimeError):
    """A failure of ``invariant up``; one line for the terminal."""


def state_dir(explicit: str | None) -> Path:
    root = explicit or os.environ.get("INVARIANT_HOME") or Path.home() / ".cache" / "invariant"
    return Path(root)


def ensure_default_model(root: Path) -> Path:
    """The default tiny model, made once and reused (its bytes are fixed by the seed)."""
    from invariant.modelmaker import ModelSpec, make_model

    path = root / "models" / DEFAULT_MODEL_NAME
    if (path / "config.json").is_file():
        return path
    print(f"making the default model in {path} ...", flush=True)
    make_model(path, ModelSpec(), overwrite=True)
    return path


def worker_command(args: argparse.Namespace, model: Path) -> list[str]:
    return [sys.executable, "-m", "invariant",
            *worker_argv(str(model), host=args.host, port=args.port, dtype=args.dtype, kv_cache_gib=args.kv_cache_gib,
                         max_model_len=args.max_model_len or None, served_model_name=args.served_model_name or None,
                         invariance=not args.no_invariance)]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout: float, *,
               path: str = routes.READY, what: str = "worker") -> dict:
    """Poll ``path`` until 200; fail fast if the process exits."""
    deadline = time.monotonic() + timeout
    spinner = "|/-\\"
    started = time.monotonic()
    i = 0
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            tail = _tail(log_path)
            last = next((line for line in reversed(tail.splitlines()) if line.strip()), "no output")
            raise UpError(f"the {what} exited with status {code}: {last.strip()} (full log: {log_path})")
        try:
            resp = httpx.get(f"{url}{path}", timeout=2.0)
            if resp.status_code == 200:
                if sys.stderr.isatty():
                    sys.stderr.write("\r" + " " * 60 + "\r")
                return resp.json()
        except httpx.HTTPError:
            pass
        if sys.stderr.isatty():
            sys.stderr.write(f"\rstarting {what} {spinner[i % 4]} {time.monotonic() - started:4.0f}s")
            sys.stderr.flush()
        i += 1
        time.sleep(0.5)
    raise UpError(f"the {what} was not ready within {timeout:.0f}s (log: {log_path})")


def up(args: argparse.Namespace) -> None:
    from invariant.contract.net import PortError, check_port_free

    root = state_dir(args.state_dir)
    try:
        check_port_free(args.host, args.port)
        if not args.no_gateway:
            check_port_free(args.host, args.gateway_port)
    except PortError as exc:
        raise UpError(str(exc)) from exc
    model = Path(args.model) if args.model else ensure_default_model(root)
    if not model.exists():
        raise UpError(f"model directory {model} does not exist: make one with `invariant model make {model}`")
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"worker-{args.port}.log"
    url = f"http://{args.host}:{args.port}"
    print(f"starting worker on {url} (log: {log_path})", flush=True)
    name = args.served_model_name or model.name
    procs: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with log_path.open("wb") as log:
            procs.append(subprocess.Popen(worker_command(args, model), stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, env=CHILD_ENV))
        ready = wait_ready(procs[0], url, log_path, args.timeout)
        front = url
        if not args.no_gateway:
            front = f"http://{args.host}:{args.gateway_port}"
            gw_log = logs / f"gateway-{args.gateway_port}.log"
            print(f"starting gateway on {front} (log: {gw_log})", flush=True)
            with gw_log.open("wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "invariant", "gateway", "--host", args.host, "--port",
                     str(args.gateway_port), "--model", f"{name}={url}"],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=CHILD_ENV))
            wait_ready(procs[1], front, gw_log, 60, path="/ready", what="gateway")
        print(f"\ninvariant is up: {front}")
        print(f"  model        {name} ({model})")
        print(f"  worker       {url}")
        if not args.no_gateway:
            print(f"  gateway      {front} (exact cache: embedded Redis)")
        print(f"  fingerprint  {ready['fingerprint']}")
        print("  try:")
        print(f"    curl -s {front}/v1/completions -H 'Content-Type: application/json' \\")
        print(f"      -d '{{\"model\": \"{name}\", \"prompt\": \"Tell me about reproducibility\", "
              f"\"max_tokens\": 16, \"temperature\": 0}}'")
        print("  stop with Ctrl-C", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        dead = next(p for p in procs if p.poll() is not None)
        if dead.returncode not in (0, -signal.SIGTERM, -signal.SIGINT):
            raise UpError(f"a component exited with status {dead.returncode} (logs: {logs})")
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        stop_all(procs)
