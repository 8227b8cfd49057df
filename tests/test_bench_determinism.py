"""`invariant bench determinism` survives what long runs meet and loses nothing it measured.

Against a stand-in server on loopback (tests/flaky_server.py): one that drops connections now and
then (the run retries, counts the retries and still collects every completion), one that dies
mid-run (the run ends with a clear message, and what came back is in the partial file and the
report). The 10,000-completion run itself is a benchmark, not a test (docs/cpu-invariance.md).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port
from invariant import determinism

SERVER = Path(__file__).resolve().parent / "flaky_server.py"


def serve(*flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SERVER), str(port), *flags], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "listening"
    return proc, f"http://127.0.0.1:{port}"


def run_against(url: str, proc: subprocess.Popen, n: int, sink, background: int = 2) -> determinism.Run:
    run = determinism.Run(label="test", alive=lambda: None if proc.poll() is None else f"exit status {proc.returncode}",
                          sink=sink)
    asyncio.run(determinism.experiment(url, "m", n, 3, 8, background, 0, run))
    return run


def test_dropped_connections_are_retried_counted_and_nothing_is_lost(tmp_path):
    proc, url = serve("--drop-every", "7")
    try:
        with (tmp_path / "on.jsonl").open("w") as sink:
            run = run_against(url, proc, 120, sink)
    finally:
        proc.kill()
    assert len(run.outputs) == 120
    assert run.retries >= 120 // 7  # every 7th request of measured and background traffic was dropped
    assert determinism.summarize(run.outputs)["unique_outputs"] == 1
    lines = (tmp_path / "on.jsonl").read_text().splitlines()
    assert len(lines) == 120 and json.loads(lines[0])["token_ids"] == [5, 6, 7]
    stats = run.stats()
    assert stats["retries"] == run.retries and stats["completions"] == 120 and stats["completions_per_s"] > 0


def test_without_retries_the_same_server_breaks_the_run(monkeypatch):
    """Control: the drops are real - one attempt per request and the run fails on the first drop."""
    monkeypatch.setattr(determinism, "RETRY_ATTEMPTS", 1)
    proc, url = serve("--drop-every", "7")
    try:
        with pytest.raises(determinism.BenchError, match="RemoteProtocolError|ReadError|attempts in a row"):
            run_against(url, proc, 120, None, background=0)
    finally:
        proc.kill()


def test_a_worker_that_dies_ends_the_run_with_the_reason_and_keeps_what_came_back(tmp_path):
    proc, url = serve("--die-after", "40")
    sink_path = tmp_path / "on.jsonl"
    run = determinism.Run(label="invariance on",
                          alive=lambda: None if proc.poll() is None else f"exit status {proc.returncode}")
    started = time.monotonic()
    with sink_path.open("w") as sink, pytest.raises(determinism.BenchError) as caught:
        run.sink = sink
        asyncio.run(determinism.experiment(url, "m", 1000, 3, 8, 0, 0, run))
    assert time.monotonic() - started < 60  # no hang on a dead worker
    assert "the worker died (exit status 3)" in str(caught.value)
    got = len(run.outputs)
    assert 0 < got < 40
    assert len(sink_path.read_text().splitlines()) == got

    results = {"n": 1000, "max_tokens": 3, "max_concurrency": 8, "background": 0, "model": "m", "prompt": "p",
               "note": "", "when": "now", "machine": "test", "status": f"interrupted: {caught.value}",
               "modes": {"on": determinism.mode_result(run, "inv-0", caught.value)}}
    paths = determinism.write_report(results, tmp_path, "partial")
    report = json.loads(paths[0].read_text())
    assert report["modes"]["on"]["stats"]["completions"] == got
    assert report["modes"]["on"]["summary"]["unique_outputs"] == 1
    assert report["modes"]["on"]["status"].startswith("interrupted: invariance on: the worker died")
    md = paths[1].read_text()
    assert "Run interrupted" in md and f"| on | {got} |" in md
    assert paths[2].stat().st_size > 0


def test_a_mode_that_measured_nothing_still_reports():
    run = determinism.Run(label="x")
    entry = determinism.mode_result(run, None, determinism.BenchError("worker not ready"))
    assert entry["summary"] is None and entry["stats"]["completions"] == 0
    assert entry["status"] == "interrupted: worker not ready"


def test_the_client_lets_idle_connections_go_before_the_server_does():
    """The likely cause of the 2,473-completion crash: httpx and uvicorn both kept idle connections 5 s."""
    assert determinism.KEEPALIVE_EXPIRY_S < 5
