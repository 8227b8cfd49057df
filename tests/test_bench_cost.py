"""The GPU cost benchmark's table (bench/gpu_worker_cost.py runs on the device): ratios against the
stock run of the same file, the workers' starts, and a refusal of modes it does not know."""

from __future__ import annotations

import json
import statistics
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


def test_over_as_many_waves_as_modes_each_mode_runs_at_each_place_once(cost):
    labels = ("stock", "invariant", "invariant+vllm-gemm")
    orders = [cost.rotation(labels, k) for k in range(len(labels))]
    assert all(sorted(o) == sorted(labels) for o in orders)
    for place in range(len(labels)):
        assert sorted(o[place] for o in orders) == sorted(labels)
    assert cost.rotation(labels, 3) == cost.rotation(labels, 0)


def _wave(tok_s, ttft):
    return {"tok_s": tok_s, "ttft_ms": ttft, "concurrency": 1, "requests": len(ttft)}


def test_paired_ratios_cancel_drift_that_hits_both_sides_of_a_wave(cost):
    # the host slows down over the run (400 -> 200 tok/s); invariant is 10% faster in every wave
    base = [_wave(400, [10, 12]), _wave(300, [20, 22]), _wave(200, [40, 44])]
    other = [_wave(440, [11, 13]), _wave(330, [22, 24]), _wave(220, [44, 48])]
    p = cost.paired(base, other)
    assert p["tok_s_ratio"] == pytest.approx(1.1) and p["tok_s_ratio_range"] == pytest.approx([1.1, 1.1])
    assert p["ttft_ratio"] == pytest.approx(1.1, rel=0.01)
    # the medians of the two cells say the same here only by luck of the order; shuffled they would not
    lopsided = [_wave(440, [11]), _wave(220, [44]), _wave(330, [22])]
    assert cost.paired(base, lopsided)["tok_s_ratio_range"][0] < 1.0 < cost.paired(base, lopsided)["tok_s_ratio_range"][1]


def test_paired_waves_must_match_one_to_one(cost):
    with pytest.raises(ValueError):
        cost.paired([_wave(1, [1])], [_wave(1, [1]), _wave(2, [2])])


def test_a_paired_table_quotes_the_paired_median_and_its_range(cost):
    base = [_wave(400, [10]), _wave(300, [20]), _wave(200, [40])]
    other = [_wave(360, [12]), _wave(330, [20]), _wave(210, [30])]
    stock, inv = cost.cell(base), cost.cell(other)
    inv["paired"] = cost.paired(base, other)
    res = {"rows": [{"mode": "stock", **stock}, {"mode": "invariant", **inv}],
           "meta": {"device": {"name": "H200"}, "versions": {"vllm": "0.26.0"}, "when": "now",
                    "stock": {"ready_s": 80.0}, "invariant": {"ready_s": 85.0}}}
    md = cost.table(res)
    # ratios per wave: 0.9, 1.1, 1.05 -> median 1.05 (the cells' medians would say 330/300 = 1.1)
    assert "| default | invariant | 1 | 330 | 1.050x | 0.90-1.10 |" in md
    assert "paired ratios" in md and "side by side" in md


def test_the_paired_h200_run_quotes_each_cells_paired_median(cost):
    res = json.loads((ROOT / "docs/results/gpu_worker_cost_h200_paired.json").read_text())
    md = cost.table(res)
    for r in res["rows"]:
        if r["mode"] == "invariant":
            ratios = r["paired"]["tok_s_ratios"]
            assert len(ratios) == res["meta"]["waves"] == r["waves"]
            lo, hi = min(ratios), max(ratios)
            assert f"| {r['load']} | invariant | {r['concurrency']} | {r['tok_s']:.0f} | {statistics.median(ratios):.3f}x | {lo:.2f}-{hi:.2f} |" in md
