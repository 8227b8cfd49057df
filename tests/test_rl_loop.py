"""The on-policy loop of bench/rl_loop.py, small: sample from the worker, train with the trainer,
serve the new weights. With invariance the sampler-trainer KL and every logprob difference are
exactly 0 at every step, also after the weights changed; the same loop on a --no-invariance worker
(the control) is not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.engine


def test_the_loop_stays_exactly_on_policy_and_the_control_does_not(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "rl_loop.py"), "--steps", "2", "--prompts", "2",
                          "--samples", "2", "--max-tokens", "8", "--out", str(tmp_path), "--name", "rl"],
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = json.loads((tmp_path / "rl.json").read_text())["rows"]
    inv = [r for r in rows if r["mode"] == "invariant"]
    stock = [r for r in rows if r["mode"] == "stock"]
    assert len(inv) == len(stock) == 2
    for r in inv:
        assert r["tokens"] == 32 and r["identical"] == 32 and r["kl"] == 0.0 and r["max_abs_diff"] == 0.0, r
    assert inv[0]["fingerprint"] != inv[1]["fingerprint"], "the trained weights were not what the worker served"
    assert all(r["identical"] < r["tokens"] and r["max_abs_diff"] > 0 for r in stock), stock
    assert (tmp_path / "rl.md").read_text().count("| invariant |") == 2
