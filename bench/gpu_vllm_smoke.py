"""Smoke run of carried vLLM on the device: one prompt alone and amid fillers, bitwise compared.

    python3 bench/gpu_vllm_smoke.py MODEL_DIR [--sizes 1,5,64,256] [--tokens 64]

Run it twice, with and without ``VLLM_BATCH_INVARIANT=1`` (read at import, so one process per mode).
Prints, per batch size, whether token ids and logprobs equal the batch-of-1 result, and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random

os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--sizes", default="1,5,64,256")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--native-norm", action="store_true", help="RMSNorm through vLLM's torch-native path, "
                    "not its CUDA kernel (ir_op_priority)")
    ap.add_argument("--max-batched-tokens", type=int, help="vLLM's max_num_batched_tokens (chunked-prefill budget)")
    args = ap.parse_args()
    from vllm import LLM, SamplingParams

    extra = {"max_num_batched_tokens": args.max_batched_tokens} if args.max_batched_tokens else {}
    if args.native_norm:
        extra["ir_op_priority"] = {"rms_norm": ["native"], "fused_add_rms_norm": ["native"]}
    llm = LLM(args.model, dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.5, seed=0, **extra)
    params = SamplingParams(temperature=0, max_tokens=args.tokens, logprobs=0, ignore_eos=True)
    prompt = "The same prompt, alone or in a crowd, must give the same bits."
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()

    def run(n: int):
        fillers = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 200))) for _ in range(n - 1)]
        out = llm.generate([prompt, *fillers], params, use_tqdm=False)[0].outputs[0]
        return out.token_ids, [next(iter(lp.values())).logprob for lp in out.logprobs]

    ref = run(1)
    result = {}
    for n in [int(s) for s in args.sizes.split(",")]:
        ids, lps = run(n)
        first = next((i for i, (a, b) in enumerate(zip(lps, ref[1])) if a != b), None)
        result[n] = dict(tokens_equal=list(ids) == list(ref[0]), logprobs_equal=lps == ref[1], first_logprob_diff=first)
        print(f"batch {n:4d}: tokens {'==' if result[n]['tokens_equal'] else '!='}, logprobs "
              f"{'==' if result[n]['logprobs_equal'] else '!= from step ' + str(first)}", flush=True)
    print(json.dumps(dict(invariant=os.environ.get("VLLM_BATCH_INVARIANT", "0"), results=result)))


if __name__ == "__main__":
    main()
