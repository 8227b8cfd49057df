"""What decides a worker's numerics, in one place: the kernels (backend, compile mode, threads,
our kernels' build, the attention ISA or backend, the GEMM, inductor's settings, the sizes the
engine is compiled for) and the vLLM arguments that select them. The fingerprint's kernel part is
:func:`kernel_config`; the engine gets :func:`vllm_args`; both are decided here, from the same
names, so the fingerprint cannot describe other kernels than the engine runs.
"""

from __future__ import annotations

import json
import os
from typing import Any

from invariant.contract.engine_args import GPU_GEMM_DEFAULT, compile_shape


# FlashAttention 3 (vLLM's default on Hopper, num_splits=1 in invariant mode) still picks its kernel
# variant from the step's longest query (suspected in a seeded HTTP crowd that differed on an H100,
# docs/gpu-vllm.md). vLLM's Triton attention in invariant mode always runs its 2-D kernel, walking
# the KV cache in fixed 32-token tiles from position 0 for every query, whatever the step holds.
GPU_INVARIANT_ATTENTION = "TRITON_ATTN"


# vLLM 0.26 masks top-k/top-p with torch's sort and cumsum below 8 rows and with its Triton kernel
# from 8 rows: a request alone and the same request in a crowd were masked by different code, and
# near the nucleus boundary they disagree (issue 16: a seeded request amid crowds differed from step
# 11). The invariant CUDA worker runs the Triton kernel for every batch: one program walks one row in
# fixed tiles, whatever the batch (invariant.worker.plugin.invariant_top_k_top_p).
GPU_INVARIANT_SAMPLER = "triton-topk-topp"


# The CPU worker's attention in invariant mode: our kernel over vLLM's paged cache (plugin.py says why).
CPU_INVARIANT_ATTENTION = "invariant-cpu-paged"


def resolve_gpu_gemm(gemm: str, arch: str) -> str:
    """The GEMM ``--gpu-gemm`` names on this GPU (contract.engine_args.GPU_GEMMS): ``auto`` is
    cuBLASLt without split-K from Hopper (sm90) on and upstream's Triton matmul before it (vLLM's
    own note: Ampere cannot rely on cuBLASLt alone for invariance). ``cublaslt`` before Hopper is
    refused: there upstream's invariant mode routes torch's linear itself to its Triton matmul, so
    the fingerprint would name a GEMM the layers do not run."""
    major = int(arch[2:-1] or 0) if arch.startswith("sm") and len(arch) > 3 else 0
    if gemm == "auto":
        return "cublaslt" if major >= 9 else "vllm"
    if gemm == "cublaslt" and major < 9:
        from invariant.worker.options import WorkerConfigError

        raise WorkerConfigError(f"--gpu-gemm cublaslt needs Hopper (sm90) or later, this GPU is {arch}: there "
                                "vLLM's invariant mode sends torch's linear to its Triton matmul (use auto or vllm)")
    return gemm


def cuda_arch() -> str:
    """This process's CUDA device as ``sm90`` etc. (the worker process touches CUDA anyway)."""
    import torch

    from invariant.kernels.gpu.device import arch_of

    return arch_of(torch.device("cuda"))


def gpu_gemm_library(gemm: str, arch: str) -> dict[str, str]:
    """Which code does the CUDA worker's GEMMs, as far as the bits go (``gemm`` resolved). vLLM
    0.26's invariant mode runs its persistent Triton matmul in every linear layer on every GPU
    (linear_batch_invariant), though its own setup only shrinks cuBLAS's workspace on Hopper: a
    profile on the H200 found that kernel, not cuBLASLt, in the decode step. ``cublaslt`` trusts
    cuBLAS's heuristics to pick no other reduction order for another M, so the cuBLAS build is
    named too (the kernel canary checks that trust at start-up: invariant.worker.kernel_canary)."""
    gemm = resolve_gpu_gemm(gemm, arch)
    if gemm == "invariant":
        return {"library": "invariant-triton"}
    if gemm == "vllm":
        return {"library": "vllm-triton-persistent"}
    from invariant.worker.fingerprint import package_version

    return {"library": "cublaslt-no-splitk",
            "cublas": package_version("nvidia-cublas", "nvidia-cublas-cu13", "nvidia-cublas-cu12")}


