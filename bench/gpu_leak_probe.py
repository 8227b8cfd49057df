"""Which kernel of vLLM's eager path leaks the batch? One row's bits alone vs amid M-1 others.

    python3 bench/gpu_leak_probe.py [--out DIR]      (the device, with carried vLLM on PYTHONPATH)

For each op that vLLM 0.26 runs in eager mode with ``VLLM_BATCH_INVARIANT=1`` on a Qwen3 (RMSNorm
with and without the residual, SiLU-and-mul, the persistent Triton GEMM, log_softmax), the same
first row is computed alone and inside batches of M rows, and its bits compared. Our Triton RMSNorm
(invariant.kernels.gpu.rowops) is probed beside vLLM's. Prints a table; writes leak_probe.json/.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ["VLLM_BATCH_INVARIANT"] = "1"

ROWS = (2, 64, 255, 256, 512, 2048)
HIDDEN = (1024, 2048, 4096)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = ap.parse_args()
    import torch
    import vllm
    import vllm._custom_ops as ops
    from vllm.model_executor.layers import batch_invariant as bi

    from invariant.kernels.gpu import rowops

    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(torch.bfloat16)

    def vllm_fused(x, r, w):
        x, r = x.clone(), r.clone()
        ops.fused_add_rms_norm(x, r, w, 1e-6)
        return torch.cat([x, r], dim=-1)

    def vllm_rms(x, w):
        out = torch.empty_like(x)
        ops.rms_norm(out, x, w, 1e-6)
        return out

    def silu_mul(x):
        out = torch.empty(x.shape[0], x.shape[1] // 2, device="cuda", dtype=x.dtype)
        torch.ops._C.silu_and_mul(out, x)
        return out

    probes = {
        "vllm fused_add_rms_norm (CUDA)": lambda x, r, w, W: vllm_fused(x, r, w),
        "vllm rms_norm (CUDA)": lambda x, r, w, W: vllm_rms(x, w),
        "vllm rms_norm_batch_invariant (Triton, no residual)": lambda x, r, w, W: bi.rms_norm_batch_invariant(x, w, 1e-6),
        "vllm silu_and_mul (CUDA)": lambda x, r, w, W: silu_mul(torch.cat([x, r], dim=-1)),
        "vllm matmul_persistent (Triton)": lambda x, r, w, W: bi.matmul_persistent(x, W),
        "vllm log_softmax (Triton)": lambda x, r, w, W: bi.log_softmax(x.float(), -1),
        "invariant fused_add_rms_norm (Triton)": lambda x, r, w, W: torch.cat(rowops.fused_add_rms_norm(x, r, w, 1e-6), -1),
        "invariant rms_norm (Triton)": lambda x, r, w, W: rowops.rms_norm(x, w, 1e-6),
    }
    table = []
    for hidden in HIDDEN:
        x, r, w, W = rand(max(ROWS), hidden), rand(max(ROWS), hidden), rand(hidden), rand(hidden, 1024)
        for name, fn in probes.items():
            try:
                alone = fn(x[:1], r[:1], w, W)[0]
                differs = [m for m in ROWS if not torch.equal(fn(x[:m], r[:m], w, W)[0], alone)]
            except Exception as exc:  # an op this vLLM build lacks or calls otherwise: say so, go on
                table.append({"op": name, "hidden": hidden, "error": f"{type(exc).__name__}: {exc}"[:200]})
                print(f"{name:55s} hidden {hidden:5d}: ERROR {table[-1]['error']}", flush=True)
                continue
            table.append({"op": name, "hidden": hidden, "differs_at_rows": differs})
            print(f"{name:55s} hidden {hidden:5d}: {'row-invariant' if not differs else 'DIFFERS at ' + str(differs)}",
                  flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "leak_probe.json").write_text(json.dumps(table, indent=1))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"{torch.cuda.get_device_name(0)}, vLLM {vllm.__version__}, VLLM_BATCH_INVARIANT=1, bf16; {when}.", "",
             "| op | hidden | first row differs from its batch-of-1 bits at M = |", "|---|---|---|"]
    lines += [f"| {t['op']} | {t['hidden']} | {t.get('error') or ', '.join(map(str, t['differs_at_rows'])) or 'never'} |"
              for t in table]
    (args.out / "leak_probe.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
