"""On the device: start ``invariant worker`` on the GPU, wait for its verdict, probe it over HTTP.

    python3 bench/gpu_worker_check.py MODEL_DIR [--no-invariance] [--crowds 1,64,256] [--out DIR]

Prints /invariant/ready (with the canary's verdict) and the fingerprint's device and kernel parts,
then sends the canary's prompt alone and amid N concurrent fillers through /v1/completions and says
whether token ids and logprobs are bitwise equal. Writes worker_check.json (and the worker's log).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

import httpx

from invariant.contract import routes
from invariant.processes import WorkerStartError, start_worker, stop_all, wait_ready

PROMPT = "A reproducible answer depends on the request and the numerics, never on the batch."


async def completion(client: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> tuple[list[int], list[float]]:
    r = await client.post(f"{url}/v1/completions", json=dict(model="m", prompt=prompt, max_tokens=tokens,
                                                             temperature=0, logprobs=0, ignore_eos=True,
                                                             return_token_ids=True))
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return choice["token_ids"], choice["logprobs"]["token_logprobs"]


async def crowd_check(url: str, sizes: list[int], tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        alone = await completion(client, url, PROMPT, tokens)
        out = {}
        for n in sizes:
            fillers = [" ".join(["filler"] * (4 + (i * 37) % 197)) for i in range(n - 1)]
            jobs = [asyncio.create_task(completion(client, url, f, tokens)) for f in fillers]
            await asyncio.sleep(0)
            got = await completion(client, url, PROMPT, tokens)
            await asyncio.gather(*jobs)
            first = next((i for i, (a, b) in enumerate(zip(got[1], alone[1])) if a != b), None)
            out[n] = dict(tokens_equal=got[0] == alone[0], logprobs_equal=got[1] == alone[1], first_logprob_diff=first)
            print(f"crowd {n:4d}: tokens {'==' if got[0] == alone[0] else '!='}, logprobs "
                  f"{'==' if first is None else '!= from step ' + str(first)}", flush=True)
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--no-invariance", action="store_true")
    ap.add_argument("--crowds", default="1,64,256")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = ap.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    log = args.out / "worker.log"
    proc = start_worker(args.model, args.port, log, *(["--no-invariance"] if args.no_invariance else []), name="m")
    result: dict = {"mode": "off" if args.no_invariance else "on"}
    try:
        try:
            ready = {"status": 200, "body": wait_ready(proc, url, log, timeout=400)}
        except WorkerStartError as exc:  # a failed canary is a result here, not only an error
            ready = None
            result["error"] = str(exc)
        result["ready"] = ready
        print("ready:", json.dumps(ready)[:600], result.get("error", ""), flush=True)
        if ready is not None:
            fp = httpx.get(f"{url}{routes.FINGERPRINT}", timeout=10).json()
            parts = fp.get("parts", {})
            result["fingerprint"] = fp.get("fingerprint")
            result["parts"] = {k: parts.get(k) for k in ("device", "kernels", "versions", "invariance")}
            print("fingerprint:", result["fingerprint"], json.dumps(result["parts"])[:800], flush=True)
            result["crowds"] = asyncio.run(crowd_check(url, [int(s) for s in args.crowds.split(",")], args.tokens))
    finally:
        stop_all([proc])
        (args.out / f"worker_check_{result['mode']}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
