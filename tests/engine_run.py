"""Run vLLM's offline engine on one model in one mode and print what each scenario generated (JSON).

Used by tests/test_batch_invariance.py in a fresh process per engine: vLLM's plugins patch the
process they load in, so the invariant and the stock engine cannot share one test process.

    python tests/engine_run.py MODEL_DIR {invariant|stock} MAX_NUM_BATCHED_TOKENS OUT.json

Scenarios (greedy unless named; token ids and logprobs of the prompt under test):
  alone, batch_<n>          the prompt alone, then with n-1 fillers of varied lengths in one call
  seeded_alone, seeded_<n>  the same at temperature 0.8 with a fixed seed
  prefix_warm               the prompt again right after itself (all its blocks cached)
  prefix_shared             the prompt after another prompt with the same long prefix (part cached)
  crowd_chunked             the prompt amid a crowd while the token budget splits every prefill
"""

from __future__ import annotations

import json
import os
import random
import sys

BATCH_SIZES = (2, 5, 16, 33, 64, 128)
WORDS = ("the numbers of a request should depend on the request and the numerics only never on the "
         "batch it happens to share with other requests in a busy server").split()


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def main() -> None:
    model, mode, budget, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    os.environ["INVARIANT_BATCH_INVARIANT"] = "cpu" if mode == "invariant" else "off"
    os.environ["VLLM_CPU_ATTN_SPLIT_KV"] = "0" if mode == "invariant" else os.environ.get("VLLM_CPU_ATTN_SPLIT_KV", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["TORCH_COMPILE_DISABLE"] = "1"
    from vllm import LLM, SamplingParams

    rng = random.Random(7)
    prefix = text(rng, 90)
    prompt = prefix + " " + text(rng, 25)
    sibling = prefix + " " + text(rng, 25)
    fillers = [text(rng, rng.randint(1, 260)) for _ in range(max(BATCH_SIZES))]

    # The checkpoint's own dtype, explicitly: vLLM's "auto" serves fp32 checkpoints in bf16 on the CPU.
    dtype = json.load(open(os.path.join(model, "config.json")))["dtype"]
    llm = LLM(model=model, dtype=dtype, max_model_len=1024, enforce_eager=True, seed=0,
              gpu_memory_utilization=0.3, max_num_batched_tokens=budget, max_num_seqs=min(256, budget),
              enable_prefix_caching=True, enable_chunked_prefill=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=20, logprobs=0, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, seed=1234, max_tokens=20, logprobs=0, ignore_eos=True)

    def run(prompts, params, at=0):
        comp = llm.generate(prompts, params, use_tqdm=False)[at].outputs[0]
        lps = [float(step[tok].logprob) for tok, step in zip(comp.token_ids, comp.logprobs)]
        return {"token_ids": list(comp.token_ids), "logprobs": lps}

    results = {}
    if budget >= 1024:
        llm.reset_prefix_cache()
        results["alone"] = run([prompt], greedy)
        for n in BATCH_SIZES:
            llm.reset_prefix_cache()
            results[f"batch_{n}"] = run([prompt] + fillers[: n - 1], greedy)
        results["prefix_warm"] = run([prompt], greedy)
        llm.reset_prefix_cache()
        run([sibling], greedy)
        results["prefix_shared"] = run([prompt], greedy)
        llm.reset_prefix_cache()
        results["seeded_alone"] = run([prompt], seeded)
        for n in BATCH_SIZES:
            llm.reset_prefix_cache()
            results[f"seeded_{n}"] = run([prompt] + fillers[: n - 1], seeded)
    else:
        llm.reset_prefix_cache()
        results["alone_chunked"] = run([prompt], greedy)
        llm.reset_prefix_cache()
        results["crowd_chunked"] = run(fillers[:7] + [prompt] + fillers[7:20], greedy, at=7)
    with open(out, "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main()
