"""Run vLLM's offline engine on one model in one mode and print what each scenario generated (JSON).

Used by tests/test_batch_invariance.py in a fresh process per engine: vLLM's plugins patch the
process they load in, so the invariant and the stock engine cannot share one test process.

    python tests/engine_run.py MODEL_DIR {invariant|stock|upstream} MAX_NUM_BATCHED_TOKENS OUT.json [--eager] [--canary] [--only=SCENARIO,...] [--tp=N]

Modes: ``invariant`` is what the worker runs (CPU: our plugin; CUDA: upstream's VLLM_BATCH_INVARIANT=1
plus our plugin's RMSNorm and vLLM's Triton attention), ``stock`` is vLLM as shipped, ``upstream`` (CUDA only) is upstream's
invariant mode without our plugin. On CUDA the engine compiles and captures CUDA graphs, as the
worker does, unless ``--eager``; the CPU engine is always eager. ``--canary`` runs the worker's
start-up canary (invariant.worker.canary, at this device's size) on an AsyncLLM instead of the
scenarios and writes its verdict.

Scenarios (greedy unless named; token ids and logprobs of the prompt under test):
  alone, batch_<n>          the prompt alone, then with n-1 fillers of varied lengths in one call
  seeded_alone, seeded_<n>  the same at temperature 0.8 with a fixed seed
  prefix_warm               the prompt again right after itself (all its blocks cached)
  prefix_shared             the prompt after another prompt with the same long prefix (part cached)
  split_prefill             the prompt behind requests that fill all but SPLIT_AT tokens of the step
                            budget: its prefill is split in two by the budget, in the same engine
  seeded_split_prefill      the same, seeded: the token sampled after the first chunk is thrown away
                            and its random draw undone, so the rest must equal seeded_alone
  alone_chunked             the prompt alone while the (small) token budget splits every prefill
  crowd_chunked             the prompt amid a crowd while the token budget splits every prefill
"""

from __future__ import annotations

import json
import os
import random
import sys

