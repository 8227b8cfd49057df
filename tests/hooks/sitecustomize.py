"""Test-only hooks for every Python process of a test's worker (put this folder on PYTHONPATH).

vLLM runs the model in child processes, so a test cannot monkeypatch it from outside; Python imports
``sitecustomize`` at start-up in every process, children included, and this one patches modules
right after they are imported, only when its environment variables ask for it:

- ``INVARIANT_TEST_STOCK_GEMM=torch``: vLLM's CPU linear layers take vLLM's own fallback GEMM,
  ``torch.nn.functional.linear`` (what vLLM uses where oneDNN is unavailable, and for bf16 on
  AVX2-only CPUs). In fp32 that is MKL, which picks a different kernel for one row than for several
  on every x86 CPU we measured: the control's batch variance, on any CI machine.
- ``INVARIANT_TEST_FAULT=split-k``: our GEMM made batch-variant on purpose; a call with more than
  one row sums the two halves of K separately, so a row's rounding depends on the batch. The canary
  must catch it.
"""

from __future__ import annotations

import importlib.abc
import os
import sys


def _stock_torch_gemm(module) -> None:
    module._supports_onednn = False


def _split_k_fault(module) -> None:
    import torch

    original = module.linear

    def linear(x, weight, bias=None):
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        if rows <= 1:
            return original(x, weight, bias)
        half = x.shape[-1] // 2
        lo = original(x[..., :half].contiguous(), weight[:, :half].contiguous()).float()
        hi = original(x[..., half:].contiguous(), weight[:, half:].contiguous()).float()
        y = lo + hi
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)

    module.linear = linear


HOOKS = {}
if os.environ.get("INVARIANT_TEST_STOCK_GEMM") == "torch":
    HOOKS["vllm._custom_ops"] = _stock_torch_gemm
if os.environ.get("INVARIANT_TEST_FAULT") == "split-k":
    HOOKS["invariant.kernels.cpu.gemm"] = _split_k_fault


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of a hooked module to run the hook after it."""

    def find_spec(self, fullname, path, target=None):
        hook = HOOKS.get(fullname)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def run(module, _exec=exec_module, _hook=hook):
                    _exec(module)
                    _hook(module)

                spec.loader.exec_module = run
                return spec
        return None


if HOOKS:
    sys.meta_path.insert(0, _AfterImport())
