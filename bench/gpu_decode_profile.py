"""Where a decode step's time goes: the invariant worker against stock vLLM, kernel by kernel
(issue 16, item 2: decode at concurrency 1 is ~0.9x stock; find it by measurement).

    python3 bench/gpu_decode_profile.py MODEL_DIR --out DIR        (the device, carried vLLM on PYTHONPATH)
    python3 bench/gpu_decode_profile.py --render DIR/gpu_decode_profile.json
    python3 bench/gpu_decode_profile.py MODEL_DIR --out DIR --cpu   (this script's check, on a CPU)

Starts ``invariant worker`` per mode (stock: ``--no-invariance``; invariant: the default), one after
the other, each with ``INVARIANT_WORKER_PROFILE_DIR`` (vLLM's torch profiler behind /start_profile and
/stop_profile). Per load it warms up, profiles the load, stops, and reads the traces that stop wrote: every GPU kernel's time, summed by name and by category (GEMM, attention, norm, sampling,
elementwise, copies, other), per output token. Loads: ``decode`` (one request of ~256 prompt tokens,
64 output tokens: concurrency 1, where the gap is), ``decode8`` (8 such requests at once) and
``first`` (one request of one output token: the prefill step behind time to first token).
Writes gpu_decode_profile.json and .md (category table, the 12 costliest kernels per mode).
On a CPU (``--cpu``) the trace holds CPU ops, not kernels: the check that this script works.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import httpx

MODES = {"stock": ["--no-invariance"], "invariant": []}
# load -> (concurrent requests, output tokens each); "first": one request of one token, the step behind
# time to first token (its prefill of 256 tokens), where the paired cost bench puts invariant at 1.08x
LOADS = {"decode": (1, 64), "decode8": (8, 64), "first": (1, 1)}
PROMPT_IDS = [(i * 7919) % 1000 + 16 for i in range(256)]
CATEGORIES = [  # first match wins; kernel names of cuBLAS(Lt), CUTLASS, Triton, FlashAttention, vLLM
    ("copy", r"reshape_and_cache|memcpy|memset"),  # the KV-cache write before "flash" in its name
    ("attention", r"attn|attention|flash|fmha|paged|unified|mha|softmax_lse"),
    ("gemm", r"gemm|matmul|nvjet|cutlass|xmma|cublas|sm90_|mm_|_mm\b|linear|splitk"),
    ("norm", r"rms|norm|rsqrt"),  # vLLM's RMSNorm, or inductor's fused mean/rsqrt reduction
    ("sampling", r"sampl|topk|top_k|top_p|argmax|sort|cumsum|multinomial|exponential|gumbel|logits|penalt"),
    ("rotary", r"rotary|rope"),
    ("copy", r"memcpy|memset|copy|cache_kernel|reshape_and_cache|cat_|concat"),
    ("elementwise", r"elementwise|vectorized|triton_poi|act_and_mul|silu|gelu|add|mul|fused"),
]


HOST_TOP = 20  # host ops kept per load and mode (by inclusive time)


def category(name: str) -> str:
    low = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, low):
            return label
    return "other"


def trace_files(directory: Path) -> set[Path]:
    return set(directory.rglob("*.json.gz")) | set(directory.rglob("*.json"))


def trace_events(files: set[Path]) -> list[dict]:
    """Every complete event ("X", with a duration) of these vLLM traces, each file parsed once;
    a file that is not JSON (one still being written) is left out."""
    events: list[dict] = []
    for path in sorted(files):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as fh:
            try:
                trace = json.load(fh)
            except ValueError:
                continue
        events += [ev for ev in (trace.get("traceEvents", []) if isinstance(trace, dict) else [])
                   if ev.get("ph") == "X" and "dur" in ev]
    return events


def read_trace(events: list[dict], cpu: bool) -> dict[str, list[float]]:
    """name -> durations (us) of every GPU kernel (``cpu``: aten op) among these trace events."""
    out: dict[str, list[float]] = {}
    for ev in events:
        cat = ev.get("cat", "")
        if cat == "kernel" or (cpu and cat == "cpu_op" and str(ev.get("name", "")).startswith("aten::")):
            out.setdefault(str(ev["name"]), []).append(float(ev["dur"]))
    return out


def read_host(events: list[dict]) -> dict:
    """What the kernel sums leave out: how long the GPU was busy (the union of kernel intervals) and
    idle (the rest of the span from the first kernel to the last), and the host's aten ops by name
    (durations in us, inclusive of the ops they call). At concurrency 1 a decode step is bound by the
    host (H200: ~2.2 ms of wall time per token against ~0.55 ms of kernels), so a gap between two
    workers there is in these numbers, not in the kernels'."""
    spans = [(float(ev["ts"]), float(ev["ts"]) + float(ev["dur"])) for ev in events
             if ev.get("cat") == "kernel" and "ts" in ev]
    cpu_ops: dict[str, list[float]] = {}
    for ev in events:
        if ev.get("cat") == "cpu_op":
            cpu_ops.setdefault(str(ev.get("name", "")), []).append(float(ev["dur"]))
    busy, end = 0.0, None
    for start, stop in sorted(spans):
        if end is None or start >= end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    span = (max(s for _, s in spans) - min(s for s, _ in spans)) if spans else 0.0
    return {"busy_us": busy, "idle_us": span - busy, "cpu_ops": cpu_ops}


