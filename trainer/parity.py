"""Check sampler-trainer parity against a running worker: sample completions over HTTP (logprobs on,
token ids back), score them with :class:`PolicyModel`, and compare bit for bit. Used by
``invariant parity`` and bench/rl_loop.py; an RL user can call :func:`sample` and :func:`compare`
from their own loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from invariant.contract.routes import COMPLETIONS


@dataclass(frozen=True)
class Sample:
    """One completion as the worker served it."""

    prompt: list[int]
    token_ids: list[int]
    logprobs: list[float]


class ParityError(RuntimeError):
    """The worker's answer cannot be scored (an HTTP error, or no token ids / logprobs in it)."""


def sample(url: str, model: str, prompts: Sequence[Sequence[int]], *, max_tokens: int, temperature: float,
           seeds: Sequence[int | None] | None = None, timeout: float = 600.0,
           client: httpx.Client | None = None) -> list[Sample]:
    """Sample each token-id prompt from the worker at ``url`` (its /v1/completions, vLLM's
    ``return_token_ids``), one request per prompt, sequentially; returns what it served."""
    own = client is None
    http = client or httpx.Client(base_url=url, timeout=timeout)
    try:
        out = []
        for i, prompt in enumerate(prompts):
            body: dict[str, Any] = {"model": model, "prompt": list(prompt), "max_tokens": max_tokens,
                                    "temperature": temperature, "logprobs": 1, "return_token_ids": True,
                                    "ignore_eos": True}
            seed = seeds[i] if seeds is not None else None
            if seed is not None:
                body["seed"] = seed
            res = http.post(COMPLETIONS, json=body)
            if res.status_code != 200:
                raise ParityError(f"the worker answered {res.status_code}: {res.text[:300]}")
            choice = res.json()["choices"][0]
            ids, lps = choice.get("token_ids"), (choice.get("logprobs") or {}).get("token_logprobs")
            if not isinstance(ids, list) or not isinstance(lps, list) or len(ids) != len(lps):
                raise ParityError("the worker's answer has no token ids or logprobs to compare")
            out.append(Sample(list(prompt), [int(t) for t in ids], [float(x) for x in lps]))
        return out
    finally:
        if own:
            http.close()


@dataclass
class Comparison:
    """Served vs trainer logprobs over every sampled token."""

    tokens: int = 0
    equal: int = 0
    max_abs_diff: float = 0.0
    kl: float = 0.0  # mean over tokens of (served - trainer): the k1 estimate of KL(sampler || trainer)
    first_mismatch: tuple[int, int] | None = None  # (sample, position)
    per_sample: list[bool] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return self.tokens > 0 and self.equal == self.tokens

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "equal": self.equal, "identical": self.identical,
                "max_abs_diff": self.max_abs_diff, "kl": self.kl, "first_mismatch": self.first_mismatch}


def compare(served: Sequence[Sample], trainer: Sequence[Sequence[float]]) -> Comparison:
    """Bitwise comparison (float equality of the fp32 values) plus the size of any difference."""
    result = Comparison()
    total = 0.0
    for i, (s, lps) in enumerate(zip(served, trainer)):
        lps = [float(x) for x in lps]
        if len(lps) != len(s.logprobs):
            raise ParityError(f"sample {i}: {len(s.logprobs)} served logprobs, {len(lps)} from the trainer")
        same = True
        for j, (a, b) in enumerate(zip(s.logprobs, lps)):
            result.tokens += 1
            if a == b or (math.isnan(a) and math.isnan(b)):
                result.equal += 1
            else:
                same = False
                if result.first_mismatch is None:
                    result.first_mismatch = (i, j)
            result.max_abs_diff = max(result.max_abs_diff, abs(a - b))
            total += a - b
        result.per_sample.append(same)
    result.kl = total / result.tokens if result.tokens else 0.0
    return result


def score(policy, served: Sequence[Sample], batch_size: int = 16) -> list[list[float]]:
    """The trainer's logprobs of each served completion, in packed batches (no gradients)."""
    import torch

    out: list[list[float]] = []
    with torch.no_grad():
        for at in range(0, len(served), batch_size):
            part = served[at:at + batch_size]
            got = policy.token_logprobs([s.prompt for s in part], [s.token_ids for s in part])
            out.extend(lp.tolist() for lp in got)
    return out


def random_prompts(n: int, vocab: int, seed: int, longest: int = 200) -> list[list[int]]:
    """Token-id prompts of varied lengths (1 to ``longest``), the same for the same seed."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(1, longest))] for _ in range(n)]


def check(url: str, model_dir: str, *, model: str | None = None, prompts: int = 8, max_tokens: int = 16,
          seed: int = 0, longest: int = 200) -> dict[str, Any]:
    """Sample ``prompts`` greedy and as many seeded (T = 1) completions from the worker and compare
    their logprobs with the trainer's. Returns the comparison per mode."""
    from invariant.contract import routes
    from invariant.trainer.model import PolicyModel

    with httpx.Client(base_url=url, timeout=600.0) as http:
        try:
            info = http.get(routes.FINGERPRINT)
        except httpx.HTTPError as exc:
            raise ParityError(f"no worker at {url}: {exc}") from exc
        if info.status_code != 200:
            raise ParityError(f"{url}{routes.FINGERPRINT} answered {info.status_code}: is it an invariant worker?")
        body = info.json()
        name = model or body.get(routes.F_MODEL)
        if not name:
            raise ParityError("the worker does not name its model: pass --model-name")
        policy = PolicyModel.from_pretrained(model_dir)
        asked = random_prompts(prompts, policy.config["vocab_size"], seed, longest)
        report: dict[str, Any] = {"worker": url, "model": name, "fingerprint": body.get(routes.F_FINGERPRINT)}
        for mode, temperature, seeds in (("greedy", 0.0, None), ("seeded", 1.0, [seed * 1000 + i for i in range(prompts)])):
            served = sample(url, name, asked, max_tokens=max_tokens, temperature=temperature, seeds=seeds, client=http)
            report[mode] = compare(served, score(policy, served)).as_dict()
    report["identical"] = all(report[m]["identical"] for m in ("greedy", "seeded"))
    return report
