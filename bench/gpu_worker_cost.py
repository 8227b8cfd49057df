"""What batch invariance costs on a GPU: the invariant worker against stock vLLM, same model, one run.

    python3 bench/gpu_worker_cost.py MODEL_DIR --out DIR        (the device, carried vLLM on PYTHONPATH)
    python3 bench/gpu_worker_cost.py --plot DIR/gpu_worker_cost.json   (anywhere with matplotlib)

Starts ``invariant worker`` once per mode on the same model, all side by side on the one GPU, each
with its own fixed 8 GiB KV cache (``--modes``): ``--no-invariance`` (stock vLLM 0.26, CUDA graphs),
invariant as it ships (``--gpu-gemm auto``: cuBLASLt without split-K on Hopper), with upstream's
Triton GEMM (``--gpu-gemm vllm``), with ours (``--gpu-gemm invariant``) and, experimental, with the
lm_head replayed from CUDA graphs (``--gpu-lm-head-graphs 64``). Each worker must pass
its start-up canary to become ready. Two loads of streamed completions (greedy, ignore_eos) measure
output tokens/s over a wave and time to first token per request: ``default`` (about 256 prompt
tokens, 128 output tokens, concurrency 1, 8 and 64) and ``prefill`` (prompts of 2,048-3,847 token
ids, 16 output tokens, concurrency 1 and 8: where prefill dominates, so TTFT shows what the invariant
prefill costs).

Why side by side and paired: on the H200 host one mode's waves spread by +-20% from wave to wave
(stock at c = 1: 386-501 tok/s in one cell), and two runs of the same code, one worker after the
other, put invariant at c = 1 at 0.91x and then 1.075x of stock. Here wave k of every mode runs the
same prompts back to back (the modes in rotated order, so none always goes first), and each ratio
against stock is the median over waves of wave k's ratio, with its range: drift between waves hits
both sides of a pair. Writes gpu_worker_cost.json/.md (and the plot where matplotlib is installed).
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
WAVES = 7  # per cell and mode (--waves); each ratio is the median of the waves' paired ratios
# side by side on one GPU: a small share of memory each and a fixed KV cache (vLLM then skips its memory
# profile, which fails when another process frees memory while it measures)
ENGINE = ["--engine-arg=--gpu-memory-utilization=0.12", f"--engine-arg=--kv-cache-memory-bytes={8 << 30}"]
OUTPUT_TOKENS = 128
# load -> (concurrency levels, requests per wave at each, output tokens)
LOADS = {"default": (CONCURRENCY, REQUESTS, OUTPUT_TOKENS), "prefill": ((1, 8), {1: 6, 8: 24}, 16)}
# "invariant" is the worker's default (--gpu-gemm auto: cuBLASLt without split-K on Hopper); the others
# name the GEMM: upstream's persistent Triton matmul (what vLLM 0.26's invariant mode runs) and ours.
MODES = {"stock": ["--no-invariance"], "invariant": [], "invariant+vllm-gemm": ["--gpu-gemm", "vllm"],
         "invariant+our-gemm": ["--gpu-gemm", "invariant"],
         # experimental: the lm_head's eager cuBLASLt call per decode step replayed from CUDA graphs
         "invariant+lm-head-graphs": ["--gpu-lm-head-graphs", "64"]}
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


def rotation(labels: tuple[str, ...], k: int) -> tuple[str, ...]:
    """The order of the modes in wave k: rotated by k, so over len(labels) waves each mode runs at
    each place once (the first of a pair meets a GPU and host the previous wave left)."""
    k %= len(labels)
    return labels[k:] + labels[:k]


def paired(base: list[dict], other: list[dict]) -> dict:
    """Wave k of a mode against wave k of stock (the same prompts, moments apart): the median and
    range of the tok/s ratios and of the median-TTFT ratios."""
    tok = [o["tok_s"] / b["tok_s"] for b, o in zip(base, other, strict=True)]
    ttft = [statistics.median(o["ttft_ms"]) / statistics.median(b["ttft_ms"]) for b, o in zip(base, other, strict=True)]
    return {"tok_s_ratio": statistics.median(tok), "tok_s_ratio_range": [min(tok), max(tok)],
            "ttft_ratio": statistics.median(ttft), "ttft_ratio_range": [min(ttft), max(ttft)],
            "tok_s_ratios": [round(x, 4) for x in tok], "ttft_ratios": [round(x, 4) for x in ttft]}


def measure(model: str, out: Path, loads: tuple[str, ...] = tuple(LOADS), modes: tuple[str, ...] = tuple(MODES),
            waves: int = WAVES) -> dict:
    """Every mode's worker at once (stock is the baseline), then every cell in paired waves; the JSON
    so far is rewritten after each cell, so a device visit cut short keeps what it measured."""
    labels = ("stock", *(m for m in modes if m != "stock"))
    rows, meta, procs, urls = [], {}, {}, {}

    def save() -> None:
        (out / "gpu_worker_cost.json").write_text(json.dumps({"rows": rows, "meta": meta, "model": model}, indent=1))

    try:
        t0 = time.monotonic()
        for i, label in enumerate(labels):
            urls[label] = f"http://127.0.0.1:{8100 + i}"
            log = out / f"worker_{label.replace('+', '_')}.log"
            # 4,096 positions (the made models have as many): the prefill load sends up to 3,847 tokens
            procs[label] = (start_worker(model, 8100 + i, log, *ENGINE, *MODES[label], name="m", max_model_len=4096), log)
        for label in labels:
            proc, log = procs[label]
            ready = wait_ready(proc, urls[label], log, timeout=900)
            fp = httpx.get(f"{urls[label]}{routes.FINGERPRINT}", timeout=5).json()
            kernel_canary = ready.get("kernel_canary") or {}
            meta[label] = {"ready_s": round(time.monotonic() - t0, 1), "canary": ready.get("canary"),
                           # issue 16 asks the GEMM canary for about a second: its own seconds, slowest cases
                           "kernel_canary": {k: kernel_canary.get(k) for k in ("ok", "seconds", "wall_seconds", "slowest")},
                           "fingerprint": fp["fingerprint"], "kernels": fp["parts"]["kernels"]}
            meta.setdefault("device", fp["parts"]["device"])
            meta.setdefault("versions", fp["parts"]["versions"])
            print(f"{label}: ready after {meta[label]['ready_s']} s (side by side), canary {ready.get('canary', {}).get('ok')}, "
                  f"kernel canary {kernel_canary.get('ok')} in {kernel_canary.get('wall_seconds')} s "
                  f"{kernel_canary.get('slowest') or ''}", flush=True)
        for label in labels:
            asyncio.run(wave(urls[label], 8, 16, 10_000))  # warm-up: first graphs, allocator, HTTP
        for load in loads:
            levels, requests, _ = LOADS[load]
            for c in levels:
                done: dict[str, list[dict]] = {label: [] for label in labels}
                for k in range(waves):
                    for label in rotation(labels, k):
                        done[label].append(asyncio.run(wave(urls[label], c, requests[c], 1000 * k, load)))
                for label in labels:
                    r = cell(done[label])
                    if label != "stock":
                        r["paired"] = paired(done["stock"], done[label])
                    rows.append({"mode": label, **r})
                    print(f"  {load} c={c:3d} {label:>20}: {r['tok_s']:9.1f} tok/s  TTFT median {r['ttft_ms_median']:8.2f} ms"
                          + (f"  paired {r['paired']['tok_s_ratio']:.3f}x tok/s, {r['paired']['ttft_ratio']:.3f}x TTFT"
                             if "paired" in r else ""), flush=True)
                save()
    finally:
        stop_all([proc for proc, _ in procs.values()], timeout=60)
    meta["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    meta["waves"] = waves
    return {"rows": rows, "meta": meta, "model": model}


def ratios(row: dict, base: dict) -> tuple[float, float, str, str]:
    """(tok/s ratio, TTFT ratio, their ranges as text) of a row against stock: the paired median where
    the waves were paired, else (files from before) the ratio of the two cells' medians."""
    if "paired" in row:
        p = row["paired"]
        return (p["tok_s_ratio"], p["ttft_ratio"], "{:.2f}-{:.2f}".format(*p["tok_s_ratio_range"]),
                "{:.2f}-{:.2f}".format(*p["ttft_ratio_range"]))
    return row["tok_s"] / base["tok_s"], row["ttft_ms_median"] / base["ttft_ms_median"], "-", "-"


