"""invariant.companions: a torchvision (or torchaudio, torchcodec) that fails to import is hidden, so
transformers takes it as absent instead of failing every model class; one that imports is left
alone. What `pip install '.[cpu]'` leaves on a bare machine (PyPI's builds for another torch) is
modelled by a package that raises on import as theirs does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import WORKER_START_TIMEOUT, start_worker, wait_ready
from invariant import companions

BROKEN = 'raise RuntimeError("operator torchvision::nms does not exist")\n'


def _site(tmp_path: Path, body: str) -> Path:
    site = tmp_path / "site"
    (site / "torchvision").mkdir(parents=True)
    (site / "torchvision" / "__init__.py").write_text(body)
    dist = site / "torchvision-0.29.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.29.1\n")
    return site


def _pythonpath(site: Path) -> str:
    return os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)  # no "" (the cwd)


def _run(site: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": _pythonpath(site), "PYTHONSAFEPATH": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


CHECK = ("from transformers.utils import is_torchvision_available\n"
         "print('available', is_torchvision_available())\n"
         "from transformers import LlamaConfig\n"
         "print('config', LlamaConfig.__name__)\n")


def test_a_broken_torchvision_is_hidden_and_transformers_works(tmp_path):
    res = _run(_site(tmp_path, BROKEN), "from invariant import companions\n"
                                        "print('hidden', companions.hide_broken())\n" + CHECK)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "hidden ['torchvision']" in res.stdout
    assert "available False" in res.stdout and "config LlamaConfig" in res.stdout


def test_control_without_the_guard_transformers_sees_the_broken_torchvision(tmp_path):
    res = _run(_site(tmp_path, BROKEN), CHECK + "import torchvision\n")
    assert "available True" in res.stdout, res.stdout + res.stderr[-2000:]
    assert res.returncode != 0 and "torchvision::nms does not exist" in res.stderr


def test_a_torchvision_that_imports_is_left_alone(tmp_path):
    res = _run(_site(tmp_path, "__version__ = '0.29.1'\n"),
               "from invariant import companions\nprint('hidden', companions.hide_broken())\n"
               "import torchvision\nprint('version', torchvision.__version__)\n")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "hidden []" in res.stdout and "version 0.29.1" in res.stdout


@pytest.mark.engine
@pytest.mark.parametrize("guard", ["on", "off"])
def test_a_worker_serves_beside_a_broken_torchvision(tiny_model, tmp_path, guard):
    """What a plain `pip install '.[cpu]'` leaves (issue 12): a torchvision that fails to import, here
    on PYTHONPATH for every process. The worker hides it in its own process and, through its start-up
    folder, in vLLM's spawned engine processes (which load transformers before any code of ours);
    it becomes ready and serves. The control (INVARIANT_HIDE_BROKEN=0) dies as a plain install did."""
    site = _site(tmp_path, BROKEN)
    env = {"PYTHONPATH": _pythonpath(site)}
    if guard == "off":
        env[companions.ENV] = "0"
    w = start_worker(tiny_model, tmp_path, env=env)
    try:
        if guard == "off":
            deadline = time.monotonic() + WORKER_START_TIMEOUT
            while w.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            assert w.proc.poll() is not None, "the worker started beside a broken torchvision without the guard"
            assert "torchvision::nms does not exist" in w.log.read_text()
            return
        wait_ready(w)
        r = httpx.post(f"{w.url}/v1/completions", json={"model": w.name, "prompt": "hello", "max_tokens": 4,
                                                         "temperature": 0}, timeout=60)
        assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) > 0
    finally:
        w.stop()
