"""Per-op properties of the CPU kernels: batch invariance (bitwise) and accuracy (float64 reference).

Invariance, as the issue defines it: for any batch, row i of the output equals the output for row i
alone, whatever the number and the contents of the other rows. Hypothesis draws shapes, batch sizes,
the row's position and the other rows' contents. The controls show the test can fail: torch's own
fp32 linear (MKL) is batch-variant, and so is a GEMM made variant on purpose.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from invariant.kernels.cpu import gemm, native, rowops

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])


@st.composite
def batches(draw, max_width: int = 1100):
    """(batch, index of the row under test, dtype): other rows drawn at another scale and seed."""
    dtype = draw(DTYPES)
    width = draw(st.integers(1, max_width))
    rows = draw(st.integers(1, 130))
    at = draw(st.integers(0, rows - 1))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    x = (torch.randn(rows, width, generator=g) * scale).to(dtype)
    return x, at, dtype


def _alone_equals_batched(op, x: torch.Tensor, at: int) -> None:
    batched = op(x)
    alone = op(x[at:at + 1].clone())
    assert torch.equal(batched[at], alone[0]), f"row {at} of {x.shape[0]} differs from the row alone"
    # and a different crowd around the same row (other rows replaced, order reversed)
    crowd = torch.flip(x, dims=[0]).clone()
    crowd[x.shape[0] - 1 - at] = x[at]
    assert torch.equal(op(crowd)[x.shape[0] - 1 - at], alone[0])


def runnable(path: str):
    """A GEMM path as a test parameter, skipped with the reason on a CPU that cannot run it."""
    missing = native.GEMM_PATHS[path] - native.cpu_flags()
    reason = f"the {path} GEMM path needs {', '.join(sorted(missing))}, which this CPU lacks"
    return pytest.param(path, marks=pytest.mark.skipif(bool(missing), reason=reason), id=path)


GEMM_PATHS = [runnable(p) for p in native.GEMM_PATHS]


@pytest.mark.parametrize("path", GEMM_PATHS)
@SETTINGS
@given(batches(), st.integers(1, 300), st.booleans())
def test_linear_is_batch_invariant_and_accurate(path, case, n, with_bias):
    x, at, dtype = case
    g = torch.Generator().manual_seed(n)
    w = (torch.randn(n, x.shape[1], generator=g) / x.shape[1] ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    _alone_equals_batched(lambda t: gemm.linear(t, w, b, path=path), x, at)
    ref = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    got = gemm.linear(x, w, b, path=path).double()
    # fp32 accumulation of K products, then one rounding to the dtype
    eps = {torch.float32: 2**-23, torch.bfloat16: 2**-8}[dtype]
    bound = eps * ref.abs() + 2**-23 * x.shape[1] * (x.double().abs() @ w.double().abs().t()) + 1e-30
    assert bool((got - ref).abs().le(bound * 4).all())


def test_linear_handles_strided_and_3d_inputs():
    x = torch.randn(3, 5, 64)
    w = torch.randn(16, 64)
    assert torch.equal(gemm.linear(x, w), gemm.linear(x.reshape(15, 64), w).reshape(3, 5, 16))
    xt = torch.randn(64, 10).t()  # non-contiguous rows
    assert torch.equal(gemm.linear(xt, w), gemm.linear(xt.contiguous(), w))
    assert gemm.linear(torch.randn(0, 64), w).shape == (0, 16)
    with pytest.raises(ValueError, match="does not match"):
        gemm.linear(torch.randn(2, 63), w)


@SETTINGS
@given(batches(max_width=4096))
def test_rms_norm_is_batch_invariant_and_accurate(case):
    x, at, dtype = case
    w = torch.linspace(0.5, 1.5, x.shape[1]).to(dtype)
    _alone_equals_batched(lambda t: rowops.rms_norm(t, w, 1e-6), x, at)
    xf = x.double()
    ref = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert torch.allclose(rowops.rms_norm(x, w, 1e-6).double(), ref, rtol=tol, atol=tol)


@SETTINGS
@given(batches(max_width=4096))
def test_fused_add_rms_norm_is_batch_invariant(case):
    x, at, dtype = case
    residual = torch.flip(x, dims=[1]).clone()
    w = torch.linspace(0.5, 1.5, x.shape[1]).to(dtype)

    def op(t):
        r = torch.flip(t, dims=[1]).clone()
        out, res = rowops.fused_add_rms_norm(t, r, w, 1e-6)
        return torch.cat([out, res], dim=-1)

    _alone_equals_batched(op, x, at)
    out, res = rowops.fused_add_rms_norm(x, residual, w, 1e-6)
    assert torch.equal(res, (x.float() + residual.float()).to(dtype))
    assert torch.equal(out, rowops.rms_norm(res, w, 1e-6))


@SETTINGS
@given(batches(max_width=160000), st.sampled_from(["softmax", "log_softmax"]))
def test_softmax_family_is_batch_invariant_and_accurate(case, which):
    x, at, _ = case
    op = getattr(rowops, which)
    _alone_equals_batched(op, x, at)
    ref = getattr(torch, which)(x.double(), dim=-1)
    assert torch.allclose(op(x).double(), ref, rtol=1e-5, atol=1e-6 if which == "softmax" else 1e-4)


@SETTINGS
@given(batches(max_width=20000))
def test_mean_is_batch_invariant_and_accurate(case):
    x, at, _ = case
    _alone_equals_batched(lambda t: rowops.mean(t).unsqueeze(-1), x, at)
    ref = x.double().mean(-1)
    assert torch.allclose(rowops.mean(x).double(), ref, rtol=1e-5, atol=1e-5 * x.double().abs().max().item())


def test_softmax_edge_cases_match_torch():
    x = torch.tensor([[0.0, float("-inf"), 1.0], [float("-inf")] * 3])
    assert torch.equal(rowops.log_softmax(x)[0].isinf(), torch.log_softmax(x, -1)[0].isinf())
    assert bool(rowops.softmax(x)[1].isnan().all()) and bool(torch.softmax(x, -1)[1].isnan().all())


@SETTINGS
@given(batches(max_width=160000))
def test_reused_torch_sampler_ops_are_batch_invariant(case):
    """The sampler keeps torch's last-dimension softmax, cumsum, sort and argmax (one thread per row);
    the plugin relies on that, so it is checked here like our own kernels."""
    x, at, _ = case
    x = x.float()
    for op in (lambda t: t.softmax(-1), lambda t: torch.cumsum(t.softmax(-1), -1),
               lambda t: t.argmax(-1, keepdim=True).float(), lambda t: t.sort(-1, descending=True)[0]):
        _alone_equals_batched(op, x, at)


def test_control_torch_fp32_linear_is_batch_variant():
    """Control: the same property check fails on MKL's fp32 GEMM (one row takes another kernel)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1024, generator=g)
    w = torch.randn(512, 1024, generator=g)
    with pytest.raises(AssertionError):
        _alone_equals_batched(lambda t: torch.nn.functional.linear(t, w), x, 3)


