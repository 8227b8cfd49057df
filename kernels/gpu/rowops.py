"""Row reductions in Triton: RMSNorm (plain and fused with the residual add), softmax,
log_softmax, mean. One program per row; the block and the warps depend on the row length alone
(``configs.row_config``), and a row longer than the block is walked in block steps into fixed fp32
lanes that one fixed tree adds at the end, so a row's bits never depend on the other rows."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from invariant.kernels.gpu import configs
from invariant.kernels.gpu.device import arch_of


@triton.jit
def _rms_norm(x, res, w, out, res_out, n, s_x, s_r, s_o, s_ro, eps,
              BLOCK: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr):
    row = tl.program_id(0)
    lanes = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < n
        v = tl.load(x + row * s_x + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:  # the sum is rounded to the dtype first (vLLM's CUDA kernel and HF models)
            r = (v + tl.load(res + row * s_r + cols, mask=ok, other=0.0).to(tl.float32)).to(res_out.dtype.element_ty)
            tl.store(res_out + row * s_ro + cols, r, mask=ok)
            v = r.to(tl.float32)
        lanes += v * v
    rstd = 1.0 / tl.sqrt_rn(tl.sum(lanes, axis=0) / n + eps)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < n
        if HAS_RES:
            v = tl.load(res_out + row * s_ro + cols, mask=ok, other=0.0).to(tl.float32)
        else:
            v = tl.load(x + row * s_x + cols, mask=ok, other=0.0).to(tl.float32)
        y = (v * rstd).to(out.dtype.element_ty)
        if HAS_W:
            y = (y.to(tl.float32) * tl.load(w + cols, mask=ok, other=0.0).to(tl.float32)).to(out.dtype.element_ty)
        tl.store(out + row * s_o + cols, y, mask=ok)


@triton.jit
def _softmax(x, out, n, s_x, s_o, BLOCK: tl.constexpr, LOG: tl.constexpr):
    row = tl.program_id(0)
    lane_max = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        v = tl.load(x + row * s_x + cols, mask=cols < n, other=float("-inf")).to(tl.float32)
        lane_max = tl.maximum(lane_max, v)
    mx = tl.max(lane_max, axis=0)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    lanes = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        v = tl.load(x + row * s_x + cols, mask=cols < n, other=float("-inf")).to(tl.float32)
        lanes += tl.exp(v - safe)
    total = tl.sum(lanes, axis=0)
    log_total = tl.log(total)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        v = tl.load(x + row * s_x + cols, mask=cols < n, other=float("-inf")).to(tl.float32)
        if LOG:
            y = v - safe - log_total
        else:
            y = tl.exp(v - safe) / total
        tl.store(out + row * s_o + cols, y.to(out.dtype.element_ty), mask=cols < n)


@triton.jit
def _mean(x, out, n, s_x, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    lanes = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        lanes += tl.load(x + row * s_x + cols, mask=cols < n, other=0.0).to(tl.float32)
    tl.store(out + row, (tl.sum(lanes, axis=0) / n).to(out.dtype.element_ty))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A 2-D view [rows, n] whose last dim is contiguous (a copy only where it must)."""
    arch_of(x.device)  # clear error for an unsupported device
    if x.dim() == 0:
        x = x.reshape(1)
    x2 = x.reshape(-1, x.shape[-1]) if x.shape[-1] else x.reshape(-1, 0)
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """vLLM's RMSNorm: ``(x / rms(x)).to(dtype) * weight``, fp32 inside, per row."""
    x2 = _rows(x)
    out = torch.empty_like(x2)
    n = x2.shape[-1]
    if x2.shape[0] and n:
        block, warps = configs.row_config(n)
        _rms_norm[(x2.shape[0],)](x2, x2, weight if weight is not None else x2, out, out, n, x2.stride(0),
                                  0, out.stride(0), 0, eps, BLOCK=block, HAS_RES=False,
                                  HAS_W=weight is not None, num_warps=warps)
    return out.reshape(x.shape)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual = (x + residual)`` rounded to the dtype, and the RMSNorm of that rounded sum."""
    if residual.shape != x.shape:
        raise ValueError(f"fused_add_rms_norm: residual {tuple(residual.shape)} != x {tuple(x.shape)}")
    x2, r2 = _rows(x), _rows(residual)
    out, res_out = torch.empty_like(x2), torch.empty_like(r2)
    n = x2.shape[-1]
    if x2.shape[0] and n:
        block, warps = configs.row_config(n)
        _rms_norm[(x2.shape[0],)](x2, r2, weight if weight is not None else x2, out, res_out, n, x2.stride(0),
                                  r2.stride(0), out.stride(0), res_out.stride(0), eps, BLOCK=block,
                                  HAS_RES=True, HAS_W=weight is not None, num_warps=warps)
    return out.reshape(x.shape), res_out.reshape(x.shape)


def _softmax_like(x: torch.Tensor, dim: int, log: bool, out_dtype: torch.dtype | None) -> torch.Tensor:
    dim = dim % max(x.dim(), 1)
    moved = x.movedim(dim, -1) if x.dim() else x
    x2 = _rows(moved)
    out = torch.empty(x2.shape, device=x.device, dtype=out_dtype or x.dtype)
    n = x2.shape[-1]
    if x2.shape[0] and n:
        block, warps = configs.row_config(n)
        _softmax[(x2.shape[0],)](x2, out, n, x2.stride(0), out.stride(0), BLOCK=block, LOG=log, num_warps=warps)
    out = out.reshape(moved.shape)
    return out.movedim(-1, dim) if x.dim() else out.reshape(x.shape)


def softmax(x: torch.Tensor, dim: int = -1, dtype: torch.dtype | None = None) -> torch.Tensor:
    return _softmax_like(x, dim, False, dtype)


def log_softmax(x: torch.Tensor, dim: int = -1, dtype: torch.dtype | None = None) -> torch.Tensor:
    return _softmax_like(x, dim, True, dtype)


def mean(x: torch.Tensor, dim: int = -1, keepdim: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean over one dim, fp32 inside."""
    dim = dim % max(x.dim(), 1)
    moved = x.movedim(dim, -1)
    x2 = _rows(moved)
    out = torch.empty(x2.shape[0], device=x.device, dtype=dtype or x.dtype)
    n = x2.shape[-1]
    if x2.shape[0]:
        if n == 0:
            out.fill_(float("nan"))
        else:
            block, warps = configs.row_config(n)
            _mean[(x2.shape[0],)](x2, out, n, x2.stride(0), BLOCK=block, num_warps=warps)
    out = out.reshape(moved.shape[:-1])
    return out.unsqueeze(dim) if keepdim else out
