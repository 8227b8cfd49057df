"""Start-up canary: the same prompts alone and inside a crowd must give the same bits.

Before the worker says ready (and after the kernel canary, invariant.worker.kernel_canary, checked
each kernel on its own) it generates fixed prompts by themselves (greedy, seeded, and a long one
whose prefill the crowd splits across engine steps), then again while a crowd of fillers of varied
lengths is generated at the same moment (so the prompts share their batches with them), and
compares token ids, logprobs and the top-k candidates bitwise. A kernel that leaks the batch into a request's
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
MAX_TOKENS = 32
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
    # Per position, the top-k candidates as (token id, logprob) pairs sorted by id: a difference in
    # the runners-up shows a batch-variant logit long before it flips a token.
    top: tuple[tuple[tuple[int, float], ...], ...] = ()


@dataclass(frozen=True)
class Verdict:
    ok: bool
    position: int | None = None
    what: str = ""
    crowd: int = CROWD
    case: str = "greedy"

    def message(self, alone: Sequence, crowd: Sequence) -> str:
        if self.ok:
            return "canary passed: the prompt gave the same token ids and logprobs alone and in a crowd"
        return (f"canary failed: {self.case} prompt: {self.what} differ alone vs in a batch of {self.crowd + 1}, "
                f"first at position {self.position} (alone {_at(alone, self.position)}, "
                f"in batch {_at(crowd, self.position)})")


def _at(seq: Sequence, i: int | None) -> str:
    if i is None or i >= len(seq.token_ids):
        return "<end>"
    return f"token {seq.token_ids[i]} logprob {seq.logprobs[i]!r}"


def _same(a: float | None, b: float | None) -> bool:
    return a == b or (a != a and b != b)  # float equality; NaN matches NaN


def compare(alone: Sequence, crowd: Sequence) -> Verdict:
    """Bitwise, position by position: the first step whose token id, logprob or top-k differs."""
    for i, (ta, tb) in enumerate(zip(alone.token_ids, crowd.token_ids)):
        if ta != tb:
            return Verdict(False, i, "token ids")
        la = alone.logprobs[i] if i < len(alone.logprobs) else None
        lb = crowd.logprobs[i] if i < len(crowd.logprobs) else None
        if not _same(la, lb):
            return Verdict(False, i, "logprobs")
        ka = alone.top[i] if i < len(alone.top) else ()
        kb = crowd.top[i] if i < len(crowd.top) else ()
        if len(ka) != len(kb) or any(x[0] != y[0] or not _same(x[1], y[1]) for x, y in zip(ka, kb)):
            return Verdict(False, i, "top-k logprobs")
    if len(alone.token_ids) != len(crowd.token_ids):
        return Verdict(False, min(len(alone.token_ids), len(crowd.token_ids)), "token ids")
    return Verdict(True)


def fillers(n: int = CROWD) -> list[str]:
    """Prompts of varied lengths (4 to about 100 words), the same every start."""
    return [" ".join(FILLER_WORDS[(i * 3 + j) % len(FILLER_WORDS)] for j in range(4 + (i * 37) % 97))
            for i in range(n)]


# Top-k candidates compared at every step (vLLM returns the sampled token plus the top k).
TOP_K = 5
SEED = 20261202
SEEDED_TEMPERATURE = 0.8


def split_lengths(budget: int, max_model_len: int, max_tokens: int) -> tuple[int, list[int]]:
    """The long case: its prompt length, and the lengths of token-id fillers sent before it that
    fill about half of an engine step, so that the long prompt's prefill cannot fit the rest of
    that step and is split across two (with chunked prefill, as the worker runs it)."""
    long_len = max(8, min(max_model_len - max_tokens - 8, budget) * 3 // 4)
    head = max(1, budget - long_len // 2)
    per = max(1, min(max_model_len - 2 * max_tokens - 8, 256))
    lengths = [per] * (head // per) + ([head % per] if head % per else [])
    return long_len, lengths


def _ids(tokenizer, n: int, salt: int) -> list[int]:
    """``n`` token ids of ordinary text, the same every start."""
    words = [FILLER_WORDS[(salt + j * 7) % len(FILLER_WORDS)] for j in range(n)]
    ids = tokenizer.encode(" ".join(words), add_special_tokens=False)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


async def _generate(engine_client, prompt: str | list[int], params) -> Sequence:
    final = None
    inputs = {"prompt_token_ids": prompt} if isinstance(prompt, list) else {"prompt": prompt}
    async for out in engine_client.generate(inputs, params, f"invariant-canary-{uuid.uuid4().hex}"):
        final = out
    comp = final.outputs[0]
    steps = comp.logprobs or []
    logprobs = tuple(float(step[tok].logprob) for tok, step in zip(comp.token_ids, steps))
    top = tuple(tuple(sorted((int(t), float(lp.logprob)) for t, lp in step.items())) for step in steps)
    return Sequence(tuple(comp.token_ids), logprobs, top)


async def _engine_limits(engine_client) -> tuple[int, int, Any]:
    import inspect

    config = engine_client.vllm_config
    tokenizer = engine_client.get_tokenizer()
    if inspect.isawaitable(tokenizer):
        tokenizer = await tokenizer
    return (int(config.scheduler_config.max_num_batched_tokens), int(config.model_config.max_model_len),
            tokenizer)


async def run(engine_client, crowd: int = CROWD, max_tokens: int = MAX_TOKENS,
              probe_words: int = 0) -> dict[str, Any]:
    """Three prompts, each alone and then all together amid the crowd: greedy, seeded (T > 0, a
    fixed seed) and a long seeded one whose prefill is split across engine steps; token ids, logprobs and
    the top-k candidates of every step compared bitwise. Returns the summary (see :func:`summary`)."""
    import time

    from vllm import SamplingParams

    started = time.perf_counter()
    budget, max_len, tokenizer = await _engine_limits(engine_client)
    long_len, head = split_lengths(budget, max_len, max_tokens)
    prompt = probe(probe_words)
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=TOP_K, ignore_eos=True)
    seeded = SamplingParams(temperature=SEEDED_TEMPERATURE, seed=SEED, max_tokens=max_tokens, logprobs=TOP_K,
                            ignore_eos=True)
    # The long case samples with a seed: a seeded request whose prefill is split in a crowd but not
    # alone is where a GPU worker was seen to differ (issue #16); its logprobs show any logit change.
    cases = {"greedy": (prompt, greedy), "seeded": (prompt, seeded),
             "long split-prefill": (_ids(tokenizer, long_len, 1), seeded)}
    alone = {name: await _generate(engine_client, p, params) for name, (p, params) in cases.items()}
    # The crowd outlives the prompts' decode by a few steps, so they never finish in a thinned batch.
    crowd_params = SamplingParams(temperature=0.0, max_tokens=max_tokens + 8, ignore_eos=True)
    tasks = [asyncio.create_task(_generate(engine_client, f, crowd_params)) for f in fillers(crowd)]
    tasks += [asyncio.create_task(_generate(engine_client, _ids(tokenizer, n, 3 + i), crowd_params))
              for i, n in enumerate(head)]
    await asyncio.sleep(0)  # let the crowd reach the engine first, so the prompts join its batches
    together = await asyncio.gather(*(_generate(engine_client, p, params) for p, params in cases.values()))
    await asyncio.gather(*tasks)
    size = crowd + len(head) + len(cases) - 1
    results = []
    for (name, a), b in zip(alone.items(), together):
        verdict = dataclasses.replace(compare(a, b), crowd=size, case=name)
        if not verdict.ok:
            log.error("canary %s: alone    token ids %s logprobs %s", name, list(a.token_ids), list(a.logprobs))
            log.error("canary %s: in batch token ids %s logprobs %s", name, list(b.token_ids), list(b.logprobs))
        results.append((verdict, a, b))
    return {**summary(results), "seconds": round(time.perf_counter() - started, 3)}


def summary(results: list[tuple[Verdict, Sequence, Sequence]]) -> dict[str, Any]:
    """ok, the first failing case's message (or the pass), and every case's verdict."""
    failed = [r for r in results if not r[0].ok]
    first = failed[0] if failed else results[0]
    message = first[0].message(first[1], first[2])
    if not failed:
        message = (f"canary passed: {', '.join(v.case for v, _, _ in results)} prompts gave the same token ids, "
                   f"logprobs and top-{TOP_K} alone and in a crowd")
    return {"ok": not failed, "message": message, "position": first[0].position,
            "cases": {v.case: {"ok": v.ok, "position": v.position, "what": v.what, "tokens": len(a.token_ids)}
                      for v, a, _ in results}}
