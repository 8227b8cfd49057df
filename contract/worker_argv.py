"""The worker's command line, written in one place.

`invariant up`, the operator's pod template, the benchmarks and the test helpers all start
``invariant worker``; each used to write its flags itself. They call :func:`worker_argv` now, and
``invariant.cli`` declares the worker's parser from the same flag names (``FLAGS``), so a renamed
flag is one edit that the argv writers and the parser share.
"""

from __future__ import annotations

from typing import Iterable

# option field -> the worker's flag (invariant.cli declares its parser from these)
FLAGS = {
    "model": "--model",
    "host": "--host",
    "port": "--port",
    "dtype": "--dtype",
    "max_model_len": "--max-model-len",
    "served_model_name": "--served-model-name",
    "tensor_parallel_size": "--tensor-parallel-size",
    "kv_cache_gib": "--kv-cache-gib",
    "expect_gpu_product": "--expect-gpu-product",
    "expect_driver_version": "--expect-driver-version",
    "expect_fingerprint": "--expect-fingerprint",
    "gpu_gemm": "--gpu-gemm",
    "tp_invariant_parts": "--tp-invariant-parts",
}
NO_INVARIANCE = "--no-invariance"
ENGINE_ARG = "--engine-arg"
SUBCOMMAND = "worker"


def worker_argv(model: str, *, invariance: bool = True, engine_args: Iterable[str] = (),
                **options: object) -> list[str]:
    """``["worker", "--model", MODEL, ...]``: the options given (None leaves a flag out, so the
    worker's default holds), ``--no-invariance`` when asked, one ``--engine-arg=`` per engine
    argument. An unknown option is an error here, not a surprise at the worker's start."""
    unknown = sorted(set(options) - set(FLAGS))
    if unknown:
        raise TypeError(f"worker_argv: unknown worker option(s) {', '.join(unknown)}")
    argv = [SUBCOMMAND, FLAGS["model"], str(model)]
    for name, flag in FLAGS.items():
        value = options.get(name)
        if name != "model" and value is not None:
            argv += [flag, str(value)]
    if not invariance:
        argv.append(NO_INVARIANCE)
    argv += [f"{ENGINE_ARG}={arg}" for arg in engine_args]
    return argv
