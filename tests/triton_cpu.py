"""Run the Triton kernels where the machine has no GPU (CI): Triton's interpreter on CPU tensors.

Import this before ``invariant.kernels.gpu``: ``triton.jit`` reads ``TRITON_INTERPRET`` when the
kernels are defined. On a CUDA machine (the device) it does nothing and the kernels compile.

Triton 3.6's interpreter keeps bf16 as raw uint16 for numpy, and gets two things wrong that the
compiled kernels do right: ``tl.dot`` multiplies the raw uint16 storage, and fp32 -> bf16 casts
truncate (the GPU rounds to nearest even). ``patch_interpreter`` widens bf16 dot operands to fp32
first (exact: a bf16 product fits in fp32) and rounds casts to bf16 to nearest even, so the
interpreted kernels compute what the compiled ones do.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from invariant.kernels.cpu.native import cpu_flags

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

# Open (2026-12-02): on the AVX2-only AMD EPYC (Zen 3) the interpreted matmul's rows differ with the
# batch, on the landed code too; a lead: the interpreter's tl.dot runs on numpy's BLAS, whose kernels
# follow the CPU. They pass on the AVX-512 CPUs; the compiled kernels are tested on the GPU.
interpreter_blas = pytest.mark.xfail(
    not ON_GPU and "avx512f" not in cpu_flags(), strict=False,
    reason="open: on an AVX2-only CPU (seen on the AMD EPYC Zen 3) the Triton interpreter's matmul rows "
           "differ with the batch; cause not found (lead: numpy's BLAS behind tl.dot); passes on AVX-512 "
           "CPUs, and the compiled kernels run in tests/test_gpu_*")

if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"


def _scalar(dtype):
    return getattr(dtype, "scalar", dtype)


def patch_interpreter() -> None:
    if ON_GPU:
        return
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_invariant", False):
        return
    original_dot, original_cast, original_fp = builder.create_dot, builder.cast_impl, builder.create_fp_to_fp

    def widen(handle):
        if _scalar(handle.dtype) == tl.bfloat16:
            data = handle.data.astype(np.uint32) << 16
            return interpreter.TensorHandle(data.view(np.float32), tl.float32)
        return handle

    def to_bf16(handle):
        data = torch.from_numpy(np.ascontiguousarray(handle.data, dtype=np.float32)).to(torch.bfloat16)
        return interpreter.TensorHandle(data.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if _scalar(src.dtype) == tl.float32 and _scalar(dst_type) == tl.bfloat16:
            return to_bf16(src)
        return original_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if _scalar(src.dtype) == tl.float32 and _scalar(dst_type) == tl.bfloat16:
            return to_bf16(src)
        return original_fp(self, src, dst_type, rounding_mode)

    create_dot._invariant = True
    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp
    for name in ("create_fp_ext", "create_fp_trunc"):
        setattr(builder, name, lambda self, src, dst_type: self.cast_impl(src, dst_type))


patch_interpreter()