def table(res: dict) -> str:
    base = {(r.get("load", "default"), r["concurrency"]): r for r in res["rows"] if r["mode"] == "stock"}
    dev = res["meta"]["device"]
    paired_run = any("paired" in r for r in res["rows"])
    lines = [f"Measured {res['meta'].get('when', 'at an unrecorded time')}, stock vLLM in the same run as the baseline.",
             f"Device: {dev.get('name')} (driver {dev.get('driver')}, CUDA {dev.get('cuda')}); vLLM "
             f"{res['meta']['versions'].get('vllm')}; greedy. Loads: default = ~256 prompt tokens, {OUTPUT_TOKENS} output "
             "tokens; prefill = 2,048-3,847 prompt tokens, 16 output tokens.", "",
             "| load | mode | concurrency | output tok/s | vs stock | range | TTFT median ms | vs stock | range |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(res["rows"], key=lambda r: (r.get("load", "default") != "default", r.get("load", "default"))):
        b = base[(r.get("load", "default"), r["concurrency"])]
        tok, ttft, tok_range, ttft_range = ratios(r, b) if r["mode"] != "stock" else (1.0, 1.0, "", "")
        lines.append(f"| {r.get('load', 'default')} | {r['mode']} | {r['concurrency']} | {r['tok_s']:.0f} | {tok:.3f}x | {tok_range} | "
                     f"{r['ttft_ms_median']:.1f} | {ttft:.3f}x | {ttft_range} |")
    waves = res["rows"][0].get("waves", 1)
    how = ("the workers side by side, wave k of each mode on the same prompts back to back; vs stock = the median "
           "of the waves' paired ratios, range = their lowest and highest" if paired_run else
           "one worker after the other; vs stock = the ratio of the cells' medians")
    lines += ["", f"{waves} wave(s) per cell and mode; {how}. Slowdown = 1 - (tok/s ratio). "
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
        pairs = [ratios(rows[c], base[c]) if mode != "stock" else (1.0, 1.0, "", "") for c in cells]
        axes[0].bar(xs, [p[0] for p in pairs], width, label=mode)
        axes[1].bar(xs, [p[1] for p in pairs], width, label=mode)
        for ax, key in ((axes[0], "tok_s_ratio_range"), (axes[1], "ttft_ratio_range")):
            for x, c in zip(xs, cells):
                span = rows[c].get("paired", {}).get(key)
                if span:  # the paired waves' lowest and highest ratio
                    ax.plot([x, x], span, color="black", lw=1)
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
    ap.add_argument("--waves", type=int, default=WAVES, help="waves per cell and mode (paired)")
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
    if args.waves < 1:
        ap.error(f"--waves: needs at least 1, got {args.waves}")
    res = measure(args.model, args.out, tuple(args.loads.split(",")), modes, args.waves)
    (args.out / "gpu_worker_cost.json").write_text(json.dumps(res, indent=1))
    (args.out / "gpu_worker_cost.md").write_text(table(res))
    print(table(res))
    try:
        plot(res, args.out / "gpu_worker_cost.png")
    except ImportError:
        print("matplotlib missing here: draw the plot with --plot")


if __name__ == "__main__":
    main()
