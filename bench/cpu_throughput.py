"""Output tokens/s of the invariant CPU worker against stock vLLM CPU (--no-invariance), same model,
same run, at concurrency 1, 8 and 32; also the median time to first token.

One worker runs at a time (an idle vLLM CPU worker still spins its threads, so two side by side
slow each other down), in passes stock, invariant, stock, invariant, ... (`--passes`), so that drift
of the shared 2-core machine hits both alike; the medians are over all rounds of a mode. Each round
is `concurrency * 2` greedy requests of `--max-tokens` tokens (ignore_eos), streamed so that the
first token is timed. The ratio invariant / stock is per concurrency, medians of the rounds. Writes
docs/results/cpu_throughput.{json,md,png}.

Run: python bench/cpu_throughput.py [--models tiny,small] [--dtype bfloat16] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from invariant.determinism import KEEPALIVE_EXPIRY_S, RETRY_ATTEMPTS
from invariant.contract import routes
from invariant.contract.worker_argv import worker_argv

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
PORTS = {False: 8197, True: 8198}  # stock, invariant


def start(model: Path, invariance: bool, log: Path, port: int | None = None, **options: object) -> subprocess.Popen:
    """A worker on the model, ready; ``options`` are more worker options (worker_argv's names)."""
    port = PORTS[invariance] if port is None else port
    cmd = [sys.executable, "-m", "invariant",
           *worker_argv(str(model), port=port, served_model_name="m", max_model_len=1024, invariance=invariance,
                        **options)]
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONSAFEPATH": "1"})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"worker exited; log {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{routes.READY}", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"worker not ready; log {log}")


async def one(client: httpx.AsyncClient, i: int, max_tokens: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    body = {"model": "m", "prompt": f"Request {i}: tell me about reproducible numerics", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    for attempt in range(RETRY_ATTEMPTS):
        try:
            async with client.stream("POST", "/v1/completions", json=body) as res:
                async for line in res.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if ttft is None and chunk.get("choices"):
                        ttft = time.perf_counter() - t0
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            return tokens, ttft or 0.0
        except httpx.TransportError:
            # A reused keep-alive connection the server had just closed (a 2-core run lost its small
            # model to one): retry a request that got no token yet, else the measurement is void.
            if ttft is not None or attempt == RETRY_ATTEMPTS - 1:
                raise
            t0 = time.perf_counter()
    raise AssertionError("unreachable")


async def round_(port: int, concurrency: int, max_tokens: int, per_lane: int = 4) -> tuple[float, float]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency + 4,
                                                     keepalive_expiry=KEEPALIVE_EXPIRY_S)) as client:
        queue = list(range(concurrency * per_lane))
        results: list[tuple[int, float]] = []

        async def lane() -> None:
            while queue:
                i = queue.pop()
                results.append(await one(client, i, max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return sum(t for t, _ in results) / wall, statistics.median(f for _, f in results)


def measure_one(model: Path, invariance: bool, levels: list[int], reps: int, max_tokens: int, logs: Path,
                out: dict) -> None:
    proc = start(model, invariance, logs / f"{model.name}-{'inv' if invariance else 'stock'}.log")
    try:
        asyncio.run(round_(PORTS[invariance], 8, 16, per_lane=2))  # warm: the server's first requests stall
        for c in levels:
            for _ in range(reps):
                out.setdefault(c, []).append(asyncio.run(round_(PORTS[invariance], c, max_tokens)))
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def measure(model: Path, levels: list[int], reps: int, passes: int, max_tokens: int, logs: Path) -> dict:
    rounds: dict = {False: {}, True: {}}
    for p in range(passes):
        for inv in (False, True):
            measure_one(model, inv, levels, reps, max_tokens, logs, rounds[inv])
            print(f"  {model.name} pass {p + 1}/{passes} {'invariant' if inv else 'stock'}: " + ", ".join(
                f"c={c} {statistics.median(r[0] for r in rounds[inv][c]):.1f} tok/s" for c in levels), flush=True)
    return {inv: {c: {"tok_s": statistics.median(r[0] for r in rs), "ttft_s": statistics.median(r[1] for r in rs),
                      "rounds": rs} for c, rs in per.items()} for inv, per in rounds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=3, help="rounds per concurrency level per pass")
    ap.add_argument("--passes", type=int, default=2, help="stock/invariant passes, alternating")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--name", default="cpu_throughput",
                    help="results file stem under docs/results (one per CPU family keeps each measured)")
    args = ap.parse_args()
    from invariant.modelmaker import ModelSpec, make_model

    levels = [int(x) for x in args.levels.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="invariant-tput-"))
    rows = []
    for size in args.models.split(","):
        model = make_model(tmp / f"{size}-{args.dtype}", ModelSpec(size=size, dtype=args.dtype))
        both = measure(model, levels, args.reps, args.passes, args.max_tokens, tmp)
        stock, inv = both[False], both[True]
        for c in levels:
            rows.append({"model": f"qwen3-{size}-{args.dtype}", "concurrency": c, "stock_tok_s": stock[c]["tok_s"],
                         "invariant_tok_s": inv[c]["tok_s"], "ratio": inv[c]["tok_s"] / stock[c]["tok_s"],
                         "stock_ttft_ms": stock[c]["ttft_s"] * 1000, "invariant_ttft_ms": inv[c]["ttft_s"] * 1000})
    from invariant import machine

    meta = {"when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine.describe(), "max_tokens": args.max_tokens, "reps": args.reps}
    try:
        from invariant.kernels.cpu import native

        meta["invariant_gemm_path"] = native.gemm_path()
        meta["machine"] += f"; invariant GEMM path {meta['invariant_gemm_path']}"
    except Exception:  # noqa: BLE001 - a report without the path beats no report
        pass
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    head = "| model | concurrency | stock tok/s | invariant tok/s | invariant / stock | stock TTFT ms | invariant TTFT ms |"
    lines = ["# Invariant CPU worker vs stock vLLM CPU: output tokens/s", "",
             f"{meta['when']}; {meta['machine']}; {args.max_tokens} output tokens per request, 4 x concurrency "
             f"requests per round, median of {args.reps * args.passes} rounds per mode in {args.passes} alternating "
             f"passes (stock, invariant, ...), one worker up at a time; same model, one run. HTTP streaming "
             f"through each worker's OpenAI API; the load generator shares the 2 cores.", "", head,
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['concurrency']} | {r['stock_tok_s']:.1f} | {r['invariant_tok_s']:.1f} | "
                     f"{r['ratio']:.2f}x | {r['stock_ttft_ms']:.0f} | {r['invariant_ttft_ms']:.0f} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))
    plot_ratios(RESULTS / f"{args.name}.png", rows, "model", levels, "invariant / stock output tok/s",
                meta["machine"], goal=0.8)


def plot_ratios(path: Path, rows: list[dict], group: str, levels: list[int], ylabel: str, title: str,
                goal: float | None = None, label=str) -> None:
    """Bars of each row's ``ratio``, one group of bars per value of ``group``, per concurrency level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    keys = sorted({r[group] for r in rows})
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        rs = [r for r in rows if r[group] == key]
        ax.bar([j + i * width for j in range(len(rs))], [r["ratio"] for r in rs], width, label=label(key))
    ax.axhline(1.0, color="grey", lw=0.8)
    if goal is not None:
        ax.axhline(goal, color="red", lw=0.8, ls="--", label=f"goal {goal}x")
    ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(levels))], [f"c={c}" for c in levels])
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)

if __name__ == "__main__":
    main()
