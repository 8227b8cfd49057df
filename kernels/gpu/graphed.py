"""A linear layer of few rows through CUDA graphs: one graph per row bucket and weight, captured at
first use, replayed after.

Why: vLLM captures the decoder in CUDA graphs but computes the logits outside them, so every decode
step makes one eager lm_head GEMM call. Under upstream's invariant settings that call is cuBLASLt
with a 1 KiB workspace, and on the H200 it cost ~170 us more host time per step than stock's cuBLAS
call (docs/gpu-vllm.md, fifth visit: the decode profile's host table), at concurrency 1, where a
step is bound by the host. A replay costs a copy in, the replay and a copy out.

Sound only for a row-invariant GEMM: a batch of m rows runs as the bucket's b >= m rows, the rest
being whatever an earlier call left there, so a row's bits must depend neither on the other rows nor
on b. That is the property the worker's kernel canary checks for every GEMM at every M, and it runs
this very function for the lm_head, padding included; the control
(tests/test_kernel_canary.py, mode ``cublas-graphed``) shows the canary rejecting cuBLAS's
batch-variant default through it.
"""

from __future__ import annotations

from typing import Any

MAX_ROWS = 64  # decode batches up to here replay a graph; larger ones amortize an eager call anyway


def bucket(rows: int, max_rows: int = MAX_ROWS) -> int | None:
    """The graph's row count for a batch of ``rows``: the next power of two, None above ``max_rows``."""
    if rows < 1 or rows > max_rows:
        return None
    b = 1
    while b < rows:
        b *= 2
    return b


class GraphedLinear:
    """``torch.nn.functional.linear`` for 2-D CUDA inputs of up to ``max_rows`` rows through captured
    graphs (see the module); anything else, and any call while a graph is being captured (vLLM's
    own capture), runs eagerly. Keyed by bucket, weight and bias storage, dtypes and width, so a
    reloaded weight at another address gets its own graph. One caller thread and stream (vLLM's
    model runner): the graphs' input and output buffers are shared between calls (``one_caller``:
    the kernel canary checks it from one thread)."""

    one_caller = True

    def __init__(self, max_rows: int = MAX_ROWS) -> None:
        self.max_rows = max_rows
        self.graphs: dict[tuple, tuple[Any, Any, Any]] = {}

    def __call__(self, x, weight, bias=None):
        import torch

        b = bucket(x.shape[0], self.max_rows) if x.dim() == 2 else None
        if b is None or not x.is_cuda or torch.cuda.is_current_stream_capturing():
            return torch.nn.functional.linear(x, weight, bias)
        key = (b, weight.data_ptr(), tuple(weight.shape), weight.dtype,
               None if bias is None else bias.data_ptr(), x.dtype, x.shape[1], x.device)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(b, x, weight, bias)
        inp, out, graph = entry
        inp[:x.shape[0]].copy_(x)
        graph.replay()
        return out[:x.shape[0]].clone()  # the graph's buffer is overwritten by the next replay

    @staticmethod
    def _capture(rows: int, x, weight, bias):
        import torch

        inp = torch.zeros((rows, x.shape[1]), dtype=x.dtype, device=x.device)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up off the capture: the library's handle and workspace
            torch.nn.functional.linear(inp, weight, bias)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread of the engine may use CUDA meanwhile (not inside this capture)
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = torch.nn.functional.linear(inp, weight, bias)
        return inp, out, graph
