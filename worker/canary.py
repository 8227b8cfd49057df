"""Start-up canary: the same prompt alone and inside a crowd must give the same bits.

Before the worker says ready it generates a fixed prompt by itself, then again while a crowd of
fillers of varied lengths is generated at the same moment (so the prompt shares its batches with
them), and compares token ids and logprobs bitwise. A kernel that leaks the batch into a request's
numbers (a library update, an unsupported CPU path, a plugin that did not load) shows up here,
before any user sees it, and the worker stays unready with the first differing position.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("invariant.worker.canary")

PROMPT = "A reproducible answer depends on the request and the numerics, never on the batch."
FILLER_WORDS = "the batch changes the order of every reduction unless that order is fixed".split()
CROWD = 12
MAX_TOKENS = 16
# On a GPU the crowd is cheap and the leaks hide at large batches: upstream's invariant mode in
# vLLM 0.26 holds to a batch of 64 and breaks from 256 on, 25 decode steps in (docs/gpu-vllm.md).
GPU_CROWD = 300
GPU_MAX_TOKENS = 48
# On a GPU the prompt under test is also long (about 400 more words): alone its prefill fits one
# engine step, behind the crowd it lands where the step's token budget is partly spent and is split.
# A prompt prefilled in chunks got other bits than in one step on an H100 (engines of another budget,
# docs/gpu-vllm.md); a short prompt rarely straddles a step, a long one nearly always does.
GPU_PROBE_WORDS = 400


def sizes(cuda: bool) -> dict[str, int]:
    """How large a crowd, how many steps and how many extra prompt words the canary uses here."""
    if cuda:
        return {"crowd": GPU_CROWD, "max_tokens": GPU_MAX_TOKENS, "probe_words": GPU_PROBE_WORDS}
    return {"crowd": CROWD, "max_tokens": MAX_TOKENS, "probe_words": 0}


def probe(words: int = 0) -> str:
    """The prompt under test: PROMPT, then ``words`` more from a fixed cycle (the same every start)."""
    extra = " ".join(FILLER_WORDS[(j * 5) % len(FILLER_WORDS)] for j in range(words))
    return f"{PROMPT} {extra}" if words else PROMPT


@dataclass(frozen=True)
class Sequence:
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]


@dataclass(frozen=True)
class Verdict:
    ok: bool
    position: int | None = None
    what: str = ""
    crowd: int = CROWD

    def message(self, alone: Sequence, crowd: Sequence) -> str:
        if self.ok:
            return "canary passed: the prompt gave the same token ids and logprobs alone and in a crowd"
        return (f"canary failed: {self.what} differ alone vs in a batch of {self.crowd + 1}, first at position "
                f"{self.position} (alone {_at(alone, self.position)}, in batch {_at(crowd, self.position)})")


def _at(seq: Sequence, i: int | None) -> str:
    if i is None or i >= len(seq.token_ids):
        return "<end>"
    return f"token {seq.token_ids[i]} logprob {seq.logprobs[i]!r}"


def compare(alone: Sequence, crowd: Sequence) -> Verdict:
    """Bitwise, position by position: the first step whose token id or logprob differs."""
    for i, (ta, tb) in enumerate(zip(alone.token_ids, crowd.token_ids)):
        if ta != tb:
            return Verdict(False, i, "token ids")
        la = alone.logprobs[i] if i < len(alone.logprobs) else None
        lb = crowd.logprobs[i] if i < len(crowd.logprobs) else None
        if la != lb and not (la != la and lb != lb):  # float equality; NaN matches NaN
            return Verdict(False, i, "logprobs")
    if len(alone.token_ids) != len(crowd.token_ids):
        return Verdict(False, min(len(alone.token_ids), len(crowd.token_ids)), "token ids")
    return Verdict(True)


def fillers(n: int = CROWD) -> list[str]:
    """Prompts of varied lengths (4 to about 100 words), the same every start."""
    return [" ".join(FILLER_WORDS[(i * 3 + j) % len(FILLER_WORDS)] for j in range(4 + (i * 37) % 97))
            for i in range(n)]


async def _generate(engine_client, prompt: str, params) -> Sequence:
    final = None
    async for out in engine_client.generate({"prompt": prompt}, params, f"invariant-canary-{uuid.uuid4().hex}"):
        final = out
    comp = final.outputs[0]
    logprobs = tuple(float(step[tok].logprob) for tok, step in zip(comp.token_ids, comp.logprobs or []))
    return Sequence(tuple(comp.token_ids), logprobs)


async def run(engine_client, crowd: int = CROWD, max_tokens: int = MAX_TOKENS,
              probe_words: int = 0) -> tuple[Verdict, Sequence, Sequence]:
    from vllm import SamplingParams

    prompt = probe(probe_words)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, ignore_eos=True)
    alone = await _generate(engine_client, prompt, params)
    crowd_params = SamplingParams(temperature=0.0, max_tokens=max_tokens * 2, ignore_eos=True)
    tasks = [asyncio.create_task(_generate(engine_client, f, crowd_params)) for f in fillers(crowd)]
    await asyncio.sleep(0)  # let the crowd reach the engine first, so the prompt joins its batches
    in_crowd = await _generate(engine_client, prompt, params)
    await asyncio.gather(*tasks)
    verdict = dataclasses.replace(compare(alone, in_crowd), crowd=crowd)
    if not verdict.ok:
        log.error("canary: alone    token ids %s logprobs %s", list(alone.token_ids), list(alone.logprobs))
        log.error("canary: in batch token ids %s logprobs %s", list(in_crowd.token_ids), list(in_crowd.logprobs))
    return verdict, alone, in_crowd


def summary(verdict: Verdict, alone: Sequence, crowd: Sequence) -> dict[str, Any]:
    return {"ok": verdict.ok, "message": verdict.message(alone, crowd), "position": verdict.position}
