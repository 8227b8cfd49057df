"""``invariant bench determinism``: the Thinking Machines experiment as a command.

N completions of one prompt at temperature 0, sent in waves of random concurrency while unrelated
background traffic keeps the server's batches changing, once against an invariant worker and once
against a ``--no-invariance`` one. Then: how many distinct outputs came back, how often the most
common one, and where the first divergence from it is. The analysis is pure (``summarize``); the
runner starts the workers (or takes their URLs) and writes a JSON, a Markdown table and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from invariant import machine
from invariant.processes import WorkerStartError, start_worker, stop_all, wait_ready

PROMPT = "Tell me about Richard Feynman"
BACKGROUND_WORDS = "busy servers batch many requests together and every batch has another shape".split()


class BenchError(RuntimeError):
    """One line for the terminal."""


@dataclass(frozen=True)
class Output:
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    text: str


def first_divergence(a: Output, b: Output) -> int | None:
    """First position where token id or logprob differ; None if bitwise equal."""
    for i, (ta, tb) in enumerate(zip(a.token_ids, b.token_ids)):
        if ta != tb or a.logprobs[i] != b.logprobs[i]:
            return i
    if len(a.token_ids) != len(b.token_ids):
        return min(len(a.token_ids), len(b.token_ids))
    return None


def summarize(outputs: list[Output]) -> dict[str, Any]:
    """Completions, unique texts / token sequences / (tokens, logprobs), most common count, divergences."""
    if not outputs:
        raise ValueError("no outputs to summarize")
    exact = Counter((o.token_ids, o.logprobs) for o in outputs)
    (mode_key, mode_count), = exact.most_common(1)
    mode = next(o for o in outputs if (o.token_ids, o.logprobs) == mode_key)
    positions = [p for p in (first_divergence(mode, o) for o in outputs) if p is not None]
    return {
        "completions": len(outputs),
        "unique_texts": len({o.text for o in outputs}),
        "unique_token_sequences": len({o.token_ids for o in outputs}),
        "unique_outputs": len(exact),  # token ids and logprobs, bitwise
        "most_common_count": mode_count,
        "first_divergence": min(positions) if positions else None,
        "divergence_positions": sorted(positions),
    }


async def _one(client: httpx.AsyncClient, name: str, prompt: str, max_tokens: int) -> Output:
    res = await client.post("/v1/completions", json={
        "model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 0,
        "return_token_ids": True, "ignore_eos": True})
    if res.status_code != 200:
        raise BenchError(f"worker answered {res.status_code}: {res.text[:200]}")
    choice = res.json()["choices"][0]
    return Output(tuple(choice["token_ids"]), tuple(choice["logprobs"]["token_logprobs"]), choice["text"])


async def _background(client: httpx.AsyncClient, name: str, stop: asyncio.Event, rng: random.Random,
                      width: int) -> int:
    sent = 0

    async def one() -> None:
        nonlocal sent
        words = " ".join(rng.choice(BACKGROUND_WORDS) for _ in range(rng.randint(1, 120)))
        await _one(client, name, words, rng.randint(1, 48))
        sent += 1

    while not stop.is_set():
        await asyncio.gather(*(one() for _ in range(rng.randint(1, width))))
    return sent


async def experiment(url: str, name: str, n: int, max_tokens: int, max_concurrency: int, background: int,
                     seed: int, label: str) -> tuple[list[Output], int]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=max_concurrency + background + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        stop = asyncio.Event()
        bg = asyncio.create_task(_background(client, name, stop, random.Random(seed + 1), background)) if background else None
        outputs: list[Output] = []
        started = time.monotonic()
        while len(outputs) < n:
            wave = min(rng.randint(1, max_concurrency), n - len(outputs))
            await asyncio.sleep(rng.uniform(0, 0.02))
            outputs += await asyncio.gather(*(_one(client, name, PROMPT, max_tokens) for _ in range(wave)))
            print(f"\r  {label}: {len(outputs)}/{n} completions ({time.monotonic() - started:.0f} s)",
                  end="", flush=True)
        print(flush=True)
        stop.set()
        sent = await bg if bg else 0
    return outputs, sent


def write_report(results: dict[str, Any], out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"]
    paths[0].write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# Determinism: {results['n']} completions of one prompt at temperature 0", "",
             f"{results['when']}; {results['machine']}; model {results['model']}; max_tokens {results['max_tokens']}; "
             f"waves of 1-{results['max_concurrency']} concurrent copies, background traffic up to "
             f"{results['background']} requests in flight.{' ' + results['note'] if results.get('note') else ''}", "",
             "| mode | completions | unique texts | unique token sequences | unique outputs (ids + logprobs) "
             "| most common | first divergence | background requests |", "|---|---|---|---|---|---|---|---|"]
    for mode, r in results["modes"].items():
        s = r["summary"]
        lines.append(f"| {mode} | {s['completions']} | {s['unique_texts']} | {s['unique_token_sequences']} | "
                     f"{s['unique_outputs']} | {s['most_common_count']} | {s['first_divergence']} | {r['background_sent']} |")
    paths[1].write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    modes = list(results["modes"])
    axes[0].bar(modes, [results["modes"][m]["summary"]["unique_outputs"] for m in modes], color=["#2a7", "#c44"][:len(modes)])
    axes[0].set_title("unique outputs (token ids + logprobs)")
    for m in modes:
        pos = results["modes"][m]["summary"]["divergence_positions"]
        if pos:
            axes[1].hist(pos, bins=range(0, results["max_tokens"] + 2), alpha=0.6, label=m)
    axes[1].set_title("first divergence from the most common output")
    axes[1].set_xlabel("token position")
    if any(results["modes"][m]["summary"]["divergence_positions"] for m in modes):
        axes[1].legend()
    else:
        axes[1].text(0.5, 0.5, "no divergence", ha="center", va="center", transform=axes[1].transAxes)
    fig.suptitle(f"{results['n']} completions per mode, {results['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths


def run(args: argparse.Namespace) -> None:
    from invariant.net import PortError, check_port_free
    from invariant.up import ensure_default_model, state_dir

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("on", "off") for m in modes):
        raise BenchError(f"--modes takes on, off or on,off; got {args.modes!r}")
    if args.n < 1 or args.max_tokens < 1 or args.max_concurrency < 1 or args.background < 0:
        raise BenchError("--n, --max-tokens and --max-concurrency must be positive, --background not negative")
    model = Path(args.model) if args.model else ensure_default_model(state_dir(None))
    if not (model / "config.json").is_file():
        raise BenchError(f"{model} is not a model directory: make one with `invariant model make {model}`")
    logs = state_dir(None) / "logs"  # worker logs stay out of the report folder
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "n": args.n, "max_tokens": args.max_tokens, "max_concurrency": args.max_concurrency,
        "background": args.background, "model": model.name, "prompt": PROMPT, "note": args.note or "",
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine.describe(), "modes": {},
    }
    for mode in modes:
        try:
            check_port_free("127.0.0.1", args.port)
        except PortError as exc:
            raise BenchError(str(exc)) from exc
        url = f"http://127.0.0.1:{args.port}"
        log = logs / f"worker-{mode}.log"
        print(f"starting the {'invariant' if mode == 'on' else '--no-invariance'} worker (log: {log}) ...", flush=True)
        proc = start_worker(model, args.port, log, *([] if mode == "on" else ["--no-invariance"]))
        try:
            try:
                ready = wait_ready(proc, url, log)
            except WorkerStartError as exc:
                raise BenchError(str(exc)) from exc
            outputs, sent = asyncio.run(experiment(url, "bench", args.n, args.max_tokens, args.max_concurrency,
                                                   args.background, args.seed, f"invariance {mode}"))
        finally:
            stop_all([proc])
        summary = summarize(outputs)
        results["modes"][mode] = {"fingerprint": ready["fingerprint"], "summary": summary, "background_sent": sent,
                                  "most_common_text": Counter(o.text for o in outputs).most_common(1)[0][0]}
    print(f"\n{'mode':<6}{'completions':>12}{'unique':>8}{'most common':>13}{'first divergence':>18}")
    for mode, r in results["modes"].items():
        s = r["summary"]
        print(f"{mode:<6}{s['completions']:>12}{s['unique_outputs']:>8}{s['most_common_count']:>13}"
              f"{str(s['first_divergence']):>18}")
    for p in write_report(results, Path(args.out), args.stem):
        print(f"wrote {p}")


def add_parser(sub) -> None:
    p = sub.add_parser("determinism", help="N completions of one prompt at temperature 0, invariance on and off",
                       description="The Thinking Machines experiment: N greedy completions of one prompt in waves of "
                                   "random concurrency among background traffic, against an invariant and a "
                                   "--no-invariance worker; prints unique outputs and writes JSON, Markdown and PNG.")
    p.add_argument("--model", default=None, help="model directory (default: the default tiny model of `invariant up`)")
    p.add_argument("--n", type=int, default=1000, help="completions per mode (default 1000)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per completion (default 32)")
    p.add_argument("--max-concurrency", type=int, default=32, help="largest wave of concurrent copies (default 32)")
    p.add_argument("--background", type=int, default=8, help="background requests in flight at most (default 8)")
    p.add_argument("--modes", default="on,off", help="on, off or on,off (default)")
    p.add_argument("--port", type=int, default=8199, help="worker port (default 8199)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random waves (default 0)")
    p.add_argument("--out", default="docs/results", help="where the report goes (default docs/results)")
    p.add_argument("--stem", default="determinism", help="report file name stem (default determinism)")
    p.add_argument("--note", default="", help="a sentence for the report (e.g. how the stock worker was set up)")
