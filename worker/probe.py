"""What each vLLM model process really runs: asked through the engine before the worker says ready.

The fingerprint is computed before the engine starts, from what the worker intends (options, CPU
flags, vLLM's own ISA choice). A plugin that did not load in a model process (a ``VLLM_PLUGINS``
filter, a broken install) or a vLLM that picked another attention ISA would serve other bits under
that fingerprint. So, once the engine is up, the worker sends :func:`kernel_report` to every model
process (vLLM's ``collective_rpc``) and compares the answers with the fingerprint's parts
(:func:`disagreements`); any disagreement keeps the worker unready with a one-line reason.

``kernel_report`` runs inside vLLM's worker process, where the plugin (:func:`install`) makes it
a method vLLM's RPC can name; ``disagreements`` is a pure function. A model process without the
plugin has no such method, and the RPC's refusal says so.
"""

from __future__ import annotations

import os
from typing import Any, Mapping


RPC_METHOD = "invariant_kernel_report"


def expose(name: str, fn) -> None:
    """Make ``fn(worker)`` callable by ``name`` through vLLM's ``collective_rpc`` in this model
    process (the plugin does it in every one; the kernel probe and the kernel canary use it)."""
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    setattr(WorkerWrapperBase, name, lambda wrapper: fn(wrapper.worker))


async def ask_all(engine_client, name: str, timeout: float) -> list[dict[str, Any]]:
    """Every model process's answer to the RPC ``name`` (the worker's edge to an exposed function)."""
    return list(await engine_client.collective_rpc(name, timeout=timeout))


def install() -> None:
    """Make :func:`kernel_report` callable through ``collective_rpc`` (plugin, both CPU modes)."""
    expose(RPC_METHOD, kernel_report)


async def ask(engine_client) -> list[dict[str, Any]]:
    """Every model process's report, through the engine."""
    return await ask_all(engine_client, RPC_METHOD, timeout=60)


def kernel_report(worker: Any) -> dict[str, Any]:
    """Read off a model process: which linear, norm, logprob and attention kernels are bound."""
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.v1.sample.sampler import Sampler

    from invariant.kernels.cpu import amx
    from invariant.worker import plugin

    model = worker.model_runner.get_model()
    bound, stock = 0, 0
    for module in model.modules():
        fn = getattr(module, "cpu_linear", None)
        if fn is None:
            continue
        if getattr(fn, "__invariant__", False):
            bound += 1
        else:
            stock += 1
    context = worker.vllm_config.compilation_config.static_forward_context
    isas = sorted({str(layer.isa) for layer in context.values() if hasattr(layer, "isa")})
    report: dict[str, Any] = {
        "pid": os.getpid(),
        "mode": os.environ.get(plugin.ENV, ""),
        "linear_invariant": bound,
        "linear_stock": stock,
        "rms_norm_invariant": RMSNorm.forward_cpu is plugin._rms_norm_forward,
        "logprobs_invariant": Sampler.compute_logprobs is plugin._compute_logprobs,
        "attention_isa": isas,
        "attention_invariant": _attention_is_ours(plugin),
        "attn_split_kv": os.environ.get("VLLM_CPU_ATTN_SPLIT_KV", "1") != "0",
        "amx_tile_permitted": amx.cpu_has_amx() and amx.tile_permitted(),
    }
    if report["mode"] == "cpu":
        from invariant.kernels.cpu import native

        report["gemm_path"] = native.gemm_path()
    return report


def _attention_is_ours(plugin) -> bool:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    return (CPUAttentionBackendImpl.forward is plugin._attention_forward
            and CPUAttentionBackendImpl.do_kv_cache_update is plugin._attention_cache_update)


def disagreements(kernels: Mapping[str, Any], reports: list[Mapping[str, Any]]) -> list[str]:
    """Where a model process's report contradicts the fingerprint's kernel part (empty: none)."""
    problems: list[str] = []
    if not reports:
        return ["no model process answered the kernel probe"]
    invariant = kernels.get("batch_invariant") == "invariant-cpu"
    for r in reports:
        who = f"model process {r.get('pid')}"
        if invariant:
            if r.get("mode") != "cpu":
                problems.append(f"{who}: invariant's plugin is not active there (mode {r.get('mode')!r}): "
                                "is the plugin filtered out by VLLM_PLUGINS?")
                continue
            if r.get("linear_stock"):
                problems.append(f"{who}: {r['linear_stock']} linear layers run stock GEMMs")
            if not r.get("linear_invariant"):
                problems.append(f"{who}: no linear layer runs invariant's GEMM")
            if not r.get("rms_norm_invariant"):
                problems.append(f"{who}: RMSNorm is not invariant's kernel")
            if not r.get("logprobs_invariant"):
                problems.append(f"{who}: logprobs are not invariant's kernel")
            if not r.get("attention_invariant"):
                problems.append(f"{who}: attention is not invariant's kernel")
            want_path = kernels.get("cpu_kernels_build", {}).get("gemm_path")
            if want_path and r.get("gemm_path") != want_path:
                problems.append(f"{who}: GEMM path {r.get('gemm_path')} but the fingerprint names {want_path}")
        if bool(r.get("attn_split_kv")) != bool(kernels.get("attn_split_kv")):
            problems.append(f"{who}: attention KV split {'on' if r.get('attn_split_kv') else 'off'}, "
                            "not what the fingerprint names")
        want_isa = kernels.get("attention_isa")
        if want_isa and r.get("attention_isa") != [want_isa]:
            problems.append(f"{who}: attention ISA {r.get('attention_isa')} but the fingerprint names {want_isa}")
    return problems
