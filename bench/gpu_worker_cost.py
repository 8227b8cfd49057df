"""What batch invariance costs on a GPU: the invariant worker against stock vLLM, same model, one run.

    python3 bench/gpu_worker_cost.py MODEL_DIR --out DIR        (the device, carried vLLM on PYTHONPATH)
    python3 bench/gpu_worker_cost.py --plot DIR/gpu_worker_cost.json   (anywhere with matplotlib)

Starts ``invariant worker`` once per mode on the same model, one after another (``--modes``):
``--no-invariance`` (stock vLLM 0.26, CUDA graphs), invariant as it ships (``--gpu-gemm auto``:
cuBLASLt without split-K on Hopper), with upstream's Triton GEMM (``--gpu-gemm vllm``) and with ours
(``--gpu-gemm invariant``). Each worker must pass its start-up canary to become
ready. Two loads of streamed completions (greedy, ignore_eos) measure output tokens/s over a wave and
time to first token per request: ``default`` (about 256 prompt tokens, 128 output tokens, concurrency
1, 8 and 64) and ``prefill`` (prompts of 2,048-3,847 token ids, 16 output tokens, concurrency 1 and 8:
where prefill dominates, so TTFT shows what the invariant prefill costs). Each cell is three waves
(median wave, median request). Ratios are against stock in the same run. Writes gpu_worker_cost.json/.md (and
the plot where matplotlib is installed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import httpx

from invariant.contract import routes
from invariant.processes import start_worker, stop_all, wait_ready

CONCURRENCY = (1, 8, 64)
REQUESTS = {1: 8, 8: 32, 64: 128}
REPEAT = 3  # waves per cell; the table quotes the median wave (tok/s) and the median request (TTFT)
OUTPUT_TOKENS = 128
# load -> (concurrency levels, requests per wave at each, output tokens)
LOADS = {"default": (CONCURRENCY, REQUESTS, OUTPUT_TOKENS), "prefill": ((1, 8), {1: 6, 8: 24}, 16)}
# "invariant" is the worker's default (--gpu-gemm auto: cuBLASLt without split-K on Hopper); the others
# name the GEMM: upstream's persistent Triton matmul (what vLLM 0.26's invariant mode runs) and ours.
MODES = {"stock": ["--no-invariance"], "invariant": [], "invariant+vllm-gemm": ["--gpu-gemm", "vllm"],
         "invariant+our-gemm": ["--gpu-gemm", "invariant"]}
WORDS = "every reduction keeps its order whatever else shares the batch so the bits hold".split()


def prompt(i: int, load: str = "default") -> str | list[int]:
    """``default``: ~256 tokens of text; ``prefill``: 2,048-3,847 token ids (exact lengths, under the
    made models' 4,096 positions), distinct per request so no prefix cache helps."""
    if load == "prefill":
        # ids 16-1015: inside the made models' 1,024-token vocabulary
        return [(i * 7919 + j * 31) % 1000 + 16 for j in range(2048 + (i * 331) % 1800)]
    return " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(200 + i % 17))


async def one(client: httpx.AsyncClient, i: int, load: str = "default") -> tuple[float, int, float]:
    """(time to first token, tokens, end) of one streamed completion."""
    start = time.perf_counter()
    first = None
    tokens = 0
    body = {"model": "m", "prompt": prompt(i, load), "max_tokens": LOADS[load][2], "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as res:
        res.raise_for_status()
        async for line in res.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0].get("text") and first is None:
                first = time.perf_counter() - start
    return first or float("nan"), tokens, time.perf_counter()


async def wave(url: str, c: int, n: int, offset: int, load: str = "default") -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=c)) as client:
        sem = asyncio.Semaphore(c)

        async def limited(i):
            async with sem:
                return await one(client, i, load)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(offset + i) for i in range(n)))
        wall = time.perf_counter() - start
    tokens = sum(r[1] for r in results)
    return {"load": load, "concurrency": c, "requests": n, "output_tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_ms": [1000 * r[0] for r in results]}


def cell(waves: list[dict]) -> dict:
    """One table cell from repeated waves: median wave throughput, median request TTFT."""
    return {"load": waves[0].get("load", "default"), "concurrency": waves[0]["concurrency"], "requests": waves[0]["requests"], "waves": len(waves),
            "tok_s": statistics.median(w["tok_s"] for w in waves),
            "tok_s_waves": [round(w["tok_s"], 1) for w in waves],
            "ttft_ms_median": statistics.median(t for w in waves for t in w["ttft_ms"])}


