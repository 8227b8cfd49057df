"""Batch-invariant linear layer for the CPU (the C kernel in ``gemm.c``).

Row *i* of ``linear(x, w)`` is bitwise the same for any number and content of the other rows,
because each output element is reduced in one fixed order (see gemm.c). bf16 and fp32 run natively;
fp16 is widened exactly to fp32 and rounded back once, like the library kernels do.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from invariant.kernels.cpu import native

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}
NATIVE_DTYPES = tuple(_DTYPE_CODE)


@lru_cache(maxsize=None)
def _kernel(path: str | None):
    """The C entry point of a GEMM path (None: this process's, ``native.gemm_path``); looked up once."""
    chosen = native.choose_gemm_path(native.cpu_flags(), path) if path else native.gemm_path()
    lib = native.library()
    return {"avx2": lib.invariant_gemm, "avx512": lib.invariant_gemm_avx512}[chosen]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           path: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear`` with a fixed reduction order per output element.

    ``path`` (``avx2``, ``avx512``) picks the instruction path; by default this process's
    (``native.gemm_path``). Each path has its own bits."""
    kernel = _kernel(path)
    if x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError("invariant.kernels.cpu.linear runs on CPU tensors only")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    out_dtype = x.dtype
    compute = x.dtype if x.dtype in _DTYPE_CODE else torch.float32
    if weight.dtype != compute:
        weight = weight.to(compute)
    lead = x.shape[:-1]
    K = x.shape[-1]
    N = weight.shape[0]
    x2 = x.reshape(-1, K).to(compute)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    if M and N:
        rc = kernel(
            _DTYPE_CODE[compute], x2.data_ptr(), x2.stride(0), weight.data_ptr(), weight.stride(0),
            y.data_ptr(), N, M, N, K, torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"invariant_gemm refused M={M} N={N} K={K}")
    if bias is not None:
        y += bias.to(torch.float32)
    return y.to(out_dtype).reshape(*lead, N)
