"""The kernel canary (invariant.worker.kernel_canary): each kernel's row alone vs amid batches.

Pure parts first (sizes, positions, bit comparison, the verdict), then the check itself on our CPU
kernels with a batch-variant twin as the control, then the worker: each of several differently
broken kernels (tests/hooks/sitecustomize.py FAULTS) keeps it unready, naming kernel and batch size.
"""

from __future__ import annotations


import httpx
import pytest
import torch
import torch.utils._python_dispatch

from conftest import hooked_env, start_worker, wait_verdict
from invariant.kernels.cpu import gemm, rowops
from invariant.worker import kernel_canary as kc


def test_batch_sizes_are_dense_to_64_then_reach_the_budget():
    sizes = kc.batch_sizes(2048)
    assert sizes[:64] == list(range(1, 65))
    assert sizes[64:] == [128, 129, 256, 257, 512, 513, 1024, 1025, 2048]  # whole tiles, a remainder, the budget
    assert kc.batch_sizes(3000)[-3:] == [2048, 2049, 3000]
    assert kc.batch_sizes(1) == [1] and kc.batch_sizes(5) == [1, 2, 3, 4, 5]
    assert max(kc.batch_sizes(100)) == 100
    with pytest.raises(ValueError):
        kc.batch_sizes(0)


def test_a_cuda_gemm_is_checked_at_every_m_to_2048_then_every_64th_and_one_more():
    sizes = kc.gpu_gemm_sizes(8192)
    assert sizes[:2048] == list(range(1, 2049))
    assert sizes[2048:2052] == [2112, 2113, 2176, 2177] and sizes[-2:] == [8129, 8192]
    assert len(sizes) == 2048 + 2 * 96 - 1  # 8193 is past the budget
    assert kc.gpu_gemm_sizes(100) == list(range(1, 101))
    assert kc.batch_sizes(300, 128, 64) == list(range(1, 129)) + [192, 193, 256, 257, 300]
    with pytest.raises(ValueError):
        kc.batch_sizes(300, 128, 0)


def test_dense_sizes_catch_a_gemm_that_varies_at_one_scattered_m_and_the_ladder_does_not():
    """What a vendor heuristic does (cuBLAS's default: variant at scattered M values, issue 16): a
    GEMM whose order changes at M = 1000 alone. The CPU ladder never tries 1000; the dense sizes a
    CUDA GEMM gets do, and name it."""
    def scattered(x):
        y = gemm.linear(x, WEIGHT, out_dtype=torch.float32)
        if x.shape[0] == 1000:
            y = torch.nn.functional.linear(x.float(), WEIGHT.float())
        return [("fp32 sums", y)]

    assert kc.check(_gemm_case(scattered, max_rows=1024)) is None  # the ladder: 1..64, 128, 129, ..., 1024
    dense = kc.check(_gemm_case(scattered, max_rows=1024), kc.gpu_gemm_sizes(1024))
    assert dense is not None and dense.batch == 1000, dense
    assert kc.check(_gemm_case(lambda x: [("fp32 sums", gemm.linear(x, WEIGHT, out_dtype=torch.float32))],
                               max_rows=1024), kc.gpu_gemm_sizes(1024)) is None


def test_the_check_leaves_the_rows_it_was_given_for_the_next_size_untouched():
    """At every size the batch is the pool's first rows with the probes in their places: the other
    rows are the pool's own, never an earlier size's probes (a kernel that sums its batch sees it)."""
    seen = []

    def record(x):
        seen.append(x.float().clone())
        return [("fp32", x.float())]

    case = kc.Case("gemm", "t", "K=8 N=8", 8, 10, record, torch.float32, torch.device("cpu"))
    assert kc.check(case, [4, 10]) is None
    probes = torch.cat(seen[:3])
    four, ten = seen[3], seen[4]
    assert torch.equal(four[[0, 2, 3]], probes) and torch.equal(ten[[0, 5, 9]], probes)
    assert torch.equal(four[1], ten[1]) and not torch.equal(ten[2], probes[1])


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that make or write a tensor (views are free: no kernel, no launch)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += not func.is_view
        return func(*args, **(kwargs or {}))


