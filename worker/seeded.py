"""Seeded sampling on the CPU that survives chunked prefill, and stays independent of the chunking.

When a seeded request's prefill is split into chunks, vLLM samples a token at the end of each
partial chunk, throws it away, and undoes the random draw so that the request's random stream
does not depend on how its prefill was chunked: ``gen.set_offset(gen.get_offset() - 4)``. That is
Philox (CUDA) arithmetic; a CPU generator refuses it ("CPU Generator does not use offset") and the
error kills the engine. Stock vLLM 0.32 on the CPU therefore dies on the first seeded request that
arrives while the token budget is full. We give CPU requests a generator that can undo its last
draw exactly (by restoring the state saved before it), which keeps vLLM's intended semantics.
"""

from __future__ import annotations

import torch


class RewindableGenerator(torch.Generator):
    """A CPU generator whose "offset" counts draws, so vLLM's one-draw rewind works."""

    def __init__(self, device: str = "cpu") -> None:  # torch.Generator takes the device in __new__
        self._draws = 0
        self._before_last: torch.Tensor | None = None

    @classmethod
    def like(cls, gen: torch.Generator) -> "RewindableGenerator":
        new = cls()
        new.set_state(gen.get_state())
        return new

    def before_draw(self) -> None:
        """Called by the sampler right before it draws once from this generator."""
        self._before_last = self.get_state()
        self._draws += 1

    def get_offset(self) -> int:  # type: ignore[override]
        return 4 * self._draws

    def set_offset(self, offset: int) -> "RewindableGenerator":  # type: ignore[override]
        if offset == self.get_offset():
            return self
        if offset != self.get_offset() - 4 or self._before_last is None:
            raise RuntimeError(f"RewindableGenerator can only undo its last draw (offset {self.get_offset()} -> {offset})")
        self.set_state(self._before_last)
        self._before_last = None
        self._draws -= 1
        return self


def wrap_add_request(add_request):
    def add(self, request, *args, **kwargs):
        gen = getattr(request, "generator", None)
        if gen is not None and gen.device.type == "cpu" and not isinstance(gen, RewindableGenerator):
            request.generator = RewindableGenerator.like(gen)
        return add_request(self, request, *args, **kwargs)

    add.__invariant__ = True
    return add


def wrap_sampler(forward_cpu):
    """The CPU sampler draws exactly once from each request's generator per call."""

    def forward(self, logits, generators, k, p):
        for gen in generators.values():
            if isinstance(gen, RewindableGenerator):
                gen.before_draw()
        return forward_cpu(self, logits, generators, k, p)

    forward.__invariant__ = True
    return forward


def apply() -> None:
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler
    from vllm.v1.worker.gpu_input_batch import InputBatch

    if not getattr(InputBatch.add_request, "__invariant__", False):
        InputBatch.add_request = wrap_add_request(InputBatch.add_request)
    if not getattr(TopKTopPSampler.forward_cpu, "__invariant__", False):
        TopKTopPSampler.forward_cpu = wrap_sampler(TopKTopPSampler.forward_cpu)
