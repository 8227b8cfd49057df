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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from invariant import machine
from invariant.contract import routes
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


# A run of 10,000 completions meets what short ones do not: a keep-alive connection the server closed
# just as the client reused it (uvicorn closes idle ones after 5 s, httpx kept them 5 s too), a reset
# under load. The requests are idempotent (same request, same answer: the claim under test), so a
# transport error is retried and counted; an answer that did come back is compared like any other.
RETRY_ATTEMPTS = 6
KEEPALIVE_EXPIRY_S = 2.0  # below the server's 5 s, so the client drops idle connections first


@dataclass
class Run:
    """One mode's run as it goes: what came back, what was retried, where it is written."""
    label: str
    alive: Any = None  # callable -> None while the worker lives, else why it is gone
    sink: Any = None  # a text file: one JSON line per completion, flushed as it arrives
    outputs: list[Output] = field(default_factory=list)
    retries: int = 0
    background_sent: int = 0
    background_failed: int = 0
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    def record(self, out: Output) -> None:
        self.outputs.append(out)
        if self.sink is not None:
            self.sink.write(json.dumps({"token_ids": out.token_ids, "logprobs": out.logprobs, "text": out.text}) + "\n")
            self.sink.flush()

    def stats(self) -> dict[str, Any]:
        seconds = (self.ended or time.monotonic()) - self.started
        tokens = sum(len(o.token_ids) for o in self.outputs)
        return {"completions": len(self.outputs), "retries": self.retries, "duration_s": round(seconds, 1),
                "completions_per_s": round(len(self.outputs) / seconds, 2) if seconds > 0 else None,
                "output_tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
                "background_sent": self.background_sent, "background_failed": self.background_failed}


async def _one(client: httpx.AsyncClient, name: str, prompt: str, max_tokens: int, run: Run) -> Output:
    body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 0,
            "return_token_ids": True, "ignore_eos": True}
    for attempt in range(RETRY_ATTEMPTS):
        try:
            res = await client.post(routes.COMPLETIONS, json=body)
        except httpx.TransportError as exc:
            gone = run.alive() if run.alive is not None else None
            if gone:
                raise BenchError(f"{run.label}: the worker died ({gone}) after {len(run.outputs)} completions") from exc
            if attempt == RETRY_ATTEMPTS - 1:
                raise BenchError(f"{run.label}: {type(exc).__name__} on {RETRY_ATTEMPTS} attempts in a row "
                                 f"after {len(run.outputs)} completions: {exc}") from exc
            run.retries += 1
            await asyncio.sleep(min(0.05 * 2 ** attempt, 1.0))
            continue
        if res.status_code != 200:
            raise BenchError(f"{run.label}: worker answered {res.status_code}: {res.text[:200]}")
        choice = res.json()["choices"][0]
        return Output(tuple(choice["token_ids"]), tuple(choice["logprobs"]["token_logprobs"]), choice["text"])
    raise AssertionError("unreachable")


async def _background(client: httpx.AsyncClient, name: str, stop: asyncio.Event, rng: random.Random,
                      width: int, run: Run) -> None:
    """Other requests in flight, to keep the batches changing. Their failures are counted, never fatal:
    a dead worker shows in the measured requests."""

    async def one() -> None:
        words = " ".join(rng.choice(BACKGROUND_WORDS) for _ in range(rng.randint(1, 120)))
        try:
            await _one(client, name, words, rng.randint(1, 48), run)
            run.background_sent += 1
        except BenchError:
            run.background_failed += 1
            await asyncio.sleep(0.2)

    while not stop.is_set():
        await asyncio.gather(*(one() for _ in range(rng.randint(1, width))))


