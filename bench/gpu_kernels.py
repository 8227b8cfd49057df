"""GPU kernel benchmark (run on the device): the anchor table of issue #6 reproduced, plus our rows.

    python bench/gpu_kernels.py --out DIR [--quick]

Linear layers of a Qwen3-8B-sized model (qkv, o, gate_up, down, lm_head) x M in {1..4096}, bf16:
cuBLAS (default), cuBLAS with split-K off (vLLM's invariant settings on Hopper, measured in a child
process because the settings are process-wide), and ours: with the shipped configuration table
and with the best of a small sweep of tile shapes (the tile shape never changes our bits, so the
sweep only informs the next table). Each row says whether the method was batch-invariant there
(row 0 equal to the product of A[:1]; rows [:M] equal to the product of A[:M+7]). Then RMSNorm,
log_softmax and decode attention over a paged KV cache against PyTorch's fastest. Times are
medians of CUDA-graph replays (``triton.testing.do_bench_cudagraph``); ratios are against cuBLAS / PyTorch measured in the same run.
Writes gpu_kernels.json, gpu_kernels.md and gpu_kernels.png into DIR.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

LAYERS = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 24576), "down": (12288, 4096),
          "lm_head": (4096, 151936)}
MS = [1, 16, 64, 256, 1024, 4096]
# (BM, BN, warps, stages, TMA)
SWEEP = {
    16: [(16, 64, 4, 4, 0), (16, 128, 4, 4, 0), (16, 32, 4, 4, 0), (16, 64, 4, 6, 0), (64, 64, 4, 4, 1)],
    64: [(64, 64, 4, 4, 0), (64, 128, 4, 4, 0), (32, 64, 4, 4, 0), (64, 32, 4, 4, 0), (64, 64, 4, 4, 1),
         (64, 128, 4, 4, 1)],
    256: [(64, 128, 4, 4, 0), (128, 128, 8, 3, 0), (64, 256, 8, 3, 0), (64, 128, 4, 4, 1),
          (128, 128, 8, 3, 1), (128, 256, 8, 3, 1)],
    1 << 62: [(128, 256, 8, 3, 0), (128, 256, 8, 3, 1),
              (128, 256, 8, 4, 1), (128, 128, 8, 4, 1), (256, 128, 8, 3, 1), (128, 128, 4, 4, 1)],
}


def bench(fn) -> float:
    """Median ms of CUDA-graph replays (as vLLM runs decode steps): Python launch overhead, which
    is larger for Triton's launcher than for cuBLAS's, stays out for both sides."""
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=100, return_mode="median")


def invariant(mm, a: torch.Tensor, M: int) -> bool:
    full = mm(a[:M + 7])
    return bool(torch.equal(mm(a[:1])[0], full[0]) and torch.equal(mm(a[:M]), full[:M]))


def linear_rows(impl: str, quick: bool) -> list[dict]:
    """impl: cublas_default | cublas_no_splitk (settings applied by the parent) | ours."""
    from invariant.kernels.gpu import configs, matmul

    if impl == "cublas_no_splitk":
        torch.backends.cuda.preferred_blas_library("cublaslt")
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    rows = []
    torch.manual_seed(0)
    for layer, (K, N) in LAYERS.items():
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / math.sqrt(K)
        a_all = torch.randn(max(MS) + 7, K, device="cuda", dtype=torch.bfloat16)
        for M in MS:
            a = a_all[:M]
            flops = 2 * M * N * K
            if impl.startswith("cublas"):
                mm = lambda x: x @ w.t()  # noqa: E731
                t = bench(lambda: a @ w.t())
                rows.append(dict(layer=layer, K=K, N=N, M=M, impl=impl, ms=t, tflops=flops / t / 1e9,
                                 batch_invariant=invariant(mm, a_all, M)))
                continue
            shipped = configs.mm_config(M, N, K, torch.cuda.get_device_properties(0).multi_processor_count)
            mm = lambda x: matmul.linear(x, w)  # noqa: E731
            t = bench(lambda: matmul.linear(a, w))
            best, best_cfg = t, shipped
            if not quick:
                for max_m, cands in SWEEP.items():
                    if M <= max_m:
                        break
                for bm, bn, warps, stages, tma in cands:
                    for split in ((False,) if tma or configs.chunks(K) == 1 else (False, True)):
                        cfg = configs.MMConfig(bm, bn, warps, stages, split, tma=bool(tma))
                        if cfg == shipped:
                            continue
                        try:
                            tc = bench(lambda: matmul.linear(a, w, config=cfg))
                        except Exception as exc:  # a shape the compiler refuses (shared memory): skip it
                            print(f"  skip {cfg}: {type(exc).__name__}", file=sys.stderr)
                            continue
                        if tc < best:
                            best, best_cfg = tc, cfg
            same = torch.equal(matmul.linear(a, w, config=best_cfg), matmul.linear(a, w))
            rows.append(dict(layer=layer, K=K, N=N, M=M, impl="ours", ms=t, tflops=flops / t / 1e9,
                             batch_invariant=invariant(mm, a_all, M) and same, config=configs.describe(shipped)))
            rows.append(dict(layer=layer, K=K, N=N, M=M, impl="ours_best_of_sweep", ms=best,
                             tflops=flops / best / 1e9, batch_invariant=invariant(mm, a_all, M) and same,
                             config=configs.describe(best_cfg)))
            print(f"  {layer:8s} M={M:5d} ours {flops / t / 1e9:7.1f} TFLOP/s, best {flops / best / 1e9:7.1f} "
                  f"({best_cfg})", file=sys.stderr, flush=True)
    return rows


def row_ops() -> list[dict]:
    from invariant.kernels.gpu import rowops

    rows = []
    for R, H in [(1, 4096), (64, 4096), (1024, 4096), (4096, 4096), (16384, 4096)]:
        x = torch.randn(R, H, device="cuda", dtype=torch.bfloat16)
        r = torch.randn_like(x)
        w = torch.randn(H, device="cuda", dtype=torch.bfloat16)
        t_ours = bench(lambda: rowops.fused_add_rms_norm(x, r, w, 1e-6))
        t_ref = bench(lambda: torch.nn.functional.rms_norm(x + r, (H,), w, 1e-6))
        rows.append(dict(op="fused_add_rms_norm", rows=R, n=H, ours_ms=t_ours, torch_ms=t_ref, ratio=t_ref / t_ours))
    for R, V in [(1, 151936), (64, 151936), (256, 151936), (1024, 32000)]:
        x = torch.randn(R, V, device="cuda", dtype=torch.bfloat16)
        t_ours = bench(lambda: rowops.log_softmax(x, -1, torch.float32))
        t_ref = bench(lambda: torch.log_softmax(x, -1, dtype=torch.float32))
        rows.append(dict(op="log_softmax", rows=R, n=V, ours_ms=t_ours, torch_ms=t_ref, ratio=t_ref / t_ours))
    return rows


# The decode cases and the SDPA baseline are bench/gpu_attention.py's (one definition of both).
sys.path.insert(0, str(Path(__file__).resolve().parent))  # a sibling, also under PYTHONSAFEPATH
from gpu_attention import D, HKV, HQ, decode_case, sdpa_best  # noqa: E402


def attention_rows(quick: bool) -> list[dict]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from invariant.kernels.gpu import attention

    rows = []
    for B in ([1, 64] if quick else [1, 8, 32, 64]):
        for ctx in ([4096, 32768] if quick else [4096, 8192, 32768]):
            q, kc, vc, table, seq_lens, qsl = decode_case(B, ctx)
            plan = attention.plan(qsl, seq_lens, HQ // HKV)
            t_ours = bench(lambda: attention.paged_attention(q, kc, vc, table, seq_lens, qsl, plan_=plan))
            # the same keys, contiguous, for PyTorch's SDPA (paging costs it nothing here)
            k = kc[table.long()].reshape(B, ctx, HKV, D).transpose(1, 2).contiguous()
            v = vc[table.long()].reshape(B, ctx, HKV, D).transpose(1, 2).contiguous()
            q4 = q[:, :, None, :]
            best, best_name = sdpa_best(q4, k, v, timer=bench)
            with sdpa_kernel(SDPBackend.MATH):  # float64 reference for the first sequence (memory)
                ref = F.scaled_dot_product_attention(q4[:1].double(), k[:1].double(), v[:1].double(),
                                                     enable_gqa=True)[:, :, 0]
            ours = attention.paged_attention(q, kc, vc, table, seq_lens, qsl, plan_=plan)[:1]
            err = float((ours.double() - ref).norm() / ref.norm())
            gb = 2 * B * ctx * HKV * D * 2 / 1e9
            rows.append(dict(batch=B, context=ctx, ours_ms=t_ours, sdpa_ms=best, sdpa_backend=best_name,
                             ratio=t_ours / best, ours_tb_s=gb / t_ours, rel_err=err))
            print(f"  attn B={B} ctx={ctx}: ours {t_ours:.3f} ms, sdpa[{best_name}] {best:.3f} ms", file=sys.stderr)
            del kc, vc, k, v
    return rows


def attention_variants() -> list[dict]:
    """Timing of other (block_m, block_n, split, warps) shapes of our attention: each would be another
    pinned numerics, so this informs the next pin; the shipped shape is the first row."""
    from invariant.kernels.gpu import attention, configs

    shipped = (configs.ATTN_BLOCK_M, configs.ATTN_BLOCK_N, configs.ATTN_SPLIT, configs.ATTN_WARPS)
    shapes = [shipped, (16, 64, 256, 4), (16, 64, 512, 4), (64, 64, 512, 4), (16, 128, 512, 4), (64, 128, 512, 8),
              (16, 64, 1024, 4), (16, 128, 1024, 8)]
    rows = []
    for B, ctx in [(1, 4096), (1, 32768), (8, 8192), (64, 8192)]:
        q, kc, vc, table, seq_lens, qsl = decode_case(B, ctx)
        for shape in shapes:
            plan = attention.plan(qsl, seq_lens, HQ // HKV, shape[0], shape[2])
            try:
                t = bench(lambda: attention.paged_attention(q, kc, vc, table, seq_lens, qsl, plan_=plan, _shape=shape))
            except Exception as exc:  # noqa: BLE001 - a shape the compiler refuses
                print(f"  attn shape {shape}: {type(exc).__name__}", file=sys.stderr)
                continue
            rows.append(dict(batch=B, context=ctx, shape=list(shape), ms=t, shipped=shape == shipped))
            print(f"  attn B={B} ctx={ctx} shape={shape}: {t:.4f} ms", file=sys.stderr, flush=True)
        del kc, vc
    return rows


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def summarize(linear: list[dict]) -> dict:
    by = {}
    for r in linear:
        by.setdefault(r["impl"], {})[(r["layer"], r["M"])] = r
    base = by["cublas_default"]
    out = {}
    for impl, rows in by.items():
        ratios = [rows[k]["tflops"] / base[k]["tflops"] for k in rows if k in base]
        out[impl] = dict(variant=sum(1 for r in rows.values() if not r["batch_invariant"]), cases=len(rows),
                         geomean_vs_cublas=geomean(ratios), min_vs_cublas=min(ratios))
    return out


def markdown(res: dict) -> str:
    lines = [f"# GPU kernels: {res['meta']['device']}", "",
             f"{res['meta']['date']}; torch {res['meta']['torch']}, Triton {res['meta']['triton']}, bf16. "
             "Medians of CUDA-graph replays (`triton.testing.do_bench_cudagraph`), as vLLM runs decode; ratios against cuBLAS / PyTorch measured in the same run.", "",
             "## Linear layers (30 shapes)", "", "| method | variant cases | geomean vs cuBLAS | worst vs cuBLAS |",
             "|---|---|---|---|"]
    for impl, s in res["summary"].items():
        lines.append(f"| {impl} | {s['variant']}/{s['cases']} | {s['geomean_vs_cublas']:.3f}x | {s['min_vs_cublas']:.3f}x |")
    lines += ["", "| layer | M | cuBLAS TFLOP/s (inv.) | no split-K | ours (shipped) | ours (best tile) |", "|---|---|---|---|---|---|"]
    idx = {(r["impl"], r["layer"], r["M"]): r for r in res["linear"]}
    for layer in LAYERS:
        for M in MS:
            cells = []
            for impl in ("cublas_default", "cublas_no_splitk", "ours", "ours_best_of_sweep"):
                r = idx.get((impl, layer, M))
                cells.append(f"{r['tflops']:.1f} ({'yes' if r['batch_invariant'] else 'NO'})" if r else "-")
            lines.append(f"| {layer} | {M} | " + " | ".join(cells) + " |")
    lines += ["", "## Row ops", "", "| op | rows | n | ours ms | torch ms | torch/ours |", "|---|---|---|---|---|---|"]
    for r in res["rowops"]:
        lines.append(f"| {r['op']} | {r['rows']} | {r['n']} | {r['ours_ms']:.4f} | {r['torch_ms']:.4f} | {r['ratio']:.2f}x |")
    lines += ["", "## Decode attention (paged KV, page 16, 32 query / 8 KV heads, head dim 128)", "",
              "| batch | context | ours ms | fastest SDPA ms (backend) | ours/SDPA | ours TB/s | rel. error vs fp64 |",
              "|---|---|---|---|---|---|---|"]
    for r in res["attention"]:
        lines.append(f"| {r['batch']} | {r['context']} | {r['ours_ms']:.4f} | {r['sdpa_ms']:.4f} ({r['sdpa_backend']}) | "
                     f"{r['ratio']:.2f}x | {r['ours_tb_s']:.2f} | {r['rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    idx = {(r["impl"], r["layer"], r["M"]): r for r in res["linear"]}
    labels = [f"{layer}\nM={M}" for layer in LAYERS for M in MS]
    for impl in ("cublas_no_splitk", "ours", "ours_best_of_sweep"):
        ys = [idx[(impl, layer, M)]["tflops"] / idx[("cublas_default", layer, M)]["tflops"]
              if (impl, layer, M) in idx else float("nan") for layer in LAYERS for M in MS]
        axes[0].plot(range(len(ys)), ys, marker="o", label=impl)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].axhline(0.95, color="g", ls="--", lw=0.8, label="goal 0.95x")
    axes[0].set_xticks(range(len(labels)), labels, fontsize=5, rotation=90)
    axes[0].set_ylabel("throughput vs cuBLAS default")
    axes[0].legend(fontsize=7)
    axes[0].set_title("linear layers, bf16")
    att = res["attention"]
    axes[1].bar(range(len(att)), [r["ratio"] for r in att])
    axes[1].axhline(1.2, color="r", ls="--", lw=0.8, label="goal 1.2x")
    axes[1].set_xticks(range(len(att)), [f"B{r['batch']}\n{r['context'] // 1024}k" for r in att], fontsize=7)
    axes[1].set_ylabel("time vs fastest SDPA (lower is better)")
    axes[1].legend(fontsize=7)
    axes[1].set_title("decode attention")
    fig.suptitle(res["meta"]["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="no tile sweep, fewer attention cases")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(linear_rows(args.child, args.quick)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    import triton

    t0 = time.time()
    print("[1/5] cuBLAS default", file=sys.stderr, flush=True)
    linear = linear_rows("cublas_default", args.quick)
    print("[2/5] cuBLAS without split-K (child process: the settings are process-wide)", file=sys.stderr, flush=True)
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":16:8", CUBLASLT_WORKSPACE_SIZE="1")
    child = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--child", "cublas_no_splitk"]
                           + (["--quick"] if args.quick else []), env=env, capture_output=True, text=True, check=True)
    linear += json.loads(child.stdout.strip().splitlines()[-1])
    print("[3/5] ours (shipped table, then the tile sweep)", file=sys.stderr, flush=True)
    linear += linear_rows("ours", args.quick)
    print("[4/5] row ops", file=sys.stderr, flush=True)
    rows = row_ops()
    print("[5/5] decode attention", file=sys.stderr, flush=True)
    att = attention_rows(args.quick)
    variants = [] if args.quick else attention_variants()
    props = torch.cuda.get_device_properties(0)
    res = dict(meta=dict(device=f"{props.name}, {props.multi_processor_count} SMs", torch=torch.__version__,
                         triton=triton.__version__, date=time.strftime("%Y-%m-%d"), seconds=round(time.time() - t0)),
               summary=summarize(linear), linear=linear, rowops=rows, attention=att,
               attention_variants=variants)
    (args.out / "gpu_kernels.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (args.out / "gpu_kernels.md").write_text(md)
    plot(res, args.out / "gpu_kernels.png")
    print(md)


if __name__ == "__main__":
    main()
