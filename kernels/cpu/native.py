"""Build and load the C kernels (``*.c`` beside this file) once per source, compiler and flags.

A plain C shared object loaded with ctypes, not a torch extension: it compiles in about a second
with the system's C compiler and needs no torch headers or ninja. ctypes releases the GIL during the
call. The library links OpenMP by soname ``libgomp.so.1``; torch's wheel ships a library with that
soname and loads it first, so both share one thread pool.

The compiled bits depend on the source, the compiler and the flags, so all three are part of
:func:`build_identity`, which the worker puts into the numerics fingerprint.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

SOURCES = ("gemm.c", "gemm_avx512.c", "gemm_amx.c", "rowops.c", "attention.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fno-fast-math", "-fopenmp", "-fPIC", "-shared")
HERE = Path(__file__).resolve().parent


class KernelBuildError(RuntimeError):
    """The CPU kernels cannot be built or loaded on this machine (one line, with the reason)."""


def compiler() -> str:
    wanted = os.environ.get("CC")
    cc = shutil.which(wanted) if wanted else (shutil.which("cc") or shutil.which("gcc"))
    if not cc:
        where = f"CC={wanted} is not an executable" if wanted else "no cc or gcc on PATH"
        raise KernelBuildError(f"invariant CPU kernels need a C compiler ({where}): install gcc, "
                               "or run the worker with --no-invariance")
    return cc


@lru_cache(maxsize=1)
def compiler_version() -> str:
    out = subprocess.run([compiler(), "--version"], capture_output=True, text=True, check=False)
    return (out.stdout.splitlines() or ["unknown"])[0].strip()


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def check_isa() -> None:
    missing = {"avx2", "fma"} - cpu_flags()
    if missing:
        raise KernelBuildError(f"invariant CPU kernels need x86-64 with AVX2 and FMA; this CPU lacks {', '.join(sorted(missing))}")


# The GEMM's instruction path decides its arithmetic (lane count, bf16 pair products), so each path
# gives other bits: the path is part of build_identity and so of the fingerprint. The CPU flags each
# one needs, in order of preference.
GEMM_PATHS: dict[str, frozenset[str]] = {
    # bf16 on AMX tiles (TDPBF16PS over 32-wide K chunks); fp32 as on the avx512 path.
    "amx": frozenset({"amx_tile", "amx_bf16", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}),
    "avx512": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}),
    "avx2": frozenset({"avx2", "fma"}),
}
GEMM_PATH_ENV = "INVARIANT_CPU_GEMM"


def choose_gemm_path(flags: frozenset[str] | set[str], wanted: str | None = None) -> str:
    """The fastest path this CPU runs, or ``wanted`` (``INVARIANT_CPU_GEMM``) if it runs that one.

    A pure function of the flags, so every process of a worker (they inherit the environment)
    picks the same path, and so does the fingerprint that names it."""
    if wanted:
        if wanted not in GEMM_PATHS:
            raise KernelBuildError(f"{GEMM_PATH_ENV}={wanted}: expected one of {', '.join(GEMM_PATHS)}")
        missing = GEMM_PATHS[wanted] - flags
        if missing:
            raise KernelBuildError(f"{GEMM_PATH_ENV}={wanted}: this CPU lacks {', '.join(sorted(missing))}")
        return wanted
    for path, needs in GEMM_PATHS.items():
        if needs <= flags:
            return path
    raise KernelBuildError("invariant CPU kernels need x86-64 with AVX2 and FMA")


def gemm_path() -> str:
    """The GEMM path of this process (see choose_gemm_path)."""
    return choose_gemm_path(cpu_flags(), os.environ.get(GEMM_PATH_ENV) or None)


@lru_cache(maxsize=1)
def compiled_identity() -> dict[str, str]:
    """What decides the compiled code: source digest, compiler version, flags."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    return {"source_sha256": digest.hexdigest()[:16], "compiler": compiler_version(), "flags": " ".join(FLAGS)}


def build_identity() -> dict[str, str]:
    """What decides our kernels' bits: the compiled code, and the GEMM path this process runs."""
    return {**compiled_identity(), "gemm_path": gemm_path()}


def cache_dir() -> Path:
    root = os.environ.get("INVARIANT_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "invariant", "kernels")
    return Path(root)


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The loaded kernels, compiled on first use into the cache (atomic rename: safe across processes)."""
    check_isa()
    ident = compiled_identity()
    key = hashlib.sha256(repr(sorted(ident.items())).encode()).hexdigest()[:16]
    target = cache_dir() / f"invariant_cpu_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            cmd = [compiler(), *FLAGS, *(str(HERE / s) for s in SOURCES), "-o", str(out)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                first = (res.stderr.strip().splitlines() or ["no output"])[0]
                raise KernelBuildError(f"building the invariant CPU kernels failed: {first}")
            os.replace(out, target)
    import torch  # noqa: F401 - load torch's libgomp first, so the kernels share its OpenMP runtime

    lib = ctypes.CDLL(str(target))
    lib.invariant_gemm.restype = ctypes.c_int
    lib.invariant_gemm.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
    ]
    lib.invariant_gemm_avx512.restype = ctypes.c_int
    lib.invariant_gemm_avx512.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                          ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                          ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    lib.invariant_gemm_amx.restype = ctypes.c_int
    lib.invariant_gemm_amx.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.invariant_rms_norm.restype = ctypes.c_int
    lib.invariant_rms_norm.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64,
                                       ctypes.c_float, ctypes.c_int]
    lib.invariant_softmax.restype = ctypes.c_int
    lib.invariant_softmax.argtypes = [ctypes.c_int, ptr, ptr, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int]
    lib.invariant_mean.restype = ctypes.c_int
    lib.invariant_mean.argtypes = [ctypes.c_int, ptr, ptr, i64, i64, i64, ctypes.c_int]
    i32 = ctypes.c_int32
    lib.invariant_paged_attention.restype = ctypes.c_int
    lib.invariant_paged_attention.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, ptr, i64, i64, i64, ptr, i64, ptr,
                                              ptr, i32, i32, i32, i32, i32, ctypes.c_float, ptr, i64, i64,
                                              ctypes.c_int]
    return lib
