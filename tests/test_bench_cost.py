"""The GPU cost benchmark's table (bench/gpu_worker_cost.py runs on the device): ratios against the
stock run of the same file, the workers' starts, and a refusal of modes it does not know."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import bench_module

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "gpu_worker_cost.py"


@pytest.fixture(scope="module")
def cost():
    return bench_module("gpu_worker_cost")


def test_the_h200_table_is_against_the_stock_run_of_the_same_file(cost):
    res = json.loads((ROOT / "docs/results/gpu_worker_cost_h200.json").read_text())
    md = cost.table(res)
    stock = {(r["load"], r["concurrency"]): r["tok_s"] for r in res["rows"] if r["mode"] == "stock"}
    inv = next(r for r in res["rows"] if r["mode"] == "invariant" and r["load"] == "default" and r["concurrency"] == 8)
    assert f"| default | invariant | 8 | {inv['tok_s']:.0f} | {inv['tok_s'] / stock[('default', 8)]:.3f}x |" in md
    assert "| invariant | 64.0 |" in md  # the start table: each mode's seconds to ready


def test_an_unknown_mode_is_a_one_line_refusal(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), str(tmp_path), "--out", str(tmp_path), "--modes", "stock,fast"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--modes: unknown fast" in proc.stderr