def measure(model: str, out: Path, loads: tuple[str, ...] = tuple(LOADS), modes: tuple[str, ...] = tuple(MODES)) -> dict:
    """Every mode in turn (stock first: the baseline); the JSON so far is rewritten after each cell,
    so a device visit cut short keeps what it measured."""
    rows, meta = [], {}
    for label in ("stock", *(m for m in modes if m != "stock")):
        extra = MODES[label]
        port = 8100 + len(rows)
        url = f"http://127.0.0.1:{port}"
        log = out / f"worker_{label.replace('+', '_')}.log"
        # 4,096 positions (the made models have as many): the prefill load sends up to 3,847 tokens
        proc = start_worker(model, port, log, "--engine-arg=--gpu-memory-utilization=0.5", *extra, name="m",
                            max_model_len=4096)
        try:
            t0 = time.monotonic()
            ready = wait_ready(proc, url, log, timeout=900)
            fp = httpx.get(f"{url}{routes.FINGERPRINT}", timeout=5).json()
            kernel_canary = ready.get("kernel_canary") or {}
            meta[label] = {"ready_s": round(time.monotonic() - t0, 1), "canary": ready.get("canary"),
                           # issue 16 asks the GEMM canary for about a second: its own seconds, slowest cases
                           "kernel_canary": {k: kernel_canary.get(k) for k in ("ok", "seconds", "wall_seconds", "slowest")},
                           "fingerprint": fp["fingerprint"], "kernels": fp["parts"]["kernels"]}
            meta.setdefault("device", fp["parts"]["device"])
            meta.setdefault("versions", fp["parts"]["versions"])
            print(f"{label}: ready in {meta[label]['ready_s']} s, canary {ready.get('canary', {}).get('ok')}, kernel canary "
                  f"{kernel_canary.get('ok')} in {kernel_canary.get('wall_seconds')} s {kernel_canary.get('slowest') or ''}",
                  flush=True)
            asyncio.run(wave(url, 8, 16, 10_000))  # warm-up: first graphs, allocator, HTTP
            for load in loads:
                levels, requests, _ = LOADS[load]
                for c in levels:
                    r = cell([asyncio.run(wave(url, c, requests[c], 1000 * k, load)) for k in range(REPEAT)])
                    rows.append({"mode": label, **r})
                    (out / "gpu_worker_cost.json").write_text(json.dumps({"rows": rows, "meta": meta, "model": model},
                                                                         indent=1))
                    print(f"  {load} c={c:3d}: {r['tok_s']:9.1f} tok/s  TTFT median {r['ttft_ms_median']:8.2f} ms",
                          flush=True)
        finally:
            stop_all([proc], timeout=60)
    meta["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return {"rows": rows, "meta": meta, "model": model}


def table(res: dict) -> str:
    base = {(r.get("load", "default"), r["concurrency"]): r for r in res["rows"] if r["mode"] == "stock"}
    dev = res["meta"]["device"]
    lines = [f"Measured {res['meta'].get('when', 'at an unrecorded time')}, stock vLLM in the same run as the baseline.",
             f"Device: {dev.get('name')} (driver {dev.get('driver')}, CUDA {dev.get('cuda')}); vLLM "
             f"{res['meta']['versions'].get('vllm')}; greedy. Loads: default = ~256 prompt tokens, {OUTPUT_TOKENS} output "
             "tokens; prefill = 2,048-3,847 prompt tokens, 16 output tokens.", "",
             "| load | mode | concurrency | output tok/s | vs stock | TTFT median ms | vs stock |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(res["rows"], key=lambda r: (r.get("load", "default") != "default", r.get("load", "default"))):
        b = base[(r.get("load", "default"), r["concurrency"])]
        lines.append(f"| {r.get('load', 'default')} | {r['mode']} | {r['concurrency']} | {r['tok_s']:.0f} | {r['tok_s'] / b['tok_s']:.3f}x | "
                     f"{r['ttft_ms_median']:.1f} | {r['ttft_ms_median'] / b['ttft_ms_median']:.3f}x |")
    waves = res["rows"][0].get("waves", 1)
    lines += ["", f"{waves} wave(s) per cell (median). Slowdown = 1 - (tok/s ratio); goal: under 10%. "
              "Every worker passed its start-up canary."]
    starts = [(m, v) for m, v in res["meta"].items() if isinstance(v, dict) and "ready_s" in v]
    if starts:
        lines += ["", "| mode | ready after s | kernel canary s (in the model process / wall) |", "|---|---|---|"]
        for mode, v in starts:
            kc = v.get("kernel_canary") or {}
            lines.append(f"| {mode} | {v['ready_s']} | {kc.get('seconds', '-')} / {kc.get('wall_seconds', '-')} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    modes = list(dict.fromkeys(r["mode"] for r in res["rows"]))
    cells = list(dict.fromkeys((r.get("load", "default"), r["concurrency"]) for r in res["rows"]))
    base = {(r.get("load", "default"), r["concurrency"]): r for r in res["rows"] if r["mode"] == "stock"}
    width = 0.8 / len(modes)
    for k, mode in enumerate(modes):
        rows = {(r.get("load", "default"), r["concurrency"]): r for r in res["rows"] if r["mode"] == mode}
        xs = [i + k * width for i in range(len(cells))]
        axes[0].bar(xs, [rows[c]["tok_s"] / base[c]["tok_s"] for c in cells], width, label=mode)
        axes[1].bar(xs, [rows[c]["ttft_ms_median"] / base[c]["ttft_ms_median"] for c in cells], width, label=mode)
    for ax, title in zip(axes, ("output tok/s vs stock (higher is better)", "TTFT vs stock (lower is better)")):
        ax.set_xticks([i + width for i in range(len(cells))], [f"{load}\nc={c}" for load, c in cells], fontsize=8)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"cost of batch invariance, {res['meta']['device'].get('name')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--loads", default=",".join(LOADS), help=f"comma-separated, of {', '.join(LOADS)}")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)} (stock always runs)")
    ap.add_argument("--plot", type=Path, help="only draw the plot (and the table) from a results JSON")
    args = ap.parse_args()
    if args.plot:
        res = json.loads(args.plot.read_text())
        plot(res, args.plot.with_suffix(".png"))
        args.plot.with_suffix(".md").write_text(table(res))
        print(table(res))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    modes = tuple(args.modes.split(","))
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"--modes: unknown {', '.join(unknown)} (of {', '.join(MODES)})")
    res = measure(args.model, args.out, tuple(args.loads.split(",")), modes)
    (args.out / "gpu_worker_cost.json").write_text(json.dumps(res, indent=1))
    (args.out / "gpu_worker_cost.md").write_text(table(res))
    print(table(res))
    try:
        plot(res, args.out / "gpu_worker_cost.png")
    except ImportError:
        print("matplotlib missing here: draw the plot with --plot")


if __name__ == "__main__":
    main()
