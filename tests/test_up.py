"""`invariant up` on a bare state dir: makes the default model, serves, prints how to use it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from conftest import free_port

pytestmark = pytest.mark.engine


def test_up_makes_model_serves_and_stops(tmp_path):
    port, gw_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "invariant", "up", "--port", str(port), "--gateway-port",
                             str(gw_port), "--state-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    started = time.monotonic()
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "stop with Ctrl-C":
                break
        took = time.monotonic() - started
        out = "".join(lines)
        assert "invariant is up: http://127.0.0.1:%d" % gw_port in out, out
        assert "worker       http://127.0.0.1:%d" % port in out
        fingerprint = re.search(r"fingerprint\s+(inv-[0-9a-f]{16})", out).group(1)
        assert (tmp_path / "models" / "qwen3-tiny-bf16-seed0" / "model.safetensors").is_file()
        curl = re.search(r"curl -s (\S+) .*\\\n\s+-d '(.*)'", out).groups()
        outcomes = []
        for _ in range(2):
            resp = httpx.post(curl[0], content=curl[1], headers={"Content-Type": "application/json"}, timeout=60)
            assert resp.status_code == 200 and resp.json()["system_fingerprint"] == fingerprint
            outcomes.append(resp.headers["x-invariant-cache"])
        assert outcomes == ["MISS", "HIT"]  # through the gateway and its embedded Redis
        print(f"invariant up: ready in {took:.1f}s")
    finally:
        os.killpg(proc.pid, signal.SIGINT) if proc.poll() is None else None
        proc.wait(timeout=60)
    for p in (port, gw_port):
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{p}/health", timeout=2)
