"""Kernel canary: each batch-invariant kernel, on the model's own weights, a row alone against the
same row amid batches of every size class up to the engine's token budget, compared bit for bit.

The end-to-end canary (invariant.worker.canary) sees a difference only where it surfaces in a
token or a served logprob; bf16 rounding hides most one-ulp differences of a reduction, so a
batch-variant kernel can pass it and still change other prompts' tokens. This check looks where
differences are born: in every model process (through vLLM's ``collective_rpc``, like the kernel
probe), it runs the very functions the model calls (each distinct linear layer's GEMM with its real
weight and bias, each distinct RMSNorm plain and with residual, the logprobs' log_softmax) on fixed
random rows and compares every row of interest with the same row computed alone.

Where the CPU GEMM has full-precision sums (``out_dtype=torch.float32``, before the one rounding to
bf16) those are compared as well as the served dtype; the row kernels are also run in fp32 (the same
reduction code, no rounding of the output). Three probe rows sit at the start, the middle and the
end of each batch (kernels tile rows: a fault may live in the last partial tile only).

Batch sizes (:func:`batch_sizes`): every size from 1 to 64 (every remainder of every row tile up to
64, every decode batch of up to 64 sequences), then each power of two (whole tiles) and one more
(a remainder tile at that scale), and the budget itself. A kernel whose order changes above some
row count is caught, because the budget is checked; what goes unchecked is a change confined to a
band of sizes above 64 that none of those points falls in. The sizes are a sample because each is
a GEMM per weight shape: on the small CPU model this set costs about as much as the end-to-end
canary (docs/results/canary_cost_*.md).

A CUDA GEMM is checked densely (:data:`GPU_GEMM_DENSE_UP_TO`, then every multiple of
:data:`GPU_GEMM_STEP` and one more): upstream's invariant mode on Hopper is cuBLASLt with its
workspace shrunk so that it cannot choose a split-K, which holds only as long as cuBLAS's heuristics
pick no other reduction order for some M; cuBLAS's default was batch-variant at 34 of 528 M values on
one Qwen3-8B shape and 179 on another (issue 16), scattered, not at tile boundaries. The lm_head
(N = the vocabulary: the costliest sizes) takes at most a fixed number of rows per call under
cuBLASLt (invariant.kernels.gpu.rowchunks) and is checked densely up to that number only
(:func:`lm_head_sizes`). A cuBLASLt call cost ~1 ms per new M on the H200, where the GEMM itself
takes a fraction: work on the host, which PyTorch does without the GIL, so a case's sizes are split
across threads, each on a stream of its own (:func:`check_split`; not yet timed on the device). The
rows are drawn once on the kernel's own device (a pool the probes are written into and taken out of
again), so a size costs one kernel call. The check is pure arithmetic on the model's tensors: no
request, no KV cache, no effect on what the engine later serves.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

RPC_METHOD = "invariant_kernel_canary"
SEED = 20261202
PROBE_ROWS = 3
# Where the sizes stop being dense: every row count up to here is checked.
DENSE_UP_TO = 64
# A CUDA GEMM (a vendor library's heuristics behind it): every M up to here, then every multiple of
# the step and one more, and the budget.
GPU_GEMM_DENSE_UP_TO = 2048
GPU_GEMM_STEP = 64
# Sizes checked between two reads of the difference counts (see :func:`check`).
FLUSH_SIZES = 64
THREADS_ENV = "INVARIANT_CANARY_THREADS"  # threads per CUDA GEMM case (see :func:`canary_threads`)


def batch_sizes(budget: int, dense_up_to: int = DENSE_UP_TO, step: int | None = None) -> list[int]:
    """The row counts checked for a kernel whose batch can reach ``budget`` rows (see the module):
    every count up to ``dense_up_to``, then each power of two and one more (``step`` None) or each
    multiple of ``step`` and one more, and the budget."""
    if budget < 1:
        raise ValueError(f"batch_sizes: budget {budget} < 1")
    if dense_up_to < 1 or (step is not None and step < 1):
        raise ValueError(f"batch_sizes: dense_up_to {dense_up_to} and step {step} must be >= 1")
    sizes = set(range(1, min(budget, dense_up_to) + 1))
    p = dense_up_to * 2 if step is None else (dense_up_to // step + 1) * step
    while p <= budget:
        sizes |= {p, p + 1}
        p = p * 2 if step is None else p + step
    sizes.add(budget)
    return sorted(s for s in sizes if 1 <= s <= budget)


def gpu_gemm_sizes(budget: int) -> list[int]:
    """The row counts a CUDA GEMM is checked at (dense, see the module)."""
    return batch_sizes(budget, GPU_GEMM_DENSE_UP_TO, GPU_GEMM_STEP)


def lm_head_sizes(budget: int, rows_per_call: int | None) -> list[int]:
    """The row counts a CUDA lm_head is checked at: dense up to the rows it takes per call
    (invariant.kernels.gpu.rowchunks: every call it makes has no more), then the ladder to the budget
    (chunk boundaries and remainders, through the chunking itself). Without a limit, a GEMM's sizes."""
    if rows_per_call is None or rows_per_call >= budget:
        return gpu_gemm_sizes(budget)
    return sorted(set(gpu_gemm_sizes(rows_per_call)) | set(batch_sizes(budget)))


