"""On the device: search for rows whose top-k/top-p mask differs between vLLM 0.26's two paths.

    python3 bench/gpu_sampler_search.py [--rows 8192] [--out DIR]

Rows of random logits (top-k 40, top-p 0.9, as the made models' generation_config): each masked
alone by torch's sort path (what a request alone gets below 8 rows), alone by the Triton kernel, and
amid all the others by each path. Counts the rows on which any two disagree and keeps the top-40
logits of the first few such rows (the other logits cannot matter: top-k removes them) for a test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    from vllm.v1.sample.ops import topk_topp_sampler as ts
    from vllm.v1.sample.ops.topk_topp_triton import apply_top_k_top_p_triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(5)
    n, v = args.rows, args.vocab
    logits = torch.randn(n, v, generator=g, device="cuda") * torch.linspace(0.5, 6.0, n, device="cuda")[:, None]
    k = torch.full((n,), 40, device="cuda", dtype=torch.int32)
    p = torch.full((n,), 0.9, device="cuda")
    kept = {}
    kept["triton batch"] = torch.isfinite(apply_top_k_top_p_triton(logits.clone(), k, p))
    kept["torch batch"] = torch.isfinite(ts.apply_top_k_top_p_pytorch(logits.clone(), k, p))
    alone_torch, alone_triton = [], []
    for i in range(n):
        row = logits[i:i + 1]
        alone_torch.append(torch.isfinite(ts.apply_top_k_top_p_pytorch(row.clone(), k[:1], p[:1])))
        alone_triton.append(torch.isfinite(apply_top_k_top_p_triton(row.clone(), k[:1], p[:1])))
    kept["torch alone"] = torch.cat(alone_torch)
    kept["triton alone"] = torch.cat(alone_triton)
    names = list(kept)
    pairs = {}
    examples = []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            bad = (kept[names[a]] != kept[names[b]]).any(dim=1).nonzero().flatten().tolist()
            pairs[f"{names[a]} vs {names[b]}"] = len(bad)
            for i in bad[:3]:
                top = logits[i].topk(40).values.tolist()
                examples.append({"pair": f"{names[a]} vs {names[b]}", "row": i, "top40": top,
                                 "kept": {nm: int(kept[nm][i].sum()) for nm in names}})
    for name, count in pairs.items():
        print(f"{name:28s} rows whose mask differs: {count}/{n}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sampler_search.json").write_text(json.dumps({"rows": n, "vocab": v, "pairs": pairs,
                                                             "examples": examples, "device": torch.cuda.get_device_name()}))


if __name__ == "__main__":
    main()