async def experiment(url: str, name: str, n: int, max_tokens: int, max_concurrency: int, background: int,
                     seed: int, run: Run) -> Run:
    """Fill ``run`` with n completions in random waves; raises BenchError (``run`` keeps what came back)."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=max_concurrency + background + 8, keepalive_expiry=KEEPALIVE_EXPIRY_S)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        stop = asyncio.Event()
        bg = asyncio.create_task(_background(client, name, stop, random.Random(seed + 1), background, run)) \
            if background else None
        try:
            while len(run.outputs) < n:
                wave = min(rng.randint(1, max_concurrency), n - len(run.outputs))
                await asyncio.sleep(rng.uniform(0, 0.02))

                async def measured() -> None:
                    run.record(await _one(client, name, PROMPT, max_tokens, run))

                async with asyncio.TaskGroup() as group:  # one failure cancels the rest of the wave
                    for _ in range(wave):
                        group.create_task(measured())
                print(f"\r  {run.label}: {len(run.outputs)}/{n} completions, {run.retries} retries "
                      f"({time.monotonic() - run.started:.0f} s)", end="", flush=True)
        except* BenchError as group_error:
            raise group_error.exceptions[0] from None
        finally:
            print(flush=True)
            run.ended = time.monotonic()
            stop.set()
            if bg:
                bg.cancel()
                await asyncio.gather(bg, return_exceptions=True)
    return run


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
        s, st = r["summary"] or {}, r["stats"]
        lines.append(f"| {mode} | {st['completions']} | {s.get('unique_texts', '-')} | {s.get('unique_token_sequences', '-')} | "
                     f"{s.get('unique_outputs', '-')} | {s.get('most_common_count', '-')} | {s.get('first_divergence')} | "
                     f"{r['background_sent']} |")
    lines += ["", "| mode | status | retries | duration s | completions/s | output tokens/s | background failed |",
              "|---|---|---|---|---|---|---|"]
    for mode, r in results["modes"].items():
        st = r["stats"]
        lines.append(f"| {mode} | {r['status']} | {st['retries']} | {st['duration_s']} | {st['completions_per_s']} | "
                     f"{st['output_tokens_per_s']} | {st['background_failed']} |")
    if results.get("status", "complete") != "complete":
        lines += ["", f"**Run {results['status']}** - the rows above are what was measured up to then."]
    paths[1].write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    modes = list(results["modes"])
    axes[0].bar(modes, [(results["modes"][m]["summary"] or {}).get("unique_outputs", 0) for m in modes],
                color=["#2a7", "#c44"][:len(modes)])
    axes[0].set_title("unique outputs (token ids + logprobs)")
    positions = {m: (results["modes"][m]["summary"] or {}).get("divergence_positions", []) for m in modes}
    for m in modes:
        pos = positions[m]
        if pos:
            axes[1].hist(pos, bins=range(0, results["max_tokens"] + 2), alpha=0.6, label=m)
    axes[1].set_title("first divergence from the most common output")
    axes[1].set_xlabel("token position")
    if any(positions.values()):
        axes[1].legend()
    else:
        axes[1].text(0.5, 0.5, "no divergence", ha="center", va="center", transform=axes[1].transAxes)
    status = "" if results.get("status", "complete") == "complete" else " (INTERRUPTED: partial)"
    fig.suptitle(f"{results['n']} completions per mode{status}, {results['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths


def run(args: argparse.Namespace) -> None:
    from invariant.contract.net import PortError, check_port_free
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failure: BaseException | None = None
    for mode in modes:
        try:
            check_port_free("127.0.0.1", args.port)
        except PortError as exc:
            failure = BenchError(str(exc))
            break
        url = f"http://127.0.0.1:{args.port}"
        log = logs / f"worker-{mode}.log"
        print(f"starting the {'invariant' if mode == 'on' else '--no-invariance'} worker (log: {log}) ...", flush=True)
        proc = start_worker(model, args.port, log, *([] if mode == "on" else ["--no-invariance"]))
        run_ = Run(label=f"invariance {mode}", alive=lambda proc=proc: _gone(proc, log))
        ready: dict[str, Any] = {}
        try:
            ready = wait_ready(proc, url, log)
            run_ = Run(label=run_.label, alive=run_.alive)  # timed from the worker's readiness
            with (out / f"{args.stem}.{mode}.jsonl").open("w") as sink:
                run_.sink = sink
                asyncio.run(experiment(url, "bench", args.n, args.max_tokens, args.max_concurrency,
                                       args.background, args.seed, run_))
        except WorkerStartError as exc:
            failure = BenchError(str(exc))
        except (BenchError, KeyboardInterrupt) as exc:
            failure = exc
        finally:
            stop_all([proc])
        results["modes"][mode] = mode_result(run_, ready.get("fingerprint"), failure)
        if failure is not None:
            break
    results["status"] = "complete" if failure is None else f"interrupted: {_reason(failure)}"
    print(f"\n{'mode':<6}{'completions':>12}{'unique':>8}{'most common':>13}{'first divergence':>18}{'retries':>9}")
    for mode, r in results["modes"].items():
        s = r["summary"] or {}
        print(f"{mode:<6}{r['stats']['completions']:>12}{str(s.get('unique_outputs', '-')):>8}"
              f"{str(s.get('most_common_count', '-')):>13}{str(s.get('first_divergence')):>18}{r['stats']['retries']:>9}")
    for p in write_report(results, out, args.stem):
        print(f"wrote {p}")
    if failure is not None:
        raise failure if isinstance(failure, BenchError) else BenchError(f"interrupted: {_reason(failure)}")


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _gone(proc, log: Path) -> str | None:
    """None while the worker process runs; else its exit status and the log's last line."""
    code = proc.poll()
    if code is None:
        return None
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    return f"exit status {code}" + (f"; its log ends: {lines[-1][:200]}" if lines else "")


def mode_result(run_: Run, fingerprint: str | None, failure: BaseException | None) -> dict[str, Any]:
    """One mode's entry in the report: what was measured, also when the run did not finish."""
    texts = Counter(o.text for o in run_.outputs)
    return {"fingerprint": fingerprint, "summary": summarize(run_.outputs) if run_.outputs else None,
            "stats": run_.stats(), "background_sent": run_.background_sent,
            "status": "complete" if failure is None else f"interrupted: {_reason(failure)}",
            "most_common_text": texts.most_common(1)[0][0] if texts else None}


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
