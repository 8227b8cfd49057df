"""Route PyTorch's own reductions through the invariant kernels, for any PyTorch program.

``with enable(): model.generate(...)`` (or ``enable()`` / ``handle.disable()``) registers our kernels
for ``aten::mm``, ``addmm``, ``bmm``, ``_softmax``, ``_log_softmax`` and ``mean.dim`` on the CUDA
dispatch key (``device="cpu"`` is for tests under ``TRITON_INTERPRET=1``). ``nn.Linear`` reaches
``mm``/``addmm`` through ``F.linear``; Hugging Face RMSNorm reduces with ``mean``; eager attention is
``matmul`` (``bmm``) + ``softmax``. ``addmm`` with ``beta``/``alpha`` other than 1 is our product
scaled elementwise (still invariant). A dtype the kernels do not take (integers, float64) is refused
with a TypeError rather than quietly computed in a batch-variant way.
"""

from __future__ import annotations

import torch

from invariant.kernels.gpu import matmul, rowops

_active: list["Handle"] = []


class Handle:
    def __init__(self, lib: torch.library.Library, device: str) -> None:
        self.lib = lib
        self.device = device

    def disable(self) -> None:
        if self in _active:
            _active.remove(self)
            self.lib._destroy()

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.disable()


def enabled() -> bool:
    return bool(_active)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return matmul.mm(a, b)


def _addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    if beta == 1 and alpha == 1 and bias.dim() == 1 and bias.shape[0] == b.shape[1] and bias.dtype == a.dtype:
        return matmul.mm(a, b, bias)
    return bias * beta + matmul.mm(a, b) * alpha


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return matmul.bmm(a, b)


def _softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    return rowops.softmax(x, dim, torch.float32 if half_to_float else None)


def _log_softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    return rowops.log_softmax(x, dim, torch.float32 if half_to_float else None)


def _mean_dim(x: torch.Tensor, dim, keepdim: bool = False, *, dtype=None) -> torch.Tensor:
    dims = sorted({d % x.dim() for d in dim}) if dim else list(range(x.dim()))
    if not dims:
        return x.to(dtype or x.dtype).clone()
    # several dims: move them to the end and flatten them into one row
    keep = [d for d in range(x.dim()) if d not in dims]
    moved = x.permute(*keep, *dims)
    flat = moved.reshape(*moved.shape[:len(keep)], -1)
    out = rowops.mean(flat, -1, False, dtype)
    if keepdim:
        for d in dims:
            out = out.unsqueeze(d)
    return out


def enable(device: str = "cuda") -> "Handle":
    """Override the ops until ``disable()`` (or the end of a ``with enable():`` block)."""
    key = {"cuda": "CUDA", "cpu": "CPU"}[device]
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("mm", _mm, key)
    lib.impl("addmm", _addmm, key)
    lib.impl("bmm", _bmm, key)
    lib.impl("_softmax", _softmax, key)
    lib.impl("_log_softmax", _log_softmax, key)
    lib.impl("mean.dim", _mean_dim, key)
    handle = Handle(lib, device)
    _active.append(handle)
    return handle