BATCH_SIZES = (2, 5, 16, 33, 64, 128)
SPLIT_AT = 40  # split_prefill: tokens of the prompt's prefill in the first step
GPU_BATCH_SIZES = BATCH_SIZES + (256, 512)  # a GPU serves hundreds of requests a step
# What one engine takes of the GPU (engine_kwargs says why the KV cache is a fixed size): 8 GiB of
# KV plus weights, activations and CUDA graphs, about 12 GiB on the made medium model.
GPU_KV_CACHE_BYTES = 8 << 30
GPU_MEMORY_SHARE = 0.12
WORDS = ("the numbers of a request should depend on the request and the numerics only never on the "
         "batch it happens to share with other requests in a busy server").split()


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def configure(mode: str, cuda: bool) -> None:
    """The environment vLLM and our plugin read at start, as the worker sets it per mode."""
    if mode not in ("invariant", "stock", "upstream") or (mode == "upstream" and not cuda):
        raise SystemExit(f"mode {mode!r}: expected invariant, stock or (CUDA) upstream")
    if cuda:
        os.environ["VLLM_BATCH_INVARIANT"] = "0" if mode == "stock" else "1"
        if mode == "invariant":
            from invariant.contract.engine_args import GPU_GEMM_DEFAULT
            from invariant.worker import numerics, plugin

            os.environ["INVARIANT_BATCH_INVARIANT"] = "cuda"
            # The worker's default GEMM on this GPU, as the worker resolves it (worker/server.py).
            os.environ[plugin.GEMM_ENV] = numerics.resolve_gpu_gemm(GPU_GEMM_DEFAULT, numerics.cuda_arch())
        else:
            os.environ.pop("INVARIANT_BATCH_INVARIANT", None)
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"  # as the worker: see apply_environment
        return
    os.environ["INVARIANT_BATCH_INVARIANT"] = "cpu" if mode == "invariant" else "off"
    os.environ["VLLM_CPU_ATTN_SPLIT_KV"] = "0" if mode == "invariant" else os.environ.get("VLLM_CPU_ATTN_SPLIT_KV", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["TORCH_COMPILE_DISABLE"] = "1"


def engine_kwargs(model: str, mode: str, budget: int, cuda: bool, eager: bool, max_seqs: int) -> dict:
    # The checkpoint's own dtype, explicitly: vLLM's "auto" serves fp32 checkpoints in bf16 on the CPU.
    dtype = json.load(open(os.path.join(model, "config.json")))["dtype"]
    kwargs = dict(model=model, dtype=dtype, max_model_len=1024, enforce_eager=eager or not cuda, seed=0,
                  gpu_memory_utilization=0.3, max_num_batched_tokens=budget, max_num_seqs=min(max_seqs, budget),
                  enable_prefix_caching=True, enable_chunked_prefill=True)
    if cuda:
        # A fixed KV cache (512 prompts of up to ~300 tokens plus 64 steps need ~6 GiB on the made
        # medium model) rather than a share of the GPU: tests/test_gpu_vllm.py starts engines side by
        # side, and vLLM's memory profile fails when another process frees memory while it measures
        # (with a fixed size it is skipped). The utilization only has to be free at start.
        kwargs.update(gpu_memory_utilization=GPU_MEMORY_SHARE, kv_cache_memory_bytes=GPU_KV_CACHE_BYTES)
    if cuda and mode == "invariant":
        from invariant.worker.numerics import GPU_INVARIANT_ATTENTION, inductor_patches

        kwargs["attention_backend"] = GPU_INVARIANT_ATTENTION  # as the worker runs it
        if not eager:
            kwargs["compilation_config"] = {"inductor_compile_config": inductor_patches()}
    return kwargs


def run_canary(kwargs: dict) -> dict:
    """The worker's canary, at this device's size, on an async engine like the worker's."""
    import asyncio

    from invariant import companions

    companions.hide_broken()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from invariant.worker import canary

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    try:
        verdict = asyncio.run(canary.run(engine, **canary.sizes(True)))
    finally:
        engine.shutdown()
    return {"canary": verdict}


def budget_head(llm, fillers: list[str], tokens: int) -> list[dict]:
    """Prompts of ``tokens`` tokens in all (none longer than the model allows), to go before the
    prompt under test: first come, first scheduled, they leave it the rest of the step budget."""
    ids: list[int] = []
    for filler in fillers:
        ids += llm.get_tokenizer().encode(filler, add_special_tokens=False)
        if len(ids) >= tokens:
            break
    ids = ids[:tokens]
    longest = llm.llm_engine.model_config.max_model_len - 64  # room for the 64 steps generated
    return [{"prompt_token_ids": ids[i:i + longest]} for i in range(0, len(ids), longest)]


def main() -> None:
    model, mode, budget, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    flags = set(sys.argv[5:])
    import torch

    cuda = torch.cuda.is_available()
    configure(mode, cuda)
    sizes = GPU_BATCH_SIZES if cuda else BATCH_SIZES
    kwargs = engine_kwargs(model, mode, budget, cuda, "--eager" in flags, max(256, max(sizes)))
    tp = next((int(f.split("=", 1)[1]) for f in flags if f.startswith("--tp=")), 1)
    if tp > 1:
        kwargs.update(tensor_parallel_size=tp, distributed_executor_backend="mp")
        if not cuda and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            from invariant.worker.tensor_parallel import threads_bind

            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = threads_bind(tp, sorted(os.sched_getaffinity(0)))
    if "--canary" in flags:
        with open(out, "w") as fh:
            json.dump(run_canary(kwargs), fh)
        return
    from invariant import companions

    companions.hide_broken()
    from vllm import LLM, SamplingParams

    rng = random.Random(7)
    # 200 words (about 230 tokens): past one 128-token CPU KV block, so a sibling really shares a cached block
    prefix = text(rng, 200)
    prompt = prefix + " " + text(rng, 25)
    sibling = prefix + " " + text(rng, 25)
    fillers = [text(rng, rng.randint(1, 260)) for _ in range(max(sizes))]

    llm = LLM(**kwargs)
    # 64 steps on a GPU: upstream's eager leak first showed 25 decode steps in (docs/gpu-vllm.md).
    steps = 64 if cuda else 20
    greedy = SamplingParams(temperature=0.0, max_tokens=steps, logprobs=0, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, seed=1234, max_tokens=steps, logprobs=0, ignore_eos=True)

    def run(prompts, params, at=0):
        out = llm.generate(prompts, params, use_tqdm=False)[at]
        comp = out.outputs[0]
        lps = [float(step[tok].logprob) for tok, step in zip(comp.token_ids, comp.logprobs)]
        # What really happened, from vLLM's own accounting: prefix-cache hits and the prompt length
        # (the tests check that each scenario is the one it claims to be).
        return {"token_ids": list(comp.token_ids), "logprobs": lps, "cached_tokens": int(out.num_cached_tokens or 0),
                "prompt_tokens": len(out.prompt_token_ids)}

    only = next((f.split("=", 1)[1].split(",") for f in flags if f.startswith("--only=")), None)

    def want(name: str) -> bool:
        return only is None or name in only

    results = {}
    if budget >= 1024:
        llm.reset_prefix_cache()
        results["alone"] = run([prompt], greedy)
        for n in sizes:
            if want(f"batch_{n}"):
                llm.reset_prefix_cache()
                results[f"batch_{n}"] = run([prompt] + fillers[: n - 1], greedy)
        llm.reset_prefix_cache()  # cached blocks would shrink both prefills and the split with them
        head = budget_head(llm, fillers, budget - SPLIT_AT)
        if want("split_prefill"):
            results["split_prefill"] = run(head + [prompt], greedy, at=-1)
            results["split_prefill"]["head_tokens"] = sum(len(h["prompt_token_ids"]) for h in head)
        results["block_size"] = int(llm.llm_engine.vllm_config.cache_config.block_size)
        if want("prefix_warm"):
            if not want("split_prefill"):
                run([prompt], greedy)  # what the split run leaves cached
            results["prefix_warm"] = run([prompt], greedy)
        if want("prefix_shared"):
            llm.reset_prefix_cache()
            run([sibling], greedy)
            results["prefix_shared"] = run([prompt], greedy)
        llm.reset_prefix_cache()
        results["seeded_alone"] = run([prompt], seeded)
        if want("seeded_split_prefill"):
            llm.reset_prefix_cache()
            results["seeded_split_prefill"] = run(head + [prompt], [greedy] * len(head) + [seeded], at=-1)
        for n in sizes:
            if want(f"seeded_{n}"):
                llm.reset_prefix_cache()
                results[f"seeded_{n}"] = run([prompt] + fillers[: n - 1], seeded)
    else:
        llm.reset_prefix_cache()
        results["alone_chunked"] = run([prompt], greedy)
        llm.reset_prefix_cache()
        results["crowd_chunked"] = run(fillers[:7] + [prompt] + fillers[7:20], greedy, at=7)
    results["budget"] = budget
    with open(out, "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main()
