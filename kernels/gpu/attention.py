"""Attention over a paged KV cache (vLLM's layout), prefill and decode in one kernel.

The KV axis is cut into splits of ``ATTN_SPLIT`` tokens at absolute positions (a split *size*, never
a count), each split walked in ``ATTN_BLOCK_N`` blocks with an online softmax, and the splits' partial
results folded in split order by a second kernel. A query at position p therefore reduces over the
same blocks in the same order whether its keys were cached or computed in this step, whether it is
decoded alone or prefilled with 4,000 other tokens, and whatever else is in the batch: blocks that a
longer row of the same tile needs but this row does not are fully masked and add exact zeros. The
fold takes ``ATTN_COMBINE_CHUNK`` splits at a time (a fixed width, lanes past the row's own splits
masked), so long rows fold in a few vector steps. Rows at positions from ``ATTN_LONG_FROM`` on cut
their KV in ``ATTN_SPLIT_LONG`` splits instead (fewer, longer splits where there are many; the
position decides, so prefill and decode still agree); with ``ATTN_SPLIT_LONG == ATTN_SPLIT`` there
is one size. With ``configs.ATTN_FOLD_IN_SPLIT`` the fold runs in the first kernel instead, by the
last of each (row tile, KV head)'s split programs to finish (the same fold code; no second launch).

Rows of a tile are (query token, query head of the KV head's group) pairs, so a KV block is read once
for the whole GQA group. One block shape and warp count for every call (``configs``): the reduction
trees inside a row depend on the register layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from invariant.kernels.gpu import configs
from invariant.kernels.gpu.device import arch_of

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Plan:
    """Per-batch launch metadata (built once per step, like vLLM's attention metadata)."""

    tile_seq: torch.Tensor  # [tiles] the sequence of each row tile
    tile_row0: torch.Tensor  # [tiles] its first row within the sequence's rows
    token_seq: torch.Tensor  # [T] the sequence of each query token
    max_splits: int


def plan(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, group: int, block_m: int | None = None,
         split: int | None = None) -> Plan:
    block_m = block_m or configs.ATTN_BLOCK_M
    split = split or configs.ATTN_SPLIT
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    B = q_lens.numel()
    tiles = (q_lens * group + block_m - 1) // block_m
    n_tiles = int(tiles.sum())
    seqs = torch.arange(B, device=q_lens.device)
    tile_seq = torch.repeat_interleave(seqs, tiles, output_size=n_tiles)
    first = torch.repeat_interleave(torch.cumsum(tiles, 0) - tiles, tiles, output_size=n_tiles)
    tile_row0 = (torch.arange(n_tiles, device=q_lens.device) - first) * block_m
    T = int(q_lens.sum())
    token_seq = torch.repeat_interleave(seqs, q_lens, output_size=T)
    max_len = int(seq_lens.max()) if B else 0
    return Plan(tile_seq.to(torch.int32), tile_row0.to(torch.int32), token_seq.to(torch.int32),
                max(1, -(-max_len // split)))


@triton.jit
def _attn_split(q, kc, vc, table, seq_lens, qsl, tile_seq, tile_row0, m_ws, l_ws, acc_ws,
                qk_scale, T, HQ,
                s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_tb,
                out, arrived, s_ot, s_oh,
                PAGE: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr, SPLIT_LONG: tl.constexpr,
                LONG_FROM: tl.constexpr, CS: tl.constexpr, FOLD: tl.constexpr):
    """Program ``split`` covers KV from ``split * SPLIT``: SPLIT tokens for a query row at a position
    below LONG_FROM, SPLIT_LONG (a multiple) for one at or past it, whose splits start only at every
    (SPLIT_LONG / SPLIT)-th program. A row's splits follow from its own position alone.

    ``FOLD``: the last of a (row tile, KV head)'s programs to finish folds the tile's rows itself
    (:func:`_fold_row`, the same code as the second kernel's), so no second launch; which program is
    last decides only who folds, never the order. Every program counts itself in ``arrived`` (one
    int32 per (tile, KV head), zero before the launch; the folder sets it back to zero): the stores
    of its partials, then a barrier, then the count with release and acquire at GPU scope, as a
    split-K semaphore does."""
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    b = tl.load(tile_seq + tile)
    row0 = tl.load(tile_row0 + tile)
    q0 = tl.load(qsl + b)
    q_len = tl.load(qsl + b + 1) - q0
    seq_len = tl.load(seq_lens + b)
    rows = row0 + tl.arange(0, BM)
    t = rows // G
    g = rows % G
    row_ok = t < q_len
    pos = seq_len - q_len + t  # absolute position of each row's query
    lo = split * SPLIT
    long = pos >= LONG_FROM
    active = row_ok & (lo <= pos) & ((pos < LONG_FROM) | (split % (SPLIT_LONG // SPLIT) == 0))
    row_hi = tl.minimum(lo + tl.where(long, SPLIT_LONG, SPLIT), pos + 1)
    hi = tl.max(tl.where(active, row_hi, lo), axis=0)
    if hi > lo:
        _split_rows(q, kc, vc, table, m_ws, l_ws, acc_ws, qk_scale, T, HQ, s_qt, s_qh, s_kb, s_kt, s_kh,
                    s_vb, s_vt, s_vh, s_tb, b, q0, kvh, split, t, g, row_ok, active, row_hi, lo, hi, seq_len,
                    PAGE, G, D, BD, BM, BN)
    if FOLD:
        here = arrived + tile * tl.num_programs(1) + kvh
        tl.debug_barrier()  # every thread's stores of this program's partials, before the count
        if tl.atomic_add(here, 1, sem="acq_rel", scope="gpu") == tl.num_programs(2) - 1:
            tl.debug_barrier()
            for r in range(BM):
                t_r = (row0 + r) // G
                if t_r < q_len:
                    _fold_row(out, m_ws, l_ws, acc_ws, q0 + t_r, kvh * G + (row0 + r) % G, seq_len - q_len + t_r,
                              T, HQ, s_ot, s_oh, D, BD, SPLIT, CS, SPLIT_LONG, LONG_FROM, ".cg")
            tl.store(here, 0)  # for the next launch


@triton.jit
def _split_rows(q, kc, vc, table, m_ws, l_ws, acc_ws, qk_scale, T, HQ, s_qt, s_qh, s_kb, s_kt, s_kh,
                s_vb, s_vt, s_vh, s_tb, b, q0, kvh, split, t, g, row_ok, active, row_hi, lo, hi, seq_len,
                PAGE: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr):
    """One program's split: its rows' online softmax over KV [lo, hi), the partials stored."""
    d = tl.arange(0, BD)
    d_ok = d < D
    head = kvh * G + g
    qv = tl.load(q + (q0 + t)[:, None] * s_qt + head[:, None] * s_qh + d[None, :],
                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    for n0 in range(lo, hi, BN):
        tok = n0 + tl.arange(0, BN)
        tok_ok = tok < seq_len
        page = tl.load(table + b * s_tb + tok // PAGE, mask=tok_ok, other=0)
        slot = tok % PAGE
        k = tl.load(kc + page[None, :] * s_kb + slot[None, :] * s_kt + kvh * s_kh + d[:, None],
                    mask=tok_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(qv, k) * qk_scale
        visible = (tok[None, :] < row_hi[:, None]) & (tok[None, :] >= lo) & active[:, None]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(vc + page[:, None] * s_vb + slot[:, None] * s_vt + kvh * s_vh + d[None, :],
                    mask=tok_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out_row = split * T + (q0 + t)
    tl.store(m_ws + out_row * HQ + head, m, mask=active)
    tl.store(l_ws + out_row * HQ + head, l, mask=active)
    tl.store(acc_ws + (out_row * HQ + head)[:, None] * D + d[None, :], acc, mask=active[:, None] & d_ok[None, :])


@triton.jit
def _fold_row(out, m_ws, l_ws, acc_ws, tok, head, pos, T, HQ, s_ot, s_oh,
              D: tl.constexpr, BD: tl.constexpr, SPLIT: tl.constexpr, CS: tl.constexpr,
              SPLIT_LONG: tl.constexpr, LONG_FROM: tl.constexpr, CACHE: tl.constexpr):
    """Fold one query row's splits, ``CS`` at a time: a chunk's partials are summed as one vector (a
    tree fixed by ``CS`` and the layout), the chunk sums in chunk order. Which lanes of a chunk hold
    splits depends on the row's own position only, so the order is the row's, whatever the batch;
    the chunks make a 32k-token row's 64 splits a few wide loads instead of 64 dependent ones.
    ``CACHE``: the loads' cache modifier (".cg", past the SM's L1, where other programs of the same
    launch wrote the partials)."""
    long = pos >= LONG_FROM
    n = tl.where(long, pos // SPLIT_LONG, pos // SPLIT) + 1  # this row's splits, in slots of ...
    stride = tl.where(long, SPLIT_LONG // SPLIT, 1)  # ... every stride-th program
    c = tl.arange(0, CS)
    d = tl.arange(0, BD)
    d_ok = d < D
    ok = c < n
    mx = tl.max(tl.load(m_ws + (c * stride * T + tok) * HQ + head, mask=ok, other=float("-inf"),
                        cache_modifier=CACHE), axis=0)
    for s0 in range(CS, n, CS):  # max is exact in any order
        sp = s0 + c
        mx = tl.maximum(mx, tl.max(tl.load(m_ws + (sp * stride * T + tok) * HQ + head, mask=sp < n,
                                           other=float("-inf"), cache_modifier=CACHE), axis=0))
    w = tl.exp2(tl.load(m_ws + (c * stride * T + tok) * HQ + head, mask=ok, other=float("-inf"),
                        cache_modifier=CACHE) - mx)
    total = tl.sum(tl.load(l_ws + (c * stride * T + tok) * HQ + head, mask=ok, other=0.0,
                           cache_modifier=CACHE) * w, axis=0)
    acc = tl.sum(tl.load(acc_ws + ((c * stride * T + tok) * HQ + head)[:, None] * D + d[None, :],
                         mask=ok[:, None] & d_ok[None, :], other=0.0, cache_modifier=CACHE) * w[:, None], axis=0)
    for s0 in range(CS, n, CS):
        sp = s0 + c
        sp_ok = sp < n
        w = tl.exp2(tl.load(m_ws + (sp * stride * T + tok) * HQ + head, mask=sp_ok, other=float("-inf"),
                            cache_modifier=CACHE) - mx)
        total += tl.sum(tl.load(l_ws + (sp * stride * T + tok) * HQ + head, mask=sp_ok, other=0.0,
                                cache_modifier=CACHE) * w, axis=0)
        acc += tl.sum(tl.load(acc_ws + ((sp * stride * T + tok) * HQ + head)[:, None] * D + d[None, :],
                              mask=sp_ok[:, None] & d_ok[None, :], other=0.0, cache_modifier=CACHE) * w[:, None],
                      axis=0)
    tl.store(out + tok * s_ot + head * s_oh + d, (acc / total).to(out.dtype.element_ty), mask=d_ok)


@triton.jit
def _attn_combine(out, m_ws, l_ws, acc_ws, seq_lens, qsl, token_seq, T, HQ, s_ot, s_oh,
                  D: tl.constexpr, BD: tl.constexpr, SPLIT: tl.constexpr, CS: tl.constexpr,
                  SPLIT_LONG: tl.constexpr, LONG_FROM: tl.constexpr):
    """The second kernel: one program per (query token, head) folds its row (:func:`_fold_row`)."""
    tok = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.load(token_seq + tok)
    q0 = tl.load(qsl + b)
    q_len = tl.load(qsl + b + 1) - q0
    pos = tl.load(seq_lens + b) - q_len + (tok - q0)
    _fold_row(out, m_ws, l_ws, acc_ws, tok, head, pos, T, HQ, s_ot, s_oh, D, BD, SPLIT, CS, SPLIT_LONG, LONG_FROM, "")


_ARRIVED: dict[str, torch.Tensor] = {}


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least ``n`` int32 counters at zero, kept per device: each fold sets its own back to zero,
    so no launch needs a fill first (and a CUDA-graph replay finds them at zero too). Grown, never
    shrunk; a grown buffer is allocated outside any graph capture by the first, eager, call."""
    key = str(device)
    buf = _ARRIVED.get(key)
    if buf is None or buf.numel() < n:
        buf = _ARRIVED[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return buf


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float | None = None,
                    plan_: Plan | None = None, _shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Causal attention of ``q`` [T, Hq, D] (the batch's query tokens, packed by sequence, each
    sequence's last ``q_len`` positions) over ``k_cache``/``v_cache`` [blocks, page, Hkv, D]
    through ``block_table`` [B, pages]; ``seq_lens`` [B] counts cached plus new tokens.
    (``_shape`` = (block_m, block_n, split, warps[, combine chunk[, long split, long from[, fold in
    split]]]) overrides the pinned shape: benchmarks only; each is another numerics.)
    With the fold in the split kernel (``configs.ATTN_FOLD_IN_SPLIT``) calls must not overlap on two
    streams of one device: they share its arrival counters."""
    pinned = (configs.ATTN_BLOCK_M, configs.ATTN_BLOCK_N, configs.ATTN_SPLIT, configs.ATTN_WARPS,
              configs.ATTN_COMBINE_CHUNK, configs.ATTN_SPLIT_LONG, configs.ATTN_LONG_FROM,
              configs.ATTN_FOLD_IN_SPLIT)
    bm, bn, split, warps, cs, split_long, long_from, fold = (*_shape, *pinned[len(_shape):]) if _shape else pinned
    if _shape and len(_shape) < 8:
        fold = False  # a shape that names no fold place: the second kernel, as shapes were measured
    if not split_long or (_shape and len(_shape) < 6):
        split_long = split  # none named: one split size
    if split_long % split or long_from % split_long:
        raise ValueError(f"paged_attention: the long split ({split_long}) must be a multiple of the split ({split}) "
                         f"and its start ({long_from}) a multiple of it")
    arch_of(q.device)
    T, HQ, D = q.shape
    _, page, HKV, _ = k_cache.shape
    if HQ % HKV:
        raise ValueError(f"paged_attention: {HQ} query heads are not a multiple of {HKV} KV heads")
    G = HQ // HKV
    if split % bn:
        raise ValueError(f"paged_attention: the KV split ({split}) is not a multiple of the block ({bn})")
    if bm % G:
        raise ValueError(f"paged_attention: GQA group {G} does not divide the row tile {bm}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("paged_attention: the head dim must be contiguous")
    p = plan_ or plan(query_start_loc, seq_lens, G, bm, split)
    out = torch.empty_like(q)
    if T == 0:
        return out
    S = p.max_splits
    m_ws = torch.empty((S, T, HQ), device=q.device, dtype=torch.float32)
    l_ws = torch.empty_like(m_ws)
    acc_ws = torch.empty((S, T, HQ, D), device=q.device, dtype=torch.float32)
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    BD = triton.next_power_of_2(D)
    tiles = p.tile_seq.numel()
    arrived = _arrival_counters(q.device, tiles * HKV) if fold else m_ws  # unused without the fold
    _attn_split[(tiles, HKV, S)](
        q, k_cache, v_cache, block_table, seq_lens, query_start_loc, p.tile_seq, p.tile_row0,
        m_ws, l_ws, acc_ws, scale * LOG2E, T, HQ,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0),
        out, arrived, out.stride(0), out.stride(1),
        PAGE=page, G=G, D=D, BD=BD, BM=bm, BN=bn, SPLIT=split, SPLIT_LONG=split_long, LONG_FROM=long_from,
        CS=cs, FOLD=bool(fold), num_warps=warps, num_stages=3)
    if fold:
        return out
    _attn_combine[(T, HQ)](out, m_ws, l_ws, acc_ws, seq_lens, query_start_loc, p.token_seq, T, HQ,
                           out.stride(0), out.stride(1), D=D, BD=BD, SPLIT=split, CS=cs,
                           SPLIT_LONG=split_long, LONG_FROM=long_from,
                           num_warps=1 if cs <= 8 else 4)
    return out