def test_control_split_k_gemm_is_caught():
    """Control: a GEMM that sums two halves of K when batched is caught by the property check."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1000, generator=g)
    w = torch.randn(64, 1000, generator=g)

    def split_when_batched(t):
        if t.shape[0] == 1:
            return gemm.linear(t, w)
        return gemm.linear(t[:, :500].contiguous(), w[:, :500].contiguous()) + gemm.linear(
            t[:, 500:].contiguous(), w[:, 500:].contiguous())

    with pytest.raises(AssertionError):
        _alone_equals_batched(split_when_batched, x, 2)


@pytest.mark.parametrize("path", GEMM_PATHS)
def test_packed_weights_follow_updates_and_inference_tensors(path):
    """The avx512 and amx paths pack a weight once: an in-place update (an RL step) must be seen, and a
    weight made under inference_mode (no version counter: packed per call) must give the same bits."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(70, 130, generator=g).bfloat16()
    x = torch.randn(5, 130, generator=g).bfloat16()
    before = gemm.linear(x, w, path=path)
    w.mul_(2)
    assert torch.equal(gemm.linear(x, w, path=path), gemm.linear(x, w.clone(), path=path))
    assert not torch.equal(gemm.linear(x, w, path=path), before)
    with torch.inference_mode():
        fresh = w.clone()
        for _ in range(5):
            assert torch.equal(gemm.linear(x, fresh, path=path), gemm.linear(x, w, path=path))


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("path", GEMM_PATHS)
def test_the_bits_do_not_depend_on_the_thread_count(path, restore_threads):
    """Every kernel splits its work across threads by output element, never inside a sum: 1, 2, 5 and
    16 threads (more than this machine may have) give the same bits. The Xeon of issue 12 serves with
    12-16 threads, CI with 2; a thread-dependent order would show only on one of them."""
    from invariant.kernels.cpu.attention import paged_attention, write_kv

    g = torch.Generator().manual_seed(12)
    x, w, b = torch.randn(37, 160, generator=g), torch.randn(200, 160, generator=g), torch.randn(200, generator=g)
    rows, res, nw = torch.randn(37, 96, generator=g), torch.randn(37, 96, generator=g), torch.randn(96, generator=g)
    block, kv_heads, heads, dim, n = 16, 2, 4, 32, 45
    k, v = (torch.randn(n, kv_heads, dim, generator=g) for _ in range(2))
    q = torch.randn(n, heads, dim, generator=g)
    cache = torch.zeros(4, kv_heads, 2 * block, dim)
    key_cache, value_cache = cache.chunk(2, dim=2)
    table = torch.tensor([[3, 1, 2]], dtype=torch.int32)
    write_kv(k, v, key_cache, value_cache, (table[0, torch.arange(n) // block].long() * block + torch.arange(n) % block))

    def everything():
        out = torch.empty_like(q)
        paged_attention(q, key_cache, value_cache, table, torch.tensor([0, n], dtype=torch.int32),
                        torch.tensor([n], dtype=torch.int32), dim ** -0.5, out)
        return [gemm.linear(x, w, b, path=path), gemm.linear(x.to(torch.bfloat16), w.to(torch.bfloat16), path=path),
                rowops.rms_norm(rows, nw, 1e-6), *rowops.fused_add_rms_norm(rows.clone(), res.clone(), nw, 1e-6),
                rowops.log_softmax(rows), out]

    torch.set_num_threads(1)
    ref = everything()
    for threads in (2, 5, 16):
        torch.set_num_threads(threads)
        for i, (got, want) in enumerate(zip(everything(), ref)):
            assert torch.equal(got, want), f"output {i} differs at {threads} threads"


def test_control_a_thread_split_sum_changes_with_the_thread_count(restore_threads):
    """Control of the test above: torch's own full reduction cuts the sum into one part per thread,
    so the thread count changes its bits - what the test above must be able to see."""
    x = torch.randn(1 << 22, generator=torch.Generator().manual_seed(5))
    sums = set()
    for threads in (1, 2, 5, 16):
        torch.set_num_threads(threads)
        sums.add(x.sum().item())
    assert len(sums) > 1, "torch's sum gave one value at every thread count: the control proves nothing"
