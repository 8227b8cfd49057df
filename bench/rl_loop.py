"""A small on-policy RL loop: sample from a worker, train with the trainer, serve the new weights.

Each step: an ``invariant worker`` serves the current checkpoint; completions of a few prompts are
sampled from it over HTTP (seeded, T = 1, several per prompt); the trainer
(invariant.trainer.PolicyModel) computes the logprobs of those completions with gradients; a
REINFORCE step with a mean baseline on a toy reward (the share of even token ids in a completion)
updates the weights; the checkpoint is saved and the worker restarted on it. Per step we record the
sampler-trainer KL estimate (mean over tokens of served - trainer logprob), the largest absolute
logprob difference and the share of identical logprobs, against the same loop on a
``--no-invariance`` worker, whose stock kernels give other bits than the trainer (the control).
Writes docs/results/<name>.{json,md,png}.

Run: python bench/rl_loop.py [--steps 5] [--name rl_loop_<machine>]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
PORT = 8197


def reward(tokens: list[int]) -> float:
    """The toy task: emit even token ids."""
    return sum(1 for t in tokens if t % 2 == 0) / max(1, len(tokens))


def run_mode(model: Path, work: Path, invariance: bool, args) -> list[dict]:
    import torch

    from invariant.processes import start_worker, stop_all, wait_ready
    from invariant.trainer import PolicyModel
    from invariant.trainer.parity import compare, random_prompts, sample

    torch.manual_seed(0)
    mode = "invariant" if invariance else "stock"
    ckpt = work / f"{mode}-step0"
    shutil.copytree(model, ckpt)
    policy = PolicyModel.from_pretrained(ckpt)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    prompts = random_prompts(args.prompts, policy.config["vocab_size"], seed=1, longest=args.longest)
    rows = []
    for step in range(args.steps):
        log = work / f"{mode}-worker-{step}.log"
        extra = () if invariance else ("--no-invariance",)
        t0 = time.perf_counter()
        proc = start_worker(ckpt, PORT, log, *extra, name="policy", max_model_len=1024)
        try:
            body = wait_ready(proc, f"http://127.0.0.1:{PORT}", log)
            start_s = time.perf_counter() - t0
            asked = [p for p in prompts for _ in range(args.samples)]
            seeds = [step * 100000 + i for i in range(len(asked))]
            served = sample(f"http://127.0.0.1:{PORT}", "policy", asked, max_tokens=args.max_tokens,
                            temperature=1.0, seeds=seeds)
        finally:
            stop_all([proc])
        logprobs = policy.token_logprobs([s.prompt for s in served], [s.token_ids for s in served])
        cmp = compare(served, [lp.tolist() for lp in logprobs])
        rewards = torch.tensor([reward(s.token_ids) for s in served])
        advantage = rewards - rewards.mean()
        loss = -(advantage * torch.stack([lp.sum() for lp in logprobs])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        rows.append({"mode": mode, "step": step, "fingerprint": body.get("fingerprint"),
                     "tokens": cmp.tokens, "identical": cmp.equal, "kl": cmp.kl, "max_abs_diff": cmp.max_abs_diff,
                     "reward": float(rewards.mean()), "worker_start_s": round(start_s, 1)})
        r = rows[-1]
        print(f"{mode:9s} step {step}: reward {r['reward']:.3f}  KL {r['kl']:+.3e}  max|diff| "
              f"{r['max_abs_diff']:.3e}  identical {r['identical']}/{r['tokens']}", flush=True)
        ckpt = policy.save_pretrained(work / f"{mode}-step{step + 1}")
    return rows


def write(rows: list[dict], args, name: str) -> None:
    from invariant import machine

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "machine": machine.describe(), "steps": args.steps,
            "prompts": args.prompts, "samples_per_prompt": args.samples, "max_tokens": args.max_tokens,
            "lr": args.lr, "model": f"made {args.arch} {args.size} {args.dtype}"}
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# On-policy RL loop: sampler vs trainer ({meta['date']})", "",
             f"Machine: {meta['machine']}. Model: {meta['model']}; {args.prompts} prompts x {args.samples} "
             f"seeded samples (T = 1) x {args.max_tokens} tokens per step; REINFORCE, Adam lr {args.lr}. "
             "KL: mean over sampled tokens of (served - trainer) logprob.", "",
             "| worker | step | reward | KL(sampler, trainer) | max abs logprob diff | identical logprobs |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['step']} | {r['reward']:.3f} | {r['kl']:.3e} | {r['max_abs_diff']:.3e} "
                     f"| {r['identical']}/{r['tokens']} |")
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for mode, style in (("invariant", "o-"), ("stock", "s--")):
        part = [r for r in rows if r["mode"] == mode]
        if not part:
            continue
        axes[0].plot([r["step"] for r in part], [abs(r["kl"]) for r in part], style, label=f"{mode} worker")
        axes[1].plot([r["step"] for r in part], [r["max_abs_diff"] for r in part], style, label=f"{mode} worker")
    for ax, title in zip(axes, ("|KL(sampler, trainer)| estimate", "max |served - trainer| logprob")):
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.set_yscale("symlog", linthresh=1e-9)
        ax.legend()
    fig.suptitle(f"sampler vs trainer, {meta['model']} ({meta['machine'][:60]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / f"{name}.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=4, help="seeded samples per prompt and step")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--longest", type=int, default=120, help="longest prompt, in tokens")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--arch", default="qwen3")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--modes", default="invariant,stock")
    ap.add_argument("--name", default="rl_loop")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the results go (default docs/results)")
    args = ap.parse_args(argv)
    from invariant.modelmaker import ModelSpec, make_model

    work = Path(tempfile.mkdtemp(prefix="invariant-rl-"))
    try:
        print(f"making the {args.arch} {args.size} {args.dtype} model ...", flush=True)
        model = make_model(work / "model", ModelSpec(arch=args.arch, size=args.size, dtype=args.dtype))
        rows = []
        for mode in args.modes.split(","):
            rows += run_mode(model, work, mode == "invariant", args)
        write(rows, args, args.name)
        for mode in ("invariant", "stock"):
            part = [r for r in rows if r["mode"] == mode]
            if part:
                print(f"{mode}: median |KL| {statistics.median(abs(r['kl']) for r in part):.3e}, "
                      f"max |diff| {max(r['max_abs_diff'] for r in part):.3e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