def test_a_size_costs_the_kernel_and_four_more_ops():
    """On the GPU a GEMM canary is bound by launches, not by the GEMMs (H200: ~1 ms per size, 2 s per
    weight shape at 2,100 sizes): each size may add only the batch's copy, the probe rows' gather,
    the comparison and its count to the kernel's own call (it took 13 more: a gather, a clone, three
    writes, three compares and sums, a stack, a write back)."""
    def double(x):
        return [("fp32", x * 2.0)]  # one op, the same bits in any batch

    def ops(sizes):
        case = kc.Case("gemm", "t", "K=8 N=8", 8, 512, double, torch.float32, torch.device("cpu"))
        with _Ops() as counted:
            assert kc.check(case, sizes) is None
        return counted.n

    per_size = (ops(list(range(1, 257))) - ops(list(range(1, 129)))) / 128  # what the setup costs cancels
    assert per_size <= 1 + 4 + 0.1  # the kernel, four ops, and a read-back every FLUSH_SIZES sizes


def test_probe_rows_sit_at_the_start_middle_and_end():
    assert kc.positions(1) == [0]
    assert kc.positions(2) == [0, 1]
    assert kc.positions(17) == [0, 8, 16]


def test_differing_compares_bits_not_values():
    a = torch.tensor([1.0, 0.0, float("nan")])
    assert kc.differing(a, a.clone()) == 0
    assert kc.differing(a, torch.tensor([1.0, -0.0, float("nan")])) == 1  # -0.0 == 0.0 but other bits
    assert kc.differing(a.to(torch.bfloat16), torch.tensor([1.0078125, 0.0, float("nan")]).to(torch.bfloat16)) == 1


def _gemm_case(run, k=96, n=80, dtype=torch.bfloat16, max_rows=200):
    return kc.Case("gemm", "test", f"K={k} N={n}", k, max_rows, run, dtype, torch.device("cpu"))


WEIGHT = torch.randn(80, 96, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)


def test_our_gemm_passes_the_check_and_a_tail_variant_twin_fails_it():
    ours = _gemm_case(lambda x: [("bf16", gemm.linear(x, WEIGHT)),
                                 ("fp32 sums", gemm.linear(x, WEIGHT, out_dtype=torch.float32))])
    sizes = kc.batch_sizes(200)
    assert kc.check(ours, sizes) is None

    def tail_variant(x):  # the control: rows past the last tile of 16 take torch's GEMM
        y = gemm.linear(x, WEIGHT, out_dtype=torch.float32)
        t = x.shape[0] % 16
        if x.shape[0] > 16 and t:
            y[-t:] = torch.nn.functional.linear(x[-t:].float(), WEIGHT.float())
        return [("fp32 sums", y)]

    failure = kc.check(_gemm_case(tail_variant), sizes)
    assert failure is not None and (failure.batch, failure.row) == (17, 16), failure
    assert "gemm (test, K=96 N=80, fp32 sums) differs in a batch of 17: row 16" in failure.message()


def test_the_lm_head_is_checked_densely_up_to_its_rows_per_call_then_across_chunk_boundaries():
    sizes = kc.lm_head_sizes(8192, 256)
    assert sizes[:256] == list(range(1, 257))
    assert sizes[256:] == [257, 512, 513, 1024, 1025, 2048, 2049, 4096, 4097, 8192]
    assert kc.lm_head_sizes(8192, None) == kc.gpu_gemm_sizes(8192) == kc.lm_head_sizes(8192, 10_000)
    assert kc.lm_head_sizes(100, 256) == list(range(1, 101))


