"""How often does batch variance change *tokens* (not only logprobs) on stock vLLM CPU?

For each made model (ordinary and --close-logits), each of P prompts is generated greedily alone
and then inside batches of fillers of several sizes; a prompt "diverges" when any batch gives a
different token sequence than the prompt alone. Prints a table and writes
docs/results/close_logits_divergence.{json,md,png}.

Run: python bench/close_logits_divergence.py [--prompts 16] [--tokens 200]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
from pathlib import Path

from invariant import machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def measure(model_dir: str, prompts: list[str], fillers: list[str], batch_sizes: list[int], tokens: int) -> dict:
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    # The checkpoint's dtype, explicitly: vLLM's "auto" serves fp32 checkpoints in bf16 on the CPU.
    dtype = json.loads((Path(model_dir) / "config.json").read_text())["dtype"]
    llm = LLM(model=model_dir, dtype=dtype, max_model_len=1024, enforce_eager=True, seed=0,
              gpu_memory_utilization=0.3)
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, logprobs=0)
    alone = {p: llm.generate([p], sp, use_tqdm=False)[0].outputs[0] for p in tqdm(prompts, desc="alone")}
    rows = []
    for bs in tqdm(batch_sizes, desc="batches"):
        token_div, logprob_div, positions = 0, 0, []
        for i, p in enumerate(prompts):
            crowd = [fillers[(i * 7 + j) % len(fillers)] for j in range(bs - 1)]
            out = llm.generate([p] + crowd, sp, use_tqdm=False)[0].outputs[0]
            ref = alone[p]
            pos = first_divergence(list(ref.token_ids), list(out.token_ids))
            if pos is not None:
                token_div += 1
                positions.append(pos)
            ref_lp = [next(iter(d.values())).logprob for d in ref.logprobs]
            out_lp = [next(iter(d.values())).logprob for d in out.logprobs]
            if ref_lp != out_lp:
                logprob_div += 1
        rows.append({"batch": bs, "prompts": len(prompts), "token_divergent": token_div,
                     "logprob_divergent": logprob_div,
                     "median_first_divergence": sorted(positions)[len(positions) // 2] if positions else None})
    del llm
    return {"rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--batch-sizes", default="2,8,32")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16 or float32 (CPU GEMM variance differs by dtype)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")  # as the CPU worker runs (docs/architecture.md)

    from invariant.modelmaker import ModelSpec, make_model
    from invariant.modelmaker.make import corpus_text

    lines = [line for line in corpus_text() if line.strip()]
    prompts = [" ".join(line.split()[:6]) for line in lines[: args.prompts]]
    fillers = [line * (1 + k % 4) for k, line in enumerate(lines[args.prompts:])]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for close in (False, True):
            label = "close-logits" if close else "ordinary"
            path = make_model(Path(tmp) / label, ModelSpec(size=args.size, dtype=args.dtype, close_logits=close))
            results[label] = measure(str(path), prompts, fillers, batch_sizes, args.tokens)

    meta = {"date": datetime.date.today().isoformat(), "machine": machine.describe(),
            "engine": f"stock vLLM CPU (vllm-cpu 0.32.0), eager, greedy, {args.dtype}", "model_size": args.size,
            "cpu": machine.cpu_model(),
            "tokens": args.tokens}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"close_logits_divergence_{args.size}_{args.dtype}"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines_md = [f"Measured {meta['date']} on {meta['machine']} ({meta['cpu']}); {meta['engine']}; model size "
                f"{args.size}; {args.tokens} tokens per prompt.", "",
                "| model | batch | prompts | token sequences differ | logprobs differ | median first differing token |",
                "|---|---|---|---|---|---|"]
    for label, res in results.items():
        for r in res["rows"]:
            lines_md.append(f"| {label} | {r['batch']} | {r['prompts']} | {r['token_divergent']} | "
                            f"{r['logprob_divergent']} | {r['median_first_divergence']} |")
    table = "\n".join(lines_md)
    print(table)
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, res in results.items():
            ax.plot([r["batch"] for r in res["rows"]],
                    [r["token_divergent"] / r["prompts"] for r in res["rows"]], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (prompt + fillers)")
        ax.set_ylabel("share of prompts whose tokens change")
        ax.set_ylim(0, 1.05)
        ax.set_title("Stock vLLM CPU: token-level batch variance")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / f"{stem}.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
