"""On the device: seeded prompts alone and all at once amid a crowd, through ``invariant worker``.

    python3 bench/gpu_seeded_crowds.py MODEL_DIR --label NAME [--prompts 40] [--out DIR]

Each of the prompts (10 to 350 words, seeded, T = 0.8) is sent alone, one after the other (a batch
of one), then all of them at once amid 60 greedy fillers (batches far above 8). Reports how many came
back with other token ids or logprobs. Run with tests/hooks on PYTHONPATH and
INVARIANT_TEST_STOCK_SAMPLER=1 for the control (vLLM's own top-k/top-p dispatch).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from pathlib import Path

import httpx

from invariant.contract import routes
from invariant.processes import start_worker, stop_all, wait_ready

WORDS = ("a request should depend on the request and the numerics only never on the batch it shares with "
         "other requests in a busy server that samples tokens at random from a seeded stream").split()


async def complete(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    r = await client.post(url + routes.COMPLETIONS, json=dict(model="m", max_tokens=48, logprobs=0,
                                                              ignore_eos=True, return_token_ids=True, **body))
    r.raise_for_status()
    c = r.json()["choices"][0]
    return {"token_ids": c["token_ids"], "logprobs": c["logprobs"]["token_logprobs"]}


async def measure(url: str, n: int) -> dict:
    rng = random.Random(11)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 350))) for _ in range(n)]
    seeded = [dict(prompt=p, temperature=0.8, seed=4242 + i) for i, p in enumerate(prompts)]
    fillers = [dict(prompt=" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 200))), temperature=0)
               for _ in range(60)]
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256)) as client:
        alone = [await complete(client, url, b) for b in seeded]
        crowd = await asyncio.gather(*[complete(client, url, b) for b in seeded + fillers])
    differ = [i for i in range(n) if crowd[i] != alone[i]]
    first = {i: next(j for j, (a, b) in enumerate(zip(alone[i]["token_ids"] + [None], crowd[i]["token_ids"] + [None]))
                     if a != b or alone[i]["logprobs"][j:j + 1] != crowd[i]["logprobs"][j:j + 1]) for i in differ}
    return {"prompts": n, "differ": len(differ), "first_step": first}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--label", required=True)
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--port", type=int, default=8013)
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{args.port}"
    log = args.out / f"worker_{args.label}.log"
    proc = start_worker(args.model, args.port, log, "--engine-arg=--gpu-memory-utilization=0.4", name="m")
    try:
        wait_ready(proc, url, log, timeout=400)
        fp = httpx.get(url + routes.FINGERPRINT, timeout=10).json()
        result = {"label": args.label, "sampler": fp["parts"]["kernels"].get("sampler"),
                  **asyncio.run(measure(url, args.prompts))}
    finally:
        stop_all([proc])
    print(json.dumps(result), flush=True)
    (args.out / f"seeded_crowds_{args.label}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
