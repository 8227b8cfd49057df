"""Validate a worker's options before anything heavy is imported, with one-line errors.

vLLM's own failures for a bad model dir or dtype arrive as long tracebacks from a child
process, a minute into start-up; these checks answer at once and say what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from invariant.contract.engine_args import GPU_GEMM_DEFAULT, GPU_GEMMS, engine_arg_errors
from invariant.contract.net import PortError, check_port_free

# The architectures our invariant kernels and canary are written and tested for.
SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "LlamaForCausalLM")
CPU_DTYPES = ("bfloat16", "float32")
CUDA_DTYPES = ("bfloat16", "float16", "float32")


class WorkerConfigError(ValueError):
    """A bad worker option; the message is one actionable line."""


@dataclass(frozen=True)
class WorkerOptions:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "auto"
    max_model_len: int | None = None
    served_model_name: str | None = None
    tensor_parallel_size: int = 1
    invariance: bool = True
    kv_cache_gib: float = 1.0
    seed: int = 0
    extra_vllm_args: tuple[str, ...] = field(default_factory=tuple)
    # Whose GEMM an invariant CUDA worker runs (contract.engine_args.GPU_GEMMS). Part of the fingerprint.
    gpu_gemm: str = GPU_GEMM_DEFAULT
    # Experimental (issue 16, item 2): the lm_head's GEMM through CUDA graphs for batches of up to this
    # many rows (0: off; invariant.kernels.gpu.graphed). Part of the fingerprint.
    gpu_lm_head_graphs: int = 0
    # TP-invariant numerics (CPU): each row-parallel layer's K in this many fixed parts at every TP
    # size, so TP sizes dividing it serve the same bits under one fingerprint (worker/tensor_parallel.py).
    tp_invariant_parts: int = 0
    # Pins declared by whoever deployed this worker (the operator); readiness is refused when what
    # the worker observes disagrees, so a mis-scheduled pod never serves under the wrong name.
    expect_gpu_product: str | None = None
    expect_driver_version: str | None = None
    expect_fingerprint: str | None = None

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name


def read_model_config(model_dir: str) -> dict:
    path = Path(model_dir)
    if not path.exists():
        raise WorkerConfigError(f"model directory {model_dir} does not exist: make one with `invariant model make {model_dir}`")
    if not path.is_dir():
        raise WorkerConfigError(f"--model {model_dir} is not a directory: pass a Hugging Face checkpoint directory")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise WorkerConfigError(f"{model_dir} has no config.json: it is not a Hugging Face checkpoint directory")
    try:
        return json.loads(cfg.read_text())
    except (OSError, ValueError) as exc:
        raise WorkerConfigError(f"{cfg} is not valid JSON ({exc})") from exc


def resolve_dtype(requested: str, model_config: dict, *, cuda: bool) -> str:
    """``auto`` means the checkpoint's own dtype, as vLLM resolves it."""
    allowed = CUDA_DTYPES if cuda else CPU_DTYPES
    dtype = requested
    if dtype == "auto":
        dtype = str(model_config.get("torch_dtype") or model_config.get("dtype") or "float32")
    dtype = {"bf16": "bfloat16", "fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16"}.get(dtype, dtype)
    if dtype not in allowed:
        where = "CUDA" if cuda else "the CPU"
        raise WorkerConfigError(f"unsupported dtype {requested!r} on {where}: choose one of auto, {', '.join(allowed)}")
    return dtype


def check_architecture(model_config: dict) -> str:
    archs = model_config.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    shown = ", ".join(archs) or "none declared"
    raise WorkerConfigError(
        f"unsupported architecture ({shown}): invariant serves {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def validate(options: WorkerOptions, *, cuda: bool, check_port: bool = True) -> tuple[dict, str]:
    """Check everything checkable without the engine; return the model config and resolved dtype."""
    model_config = read_model_config(options.model)
    check_architecture(model_config)
    dtype = resolve_dtype(options.dtype, model_config, cuda=cuda)
    if options.max_model_len is not None and options.max_model_len < 16:
        raise WorkerConfigError(f"--max-model-len {options.max_model_len} is too small (at least 16)")
    if options.tensor_parallel_size < 1:
        raise WorkerConfigError("--tensor-parallel-size must be at least 1")
    parts = options.tp_invariant_parts
    if parts < 0:
        raise WorkerConfigError(f"--tp-invariant-parts {parts} must be 0 (off) or a positive multiple of the TP size")
    if parts:
        if cuda:
            raise WorkerConfigError("--tp-invariant-parts is implemented for the CPU worker only (the CUDA worker "
                                    "keeps vLLM's all-reduce: issue 17)")
        if not options.invariance:
            raise WorkerConfigError("--tp-invariant-parts applies to an invariant worker, not with --no-invariance")
        if parts % options.tensor_parallel_size:
            raise WorkerConfigError(f"--tp-invariant-parts {parts} is not a multiple of --tensor-parallel-size "
                                    f"{options.tensor_parallel_size}")
    if options.gpu_gemm not in GPU_GEMMS:
        raise WorkerConfigError(f"--gpu-gemm {options.gpu_gemm!r}: choose one of {', '.join(GPU_GEMMS)}")
    if options.gpu_gemm != GPU_GEMM_DEFAULT and not (cuda and options.invariance):
        raise WorkerConfigError(f"--gpu-gemm {options.gpu_gemm} applies to an invariant worker on CUDA GPUs only")
    if options.gpu_lm_head_graphs:
        if not 0 < options.gpu_lm_head_graphs <= 1024:
            raise WorkerConfigError(f"--gpu-lm-head-graphs {options.gpu_lm_head_graphs} must be 0 (off) or 1-1024 rows")
        if not (cuda and options.invariance):
            raise WorkerConfigError("--gpu-lm-head-graphs applies to an invariant worker on CUDA GPUs only")
        if options.gpu_gemm not in ("auto", "cublaslt"):
            raise WorkerConfigError(f"--gpu-lm-head-graphs replays the cuBLASLt GEMM, not --gpu-gemm {options.gpu_gemm}")
    problems = engine_arg_errors(list(options.extra_vllm_args))
    if problems:
        raise WorkerConfigError(problems[0])
    if check_port:
        try:
            check_port_free(options.host, options.port)
        except PortError as exc:
            raise WorkerConfigError(str(exc)) from exc
    return model_config, dtype


def gfd_product(name: str) -> str:
    """A CUDA device name as NVIDIA GPU feature discovery labels it ("NVIDIA H100 80GB HBM3" ->
    "NVIDIA-H100-80GB-HBM3")."""
    return "-".join(name.split())


def pin_disagreements(options: WorkerOptions, parts: dict, fingerprint: str) -> list[str]:
    """What this worker observes that contradicts its declared pins (empty: all agree)."""
    device = parts.get("device", {})
    problems = []
    if options.expect_gpu_product:
        observed = gfd_product(device["name"]) if device.get("kind") == "cuda" else f"no GPU ({device.get('model')})"
        if observed != options.expect_gpu_product:
            problems.append(f"GPU product is {observed}, pinned {options.expect_gpu_product}")
    if options.expect_driver_version:
        observed = device.get("driver", "none (no GPU)")
        if observed != options.expect_driver_version:
            problems.append(f"driver is {observed}, pinned {options.expect_driver_version}")
    if options.expect_fingerprint and fingerprint != options.expect_fingerprint:
        problems.append(f"numerics fingerprint is {fingerprint}, pinned {options.expect_fingerprint}")
    return problems
