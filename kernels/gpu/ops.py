"""Our GEMM as a PyTorch custom op (``torch.ops.invariant.linear``), for engines that compile.

vLLM compiles the model with torch.compile and captures CUDA graphs, with the batch dimension
symbolic. ``matmul.linear`` picks its kernel and tile from M in Python, which the compiler would
have to trace and guard on; as a custom op it is one opaque call whose output shape is known, so
the compiled graph calls it as it is, with the M of each call.
"""

from __future__ import annotations

import torch

from invariant.kernels.gpu import matmul

_OP = None


def linear_op():
    """Register once and return ``torch.ops.invariant.linear(x, weight, bias)``."""
    global _OP
    if _OP is None:
        @torch.library.custom_op("invariant::linear", mutates_args=())
        def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            return matmul.linear(x, weight, bias)

        @linear.register_fake
        def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            return x.new_empty((*x.shape[:-1], weight.shape[0]))

        _OP = torch.ops.invariant.linear
    return _OP
