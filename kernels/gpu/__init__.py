"""CUDA half of the batch-invariant kernels, in Triton (and runnable on CPU tensors under
``TRITON_INTERPRET=1``, which is how CI checks them without a GPU).

``enable()`` routes PyTorch's own ops (mm, addmm, bmm, softmax, log_softmax, mean) through them, so
any PyTorch program, a Hugging Face model included, becomes batch-invariant.
"""

from invariant.kernels.gpu.attention import paged_attention
from invariant.kernels.gpu.configs import identity
from invariant.kernels.gpu.matmul import bmm, linear, mm
from invariant.kernels.gpu.override import enable, enabled
from invariant.kernels.gpu.rowops import fused_add_rms_norm, log_softmax, mean, rms_norm, softmax

__all__ = ["bmm", "enable", "enabled", "fused_add_rms_norm", "identity", "linear", "log_softmax", "mean", "mm",
           "paged_attention", "rms_norm", "softmax"]