def gpu_gemm_plan(budget: int, threads: int, lm_head_fn: Callable[..., Any] | None = None) -> tuple[list[int], int]:
    """Sizes and threads for a CUDA GEMM case; for the lm_head, given the function it calls: its
    sizes follow the rows it takes per call, and a function that shares buffers between calls
    (``one_caller``: CUDA graphs) is checked from one thread."""
    if lm_head_fn is None:
        return gpu_gemm_sizes(budget), threads
    return (lm_head_sizes(budget, getattr(lm_head_fn, "rows_per_call", None)),
            1 if getattr(lm_head_fn, "one_caller", False) else threads)


def canary_threads(gemm: str | None) -> int:
    """Threads a CUDA GEMM case's sizes are split across: ``INVARIANT_CANARY_THREADS``, else 8 for
    cuBLASLt (each call's cost there is the library's work on the host, ~1 ms per new M on the H200,
    done without the GIL; capped at the CPUs), else 1 (a Triton launch is Python, holding the GIL)."""
    raw = os.environ.get(THREADS_ENV, "")
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"{THREADS_ENV}={raw!r}: expected a whole number >= 1")
        return int(raw)
    return min(8, os.cpu_count() or 1) if gemm == "cublaslt" else 1


def positions(rows: int) -> list[int]:
    """Where the probe rows go in a batch of ``rows``: the start, the middle and the end."""
    return sorted({0, rows // 2, rows - 1})[:PROBE_ROWS] if rows > 1 else [0]


@dataclass(frozen=True)
class Failure:
    kernel: str        # "gemm", "rms_norm", "fused_add_rms_norm", "log_softmax"
    name: str          # the module it was checked on
    shape: str
    precision: str     # which output was compared: the served dtype or the fp32 sums
    batch: int         # the batch size at which the row differed
    row: int           # the row's position in that batch
    differing: int
    width: int

    def message(self) -> str:
        return (f"{self.kernel} ({self.name}, {self.shape}, {self.precision}) differs in a batch of {self.batch}: "
                f"row {self.row} has {self.differing} of {self.width} values other than the row alone")


def _dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


def _bits(t):
    import torch

    ints = {4: torch.int32, 2: torch.int16, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()])


def differing(a, b) -> int:
    """How many elements differ in their bits (NaN equals the same NaN; -0.0 differs from 0.0)."""
    return int((_bits(a) != _bits(b)).sum())


@dataclass
class Case:
    """One kernel on one module: ``run(rows)`` returns the outputs to compare, one tensor per
    output, each with the batch's rows first; ``width`` is the row length of the input."""

    kernel: str
    name: str
    shape: str
    width: int
    max_rows: int
    run: Callable[[Any], list[tuple[str, Any]]]
    dtype: Any
    device: Any
    scale: float = 1.0
    sizes: list[int] | None = None  # None: the ladder up to max_rows
    threads: int = 1  # how many threads may share its sizes (check_split); 1 where run is not thread-safe


def _sizes(case: Case, sizes: list[int] | None) -> list[int]:
    sizes = sizes if sizes is not None else case.sizes if case.sizes is not None else batch_sizes(case.max_rows)
    return [m for m in sizes if m <= case.max_rows]


def _draw(case: Case, rows: int) -> tuple[Any, Any]:
    """The probes and a pool of ``rows`` other rows, fixed random values on the kernel's device."""
    import torch

    gen = torch.Generator(device=case.device).manual_seed(SEED)
    pool = (torch.randn(PROBE_ROWS + rows, case.width, generator=gen, device=case.device)
            * case.scale).to(case.dtype)
    return pool[:PROBE_ROWS].clone(), pool[PROBE_ROWS:]


def check(case: Case, sizes: list[int] | None = None, drawn: tuple[Any, Any] | None = None) -> Failure | None:
    """The probe rows alone, then amid fixed random rows at every size (``sizes``, else the case's
    own, else the ladder up to its row limit); the first difference. ``drawn``: probes and pool
    (:func:`_draw`) shared with other parts of the same check."""
    import torch

    sizes = _sizes(case, sizes)
    if not sizes:
        return None

    # Drawn once, on the kernel's device: at every size the batch is the pool's first m rows with
    # the probes in their places, built in one copy (a fresh tensor: an output may be a view of its input).
    probes, pool = drawn if drawn is not None else _draw(case, max(sizes))
    alone = [case.run(probes[i:i + 1]) for i in range(PROBE_ROWS)]
    # What the first n probes must give, per output, stacked once (a batch of 1 or 2 rows holds fewer
    # probes): each size then costs a few kernel launches, not one per probe and output (on the GPU
    # a GEMM canary is bound by those launches, not by the GEMMs: ~1 ms per size before).
    wants = {n: [_bits(torch.cat([alone[i][j][1] for i in range(n)])) for j in range(len(alone[0]))]
             for n in range(1, PROBE_ROWS + 1)}
    # Counted on the device, read back every FLUSH_SIZES sizes: one host sync per flush instead of
    # one per comparison (on the GPU a sync costs more than a small GEMM).
    pending: list[tuple[int, list[tuple[int, str, int]]]] = []
    counts: list[Any] = []
    for n, m in enumerate(sizes):
        where = positions(m)
        outs = case.run(torch.cat(_batch_pieces(pool, probes, where, m)))
        labels = []
        for j, (precision, got) in enumerate(outs):
            rows = torch.cat([got[pos:pos + 1] for pos in where])
            want = wants[len(where)][j]
            counts.append((_bits(rows) != want).reshape(len(where), -1).sum(1))
            labels += [(pos, precision, want[i].numel()) for i, pos in enumerate(where)]
        pending.append((m, labels))
        if len(pending) == FLUSH_SIZES or n == len(sizes) - 1:
            read = torch.cat(counts).cpu().tolist()
            at = 0
            # labels come output by output, probe by probe: in the order the counts were concatenated
            for size, labels in pending:
                for (pos, precision, width), d in zip(labels, read[at:at + len(labels)]):
                    if d:
                        return Failure(case.kernel, case.name, case.shape, precision, size, pos, int(d), width)
                at += len(labels)
            pending, counts = [], []
    return None


def check_split(case: Case, threads: int | None = None, sizes: list[int] | None = None) -> Failure | None:
    """:func:`check` with the sizes dealt round-robin to ``threads`` threads (default the case's),
    each on a CUDA stream of its own: where each call's cost is the library's host work (cuBLASLt's
    heuristics), the threads do it side by side. The first difference, as :func:`check` would
    report it: the smallest failing size (each part's first failure is its smallest). A kernel's
    exception is raised here, as :func:`check` raises it."""
    import contextlib
    import threading

    import torch

    threads = case.threads if threads is None else threads
    sizes = _sizes(case, sizes)
    if threads <= 1 or len(sizes) < 2 * threads:
        return check(case, sizes)
    drawn = _draw(case, max(sizes))  # one pool for all parts (read only)
    cuda = torch.device(case.device).type == "cuda"
    if cuda:
        threads = _threads_memory_allows(case, drawn[0], max(sizes), threads)
        if threads <= 1:
            return check(case, sizes, drawn)
    # Each thread's stream waits for this one's work: the pool, and weights written just before.
    caller = torch.cuda.current_stream(case.device) if cuda else None
    results: list[Failure | None] = [None] * threads
    errors: list[BaseException] = []

    def part(i: int) -> None:
        try:
            with contextlib.ExitStack() as scope:
                scope.enter_context(torch.inference_mode())  # thread-local, like the device and stream
                if cuda:
                    stream = torch.cuda.Stream(device=case.device)
                    stream.wait_stream(caller)
                    scope.enter_context(torch.cuda.device(case.device))
                    scope.enter_context(torch.cuda.stream(stream))
                    scope.callback(stream.synchronize)  # runs first on the way out: this part's work done
                results[i] = check(case, sizes[i::threads], drawn)
        except BaseException as exc:  # noqa: BLE001 - raised below, in the caller's thread
            errors.append(exc)

    workers = [threading.Thread(target=part, args=(i,), name=f"kernel-canary-{i}") for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    failures = [f for f in results if f is not None]
    return min(failures, key=lambda f: f.batch) if failures else None


def _threads_memory_allows(case: Case, probes, rows: int, threads: int) -> int:
    """At most ``threads``, as many as half the device's free memory holds at the largest size (each
    thread's batch and outputs at once: the canary runs beside a KV cache that took the rest)."""
    import torch

    out_bytes = sum(o.shape[-1] * o.element_size() for _, o in case.run(probes[:1]))
    per_thread = rows * (case.width * probes.element_size() + out_bytes) * 2  # and the probe rows' copies
    free, _ = torch.cuda.mem_get_info(case.device)
    free += torch.cuda.memory_reserved(case.device) - torch.cuda.memory_allocated(case.device)
    return max(1, min(threads, int(free // 2 // max(per_thread, 1))))


def _batch_pieces(pool, probes, where: list[int], m: int) -> list[Any]:
    """Slices that concatenate to the pool's first ``m`` rows with probe i at row ``where[i]``."""
    pieces, prev = [], 0
    for i, pos in enumerate(where):
        if pos > prev:
            pieces.append(pool[prev:pos])
        pieces.append(probes[i:i + 1])
        prev = pos + 1
    if prev < m:
        pieces.append(pool[prev:m])
    return pieces


def _linear_cases(model, budget: int, cpu: bool) -> list[Case]:
    import torch
    import vllm.model_executor.layers.vocab_parallel_embedding as vocab
    from vllm.model_executor.layers.linear import RowParallelLinear as row_parallel

    from invariant.worker.plugin import GEMM_ENV

    # Under --tp-invariant-parts the row-parallel layers serve through tensor_parallel's part sums,
    # not quant_method.apply: check what they serve.
    tp_parts = getattr(row_parallel.forward, "__invariant_tp__", 0)
    # On CUDA: what the lm_head calls (invariant.worker.plugin: chunked under cuBLASLt, perhaps graphed)
    head_fn = None if cpu else getattr(vocab, "linear_batch_invariant", None)
    threads = 1 if cpu else canary_threads(os.environ.get(GEMM_ENV))
    cases, seen = [], set()
    for name, module in model.named_modules():
        if type(module) is vocab.VocabParallelEmbedding:
            continue  # a table lookup, never a GEMM (the lm_head is a ParallelLMHead)
        weight = getattr(module, "weight", None)
        method = getattr(module, "quant_method", None)
        if weight is None or method is None or not hasattr(method, "apply") or weight.dim() != 2:
            continue
        if cpu and getattr(module, "cpu_linear", None) is None:
            continue
        bias = getattr(module, "bias", None)
        parts = tp_parts if cpu and isinstance(module, row_parallel) and \
            getattr(module.cpu_linear, "__invariant__", False) else 0
        key = (tuple(weight.shape), weight.dtype, bias is not None, parts)
        if key in seen:
            continue
        seen.add(key)
        if parts:
            cases.append(tp_parts_case(name, module, parts, budget))
            continue
        n_out, k = weight.shape

        def run(x, module=module, method=method, weight=weight, bias=bias):
            if not cpu:
                return [(_dtype_name(x), method.apply(module, x, bias))]
            from invariant.kernels.cpu import gemm

            outs = [("fp32 sums", gemm.linear(x, weight, bias, out_dtype=torch.float32))]
            # The served dtype through the layer's own call as well, where it is cheap (the dense
            # sizes) and at the budget: elsewhere its bits are the fp32 sums' one rounding.
            if x.shape[0] <= DENSE_UP_TO or x.shape[0] == budget:
                outs.append((_dtype_name(x), method.apply(module, x, bias)))
            return outs

        sizes, case_threads = (None, 1) if cpu else \
            gpu_gemm_plan(budget, threads, head_fn if isinstance(module, vocab.ParallelLMHead) else None)
        cases.append(Case("gemm", name, f"K={k} N={n_out}", k, budget, run, weight.dtype, weight.device,
                          scale=1.0, sizes=sizes, threads=case_threads))
    return cases


def tp_parts_case(name: str, module, parts: int, budget: int) -> Case:
    """A row-parallel layer under TP-invariant parts, as this rank serves it: its parts' fp32 sums
    (what the ranks all-gather: an exact copy) and their in-order total, rounded once (at TP = 1
    the layer's output; at TP = t the total of this rank's parts, elementwise like the whole)."""
    from invariant.worker import tensor_parallel

    tp_size = int(getattr(module, "tp_size", 1))
    n_out, k_local = module.weight.shape
    width = tensor_parallel.check_parts(parts, tp_size, k_local * tp_size, name)
    local = parts // tp_size
    bias = None if getattr(module, "skip_bias_add", False) else getattr(module, "bias", None)

    def run(x):
        partials = tensor_parallel.partial_sums(x, tensor_parallel._part_weights(module, local, width), width)
        return [("fp32 part sums", partials.transpose(0, 1)),
                (_dtype_name(x), tensor_parallel.add_in_order(partials, bias, x.dtype))]

    return Case("gemm", name, f"K={k_local} N={n_out} parts={local}/{parts}", k_local, budget, run,
                module.weight.dtype, module.weight.device)


def _norm_cases(model, budget: int, hidden: int) -> list[Case]:
    import torch
    from vllm.model_executor.layers.layernorm import RMSNorm

    cases, seen = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, RMSNorm):
            continue
        weight = module.weight.data if module.has_weight else None
        width = int(module.weight.shape[0]) if module.has_weight else hidden
        dtype = weight.dtype if weight is not None else torch.get_default_dtype()
        device = weight.device if weight is not None else torch.device("cpu")
        if (width, dtype) in seen:
            continue
        seen.add((width, dtype))
        # q/k norms see one row per head: a token budget of rows times heads per token.
        max_rows = budget * max(1, hidden // width)
        forward = getattr(module, "_forward_method", None) or module.forward
        twin = _fp32_twin(module, forward) if dtype != torch.float32 and device.type == "cpu" else None

        def plain(x, forward=forward, twin=twin):
            outs = [(_dtype_name(x), forward(x))]
            if twin is not None:
                outs.append(("fp32", twin(x.float())))
            return outs

        def fused(x, forward=forward, twin=twin):
            residual = torch.flip(x, dims=(-1,)).contiguous()  # a fixed, row-local residual
            out, res = forward(x.clone(), residual.clone())
            outs = [(_dtype_name(x), out), ("residual", res)]
            if twin is not None:
                outs.append(("fp32", twin(x.float(), residual.float())[0]))
            return outs

        for kernel, run in (("rms_norm", plain), ("fused_add_rms_norm", fused)):
            cases.append(Case(kernel, name, f"width={width}", width, max_rows, run, dtype, device))
    return cases


def _fp32_twin(module, forward):
    """The same RMSNorm function on fp32 copies (a stand-in module holding an fp32 weight): the
    reduction's own bits, not rounded to bf16, and nothing of the live module touched. None where
    the bound forward is not a plain method (a compiled wrapper): then the served dtype is compared."""
    import functools
    from types import SimpleNamespace

    fn = getattr(forward, "__func__", None)
    if fn is None:
        return None
    weight = module.weight.detach().float() if module.has_weight else None
    twin = SimpleNamespace(weight=weight, has_weight=module.has_weight, variance_epsilon=module.variance_epsilon,
                           variance_size_override=getattr(module, "variance_size_override", None))
    return functools.partial(fn, twin)


def _logprob_cases(vocab: int, budget: int, device) -> list[Case]:
    import torch
    from vllm.v1.sample.sampler import Sampler

    def run(x):
        return [("float32", Sampler.compute_logprobs(x))]

    return [Case("log_softmax", "sampler", f"vocab={vocab}", vocab, budget, run, torch.float32, device, scale=4.0)]


def run_all(model, *, budget: int, vocab: int, hidden: int, cpu: bool) -> dict[str, Any]:
    """Every case in this process; the first failure of each case, timings, sizes. Never raises for
    a failed comparison: an exception inside a kernel is reported as that case's failure."""
    import torch

    start = time.perf_counter()
    device = next(model.parameters()).device
    cases = _linear_cases(model, budget, cpu) + _norm_cases(model, budget, hidden) + \
        _logprob_cases(vocab, budget, device)
    checked, failures = [], []
    with torch.inference_mode():
        for case in cases:
            t0 = time.perf_counter()
            try:
                failure = check_split(case)
            except Exception as exc:  # noqa: BLE001 - a kernel that raises is a failed kernel
                failures.append({"kernel": case.kernel, "name": case.name, "shape": case.shape, "batch": None,
                                 "message": f"{case.kernel} ({case.name}, {case.shape}) raised: {exc}"})
                continue
            checked.append({"kernel": case.kernel, "name": case.name, "shape": case.shape,
                            "sizes": len(case.sizes or batch_sizes(case.max_rows)), "threads": case.threads,
                            "seconds": round(time.perf_counter() - t0, 3)})
            if failure is not None:
                failures.append({**asdict(failure), "message": failure.message()})
    gemm_sizes = [c["sizes"] for c in checked if c["kernel"] == "gemm"]
    return {"pid": os.getpid(), "ok": not failures, "failures": failures, "checked": checked,
            "sizes": len(batch_sizes(budget)), "gemm_sizes": max(gemm_sizes, default=None), "budget": budget,
            "seconds": round(time.perf_counter() - start, 3)}


def in_model_process(worker: Any) -> dict[str, Any]:
    """The RPC's body, inside a vLLM worker process."""
    config = worker.vllm_config
    model = worker.model_runner.get_model()
    text = config.model_config.hf_text_config
    return run_all(model, budget=int(config.scheduler_config.max_num_batched_tokens),
                   vocab=int(text.vocab_size), hidden=int(text.hidden_size),
                   cpu=config.device_config.device.type == "cpu")


def install() -> None:
    """Make :func:`in_model_process` callable through ``collective_rpc`` (plugin)."""
    from invariant.worker import probe

    probe.expose(RPC_METHOD, in_model_process)


async def ask(engine_client) -> list[dict[str, Any]]:
    """Every model process's result, through the engine."""
    from invariant.worker import probe

    return await probe.ask_all(engine_client, RPC_METHOD, timeout=600)


def verdict(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary of all processes' results, with a one-line message naming kernel and batch size."""
    if not results:
        return {"ok": False, "message": "kernel canary failed: no model process answered", "failures": []}
    failures = [f for r in results for f in r.get("failures", [])]
    seconds = max(float(r.get("seconds", 0.0)) for r in results)
    checked = sum(len(r.get("checked", [])) for r in results)
    if failures:
        head = failures[0]["message"]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        return {"ok": False, "message": f"kernel canary failed: {head}{more}", "failures": failures,
                "seconds": seconds}
    slowest = sorted((c for r in results for c in r.get("checked", [])), key=lambda c: -c.get("seconds", 0))[:3]
    first = results[0]
    dense = (f" ({first['gemm_sizes']} for each GEMM)"
             if first.get("gemm_sizes") and first["gemm_sizes"] != first.get("sizes") else "")
    return {"ok": True, "failures": [], "seconds": seconds, "cases": checked,
            "checked": sorted({f"{c['kernel']} {c['name']} {c['shape']}" for r in results for c in r.get("checked", [])}),
            "slowest": [f"{c['kernel']} {c['name']} {c['shape']}: {c['seconds']} s" for c in slowest],
            "message": f"kernel canary passed: {checked} kernel cases, each row alone = amid "
                       f"{first.get('sizes')} batch sizes{dense} up to {first.get('budget')} rows, bitwise"}
