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
``--gpu-lm-head-graphs 64``, larger batches eager). A shape named ``lm_head`` goes, under the
cuBLAS modes, through the chunking the worker's plugin puts before it (invariant.kernels.gpu.rowchunks),
at the sizes the worker checks it at (``lm_head_sizes``). The sizes are split across threads as in
the worker (``canary_threads``; ``INVARIANT_CANARY_THREADS`` overrides). Prints one JSON line: per
shape the first failure (or null), sizes, threads, seconds.
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

    from invariant.kernels.gpu.rowchunks import RowChunks, lm_head_rows
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
    # As the worker checks them (kernel_canary._linear_cases): threads by the GEMM (INVARIANT_CANARY_THREADS
    # overrides), the lm_head through the chunking the plugin puts before it under cuBLASLt.
    # cuBLAS's default (the control) is checked as cuBLASLt is.
    checked_as = "cublaslt" if mode.startswith("cublas") else mode
    threads = kc.canary_threads(checked_as)
    head = RowChunks(gemm, lm_head_rows(64 if mode.endswith("-graphed") else 0)) if checked_as == "cublaslt" else gemm
    out = {"mode": mode, "budget": budget, "sizes": len(kc.gpu_gemm_sizes(budget)), "threads": threads,
           "shapes": {}}
    for spec in shapes:
        name, dims = spec.split("=")
        k, n = (int(v) for v in dims.split(","))
        weight = (torch.randn(n, k, generator=torch.Generator().manual_seed(k * 7 + n)) * k ** -0.5)
        weight = weight.to(torch.bfloat16).cuda()
        fn = head if name == "lm_head" else gemm
        sizes, case_threads = kc.gpu_gemm_plan(budget, threads, fn if name == "lm_head" else None)
        case = kc.Case("gemm", name, f"K={k} N={n}", k, budget, lambda x, w=weight, f=fn: [("bfloat16", f(x, w))],
                       torch.bfloat16, torch.device("cuda"), sizes=sizes, threads=case_threads)
        with torch.inference_mode():
            gemm(torch.zeros(4, k, dtype=torch.bfloat16, device="cuda"), weight)  # compile / warm up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            failure = kc.check_split(case)
            torch.cuda.synchronize()
        out["shapes"][name] = {"failure": failure.message() if failure else None,
                               "batch": failure.batch if failure else None, "sizes": len(sizes),
                               "threads": case.threads, "seconds": round(time.perf_counter() - t0, 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