async def one(client: httpx.AsyncClient, url: str, model: str, tokens: int) -> int:
    body = {"model": model, "prompt": PROMPT_IDS, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    resp = await client.post(f"{url}/v1/completions", json=body, timeout=600)
    resp.raise_for_status()
    return int(resp.json()["usage"]["completion_tokens"])


async def load(url: str, model: str, concurrency: int, tokens: int) -> int:
    async with httpx.AsyncClient() as client:
        return sum(await asyncio.gather(*(one(client, url, model, tokens) for _ in range(concurrency))))


def summarize(kernels: dict[str, list[float]], concurrency: int, generated: int, wall: float,
              host: dict | None = None) -> dict:
    total = sum(sum(v) for v in kernels.values())
    by_cat: dict[str, float] = {}
    for k, durs in kernels.items():
        by_cat[category(k)] = by_cat.get(category(k), 0.0) + sum(durs)
    top = sorted(((sum(d), len(d), k) for k, d in kernels.items()), reverse=True)[:12]
    n = max(1, generated)
    row = dict(concurrency=concurrency, generated=generated, wall_s=wall, us_per_token=total / n,
               categories_us_per_token={c: t / n for c, t in sorted(by_cat.items())},
               top=[dict(name=k, us_per_token=t / n, calls=c) for t, c, k in top])
    if host is not None:
        ops = sorted(((sum(d), len(d), k) for k, d in host["cpu_ops"].items()), reverse=True)[:HOST_TOP]
        row.update(gpu_busy_us_per_token=host["busy_us"] / n, gpu_idle_us_per_token=host["idle_us"] / n,
                   host_top=[dict(name=k, us_per_token=t / n, calls=c) for t, c, k in ops])
    return row


def profile_mode(model_dir: str, mode: str, out: Path, cpu: bool, max_model_len: int, port: int) -> dict:
    """One worker of ``mode``; each load warmed up, then profiled between /start_profile and
    /stop_profile; the trace files that stop wrote are that load's."""
    from invariant.processes import start_worker, stop_all, wait_ready

    trace_dir = (out / "traces" / mode).resolve()
    shutil.rmtree(trace_dir, ignore_errors=True)
    trace_dir.mkdir(parents=True)
    os.environ["INVARIANT_WORKER_PROFILE_DIR"] = str(trace_dir)  # the worker reads it at start
    url, log = f"http://127.0.0.1:{port}", out / f"worker_{mode}.log"
    t0 = time.time()
    proc = start_worker(model_dir, port, log, *MODES[mode], name="m", max_model_len=max_model_len)
    results = {}
    try:
        wait_ready(proc, url, log, timeout=900)
        print(f"  {mode}: ready in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        for name, (concurrency, tokens) in LOADS.items():
            asyncio.run(load(url, "m", concurrency, tokens))  # warm-up, not profiled
            before = trace_files(trace_dir)
            httpx.post(f"{url}/start_profile", timeout=120).raise_for_status()
            started = time.perf_counter()
            generated = asyncio.run(load(url, "m", concurrency, tokens))
            wall = time.perf_counter() - started
            httpx.post(f"{url}/stop_profile", timeout=600).raise_for_status()
            deadline = time.time() + 120  # traces are written after the stop returns, by the engine
            while not trace_files(trace_dir) - before and time.time() < deadline:
                time.sleep(1)
            time.sleep(2)
            events = trace_events(trace_files(trace_dir) - before)
            results[name] = summarize(read_trace(events, cpu), concurrency, generated, wall, host=read_host(events))
            print(f"  {mode}/{name}: {generated} tokens in {wall:.2f} s, "
                  f"{results[name]['us_per_token']:.1f} us/token in kernels", file=sys.stderr, flush=True)
    finally:
        os.environ.pop("INVARIANT_WORKER_PROFILE_DIR", None)
        stop_all([proc])
    return results


def markdown(res: dict) -> str:
    lines = [f"# Decode step profile: {res['meta']['device']}", "",
             f"{res['meta']['date']}; {res['meta']['model']}. GPU kernel time per output token (vLLM's torch "
             "profiler, one profiled load after a warm-up), invariant worker vs stock in the same run.", ""]
    for name in LOADS:
        modes = {m: res["modes"].get(m, {}).get(name) for m in MODES}
        if not all(modes.values()):
            continue
        s, i = modes["stock"], modes["invariant"]
        lines += [f"## {name} (concurrency {s['concurrency']})", "",
                  f"Wall: stock {s['wall_s']:.2f} s, invariant {i['wall_s']:.2f} s ({i['wall_s'] / s['wall_s']:.2f}x); "
                  f"kernels {s['us_per_token']:.1f} vs {i['us_per_token']:.1f} us/token "
                  f"({i['us_per_token'] / max(1e-9, s['us_per_token']):.2f}x).", "",
                  "| category | stock us/token | invariant us/token | difference |", "|---|---|---|---|"]
        cats = sorted(set(s["categories_us_per_token"]) | set(i["categories_us_per_token"]),
                      key=lambda c: -(i["categories_us_per_token"].get(c, 0) - s["categories_us_per_token"].get(c, 0)))
        for c in cats:
            a, b = s["categories_us_per_token"].get(c, 0.0), i["categories_us_per_token"].get(c, 0.0)
            lines.append(f"| {c} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
        if "gpu_busy_us_per_token" in s and "gpu_busy_us_per_token" in i:
            lines += ["", f"GPU busy / idle per token (first kernel to last): stock {s['gpu_busy_us_per_token']:.1f} / "
                          f"{s['gpu_idle_us_per_token']:.1f} us, invariant {i['gpu_busy_us_per_token']:.1f} / "
                          f"{i['gpu_idle_us_per_token']:.1f} us.", "",
                      "Host ops (aten, inclusive us per token; the costliest of either mode):", "",
                      "| op | stock | invariant | difference |", "|---|---|---|---|"]
            hs = {r["name"]: r["us_per_token"] for r in s.get("host_top", [])}
            hi = {r["name"]: r["us_per_token"] for r in i.get("host_top", [])}
            for op in sorted(set(hs) | set(hi), key=lambda o: -abs(hi.get(o, 0.0) - hs.get(o, 0.0))):
                a, b = hs.get(op), hi.get(op)
                lines.append(f"| `{op[:70]}` | {'-' if a is None else f'{a:.1f}'} | {'-' if b is None else f'{b:.1f}'} | "
                             f"{'' if a is None or b is None else f'{b - a:+.1f}'} |")
        for m in MODES:
            lines += ["", f"Costliest kernels, {m}:", "", "| kernel | us/token | calls |", "|---|---|---|"]
            for row in modes[m]["top"]:
                lines.append(f"| `{row['name'][:90]}` | {row['us_per_token']:.1f} | {row['calls']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    """Kernel time per output token, stacked by category, per load and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{load}\n{mode}", res["modes"][mode][load]) for load in LOADS for mode in MODES
            if load in res["modes"].get(mode, {})]
    cats = sorted({c for _, row in bars for c in row["categories_us_per_token"]})
    loads = [load for load in LOADS if any(label.startswith(load + "\n") for label, _ in bars)]  # older files lack "first"
    fig, axes = plt.subplots(1, len(loads), figsize=(11, 4), squeeze=False)
    axes = axes[0]
    for ax, load in zip(axes, loads):
        mine = [(label, row) for label, row in bars if label.startswith(load + "\n")]
        bottom = [0.0] * len(mine)
        for cat in cats:
            vals = [row["categories_us_per_token"].get(cat, 0.0) for _, row in mine]
            ax.bar([label.split("\n")[1] for label, _ in mine], vals, bottom=bottom, label=cat)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(f"{load}: GPU kernel us per output token")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"decode step by kernel category, {res['meta']['device']} ({res['meta']['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--cpu", action="store_true", help="check this script on a CPU (CPU ops, not kernels)")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--render", type=Path)
    args = ap.parse_args()
    if args.render:
        res = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(res))
        plot(res, args.render.with_suffix(".png"))
        return
    if not args.model or not args.out:
        ap.error("MODEL_DIR and --out are needed (or --render JSON)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cpu:
        device = "CPU (script check)"
    else:
        import torch

        device = torch.cuda.get_device_name(0)
    res = dict(meta=dict(device=device, date=time.strftime("%Y-%m-%d"), model=Path(args.model).name), modes={})
    for mode in MODES:
        print(f"[{mode}]", file=sys.stderr, flush=True)
        res["modes"][mode] = profile_mode(args.model, mode, args.out, args.cpu, args.max_model_len,
                                          8200 + len(res["modes"]))
        (args.out / "gpu_decode_profile.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (args.out / "gpu_decode_profile.md").write_text(md)
    print(md)
    try:
        plot(res, args.out / "gpu_decode_profile.png")
    except ImportError:
        print("matplotlib missing here: draw the plot with --render")


if __name__ == "__main__":
    main()
