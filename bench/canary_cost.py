"""What the start-up canaries cost: worker start to ready, with the kernel canary's and the
end-to-end canary's own seconds, against a stock worker's start (--no-invariance, no canary)
measured in the same run.

Workers start one at a time, alternating stock and invariant for ``--reps`` rounds (medians).
Start is wall time from the process's launch to /invariant/ready answering 200; the canaries'
seconds are what the worker reports there (kernel canary: the slowest model process). Writes
docs/results/<name>.{json,md,png}.

Run: python bench/canary_cost.py [--models tiny,small] [--reps 3] [--name canary_cost_<machine>]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

from invariant import machine
from invariant.processes import start_worker, stop_all, wait_ready

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
PORT = 8199


def one_start(model: Path, invariance: bool, log: Path) -> dict:
    extra = () if invariance else ("--no-invariance",)
    t0 = time.perf_counter()
    proc = start_worker(model, PORT, log, *extra, max_model_len=1024)
    try:
        body = wait_ready(proc, f"http://127.0.0.1:{PORT}", log)
        start_s = time.perf_counter() - t0
    finally:
        stop_all([proc])
    kc, e2e = body.get("kernel_canary") or {}, body.get("canary") or {}
    return {"start_s": start_s, "kernel_canary_s": kc.get("seconds"), "canary_s": e2e.get("seconds"),
            "kernel_cases": kc.get("cases")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--name", default="canary_cost")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the results go (default docs/results)")
    args = ap.parse_args()
    from invariant.modelmaker import ModelSpec, make_model

    tmp = Path(tempfile.mkdtemp(prefix="invariant-canary-"))
    rows = []
    for size in args.models.split(","):
        print(f"making the {size} model ...", flush=True)
        model = make_model(tmp / f"{size}-{args.dtype}", ModelSpec(size=size, dtype=args.dtype))
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for rep in range(args.reps):
            for inv in (False, True):
                r = one_start(model, inv, tmp / f"{size}-{inv}-{rep}.log")
                runs[inv].append(r)
                print(f"  {size} round {rep + 1}/{args.reps} {'invariant' if inv else 'stock'}: start "
                      f"{r['start_s']:.1f} s" + (f", kernel canary {r['kernel_canary_s']:.2f} s, canary "
                                                   f"{r['canary_s']:.2f} s" if inv else ""), flush=True)
        med = lambda xs: statistics.median(xs)  # noqa: E731
        inv_start, stock_start = med(r["start_s"] for r in runs[True]), med(r["start_s"] for r in runs[False])
        kc, e2e = med(r["kernel_canary_s"] for r in runs[True]), med(r["canary_s"] for r in runs[True])
        rows.append({"model": f"qwen3-{size}-{args.dtype}", "stock_start_s": stock_start, "invariant_start_s": inv_start,
                     "start_ratio": inv_start / stock_start, "kernel_canary_s": kc, "canary_s": e2e,
                     "canary_share": (kc + e2e) / inv_start, "kernel_cases": runs[True][0]["kernel_cases"],
                     "runs": {"stock": runs[False], "invariant": runs[True]}})
    meta = {"when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine.describe(), "reps": args.reps}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    head = ("| model | stock start s | invariant start s | invariant / stock | kernel canary s | "
            "end-to-end canary s | canaries' share of the start |")
    lines = ["# Start-up canaries: their cost in the worker's start", "",
             f"{meta['when']}; {meta['machine']}; medians of {args.reps} starts per mode, alternating stock "
             "(--no-invariance: no canary) and invariant, one worker at a time, --max-model-len 1024, vLLM's "
             "default token budget.", "", head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['stock_start_s']:.1f} | {r['invariant_start_s']:.1f} | "
                     f"{r['start_ratio']:.2f}x | {r['kernel_canary_s']:.2f} | {r['canary_s']:.2f} | "
                     f"{r['canary_share'] * 100:.1f}% |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    ys = range(len(rows))
    rest = [r["invariant_start_s"] - r["kernel_canary_s"] - r["canary_s"] for r in rows]
    ax.barh([y + 0.2 for y in ys], [r["stock_start_s"] for r in rows], 0.4, color="grey", label="stock start")
    ax.barh([y - 0.2 for y in ys], rest, 0.4, color="tab:blue", label="invariant start, without canaries")
    ax.barh([y - 0.2 for y in ys], [r["kernel_canary_s"] for r in rows], 0.4, left=rest, color="tab:orange",
            label="kernel canary")
    ax.barh([y - 0.2 for y in ys], [r["canary_s"] for r in rows], 0.4,
            left=[a + r["kernel_canary_s"] for a, r in zip(rest, rows)], color="tab:red", label="end-to-end canary")
    ax.set_yticks(list(ys), [r["model"] for r in rows])
    ax.set_xlabel("seconds from launch to ready (median)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(meta["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{args.name}.png", dpi=110)


if __name__ == "__main__":
    main()