def test_each_gemm_case_gets_its_sizes_and_threads_and_a_graphed_lm_head_one_thread(monkeypatch):
    from invariant.kernels.gpu.graphed import GraphedLinear
    from invariant.kernels.gpu.rowchunks import RowChunks

    linear = torch.nn.functional.linear
    assert kc.gpu_gemm_plan(8192, 8) == (kc.gpu_gemm_sizes(8192), 8)
    assert kc.gpu_gemm_plan(8192, 8, RowChunks(linear, 256)) == (kc.lm_head_sizes(8192, 256), 8)
    assert kc.gpu_gemm_plan(8192, 8, RowChunks(GraphedLinear(64), 256)) == (kc.lm_head_sizes(8192, 256), 1)
    assert kc.gpu_gemm_plan(8192, 8, linear) == (kc.gpu_gemm_sizes(8192), 8)  # unchunked: every M
    monkeypatch.delenv(kc.THREADS_ENV, raising=False)
    assert kc.canary_threads("cublaslt") == min(8, __import__("os").cpu_count())
    assert kc.canary_threads("vllm") == kc.canary_threads("invariant") == 1  # Triton launches hold the GIL
    monkeypatch.setenv(kc.THREADS_ENV, "3")
    assert kc.canary_threads("vllm") == 3
    for bad in ("0", "x", "-2"):
        monkeypatch.setenv(kc.THREADS_ENV, bad)
        with pytest.raises(ValueError, match=f"INVARIANT_CANARY_THREADS={bad!r}: expected a whole number >= 1"):
            kc.canary_threads("cublaslt")


def _scattered_at(*bad: int):
    """A GEMM whose order changes at the given row counts only (a vendor heuristic's way), and the
    threads that ran it."""
    import threading

    idents = set()

    def run(x):
        idents.add(threading.current_thread().name)
        y = gemm.linear(x, WEIGHT, out_dtype=torch.float32)
        if x.shape[0] in bad:
            y = torch.nn.functional.linear(x.float(), WEIGHT.float())
        return [("fp32 sums", y)]

    return run, idents


def test_split_across_threads_the_check_finds_the_failure_the_single_check_finds():
    sizes = kc.gpu_gemm_sizes(1024)
    run, idents = _scattered_at(700, 1000)
    single = kc.check(_gemm_case(run, max_rows=1024), sizes)
    assert single is not None and single.batch == 700 and idents == {"MainThread"}
    for threads in (2, 4, 7):
        run, idents = _scattered_at(700, 1000)
        split = kc.check_split(_gemm_case(run, max_rows=1024), threads, sizes)
        assert split is not None and (split.batch, split.row) == (single.batch, single.row), (threads, split)
        assert idents == {f"kernel-canary-{i}" for i in range(threads)}  # each part in a thread of its own
    run, _ = _scattered_at()
    assert kc.check_split(_gemm_case(run, max_rows=1024), 4, sizes) is None  # and the invariant GEMM passes


