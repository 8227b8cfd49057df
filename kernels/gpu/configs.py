"""Launch configurations of the Triton kernels: fixed per GPU architecture, shipped in the package.

Why no autotuner: a tuner picks by timing, so two pods could pick two configurations and serve two
numerics. Here a configuration is a pure function of (architecture, shapes), and the part of it that
decides bits is pinned separately:

* GEMM: each output element's K reduction is cut into chunks of ``MM_CHUNK_K`` (from K alone, never
  from M), each chunk accumulated in steps of ``MM_BLOCK_K``, the chunk sums added in chunk order.
  The tile shape (``BM``, ``BN``, warps, stages) and whether the chunks are computed by one program
  or by one program each (split-K) do not change the bits (measured on the device: see
  docs/gpu-kernels.md), so each M takes the fastest.
* Row ops: one program per row; block and warps depend on the row length only.
* Attention: one block shape and warp count for every call (the per-row reductions' tree depends
  on the register layout), KV in splits of ``ATTN_SPLIT`` tokens at absolute positions, so cached
  and fresh tokens, prefill and decode, reduce in one order.

``identity()`` digests all of it (and the kernel sources) for the numerics fingerprint of whatever
serves with these kernels (the GPU worker does not yet: it serves with vLLM's invariant mode).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = ("matmul.py", "rowops.py", "attention.py", "configs.py")

# --- what decides the bits --------------------------------------------------------------------------
MM_BLOCK_K = 64
MM_CHUNK_K = 1024
ATTN_BLOCK_M = 16  # rows = (query token, GQA head) pairs; decode fills 1 token x group
ATTN_BLOCK_N = 128
ATTN_WARPS = 4
# The split shape measured best by its worst case on the H200 (2026-12-03, docs/gpu-kernels.md):
# 256-token splits before position 16,384, 1,024-token ones from it, folded 64 at a time.
ATTN_SPLIT = 256  # tokens per KV split (a size, never a count)
ATTN_COMBINE_CHUNK = 64  # splits folded as one vector (a fixed width: the tree never follows the batch)
ATTN_SPLIT_LONG = 1024  # tokens per KV split for query positions >= ATTN_LONG_FROM (a multiple of ATTN_SPLIT); 0: ATTN_SPLIT
ATTN_LONG_FROM = 16384  # (a multiple of ATTN_SPLIT_LONG); with one split size it changes nothing
# Where a row's splits are folded: False, a second kernel (one program per query row and head); True,
# the last split program of each (row tile, KV head) to finish, saving the second launch (built for
# batch 1, where that launch may be much of the gap to cuDNN's ~11 us; not yet measured on a GPU, so
# not pinned).
ATTN_FOLD_IN_SPLIT = False
ROW_BLOCK_MAX = 4096  # row ops: elements a program holds at once (longer rows loop in this block)


@dataclass(frozen=True)
class MMConfig:
    """How one GEMM launch is shaped. Never changes the bits (see the module docstring)."""

    bm: int
    bn: int
    warps: int
    stages: int
    split: bool  # one program per (tile, K chunk), partial sums added by a second kernel in chunk order
    group_m: int = 8
    tma: bool = False  # whole tiles moved by the tensor-memory accelerator (Hopper; 2-D bf16/fp16 only)


def chunks(K: int) -> int:
    return max(1, -(-K // MM_CHUNK_K))


def mm_config(M: int, N: int, K: int, sms: int = 132, arch: str = "sm90") -> MMConfig:
    """Tile shape by M (decode rows to prefill batches); split K when the tiles cannot fill the GPU."""
    if arch == "interpret":  # small tiles keep the CPU interpreter quick; the bits are the same
        return MMConfig(16, 32, 4, 1, split=chunks(K) > 1 and M <= 16)
    if not (arch.startswith("sm9") or arch.startswith("sm10")):
        for max_m, bm, bn, warps, stages in DEFAULT:
            if M <= max_m:
                break
        return MMConfig(bm, bn, warps, stages, split=chunks(K) > 1 and tiles(M, N, bm, bn) < sms)
    # Hopper, from the tile sweep of bench/gpu_kernels.py on an H100 (docs/gpu-kernels.md):
    if M <= 64:  # decode: pointer loads; one program per K chunk while the tiles leave SMs idle
        bm = 16 if M <= 16 else 64
        return MMConfig(bm, 64, 4, 4, split=chunks(K) > 1 and tiles(M, N, bm, 64) < sms)
    if M <= 256 and tiles(M, N, 64, 128) < 4 * sms:
        return MMConfig(64, 128, 4, 4, split=False, tma=True)
    return MMConfig(128, 256, 8, 3, split=False, tma=True)


def tiles(M: int, N: int, bm: int, bn: int) -> int:
    return -(-M // bm) * -(-N // bn)


# Other architectures: (largest M, BM, BN, warps, stages); first row whose M bound holds.
DEFAULT = (
    (16, 16, 64, 4, 3),
    (64, 64, 64, 4, 3),
    (1 << 62, 128, 128, 8, 3),
)


def row_config(n: int) -> tuple[int, int]:
    """(block, warps) for a row of ``n`` elements: a function of ``n`` alone."""
    block = 1
    while block < min(n, ROW_BLOCK_MAX):
        block *= 2
    warps = 1 if block <= 256 else 4 if block <= 2048 else 8
    return block, warps


def identity(arch: str = "sm90") -> dict[str, str]:
    """What decides the bits of these kernels, for the numerics fingerprint."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    pinned = dict(MM_BLOCK_K=MM_BLOCK_K, MM_CHUNK_K=MM_CHUNK_K, ATTN_BLOCK_M=ATTN_BLOCK_M,
                  ATTN_BLOCK_N=ATTN_BLOCK_N, ATTN_WARPS=ATTN_WARPS, ATTN_SPLIT=ATTN_SPLIT,
                  ATTN_COMBINE_CHUNK=ATTN_COMBINE_CHUNK, ATTN_SPLIT_LONG=ATTN_SPLIT_LONG,
                  ATTN_LONG_FROM=ATTN_LONG_FROM, ATTN_FOLD_IN_SPLIT=ATTN_FOLD_IN_SPLIT, ROW_BLOCK_MAX=ROW_BLOCK_MAX)
    try:
        import triton

        version = triton.__version__
    except ImportError:  # pragma: no cover - the kernels need triton
        version = "none"
    return {"triton": version, "arch": arch, "pinned": json.dumps(pinned, sort_keys=True),
            "source_sha256": digest.hexdigest()[:16],
            "table_sha256": hashlib.sha256(json.dumps(DEFAULT).encode()).hexdigest()[:16]}


def describe(cfg: MMConfig) -> dict:
    return asdict(cfg)
