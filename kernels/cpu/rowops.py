"""Batch-invariant row reductions for the CPU (the C kernels in ``rowops.c``).

RMSNorm and fused add + RMSNorm follow vLLM's native semantics (fp32 statistics, rounding to the
input dtype before the weight), softmax and log_softmax return fp32 like vLLM's sampler asks for,
mean returns fp32. Each row is reduced in one fixed order by one thread, whatever the batch.
"""

from __future__ import annotations

import torch

from invariant.kernels.cpu import native

MAX_HIDDEN = 65536


def _code(dtype: torch.dtype) -> int:
    if dtype == torch.bfloat16:
        return 1
    if dtype == torch.float32:
        return 0
    raise TypeError(f"invariant CPU row kernels take bfloat16 or float32, not {dtype}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise ValueError(f"{what}: shape refused by the invariant kernel")


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    if x.shape[-1] > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {x.shape[-1]} above {MAX_HIDDEN}")
    xr = _rows(x)
    w = None if weight is None else weight.to(x.dtype).contiguous()
    out = torch.empty(xr.shape, dtype=x.dtype)
    rc = native.library().invariant_rms_norm(
        _code(x.dtype), xr.data_ptr(), None, None if w is None else w.data_ptr(), out.data_ptr(),
        xr.shape[0], xr.shape[1], xr.stride(0), 0, out.stride(0), float(eps), torch.get_num_threads())
    _check(rc, "rms_norm")
    return out.reshape(x.shape)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual) * weight, x + residual); the sum is rounded to x's dtype."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError("fused_add_rms_norm: x and residual must match in shape and dtype")
    xr = _rows(x)
    res = residual.reshape(-1, x.shape[-1]).contiguous().clone()
    w = None if weight is None else weight.to(x.dtype).contiguous()
    out = torch.empty(xr.shape, dtype=x.dtype)
    rc = native.library().invariant_rms_norm(
        _code(x.dtype), xr.data_ptr(), res.data_ptr(), None if w is None else w.data_ptr(), out.data_ptr(),
        xr.shape[0], xr.shape[1], xr.stride(0), res.stride(0), out.stride(0), float(eps), torch.get_num_threads())
    _check(rc, "fused_add_rms_norm")
    return out.reshape(x.shape), res.reshape(x.shape)


def _softmax(x: torch.Tensor, log: bool) -> torch.Tensor:
    src = x if x.dtype in (torch.float32, torch.bfloat16) else x.float()
    xr = _rows(src)
    out = torch.empty(xr.shape, dtype=torch.float32)
    rc = native.library().invariant_softmax(
        _code(src.dtype), xr.data_ptr(), out.data_ptr(), xr.shape[0], xr.shape[1], xr.stride(0),
        out.stride(0), int(log), torch.get_num_threads())
    _check(rc, "softmax")
    return out.reshape(x.shape)


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, in fp32."""
    return _softmax(x, log=False)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dimension, in fp32."""
    return _softmax(x, log=True)


def mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the last dimension, in fp32."""
    src = x if x.dtype in (torch.float32, torch.bfloat16) else x.float()
    xr = _rows(src)
    out = torch.empty(xr.shape[0], dtype=torch.float32)
    rc = native.library().invariant_mean(_code(src.dtype), xr.data_ptr(), out.data_ptr(), xr.shape[0],
                                         xr.shape[1], xr.stride(0), torch.get_num_threads())
    _check(rc, "mean")
    return out.reshape(x.shape[:-1])
