"""Which configuration table a device takes (a pure function of the device, never of timings)."""

from __future__ import annotations

import os
from functools import lru_cache

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def arch_of(device: torch.device) -> str:
    """``sm90`` for Hopper etc.; ``interpret`` under Triton's CPU interpreter (CI)."""
    if device.type != "cuda":
        if not interpreting():
            raise RuntimeError("invariant's Triton kernels run on CUDA tensors, or on CPU tensors under "
                               "TRITON_INTERPRET=1 (tests)")
        return "interpret"
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


@lru_cache(maxsize=None)
def _cuda_arch(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _sms(device.index if device.index is not None else torch.cuda.current_device())


@lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
