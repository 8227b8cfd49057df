"""On the device: is vLLM's sampling of a seeded request the same alone and amid a batch?

    python3 bench/gpu_sampler_probe.py [--vocab 151936] [--rows 64] [--out DIR]

Three questions (issue 16, a seeded request that differed amid crowds from step 11):
1. top-k/top-p masks: a row masked alone (batch of 1) against the same row at the head of batches of
   2 to 512, for vLLM 0.26's dispatcher (torch sort + cumsum below 8 rows, its Triton kernel from 8),
   each implementation on its own, and the worker's (invariant.worker.plugin.invariant_top_k_top_p,
   Triton at every size). ``torch.equal`` of the masked logits.
2. torch.cumsum of one row alone against the same row in a batch (a single row takes cub's scan).
3. The rewind vLLM does after a thrown-away token (``set_offset(get_offset() - 4)``): does one
   ``exponential_`` over a vocabulary advance a CUDA generator by exactly 4?
Also the median time of a mask call per implementation and batch. Writes sampler_probe.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SIZES = (2, 4, 7, 8, 16, 64, 256, 512)


def logits_rows(n: int, vocab: int, seed: int) -> torch.Tensor:
    """Rows shaped like a model's: a few strong candidates over a long tail, entropy varied per row."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    base = torch.randn(n, vocab, generator=g, device="cuda")
    scale = torch.linspace(1.0, 4.0, n, device="cuda")[:, None]
    return (base * scale / 0.8).float()  # divided by the temperature, as the sampler does first


def mask_impls() -> dict:
    from vllm.v1.sample.ops import topk_topp_sampler as ts
    from vllm.v1.sample.ops.topk_topp_triton import apply_top_k_top_p_triton

    from invariant.worker.plugin import invariant_top_k_top_p

    return {"vllm dispatcher": ts.apply_top_k_top_p, "torch sort": ts.apply_top_k_top_p_pytorch,
            "vllm triton": apply_top_k_top_p_triton, "invariant (worker)": invariant_top_k_top_p}


def masks(rows: int, vocab: int, k: int, p: float) -> dict:
    test = logits_rows(rows, vocab, 1)
    fill = logits_rows(max(SIZES), vocab, 2)
    out = {}
    for name, fn in mask_impls().items():
        def masked(batch: torch.Tensor) -> torch.Tensor:
            n = batch.shape[0]
            return fn(batch.clone(), torch.full((n,), k, device="cuda", dtype=torch.int32),
                      torch.full((n,), p, device="cuda", dtype=torch.float32))

        alone = [masked(test[i:i + 1])[0] for i in range(rows)]
        differ = {}
        for n in SIZES:
            differ[n] = sum(not torch.equal(masked(torch.cat([test[i:i + 1], fill[:n - 1]]))[0], alone[i])
                            for i in range(rows))
        kept = statistics.median(int(torch.isfinite(a).sum()) for a in alone)
        times = {}
        for n in (1, 8, 64, 512):
            batch = torch.cat([test[:1], fill[:n - 1]])
            for _ in range(3):
                masked(batch)
            torch.cuda.synchronize()
            samples = []
            for _ in range(20):
                t0 = time.perf_counter()
                masked(batch)
                torch.cuda.synchronize()
                samples.append((time.perf_counter() - t0) * 1e6)
            times[n] = statistics.median(samples)
        out[name] = {"rows_differing_from_alone": differ, "median_kept": kept, "median_us": times}
        print(f"{name:20s} differ from alone at batch " + ", ".join(f"{n}: {d}/{rows}" for n, d in differ.items())
              + " | us at 1/8/64/512: " + "/".join(f"{t:.0f}" for t in times.values()), flush=True)
    return out


def cumsum_rows(rows: int, vocab: int) -> dict:
    probs = logits_rows(rows, vocab, 3).softmax(-1).sort(-1).values
    alone = [torch.cumsum(probs[i:i + 1], -1) for i in range(rows)]
    res = {}
    for n in (2, 8, 64):
        res[n] = sum(not torch.equal(torch.cumsum(torch.cat([probs[i:i + 1], probs[:n - 1]]), -1)[:1], alone[i])
                     for i in range(rows))
    print("cumsum rows differing from alone: " + ", ".join(f"{n}: {d}/{rows}" for n, d in res.items()), flush=True)
    return res


def generator_steps(vocabs: list[int]) -> dict:
    res = {}
    for v in vocabs:
        g = torch.Generator(device="cuda").manual_seed(1234)
        q = torch.empty(v, device="cuda")
        first = q.exponential_(generator=g).clone()
        step = int(g.get_offset())
        g.set_offset(g.get_offset() - 4)
        again = q.exponential_(generator=g).clone()
        res[v] = {"offset_step": step, "rewound_draw_equal": bool(torch.equal(first, again))}
    print(f"generator: {res}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--k", type=int, default=40)
    ap.add_argument("--p", type=float, default=0.9)
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "vocab": args.vocab,
              "k": args.k, "p": args.p, "rows": args.rows, "date": time.strftime("%Y-%m-%d"),
              "generator": generator_steps([1024, 32000, args.vocab, 1 << 20, 1 << 22]),
              "cumsum": cumsum_rows(args.rows, args.vocab),
              "masks": masks(args.rows, args.vocab, args.k, args.p)}
    (args.out / "sampler_probe.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Sampler probe: {result['device']}, torch {result['torch']}, {result['date']}", "",
             f"top-k {args.k}, top-p {args.p}, vocab {args.vocab}, {args.rows} rows; rows whose masked logits "
             "differ from the row masked alone (`torch.equal`), and the median time of one call:", "",
             "| implementation | " + " | ".join(f"batch {n}" for n in SIZES) + " | us at 1 / 8 / 64 / 512 |",
             "|---|" + "---|" * (len(SIZES) + 1)]
    for name, r in result["masks"].items():
        lines.append(f"| {name} | " + " | ".join(str(r["rows_differing_from_alone"][n]) for n in SIZES) + " | "
                     + " / ".join(f"{t:.0f}" for t in r["median_us"].values()) + " |")
    lines += ["", "torch.cumsum, rows differing from the row alone: "
              + ", ".join(f"batch {n}: {d}" for n, d in result["cumsum"].items()), "",
              "Generator: " + "; ".join(f"vocab {v}: offset +{g['offset_step']}, rewound draw "
                                        f"{'equal' if g['rewound_draw_equal'] else 'DIFFERENT'}"
                                        for v, g in result["generator"].items())]
    (args.out / "sampler_probe.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
