"""Batch-invariant linear layer for the CPU (the C kernels ``gemm.c``, ``gemm_avx512.c``, ``gemm_amx.c``).

Row *i* of ``linear(x, w)`` is bitwise the same for any number and content of the other rows,
because each output element is reduced in one fixed order (see the C files; each path has its own
order and bits). The avx512 and amx paths pack a weight once, on first use. bf16 and fp32 run natively;
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


# Weights packed once per tensor for the avx512 and amx paths, kept on the weight tensor itself and
# packed again after an in-place update, which bumps the tensor's version (RL weight updates stay right).
_PACK_ATTR = "_invariant_packed"


def pack_avx512(weight: torch.Tensor) -> torch.Tensor:
    """w (N x K) in 64-column blocks, k outermost inside a block (gemm_avx512.c): bf16 as
    [block][k pair][64][2] (K padded to even), fp32 as [block][k][64]; zero-padded to 64 columns."""
    N, K = weight.shape
    Np = -(-N // 64) * 64
    if weight.dtype == torch.bfloat16:
        Kp = -(-K // 2) * 2
        w = torch.zeros(Np, Kp, dtype=torch.bfloat16)
        w[:N, :K] = weight
        return w.view(Np // 64, 64, Kp // 2, 2).permute(0, 2, 1, 3).contiguous()
    w = torch.zeros(Np, K, dtype=torch.float32)
    w[:N] = weight
    return w.view(Np // 64, 64, K).permute(0, 2, 1).contiguous()


def pack_amx(weight: torch.Tensor) -> torch.Tensor:
    """w (N x K bf16) as AMX B tiles: block j of 16 columns, chunk c of 32 k, row r = k pair r,
    (w[16j + n][32c + 2r], w[16j + n][32c + 2r + 1]) for n = 0..15; zero-padded to 16 x 32."""
    N, K = weight.shape
    Np, Kp = -(-N // 16) * 16, -(-K // 32) * 32
    w = torch.zeros(Np, Kp, dtype=torch.bfloat16)
    w[:N, :K] = weight
    return w.view(Np // 16, 16, Kp // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous()


def _packed(weight: torch.Tensor, kind: str) -> torch.Tensor:
    if weight.is_inference():
        # An inference tensor has no version counter, so an in-place update could not be seen: pack
        # it anew every call (correct; slow only for weights made under inference_mode).
        return pack_amx(weight) if kind == "amx" else pack_avx512(weight)
    cache = getattr(weight, _PACK_ATTR, None)
    if cache is None or cache[0] != weight._version:
        cache = (weight._version, {})
        setattr(weight, _PACK_ATTR, cache)
    if kind not in cache[1]:
        cache[1][kind] = pack_amx(weight) if kind == "amx" else pack_avx512(weight)
    return cache[1][kind]


def _run(path: str, dtype_code: int, x2: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> int:
    """The avx2 and amx kernels: fp32 sums into y (the caller adds the bias and rounds)."""
    lib = native.library()
    M, K = x2.shape
    N = weight.shape[0]
    threads = torch.get_num_threads()
    if path == "avx2":
        return lib.invariant_gemm(dtype_code, x2.data_ptr(), x2.stride(0), weight.data_ptr(), weight.stride(0),
                                  y.data_ptr(), N, M, N, K, threads)
    amx.request_tile_permission_once()
    if K % 32:
        padded = torch.zeros(M, -(-K // 32) * 32, dtype=torch.bfloat16)
        padded[:, :K] = x2
        x2 = padded
    packed = _packed(weight, "amx")  # held here: a fresh pack must outlive the call
    return lib.invariant_gemm_amx(x2.data_ptr(), x2.stride(0), packed.data_ptr(),
                                  y.data_ptr(), N, M, N, x2.shape[1], threads)


def _linear_avx512(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype_code: int,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """The avx512 kernel (also the amx path's fp32 side) adds the bias and rounds to the output dtype
    itself, as the others do through torch: one call, no fp32 intermediate on the bf16 path."""
    M, K = x2.shape
    N = weight.shape[0]
    direct = out_dtype in (torch.float32, torch.bfloat16)
    y = torch.empty(M, N, dtype=out_dtype if direct else torch.float32)
    b = None if bias is None else bias.to(torch.float32).contiguous()
    if M and N:
        packed = _packed(weight, "avx512")  # held here: a fresh pack must outlive the call
        rc = native.library().invariant_gemm_avx512(
            dtype_code, x2.data_ptr(), x2.stride(0), packed.data_ptr(),
            None if b is None else b.data_ptr(), y.data_ptr(), N, int(y.dtype == torch.bfloat16), M, N, K,
            torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"invariant GEMM (avx512) refused M={M} N={N} K={K}")
    return y if direct else y.to(out_dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           path: str | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear`` with a fixed reduction order per output element.

    ``path`` (``avx2``, ``avx512``, ``amx``) picks the instruction path; by default this process's
    (``native.gemm_path``). Each path has its own bits. ``out_dtype=torch.float32`` returns the
    kernel's fp32 sums (plus bias) before the one rounding to x's dtype: the worker's kernel canary
    compares those, where bf16 rounding cannot hide a difference (invariant.worker.kernel_canary)."""
    chosen = _path(path)
    if x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError("invariant.kernels.cpu.linear runs on CPU tensors only")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    compute = x.dtype if x.dtype in _DTYPE_CODE else torch.float32
    if weight.dtype != compute:
        weight = weight.to(compute)
    lead = x.shape[:-1]
    K = x.shape[-1]
    N = weight.shape[0]
    x2 = x if x.dim() == 2 else x.reshape(-1, K)  # the engine's usual 2-D call skips both copies
    if x2.dtype != compute:
        x2 = x2.to(compute)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    M = x2.shape[0]
    if chosen == "avx512" or (chosen == "amx" and compute == torch.float32):
        y = _linear_avx512(x2, weight, bias, _DTYPE_CODE[compute], out_dtype)
        return y if x.dim() == 2 else y.reshape(*lead, N)
    y = torch.empty(M, N, dtype=torch.float32)
    if M and N:
        rc = _run(chosen, _DTYPE_CODE[compute], x2, weight, y)
        if rc != 0:
            raise RuntimeError(f"invariant GEMM ({chosen}) refused M={M} N={N} K={K}")
    if bias is not None:
        y += bias.to(torch.float32)
    return y.to(out_dtype).reshape(*lead, N)
