"""Batch-invariant matmul in Triton: a fixed K chunking, chunk sums added in chunk order.

Each output element ``C[m, n]`` is ``((c_0 + c_1) + c_2) + ...`` where ``c_j`` is the fp32 sum of
K chunk ``j`` (``MM_CHUNK_K`` wide, accumulated in ``MM_BLOCK_K`` steps), then ``+ bias``, then one
rounding to the output dtype. Nothing in that depends on M. Two kernels compute it:

* non-split: one program per output tile walks all chunks (large M: enough tiles to fill the GPU);
* split: one program per (tile, chunk) writes ``c_j`` in fp32; ``_reduce`` adds them in order (small
  M: decode, where cuBLAS would pick a split-K from M and change the bits).

Both give the same bits, so each M takes the faster one (``configs.mm_config``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from invariant.kernels.gpu import configs
from invariant.kernels.gpu.device import arch_of, sm_count

SUPPORTED = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order (L2 reuse); which tile a program takes never changes a sum."""
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    in_group = GROUP_M * grid_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pm = first_m + (pid % in_group) % group_size
    pn = (pid % in_group) // group_size
    return pm, pn


@triton.jit
def _mm(a, b, c, bias, ws, M, N, K,
        s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cb, s_cm, s_cn,
        CHUNK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
        SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    chunk_id = tl.program_id(1)
    batch = tl.program_id(2)
    pm, pn = _tile(pid, M, N, BM, BN, GROUP_M)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk0 = tl.arange(0, BK)
    a_ptr = a + batch * s_ab + rm[:, None] * s_am
    b_ptr = b + batch * s_bb + rn[None, :] * s_bn
    m_ok = rm[:, None] < M
    n_ok = rn[None, :] < N
    total = tl.zeros((BM, BN), dtype=tl.float32)
    if SPLIT:
        c_lo = chunk_id
        c_hi = chunk_id + 1
    else:
        c_lo = 0
        c_hi = tl.cdiv(K, CHUNK)
    for ci in range(c_lo, c_hi):
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        k_end = tl.minimum(ci * CHUNK + CHUNK, K)
        for k0 in range(ci * CHUNK, k_end, BK):
            rk = k0 + rk0
            if EVEN_K:
                x = tl.load(a_ptr + rk[None, :] * s_ak, mask=m_ok, other=0.0)
                y = tl.load(b_ptr + rk[:, None] * s_bk, mask=n_ok, other=0.0)
            else:
                x = tl.load(a_ptr + rk[None, :] * s_ak, mask=m_ok & (rk[None, :] < K), other=0.0)
                y = tl.load(b_ptr + rk[:, None] * s_bk, mask=n_ok & (rk[:, None] < K), other=0.0)
            if IEEE:
                acc = tl.dot(x, y, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, y, acc)
        total += acc
    if SPLIT:
        # partial sums of chunk ``chunk_id``: ws is [chunks, batch, M, N] fp32, contiguous
        nb = tl.num_programs(2)
        w_ptr = ws + ((chunk_id * nb + batch).to(tl.int64) * M + rm[:, None]) * N + rn[None, :]  # > 2**31
        tl.store(w_ptr, total, mask=m_ok & n_ok)
    else:
        if HAS_BIAS:
            total = total + tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c + batch * s_cb + rm[:, None] * s_cm + rn[None, :] * s_cn,
                 total.to(c.dtype.element_ty), mask=m_ok & n_ok)


@triton.jit
def _mm_tma(a_desc, b_desc, c_desc, bias, M, N, K,
            CHUNK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
            HAS_BIAS: tl.constexpr):
    """``_mm``'s whole-tile path with tiles moved by the tensor-memory accelerator (Hopper): the same
    chunked sum (TMA fills out-of-range K with zeros, as ``_mm``'s masks do), faster at large M."""
    pm, pn = _tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    total = tl.zeros((BM, BN), dtype=tl.float32)
    for ci in range(0, tl.cdiv(K, CHUNK)):
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        k_end = tl.minimum(ci * CHUNK + CHUNK, K)
        for k0 in range(ci * CHUNK, k_end, BK):
            x = a_desc.load([pm * BM, k0])
            y = b_desc.load([pn * BN, k0])
            acc = tl.dot(x, y.T, acc)
        total += acc
    if HAS_BIAS:
        rn = pn * BN + tl.arange(0, BN)
        total = total + tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_desc.store([pm * BM, pn * BN], total.to(c_desc.dtype))


def _tma_ok(a: torch.Tensor, bt: torch.Tensor, c: torch.Tensor) -> bool:
    """TMA needs row-major operands with 16-byte aligned rows and bases (``bt`` is the weight [N, K])."""
    return all(t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
               and t.data_ptr() % 16 == 0 for t in (a, bt, c)) and a.dtype != torch.float32


