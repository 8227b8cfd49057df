"""Batch-invariant linear layer for the CPU (the C kernel in ``gemm.c``).

Row *i* of ``linear(x, w)`` is bitwise the same for any number and content of the other rows,
because each output element is reduced in one fixed order (see gemm.c). bf16 and fp32 run natively;
fp16 is widened exactly to fp32 and rounded back once, like the library kernels do.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from invariant.kernels.cpu import amx, native

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}
NATIVE_DTYPES = tuple(_DTYPE_CODE)


@lru_cache(maxsize=None)
def _path(wanted: str | None) -> str:
    return native.choose_gemm_path(native.cpu_flags(), wanted) if wanted else native.gemm_path()


@lru_cache(maxsize=None)
def _kernel(path: str):
    """The C entry point of a lane path (the AMX path's fp32 side is the avx512 one); looked up once."""
    lib = native.library()
    return {"avx2": lib.invariant_gemm, "avx512": lib.invariant_gemm_avx512, "amx": lib.invariant_gemm_avx512}[path]


# AMX B tiles packed once per weight, kept on the weight tensor itself (and packed again after an
# in-place update, which bumps the tensor's version: RL weight updates stay correct).
_PACK_ATTR = "_invariant_amx_tiles"


def pack_amx(weight: torch.Tensor) -> torch.Tensor:
    """w (N x K bf16) as AMX B tiles: block j of 16 columns, chunk c of 32 k, row r = k pair r,
    (w[16j + n][32c + 2r], w[16j + n][32c + 2r + 1]) for n = 0..15; zero-padded to 16 x 32."""
    N, K = weight.shape
    Np, Kp = -(-N // 16) * 16, -(-K // 32) * 32
    w = torch.zeros(Np, Kp, dtype=torch.bfloat16)
    w[:N, :K] = weight
    return w.view(Np // 16, 16, Kp // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous()


def _packed(weight: torch.Tensor) -> torch.Tensor:
    hit = getattr(weight, _PACK_ATTR, None)
    if hit is None or hit[0] != weight._version:
        hit = (weight._version, pack_amx(weight))
        setattr(weight, _PACK_ATTR, hit)
    return hit[1]


def _linear_amx(x2: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> int:
    amx.request_tile_permission_once()
    M, K = x2.shape
    N = weight.shape[0]
    if K % 32:
        padded = torch.zeros(M, -(-K // 32) * 32, dtype=torch.bfloat16)
        padded[:, :K] = x2
        x2 = padded
    return native.library().invariant_gemm_amx(x2.data_ptr(), x2.stride(0), _packed(weight).data_ptr(),
                                               y.data_ptr(), N, M, N, x2.shape[1], torch.get_num_threads())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           path: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear`` with a fixed reduction order per output element.

    ``path`` (``avx2``, ``avx512``, ``amx``) picks the instruction path; by default this process's
    (``native.gemm_path``). Each path has its own bits."""
    chosen = _path(path)
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
    if M and N and chosen == "amx" and compute == torch.bfloat16:
        if _linear_amx(x2, weight, y) != 0:
            raise RuntimeError(f"invariant_gemm_amx refused M={M} N={N} K={K}")
    elif M and N:
        rc = _kernel(chosen)(
            _DTYPE_CODE[compute], x2.data_ptr(), x2.stride(0), weight.data_ptr(), weight.stride(0),
            y.data_ptr(), N, M, N, K, torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"invariant_gemm refused M={M} N={N} K={K}")
    if bias is not None:
        y += bias.to(torch.float32)
    return y.to(out_dtype).reshape(*lead, N)