def test_threads_are_as_many_as_half_the_free_device_memory_holds_at_the_largest_size(monkeypatch):
    """Beside a KV cache that took most of the GPU: each thread holds a batch and its outputs at the
    largest size at once. Here the bytes of a CPU case, the GPU's free memory told."""
    case = _gemm_case(lambda x: [("fp32 sums", gemm.linear(x, WEIGHT, out_dtype=torch.float32))], max_rows=1000)
    probes, _ = kc._draw(case, 4)
    per_thread = 1000 * (96 * 2 + 80 * 4) * 2  # bf16 rows in, fp32 sums out, twice
    for free, reserved_idle, want in ((100 * per_thread, 0, 8), (5 * per_thread, 0, 2), (0, 3 * per_thread, 1),
                                      (per_thread // 3, 0, 1)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, f=free: (f, 10 * f))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None, r=reserved_idle: r)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
        assert kc._threads_memory_allows(case, probes, 1000, 8) == want, (free, reserved_idle)


def test_a_kernel_that_raises_in_a_thread_raises_in_the_caller():
    def broken(x):
        if x.shape[0] == 300:
            raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED at M=300")
        return [("fp32 sums", gemm.linear(x, WEIGHT, out_dtype=torch.float32))]

    with pytest.raises(RuntimeError, match="M=300"):  # run_all reports it as the case's failure
        kc.check_split(_gemm_case(broken, max_rows=512), 4, kc.gpu_gemm_sizes(512))


def test_chunked_calls_cover_every_m_above_the_chunk_and_hide_nothing_within_it():
    """RowChunks (the lm_head under cuBLASLt): a GEMM that changes its order above 16 rows is
    row-invariant through chunks of 16, so the lm_head's sizes (dense to 16 only) pass it; the
    control: without the chunks, the same sizes catch it, and a change at M = 10 (within the chunk)
    is caught through the chunks too."""
    from invariant.kernels.gpu.rowchunks import RowChunks

    def above_16(x, weight, bias=None):
        y = gemm.linear(x, weight, out_dtype=torch.float32)
        return torch.nn.functional.linear(x.float(), weight.float()) if x.shape[0] > 16 else y

    sizes = kc.lm_head_sizes(100, 16)
    plain = kc.check(_gemm_case(lambda x: [("fp32 sums", above_16(x, WEIGHT))], max_rows=100), sizes)
    assert plain is not None and plain.batch == 17, plain
    chunked = RowChunks(above_16, 16)
    assert kc.check(_gemm_case(lambda x: [("fp32 sums", chunked(x, WEIGHT))], max_rows=100), sizes) is None
    run, _ = _scattered_at(10)
    within = RowChunks(lambda x, weight, bias=None: run(x)[0][1], 16)
    failure = kc.check(_gemm_case(lambda x: [("fp32 sums", within(x, WEIGHT))], max_rows=100), sizes)
    assert failure is not None and failure.batch == 10, failure


class _RowParallelRank:
    """What tp_parts_case reads of a vLLM RowParallelLinear: one rank's weight, its TP size, bias."""

    def __init__(self, weight, tp_size=1):
        self.weight, self.tp_size, self.bias, self.skip_bias_add = weight, tp_size, None, False


@pytest.mark.parametrize("tp_size", [1, 2])
def test_the_tp_invariant_part_sums_pass_and_a_part_that_varies_with_m_fails(monkeypatch, tp_size):
    """With --tp-invariant-parts the row-parallel layers serve through tensor_parallel's part sums:
    the canary checks those (not quant_method.apply), so a batch-variant part is caught at start-up."""
    from invariant.worker import tensor_parallel as tpm

    rank = _RowParallelRank(WEIGHT[:, : 96 // tp_size].contiguous(), tp_size)
    case = kc.tp_parts_case("model.layers.0.mlp.down_proj", rank, 4, 200)
    assert case.width == 96 // tp_size and case.shape == f"K={96 // tp_size} N=80 parts={4 // tp_size}/4"
    sizes = kc.batch_sizes(200)
    assert kc.check(case, sizes) is None

    exact = tpm.partial_sums

    def last_part_varies(x, pieces, width):  # the control: the last part's sums take torch's GEMM past M = 33
        out = exact(x, pieces, width)
        if x.shape[0] > 33:
            out[-1] = torch.nn.functional.linear(x[:, -width:].float(), pieces[-1].float())
        return out

    monkeypatch.setattr(tpm, "partial_sums", last_part_varies)
    failure = kc.check(kc.tp_parts_case("model.layers.0.mlp.down_proj", rank, 4, 200), sizes)
    assert failure is not None and failure.batch == 34 and failure.precision == "fp32 part sums", failure


def test_full_precision_sees_what_bf16_rounding_hides():
    """One fp32 ulp added to every sum of a batched call: the bf16 outputs (rounded) hide it in
    most elements; the fp32 sums show it at the first batched size."""

    def ulp_variant(x, *, full):
        y = gemm.linear(x, WEIGHT, out_dtype=torch.float32)
        if x.shape[0] > 1:
            y = torch.nextafter(y, torch.full_like(y, float("inf")))
        return [("fp32 sums", y)] if full else [("bf16", y.to(torch.bfloat16))]

    full = kc.check(_gemm_case(lambda x: ulp_variant(x, full=True)), [1, 2, 3])
    assert full is not None and full.batch == 2 and full.differing >= 70, full
    rounded = kc.check(_gemm_case(lambda x: ulp_variant(x, full=False)), [1, 2, 3])
    hidden = 80 - (rounded.differing if rounded else 0)
    assert hidden >= 70, f"bf16 rounding hid only {80 - hidden} of 80 differences"


def test_our_row_kernels_pass_and_a_batch_dependent_logsoftmax_fails():
    vocab, sizes = 1000, kc.batch_sizes(300)
    case = lambda run: kc.Case("log_softmax", "test", f"vocab={vocab}", vocab, 300, run,  # noqa: E731
                               torch.float32, torch.device("cpu"), scale=4.0)
    assert kc.check(case(lambda x: [("float32", rowops.log_softmax(x))]), sizes) is None
    # the variant: ours for one row, another rounding (float64, then back) for a batch. torch's own
    # log_softmax is no portable variant: row-invariant on the AVX2 EPYC (Zen 3), not on the Zen 4
    variant = lambda x: [("float32", rowops.log_softmax(x) if x.shape[0] == 1  # noqa: E731
                          else torch.log_softmax(x.double(), -1).float())]
    failure = kc.check(case(variant), sizes)
    assert failure is not None and failure.batch == 2, failure
    w = torch.rand(64, generator=torch.Generator().manual_seed(2)) + 0.5
    norm = kc.Case("rms_norm", "test", "width=64", 64, 300, lambda x: [("fp32", rowops.rms_norm(x, w, 1e-6))],
                   torch.float32, torch.device("cpu"))
    assert kc.check(norm, sizes) is None


def test_the_verdict_names_kernel_and_batch_size_and_counts_the_rest():
    fail = kc.Failure("rms_norm", "model.norm", "width=128", "fp32", 33, 32, 29, 128)
    results = [{"ok": False, "failures": [{**fail.__dict__, "message": fail.message()}] * 2, "seconds": 1.5},
               {"ok": True, "failures": [], "seconds": 0.5, "checked": [{}]}]
    v = kc.verdict(results)
    assert not v["ok"] and v["seconds"] == 1.5
    assert v["message"] == ("kernel canary failed: rms_norm (model.norm, width=128, fp32) differs in a batch of 33: "
                            "row 32 has 29 of 128 values other than the row alone (and 1 more)")
    checked = [{"kernel": "gemm", "name": f"l{i}", "shape": "K=8 N=8", "seconds": i / 10} for i in range(10)]
    ok = kc.verdict([{"ok": True, "failures": [], "checked": checked, "sizes": 73, "budget": 2048, "seconds": 0.4}])
    assert ok["ok"] and "10 kernel cases" in ok["message"] and "up to 2048 rows" in ok["message"]
    assert ok["slowest"][0] == "gemm l9 K=8 N=8: 0.9 s" and len(ok["slowest"]) == 3
    assert kc.verdict([])["ok"] is False


# fault (tests/hooks/sitecustomize.py) -> the kernel and batch size the worker must name
FAULTS = {
    "split-k": ("gemm", 2),
    "gemm-tail": ("gemm", 17),
    "gemm-large": ("gemm", 512),
    "gemm-chunks-by-m": ("gemm", 2),
    "rms-halves": ("rms_norm", 2),
    "rms-last-row": ("rms_norm", 33),
    "logsoftmax-batched": ("log_softmax", 2),
    "logsoftmax-large": ("log_softmax", 64),
}


@pytest.mark.engine
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_broken_kernel_keeps_the_worker_unready(tiny_model, tmp_path, fault):
    kernel, batch = FAULTS[fault]
    w = start_worker(tiny_model, tmp_path, name="tiny", env=hooked_env(INVARIANT_TEST_FAULT=fault))
    try:
        body = wait_verdict(w)
        res = httpx.get(f"{w.url}/invariant/ready", timeout=5)
    finally:
        w.stop()
    assert res.status_code == 503 and body["ready"] is False, body
    reason = body["reasons"][0]
    assert reason.startswith(f"kernel canary failed: {kernel}") or \
        reason.startswith(f"kernel canary failed: fused_add_{kernel}"), reason
    assert f"differs in a batch of {batch}:" in reason, reason
    first = body["kernel_canary"]["failures"][0]
    assert first["batch"] == batch and first["differing"] > 0
    assert body["canary"]["ok"] is None  # stopped before the end-to-end canary ran


@pytest.mark.engine
def test_the_healthy_worker_passes_both_canaries_and_says_what_it_checked(worker):
    body = httpx.get(f"{worker.url}/invariant/ready", timeout=5).json()
    assert body["ready"] and body["kernel_canary"]["ok"] is True, body
    kcv = body["kernel_canary"]
    # tiny Qwen3: qkv, o, gate_up, down, lm_head; RMSNorm of hidden and head width, plain and fused;
    # the sampler's log_softmax
    assert kcv["cases"] == 10 and "up to 2048 rows" in kcv["message"], kcv
    cases = body["canary"]["cases"]
    assert set(cases) == {"greedy", "seeded", "long split-prefill"}
    assert all(c["ok"] and c["tokens"] == 32 for c in cases.values()), cases


# --- on the device: the GEMM the CUDA worker runs, and cuBLAS's default as the control ----------------
QWEN3_8B = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 24576), "down": (12288, 4096),
            "lm_head": (4096, 151936)}


def _gemm_canary(mode: str, budget: int, names: list[str], threads: int | None = None) -> dict:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    shapes = [f"{n}={QWEN3_8B[n][0]},{QWEN3_8B[n][1]}" for n in names]
    env = {k: v for k, v in os.environ.items() if k != kc.THREADS_ENV}
    if threads is not None:
        env[kc.THREADS_ENV] = str(threads)
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("gemm_canary_run.py")), mode, str(budget),
                           *shapes], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (the device)")