def inductor_patches() -> dict[str, bool]:
    """Inductor settings an invariant CUDA worker compiles with (as far as the installed torch has them).

    Compiled, vLLM 0.26 runs RMSNorm as its native IR op, which inductor lowers to a generated
    reduction kernel; inductor picks that kernel's block shape from the batch-size hint the graph was
    traced with (the engine's token budget) and, where several shapes fit, by timing them on the
    device at first use - another start could pick another and give other bits under the same
    fingerprint. ``deterministic`` picks one shape without timing; ``batch_invariant`` (newer torch)
    also stops the pick from following the hint. vLLM turns on combo kernels chosen by timing:
    naming ``benchmark_combo_kernel`` keeps them off."""
    import torch._inductor.config as inductor

    patches = {key: True for key in ("deterministic", "batch_invariant") if hasattr(inductor, key)}
    patches["benchmark_combo_kernel"] = False
    return patches


def model_head_dim(model_dir: str) -> int:
    """The attention head size from the checkpoint's config.json (vLLM's CPU attention ISA depends on it)."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def kernel_config(*, cuda: bool, invariance: bool, gpu_arch: str | None = None, gemm: str = GPU_GEMM_DEFAULT,
                  engine_args: tuple[str, ...] = (), attention_isa: str | None = None,
                  tp_invariant_parts: int = 0, lm_head_graphs: int = 0) -> dict[str, Any]:
    """What selects the kernels, and with them the bits: backend, compile mode, threads, and on
    CUDA the sizes the engine is compiled for (``engine_args.compile_shape``).
    ``gpu_arch`` (e.g. ``sm90``) is read from the device when not given."""
    import torch

    if cuda:
        if not invariance:
            return {"backend": "cuda", "enforce_eager": False, "batch_invariant": "off"}
        from invariant.kernels.gpu import identity

        # Upstream's invariant mode, with RMSNorm on our row kernels (invariant.worker.plugin):
        # their source, pinned constants and Triton version decide those bits.
        arch = gpu_arch or cuda_arch()
        config = {"backend": "cuda", "enforce_eager": False, "batch_invariant": "vllm+invariant-rmsnorm",
                  "attention": GPU_INVARIANT_ATTENTION, "sampler": GPU_INVARIANT_SAMPLER,
                  "gemm": resolve_gpu_gemm(gemm, arch),
                  "gemm_library": gpu_gemm_library(gemm, arch), "invariant_kernels": identity(arch),
                  "compiled_for": compile_shape(engine_args), "inductor": inductor_patches()}
        if config["gemm"] == "cublaslt":
            from invariant.kernels.gpu.rowchunks import lm_head_rows

            # Chunked (invariant.kernels.gpu.rowchunks) and, if asked, replayed from graphs at a
            # power-of-two row count (invariant.kernels.gpu.graphed): equal bits where the GEMM is
            # row-invariant (the canary's premise), but named until the device has shown it.
            head = f"chunks-of-{lm_head_rows(lm_head_graphs)}-rows"
            config["lm_head"] = head + (f"+graphed-up-to-{lm_head_graphs}-rows" if lm_head_graphs else "")
        return config
    config: dict[str, Any] = {
        "backend": "cpu",
        # torch.compile (inductor) fuses ops and so changes numerics, and its CPU code generation
        # depends on the ISA it detects at run time: the CPU worker runs eager, with no compile at all.
        "enforce_eager": True,
        "torch_compile": "disabled",
        "threads": torch.get_num_threads(),
        "batch_invariant": "invariant-cpu" if invariance else "off",
        "attn_split_kv": not invariance and os.environ.get("VLLM_CPU_ATTN_SPLIT_KV", "1") != "0",
    }
    if attention_isa is not None:
        # vLLM's CPU attention kernel comes in ISA variants (amx, vec, vec16, ...) of other arithmetic.
        config["attention_isa"] = attention_isa
    if invariance:
        from invariant.kernels.cpu import native

        # Our fixed-order paged attention (invariant.kernels.cpu.attention), not one of vLLM's ISA variants.
        config["attention"] = CPU_INVARIANT_ATTENTION

        # Our kernels' machine code decides the bits: source digest, compiler and flags.
        config["cpu_kernels_build"] = native.build_identity()
        if tp_invariant_parts:
            # Row-parallel layers sum K in this many fixed parts (worker/tensor_parallel.py): other
            # bits than the one reduction over K, the same at every TP size dividing it.
            config["tp_invariant_parts"] = tp_invariant_parts
    return config


def vllm_args(*, cuda: bool, invariance: bool) -> list[str]:
    """The vLLM arguments that select the kernels :func:`kernel_config` names: eager on the CPU (no
    torch.compile); on CUDA in invariant mode vLLM's Triton attention and inductor's settings."""
    if not cuda:
        return ["--enforce-eager"]
    if invariance:
        return ["--attention-backend", GPU_INVARIANT_ATTENTION,
                "--compilation-config", json.dumps({"inductor_compile_config": inductor_patches()})]
    return []