@triton.jit
def _reduce(ws, c, bias, M, N, S, NB, s_cb, s_cm, s_cn,
            BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Add the chunk partials in chunk order (``0 + c_0`` is exact, so this equals ``_mm``'s sum)."""
    pid = tl.program_id(0)
    batch = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, S):
        total += tl.load(ws + (s * NB + batch).to(tl.int64) * M * N + offs, mask=ok, other=0.0)
    rm = offs // N
    rn = offs % N
    if HAS_BIAS:
        total = total + tl.load(bias + rn, mask=ok, other=0.0).to(tl.float32)
    tl.store(c + batch * s_cb + rm * s_cm + rn * s_cn, total.to(c.dtype.element_ty), mask=ok)


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype not in SUPPORTED or b.dtype != a.dtype:
        raise TypeError(f"invariant matmul supports {', '.join(str(d) for d in SUPPORTED)} with equal "
                        f"dtypes, got {a.dtype} @ {b.dtype}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"invariant matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not match")


def bmm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, *,
        config: configs.MMConfig | None = None, out: torch.Tensor | None = None,
        _chunk: int | None = None) -> torch.Tensor:
    """``a @ b (+ bias)`` for ``a`` [B, M, K] and ``b`` [B, K, N], any strides. (``_chunk``
    overrides the pinned K chunk: for the tests' control only, which picks it from M on purpose.)"""
    _check(a, b)
    B, M, K = a.shape
    N = b.shape[-1]
    c = out if out is not None else torch.empty((B, M, N), device=a.device, dtype=a.dtype)
    if M == 0 or N == 0 or B == 0:
        return c
    if K == 0:
        c.zero_()
        if bias is not None:
            c += bias
        return c
    arch = arch_of(a.device)
    cfg = config or configs.mm_config(M * B, N, K, sm_count(a.device), arch)
    if cfg.split and _chunk:
        cfg = configs.MMConfig(cfg.bm, cfg.bn, cfg.warps, cfg.stages, split=-(-K // _chunk) > 1)
    chunk = _chunk or configs.MM_CHUNK_K
    S = -(-K // chunk)
    tiles = triton.cdiv(M, cfg.bm) * triton.cdiv(N, cfg.bn)
    bias_arg = bias if bias is not None else c
    if cfg.tma and not cfg.split and B == 1 and _tma_ok(a[0], b[0].t(), c[0]):
        from triton.tools.tensor_descriptor import TensorDescriptor

        bk = configs.MM_BLOCK_K
        _mm_tma[(tiles,)](TensorDescriptor.from_tensor(a[0], [cfg.bm, bk]),
                          TensorDescriptor.from_tensor(b[0].t(), [cfg.bn, bk]),
                          TensorDescriptor.from_tensor(c[0], [cfg.bm, cfg.bn]), bias_arg,
                          M, N, K, CHUNK=chunk, BM=cfg.bm, BN=cfg.bn, BK=bk, GROUP_M=cfg.group_m,
                          HAS_BIAS=bias is not None, num_warps=cfg.warps, num_stages=cfg.stages)
        return c
    ws = torch.empty((S, B, M, N), device=a.device, dtype=torch.float32) if cfg.split else c
    _mm[(tiles, S if cfg.split else 1, B)](
        a, b, c, bias_arg, ws, M, N, K,
        a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
        c.stride(0), c.stride(1), c.stride(2),
        CHUNK=chunk, BM=cfg.bm, BN=cfg.bn, BK=configs.MM_BLOCK_K, GROUP_M=cfg.group_m,
        SPLIT=cfg.split, HAS_BIAS=bias is not None, EVEN_K=K % configs.MM_BLOCK_K == 0,
        IEEE=a.dtype == torch.float32, num_warps=cfg.warps, num_stages=cfg.stages)
    if cfg.split:
        block = 1024
        _reduce[(triton.cdiv(M * N, block), B)](ws, c, bias_arg, M, N, S, B, c.stride(0), c.stride(1),
                                                c.stride(2), BLOCK=block, HAS_BIAS=bias is not None,
                                                num_warps=4)
    return c


def mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, *,
       config: configs.MMConfig | None = None) -> torch.Tensor:
    """``a @ b (+ bias)`` for 2-D ``a`` [M, K] and ``b`` [K, N]; row i depends on row i alone."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"mm takes 2-D tensors, got {a.dim()}-D and {b.dim()}-D")
    return bmm(a.unsqueeze(0), b.unsqueeze(0), bias, config=config)[0]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           config: configs.MMConfig | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear`` (weight [N, K], as stored): leading dims are rows."""
    lead = x.shape[:-1]
    y = mm(x.reshape(-1, x.shape[-1]), weight.t(), bias, config=config)
    return y.reshape(*lead, weight.shape[0])