def test_the_gemm_canary_fails_cublas_default_and_passes_the_gemms_the_cuda_worker_runs():
    """Issue 16: cuBLAS's default GEMM was batch-variant at 34 of 528 M values on ``o`` and 179 on
    ``down``; cuBLASLt under upstream's invariant settings (no split-K on Hopper: the worker's default
    there), upstream's Triton matmul and ours were invariant wherever tried. The worker's check, at the
    sizes it uses, must reject the first and pass the others."""
    for threads in (1, None):  # one thread, and as the worker splits cuBLAS's sizes (8)
        control = _gemm_canary("cublas", 2048, ["o", "down"], threads)
        assert any(r["failure"] for r in control["shapes"].values()), control
        print("cublas", control["threads"], "threads", {n: (r["seconds"], r["batch"]) for n, r in control["shapes"].items()})
    for mode, threads in (("cublaslt", 1), ("cublaslt", None), ("vllm", None), ("ours", None)):
        res = _gemm_canary(mode, 2048, list(QWEN3_8B), threads)
        assert all(r["failure"] is None for r in res["shapes"].values()), res
        print(mode, res["threads"], "threads", {n: (r["seconds"], r["sizes"]) for n, r in res["shapes"].items()},
              "total", round(sum(r["seconds"] for r in res["shapes"].values()), 2), "s")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (the device)")
def test_the_graphed_lm_head_passes_the_gemm_canary_and_cublas_default_through_it_fails():
    """--gpu-lm-head-graphs (experimental): batches of up to 64 rows run as the next power of two
    from a captured graph, the padding rows holding whatever an earlier call left. Sound only for a
    row-invariant GEMM: the canary, through the same function, passes cuBLASLt without split-K and
    must still reject cuBLAS's default (the control)."""
    control = _gemm_canary("cublas-graphed", 2048, ["o", "down"])
    assert any(r["failure"] for r in control["shapes"].values()), control
    res = _gemm_canary("cublaslt-graphed", 2048, ["lm_head", "o"])
    assert all(r["failure"] is None for r in res["shapes"].values()), res
    print("cublaslt-graphed", {n: r["seconds"] for n, r in res["shapes"].items()},
          "cublas-graphed", {n: (r["seconds"], r["batch"]) for n, r in control["shapes"].items()})
