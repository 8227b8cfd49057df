"""Which extra vLLM engine arguments may be passed, shared by the operator (spec validation) and
the worker (start-up refusal), so the two can never disagree."""

from __future__ import annotations

from typing import Any

# Engine arguments a user may add. Everything else is refused: numerics come from spec.numerics, and
# options such as speculative decoding, quantization or a KV-cache dtype change or break the bits.
ENGINE_ARG_ALLOW = {
    "--max-model-len": "int",
    "--max-num-seqs": "int",
    "--max-num-batched-tokens": "int",
    "--gpu-memory-utilization": "float",
    # A fixed KV-cache size instead of a share of the GPU (vLLM then skips its memory profile, which
    # fails when another process on the same GPU frees memory meanwhile): block count, not numerics.
    "--kv-cache-memory-bytes": "int",
    "--enable-prefix-caching": "flag",
    "--no-enable-prefix-caching": "flag",
    "--enable-chunked-prefill": "flag",
    "--swap-space": "float",
}
# Named so the refusal can say why, not only "not allowed".
ENGINE_ARG_WHY = {
    "--dtype": "the dtype is a pin (spec.numerics.dtype, or the worker's --dtype)",
    "--tensor-parallel-size": "tensor parallelism is a pin (spec.numerics.tensorParallelSize, or the worker's --tensor-parallel-size)",
    "--model": "the model comes from spec.model (or the worker's --model)",
    "--served-model-name": "the served name comes from spec.model.servedName (or the worker's --served-model-name)",
    "--quantization": "quantization changes the numerics: ship a quantized checkpoint as the model",
    "--kv-cache-dtype": "a KV-cache dtype changes the numerics",
    "--speculative-config": "speculative decoding breaks batch invariance",
    "--enforce-eager": ("the compile mode is part of the worker image's numerics, and vLLM's eager path is not "
                        "batch-invariant on GPUs (an H100 differed from a batch of 2: docs/gpu-vllm.md)"),
    "--seed": "the seed is fixed by the worker",
    "--attention-backend": "the attention kernel decides the bits: the invariant GPU worker fixes it",
    "--compilation-config": "the compile settings decide the bits: the invariant GPU worker fixes them",
}


def engine_arg_errors(args: list[Any]) -> list[str]:
    errors = []
    for arg in args:
        if not isinstance(arg, str):
            errors.append(f"engine arg {arg!r} must be a string")
            continue
        flag, eq, value = arg.partition("=")
        if flag in ENGINE_ARG_WHY:
            errors.append(f"engine arg {flag} is refused: {ENGINE_ARG_WHY[flag]}")
            continue
        kind = ENGINE_ARG_ALLOW.get(flag)
        if kind is None:
            errors.append(f"engine arg {flag} is not in the allow-list ({', '.join(sorted(ENGINE_ARG_ALLOW))})")
        elif kind == "flag" and eq:
            errors.append(f"engine arg {flag} takes no value")
        elif kind != "flag":
            if not eq:
                errors.append(f"engine arg {flag} needs a value: write {flag}=VALUE")
                continue
            try:
                number = int(value) if kind == "int" else float(value)
            except ValueError:
                errors.append(f"engine arg {flag} needs a{'n integer' if kind == 'int' else ' number'}, got {value!r}")
                continue
            if number <= 0:
                errors.append(f"engine arg {flag} must be positive, got {value}")
    return errors


# Whose GEMM an invariant CUDA worker runs (worker --gpu-gemm, DeterministicModel spec.numerics.gemm):
# - "cublaslt": cuBLASLt with upstream's invariant settings (a 1-byte workspace, so no split-K, and no
#   reduced-precision reduction), Hopper and later; that cuBLAS's heuristics pick one reduction
#   order for every M is checked at start-up by the kernel canary;
# - "vllm": upstream's persistent Triton matmul, which vLLM 0.26's invariant mode runs in every
#   linear layer on every GPU (3.6x cuBLAS's kernel time per decoded token on the H200, 2026-12-03);
# - "invariant": ours (invariant.kernels.gpu: fixed K chunks, a kernel per M);
# - "auto" (the default): the fastest of these for the GPU, cuBLASLt from Hopper (sm90) on, vLLM's
#   Triton matmul before. The fingerprint names the GEMM it resolved to.
GPU_GEMMS = ("auto", "cublaslt", "vllm", "invariant")
GPU_GEMM_DEFAULT = "auto"

# vLLM's CPU KV-cache block size: the worker never changes vLLM's default (--block-size is not an
# allowed engine arg); the trainer lays out its paged cache the same way.
CPU_BLOCK_SIZE = 128

# Engine sizes that vLLM's compiled CUDA path is built for (inductor's size hints and the CUDA-graph
# capture sizes derive from them). On the H100, engines that differed only in the step budget (2048
# vs 48 tokens) gave a prompt's first logprob apart in the 7th digit (docs/gpu-vllm.md), while
# crowds of 2-512 in one engine gave equal bits. Inductor picks its reduction kernels' shape from
# the budget's hint unless torch has its batch_invariant setting (worker.numerics.inductor_patches):
# these sizes are part of a CUDA worker's numerics.
COMPILE_SHAPE_ARGS = ("--max-num-batched-tokens", "--max-num-seqs")


def compile_shape(args: list[str] | tuple[str, ...]) -> dict[str, int | str]:
    """The sizes ``COMPILE_SHAPE_ARGS`` given in ``args`` (``default``: vLLM's, which its pinned
    version decides)."""
    given = dict(arg.partition("=")[::2] for arg in args if isinstance(arg, str))
    return {flag.lstrip("-").replace("-", "_"): int(given[flag]) if given.get(flag) else "default"
            for flag in COMPILE_SHAPE_ARGS}
