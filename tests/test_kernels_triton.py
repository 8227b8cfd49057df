"""The Triton kernels: bitwise batch invariance per op, and accuracy against float64.

One file, two places: in CI (no GPU) through Triton's interpreter on CPU tensors and small shapes;
on the device (``pytest -m gpu``) compiled, on CUDA tensors and larger shapes, where every test here
is marked ``gpu``. The controls show that the checks detect variance: a K chunk chosen from M (what
cuBLAS's split-K heuristics amount to), and, on the device, cuBLAS itself.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from triton_cpu import DEVICE, ON_GPU, interpreter_blas  # noqa: I001 - sets TRITON_INTERPRET before triton loads

from invariant.kernels.gpu import attention, configs, matmul, rowops  # noqa: E402

pytestmark = [pytest.mark.gpu] if ON_GPU else []
BIG = 8 if ON_GPU else 1  # shape scale on the device
EXAMPLES = 25 if ON_GPU else 6
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# ||out - ref|| / ||ref|| bounds (METHOD.md: bf16 operands 1e-3..1e-2; fp32 far under 1e-3)
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
SETTINGS = dict(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))




def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not torch.isnan(out).any()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(*shape, dtype=torch.float32, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen(seed)) * scale).to(dtype).to(DEVICE)


def rows_invariant(fn, x: torch.Tensor, sizes, seed: int = 1) -> bool:
    """Row i of fn(batch) is bitwise fn(row i alone) and fn(row i among other random rows), for
    every batch size in ``sizes`` (row i placed at varying positions)."""
    alone = fn(x[:1])
    g = gen(seed)
    for n in sizes:
        others = torch.randn(n, *x.shape[1:], generator=g).to(x.dtype).to(x.device)
        at = int(torch.randint(0, n, (1,), generator=g))
        batch = torch.cat([others[:at], x[:1], others[at + 1:]])[:n] if n > 1 else x[:1]
        out = fn(batch)
        if not torch.equal(out[at if n > 1 else 0], alone[0]):
            return False
    return True


@interpreter_blas
# --- matmul ---------------------------------------------------------------------------------------
@settings(**SETTINGS)
@given(n=st.integers(1, 96 * BIG), k=st.integers(1, 1300 * BIG), dtype=st.sampled_from(DTYPES),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_matmul_rows_do_not_depend_on_the_batch(n, k, dtype, bias, seed):
    x = randn(1, k, dtype=dtype, seed=seed)
    w = randn(n, k, dtype=dtype, seed=seed + 1, scale=k ** -0.5)
    b = randn(n, dtype=dtype, seed=seed + 2) if bias else None
    sizes = [1, 2, 5, 16, 33, 64, 128, 300] if ON_GPU else [2, 5, 17, 33]
    assert rows_invariant(lambda a: matmul.linear(a, w, b), x, sizes, seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_split_and_whole_tiles_give_the_same_bits_and_the_right_numbers(dtype):
    M, N, K = 40, 72 * BIG, 2100 * BIG  # several K chunks, a ragged last one
    a, w, b = randn(M, K, dtype=dtype, seed=3), randn(N, K, dtype=dtype, seed=4, scale=K ** -0.5), randn(N, dtype=dtype, seed=5)
    shapes = [configs.MMConfig(16, 32, 4, 1, split=True), configs.MMConfig(16, 32, 4, 1, split=False)]
    if ON_GPU:
        shapes += [configs.MMConfig(bm, bn, wp, st_, split=sp) for bm, bn, wp, st_ in
                   [(16, 64, 4, 4), (64, 64, 4, 4), (64, 128, 4, 4), (128, 256, 8, 3)] for sp in (False, True)]
        shapes += [configs.MMConfig(bm, bn, wp, st_, split=False, tma=True) for bm, bn, wp, st_ in
                   [(64, 128, 4, 4), (128, 256, 8, 3), (128, 128, 8, 4)]]
    outs = [matmul.linear(a, w, b, config=c) for c in shapes]
    for c, o in zip(shapes, outs):
        assert torch.equal(o, outs[0]), c
    assert rel(outs[0], a.double() @ w.double().T + b.double()) < TOL[dtype]


def test_matmul_tma_tiles_give_the_bits_of_pointer_tiles():
    """The TMA path (Hopper; aligned bf16/fp16 rows) fills out-of-range K and M with zeros as the
    masked loads do: same chunked sum, same bits, ragged edges included."""
    M, N, K = 37 * BIG, 72 * BIG, 2112 * BIG  # 2112 = 2 chunks + 64: a ragged last chunk
    a, w, b = randn(M, K, dtype=torch.bfloat16, seed=13), randn(N, K, dtype=torch.bfloat16, seed=14), randn(N, dtype=torch.bfloat16, seed=15)
    tiles = [(16, 32, 4, 1)] if not ON_GPU else [(64, 128, 4, 4), (128, 256, 8, 3), (128, 128, 8, 4)]
    ref = matmul.linear(a, w, b, config=configs.MMConfig(16, 32, 4, 1, split=True))
    for bm, bn, wp, st_ in tiles:
        assert torch.equal(matmul.linear(a, w, b, config=configs.MMConfig(bm, bn, wp, st_, split=False, tma=True)), ref)
    assert torch.equal(matmul.linear(a[:1], w, b, config=configs.MMConfig(16, 32, 4, 1, split=False, tma=True)), ref[:1])


def test_matmul_any_strides_and_bmm_per_matrix():
    a = randn(24, 300, dtype=torch.bfloat16, seed=6).t()  # [300, 24], column-major
    b = randn(40, 24, dtype=torch.bfloat16, seed=8).t()
    assert torch.equal(matmul.mm(a, b), matmul.mm(a.contiguous(), b.contiguous()))
    assert rel(matmul.mm(a, b), a.double() @ b.double()) < TOL[torch.bfloat16]
    x = randn(6, 9, 300, dtype=torch.bfloat16, seed=9)
    y = randn(6, 300, 40, dtype=torch.bfloat16, seed=10)
    batched = matmul.bmm(x, y)
    for i in range(6):
        assert torch.equal(batched[i], matmul.mm(x[i], y[i]))
        assert torch.equal(batched[i, :1], matmul.mm(x[i, :1], y[i]))


def test_matmul_refuses_mixed_or_integer_dtypes():
    a = randn(2, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="invariant matmul supports"):
        matmul.mm(a, randn(8, 3, dtype=torch.float32))
    with pytest.raises(TypeError):
        matmul.mm(a.to(torch.int32), a.t().to(torch.int32))


@interpreter_blas
def test_control_a_k_chunk_chosen_from_m_is_detected():
    """What cuBLAS does (a split-K picked from M) changes the bits, and the check sees it."""
    k = 4096 if ON_GPU else 1100
    x = randn(1, k, dtype=torch.float32, seed=11)
    w = randn(64, k, dtype=torch.float32, seed=12, scale=k ** -0.5)
    variant = lambda a: matmul.bmm(a[None], w.t()[None], _chunk=k if a.shape[0] == 1 else 128)[0]  # noqa: E731
    assert not rows_invariant(variant, x, [5, 17, 33])
    assert rows_invariant(lambda a: matmul.linear(a, w), x, [5, 17, 33])


# --- row ops --------------------------------------------------------------------------------------
ROW_OPS = {
    "rms_norm": lambda x, w: rowops.rms_norm(x, w, 1e-6),
    "fused_add_rms_norm": lambda x, w: torch.cat(rowops.fused_add_rms_norm(x, x.flip(-1), w, 1e-6), -1),
    "softmax": lambda x, w: rowops.softmax(x, -1),
    "log_softmax_fp32": lambda x, w: rowops.log_softmax(x, -1, torch.float32),
    "mean": lambda x, w: rowops.mean(x, -1, keepdim=True),
}


def row_reference(name: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xd, wd = x.double(), w.double()
    if name in ("rms_norm", "fused_add_rms_norm"):
        h = (x.float() + x.flip(-1).float()).to(x.dtype).double() if name == "fused_add_rms_norm" else xd
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * wd
        return torch.cat([normed, h], -1) if name == "fused_add_rms_norm" else normed
    if name == "softmax":
        return xd.softmax(-1)
    if name == "log_softmax_fp32":
        return xd.log_softmax(-1)
    return xd.mean(-1, keepdim=True)


@pytest.mark.parametrize("name", sorted(ROW_OPS))
@settings(**SETTINGS)
@given(n=st.integers(1, 5000 * BIG), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_row_ops_are_invariant_and_accurate(name, n, dtype, seed):
    x = randn(1, n, dtype=dtype, seed=seed, scale=3)
    w = randn(n, dtype=dtype, seed=seed + 1)
    fn = ROW_OPS[name]
    assert rows_invariant(lambda a: fn(a, w), x, [2, 5, 33, 130] if ON_GPU else [2, 7], seed)
    batch = randn(3, n, dtype=dtype, seed=seed + 2, scale=3)
    # fp32 outputs (log_softmax_fp32, any fp32 input) are held to fp32 accuracy, the rest to their dtype's
    tol = 1e-5 if name == "log_softmax_fp32" or dtype == torch.float32 else TOL[dtype]
    assert rel(fn(batch, w), row_reference(name, batch, w)) < tol


def test_fused_add_rms_norm_returns_the_rounded_sum_as_the_residual():
    x, r, w = (randn(4, 96, dtype=torch.bfloat16, seed=s) for s in (20, 21, 22))
    out, res = rowops.fused_add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(res, (x.float() + r.float()).to(torch.bfloat16))
    assert torch.equal(out, rowops.rms_norm(res, w, 1e-5))


# --- attention ------------------------------------------------------------------------------------
HQ, HKV, D, PAGE = (8, 2, 128, 16) if ON_GPU else (2, 1, 16, 16)


class Cache:
    """Random K/V in a paged cache with shuffled pages, as vLLM lays them out."""

    def __init__(self, lens: list[int], seed: int, dtype: torch.dtype = torch.bfloat16):
        self.lens = lens
        pages = [-(-n // PAGE) for n in lens]
        total = sum(pages) + 2
        self.k = randn(total, PAGE, HKV, D, dtype=dtype, seed=seed)
        self.v = randn(total, PAGE, HKV, D, dtype=dtype, seed=seed + 1)
        order = torch.randperm(total, generator=gen(seed)).tolist()
        self.table = torch.zeros(len(lens), max(pages), dtype=torch.int32)
        i = 0
        for b, n in enumerate(pages):
            for p in range(n):
                self.table[b, p] = order[i]
                i += 1
        self.table = self.table.to(DEVICE)
        self.q = [randn(n, HQ, D, dtype=dtype, seed=seed + 10 + b) for b, n in enumerate(lens)]

    def run(self, seqs: list[int], q_lens: list[int], upto: list[int] | None = None) -> list[torch.Tensor]:
        """Attention for the last ``q_len`` tokens of each listed sequence, with ``upto`` tokens in
        the cache so far (default: the whole sequence); one output block per sequence."""
        upto = upto or [self.lens[s] for s in seqs]
        q = torch.cat([self.q[s][u - n:u] for s, n, u in zip(seqs, q_lens, upto)])
        qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        out = attention.paged_attention(q, self.k, self.v, self.table[seqs],
                                        torch.tensor(upto, dtype=torch.int32, device=DEVICE), qsl)
        return list(out.split(q_lens))

    def reference(self, s: int) -> torch.Tensor:
        n = self.lens[s]
        pages = self.table[s, :-(-n // PAGE)].long()
        k = self.k[pages].reshape(-1, HKV, D)[:n].double().repeat_interleave(HQ // HKV, 1)
        v = self.v[pages].reshape(-1, HKV, D)[:n].double().repeat_interleave(HQ // HKV, 1)
        scores = torch.einsum("thd,shd->hts", self.q[s].double(), k) / math.sqrt(D)
        scores.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
        return torch.einsum("hts,shd->thd", scores.softmax(-1), v)


def test_attention_prefill_decode_and_cached_prefixes_reduce_in_one_order():
    long = 4 * configs.ATTN_SPLIT + 37 if ON_GPU else configs.ATTN_SPLIT + 90  # several KV splits
    cache = Cache([long, 5, 130, 64 * BIG], seed=30)
    whole = cache.run([0, 1, 2, 3], [long, 5, 130, 64 * BIG])  # everything prefilled in one batch
    assert rel(whole[0], cache.reference(0)) < TOL[torch.bfloat16]
    assert rel(whole[2], cache.reference(2)) < TOL[torch.bfloat16]
    # decoding the last token alone, and amid other sequences' decodes and prefills
    assert torch.equal(cache.run([0], [1])[0][0], whole[0][-1])
    mixed = cache.run([2, 0, 1], [130, 1, 3])
    assert torch.equal(mixed[1][0], whole[0][-1]) and torch.equal(mixed[0], whole[2])
    assert torch.equal(mixed[2], whole[1][-3:])
    # a prefix cached, the rest prefilled in chunks split at two different places
    for cut in (configs.ATTN_SPLIT - 3, long - 40):
        head = cache.run([0], [cut], upto=[cut])[0]
        tail = cache.run([0, 3], [long - cut, 7])[0]
        assert torch.equal(torch.cat([head, tail]), whole[0])


def test_control_a_kv_split_count_instead_of_size_is_detected():
    """Split-KV by count (what FlashAttention's decode heuristics do) changes the bits: emulate it by
    moving the split size with the batch, and the prefill-vs-decode comparison above sees it."""
    long = configs.ATTN_SPLIT + 90
    cache = Cache([long], seed=40)
    whole = cache.run([0], [long])[0]
    saved = configs.ATTN_SPLIT, configs.ATTN_BLOCK_N
    try:
        configs.ATTN_SPLIT = configs.ATTN_BLOCK_N = 64  # what a count of splits means for one short decode
        decoded = cache.run([0], [1])[0][0]
    finally:
        configs.ATTN_SPLIT, configs.ATTN_BLOCK_N = saved
    assert not torch.equal(decoded, whole[-1])
    assert torch.equal(cache.run([0], [1])[0][0], whole[-1])


@pytest.fixture
def small_splits(monkeypatch):
    """Splits of 16 tokens folded 2 at a time: a short row then has several fold chunks, as a 32k
    row has at the pinned sizes (cheap enough for the interpreter)."""
    monkeypatch.setattr(configs, "ATTN_SPLIT", 16)
    monkeypatch.setattr(configs, "ATTN_BLOCK_N", 16)
    monkeypatch.setattr(configs, "ATTN_COMBINE_CHUNK", 2)


# fp32 keeps the fold's last bits; prefill tiles hold other rows, which the interpreter's BLAS sees
@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float32, marks=interpreter_blas)])
def test_attention_folds_many_splits_in_chunks_in_one_order(small_splits, dtype):
    lens = [16 * 5 + 3, 40, 16 * 2]  # 6 splits (3 fold chunks), 3 (a chunk half masked), 2 (one chunk)
    cache = Cache(lens, seed=60, dtype=dtype)
    whole = cache.run([0, 1, 2], lens)
    for s in range(3):  # (fp32 tl.dot is TF32 on the GPU: bf16's bound for both)
        assert rel(whole[s], cache.reference(s)) < TOL[torch.bfloat16]
    assert torch.equal(cache.run([0], [1])[0][0], whole[0][-1])
    mixed = cache.run([1, 0, 2], [1, 1, 5])
    assert torch.equal(mixed[0][0], whole[1][-1]) and torch.equal(mixed[1][0], whole[0][-1])
    assert torch.equal(mixed[2], whole[2][-5:])


def test_control_a_fold_width_chosen_from_the_batch_is_detected(small_splits):
    """A fold width that follows the batch (wider when a longer row is in it, as a block size taken
    from the batch's split count would be) adds the same partials in another tree: the comparison
    above sees it."""
    lens = [16 * 5 + 3, 16 * 12]
    cache = Cache(lens, seed=61, dtype=torch.float32)  # an fp32 output keeps the last bits of the fold
    alone = cache.run([0], [1])[0][0]
    configs.ATTN_COMBINE_CHUNK = 4  # the batch holds a 12-split row
    assert not torch.equal(cache.run([0, 1], [1, 1])[0][0], alone)
    configs.ATTN_COMBINE_CHUNK = 2
    assert torch.equal(cache.run([0, 1], [1, 1])[0][0], alone)


@pytest.fixture
def tiered_splits(small_splits, monkeypatch):
    """Rows from position 64 on cut their KV in 32-token splits, rows before it in 16-token ones."""
    monkeypatch.setattr(configs, "ATTN_SPLIT_LONG", 32)
    monkeypatch.setattr(configs, "ATTN_LONG_FROM", 64)


def test_a_split_size_that_grows_with_the_position_keeps_one_order_per_row(tiered_splits):
    lens = [150, 70, 40]  # across the switch at 64, just past it, below it
    cache = Cache(lens, seed=62)
    whole = cache.run([0, 1, 2], lens)
    for s in range(3):
        assert rel(whole[s], cache.reference(s)) < TOL[torch.bfloat16]
    assert torch.equal(cache.run([0], [1])[0][0], whole[0][-1])
    mixed = cache.run([2, 0, 1], [40, 1, 6])
    assert torch.equal(mixed[0], whole[2]) and torch.equal(mixed[1][0], whole[0][-1])
    assert torch.equal(mixed[2], whole[1][-6:])
    # A cached prefix ending before, at and past the switch. In the interpreter the cuts keep the
    # 8-token row tiles of the whole prefill: its tl.dot (numpy) can round a row by its tile's other
    # rows on AVX2 CPUs (interpreter_blas), which the GPU's MMA does not; on the GPU any cut.
    for cut in ((60, 64, 100) if ON_GPU else (56, 64, 104)):
        head = cache.run([0], [cut], upto=[cut])[0]
        tail = cache.run([0, 2], [150 - cut, 3])[0]
        assert torch.equal(torch.cat([head, tail]), whole[0])


def test_control_the_long_split_changes_only_the_rows_past_its_start(tiered_splits):
    """The switch is real and follows the position: against one split size, rows from 64 on get
    other bits (fp32 keeps them), rows before it the same."""
    cache = Cache([150], seed=63, dtype=torch.float32)
    tiered = cache.run([0], [150])[0]
    configs.ATTN_SPLIT_LONG = 0
    one_size = cache.run([0], [150])[0]
    assert torch.equal(tiered[:64], one_size[:64])
    assert not torch.equal(tiered[64:], one_size[64:])


@pytest.mark.parametrize("tiers", [False, True])
def test_the_fold_in_the_split_kernel_keeps_one_order_per_row_and_resets_its_counters(small_splits, monkeypatch,
                                                                                      tiers):
    """configs.ATTN_FOLD_IN_SPLIT: the last split program of each (row tile, KV head) folds, no second
    kernel. Who is last changes with the schedule, the order of the fold never: alone = amid =
    prefill, and the same bits as the second kernel's fold in the interpreter (the same code; on
    the GPU the register layout may differ with the warps, another numerics then, named in the
    identity). Its arrival counters are back at zero after every call, so the next calls fold too."""
    if tiers:
        monkeypatch.setattr(configs, "ATTN_SPLIT_LONG", 32)
        monkeypatch.setattr(configs, "ATTN_LONG_FROM", 64)
    lens = [100, 70, 40]  # across the long split's switch at 64 (when on), just past it, below it
    cache = Cache(lens, seed=64)
    second = cache.run([0, 1, 2], lens)
    monkeypatch.setattr(configs, "ATTN_FOLD_IN_SPLIT", True)
    monkeypatch.setattr(attention, "_attn_combine", None)  # the second kernel must not run
    assert configs.identity()["pinned"] != _identity_without_fold()
    whole = cache.run([0, 1, 2], lens)
    for s in range(3):
        assert rel(whole[s], cache.reference(s)) < TOL[torch.bfloat16]
    assert all(int(c.abs().sum()) == 0 for c in attention._ARRIVED.values())
    if not ON_GPU:
        assert all(torch.equal(a, b) for a, b in zip(whole, second))
    # the calls after the first find the counters at zero, or their folds never run
    assert torch.equal(cache.run([0], [1])[0][0], whole[0][-1])
    mixed = cache.run([2, 0, 1], [40, 1, 6])
    assert torch.equal(mixed[0], whole[2]) and torch.equal(mixed[1][0], whole[0][-1])
    assert torch.equal(mixed[2], whole[1][-6:])
    assert all(int(c.abs().sum()) == 0 for c in attention._ARRIVED.values())


def _identity_without_fold() -> str:
    saved = configs.ATTN_FOLD_IN_SPLIT
    configs.ATTN_FOLD_IN_SPLIT = False
    try:
        return configs.identity()["pinned"]
    finally:
        configs.ATTN_FOLD_IN_SPLIT = saved


# --- the device's own control ---------------------------------------------------------------------
@pytest.mark.skipif(not ON_GPU, reason="cuBLAS is on the device only")
def test_control_cublas_is_batch_variant_on_the_device():
    k = n = 4096
    x = randn(1, k, dtype=torch.bfloat16, seed=50)
    w = randn(n, k, dtype=torch.bfloat16, seed=51, scale=k ** -0.5)
    assert not rows_invariant(lambda a: a @ w.t(), x, [16, 64, 256, 1024])
    assert rows_invariant(lambda a: matmul.linear(a, w), x, [16, 64, 256, 1024])
