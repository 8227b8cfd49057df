"""A GEMM that never sees more than a fixed number of rows in one call: larger inputs go through it in
chunks, each a fresh tensor, and the outputs are concatenated.

Why: on Hopper the worker's GEMM is cuBLASLt without split-K, whose row invariance rests on its
heuristics picking no other reduction order at some M; the kernel canary therefore tries every M
(issue 16). For the lm_head, N is the vocabulary: every M up to a 2,048-token budget on Qwen3-8B is
2.6 PFLOP, and took 5.2 s of the canary's 13.7 s on the H200 (docs/gpu-vllm.md, fifth visit). Yet
the lm_head sees more rows than a decode batch's only for prompt logprobs, or for more sequences in a
step than the limit. Chunked, every call it makes has M <= the limit, so a check of every M up to the
limit covers every M there is: a row's bits are those of its chunk, which the canary showed equal to
the row alone, and concatenation copies bits. The canary still tries sizes above the limit (a few,
across chunk boundaries) to exercise this very function.

Each chunk is cloned: the canary's batches are fresh allocations, and a vendor heuristic may choose
by a pointer's alignment, which a slice's offset could change.
"""

from __future__ import annotations

from typing import Any, Callable

LM_HEAD_ROWS = 256  # rows per lm_head call: >= a decode step's sequences at most loads, small enough to check densely


def lm_head_rows(graphed_rows: int = 0) -> int:
    """The lm_head's rows per call: :data:`LM_HEAD_ROWS`, or more where graphs replay larger batches
    (``--gpu-lm-head-graphs``): a chunk must never be smaller than a graph's bucket."""
    return max(LM_HEAD_ROWS, graphed_rows)


def spans(rows: int, limit: int) -> list[tuple[int, int]]:
    """The [start, stop) row ranges of the chunks: full ones of ``limit`` rows, then the remainder."""
    if limit < 1:
        raise ValueError(f"rowchunks: limit {limit} < 1")
    return [(i, min(i + limit, rows)) for i in range(0, rows, limit)]


class RowChunks:
    """``fn(x, weight, bias)`` on at most ``rows_per_call`` rows of a 2-D ``x`` at a time (see the
    module). ``one_caller`` is passed on from ``fn`` (a graphed GEMM shares its buffers between
    calls: the canary then checks it from one thread)."""

    def __init__(self, fn: Callable[..., Any], rows_per_call: int = LM_HEAD_ROWS) -> None:
        if rows_per_call < 1:
            raise ValueError(f"rowchunks: rows_per_call {rows_per_call} < 1")
        self.fn = fn
        self.rows_per_call = rows_per_call
        self.one_caller = bool(getattr(fn, "one_caller", False))

    def __call__(self, x, weight, bias=None):
        import torch

        if x.dim() != 2 or x.shape[0] <= self.rows_per_call:
            return self.fn(x, weight, bias)
        return torch.cat([self.fn(x[a:b].clone(), weight, bias) for a, b in spans(x.shape[0], self.rows_per_call)])
