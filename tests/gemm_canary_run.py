"""Child process of tests/test_kernel_canary.py on the device: the kernel canary's check
(invariant.worker.kernel_canary.check) on one CUDA GEMM, on Qwen3-8B's weight shapes, at the sizes a
CUDA worker checks (``gpu_gemm_sizes``). A child because cuBLAS reads its workspace settings when its
handle is made: each GEMM gets a process of its own.

    python tests/gemm_canary_run.py MODE BUDGET SHAPE...     (SHAPE: name=K,N)

MODE: ``cublas`` (PyTorch's default cuBLAS), ``cublaslt`` (torch's linear under upstream's invariant
mode, enabled through vLLM's own function: on Hopper cuBLASLt with a 1-byte workspace, no split-K),
``vllm`` (the GEMM vLLM's linear layers call in that mode: its persistent Triton matmul), ``ours``
(invariant.kernels.gpu.matmul); ``cublaslt-graphed`` and ``cublas-graphed``: those two through
invariant.kernels.gpu.graphed (up to 64 rows replayed from CUDA graphs, as the worker's lm_head with
``--gpu-lm-head-graphs 64``, larger batches eager). Prints one JSON line: per shape the first failure (or null), seconds.
"""

from __future__ import annotations

import json
import sys
import time


def enable_vllm_invariant_gemm() -> None:
    try:
        from vllm.model_executor.layers.batch_invariant import enable_batch_invariant_mode
    except ImportError:  # newer vLLM moved it
        from vllm.model_executor.determinism.batch_invariant import enable_batch_invariant_mode
    enable_batch_invariant_mode()


def main(argv: list[str]) -> None:
    mode, budget, shapes = argv[0], int(argv[1]), argv[2:]
    if mode in ("cublaslt", "vllm", "cublaslt-graphed"):
        enable_vllm_invariant_gemm()
    import torch

    from invariant.worker import kernel_canary as kc

    if mode == "ours":
        from invariant.kernels.gpu import matmul

        gemm = matmul.linear
    elif mode in ("cublas", "cublaslt"):
        gemm = torch.nn.functional.linear
    elif mode in ("cublas-graphed", "cublaslt-graphed"):
        from invariant.kernels.gpu.graphed import GraphedLinear

        gemm = GraphedLinear(64)
    elif mode == "vllm":
        from vllm.model_executor.layers.batch_invariant import linear_batch_invariant as gemm
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    out = {"mode": mode, "budget": budget, "sizes": len(kc.gpu_gemm_sizes(budget)), "shapes": {}}
    for spec in shapes:
        name, dims = spec.split("=")
        k, n = (int(v) for v in dims.split(","))
        weight = (torch.randn(n, k, generator=torch.Generator().manual_seed(k * 7 + n)) * k ** -0.5)
        weight = weight.to(torch.bfloat16).cuda()
        case = kc.Case("gemm", name, f"K={k} N={n}", k, budget, lambda x, w=weight: [("bfloat16", gemm(x, w))],
                       torch.bfloat16, torch.device("cuda"), sizes=kc.gpu_gemm_sizes(budget))
        with torch.inference_mode():
            gemm(torch.zeros(4, k, dtype=torch.bfloat16, device="cuda"), weight)  # compile / warm up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            failure = kc.check(case)
            torch.cuda.synchronize()
        out["shapes"][name] = {"failure": failure.message() if failure else None,
                               "batch": failure.batch if failure else None,
                               "seconds": round(time.perf_counter() - t0, 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
