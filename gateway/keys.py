"""The cache key: SHA-256 over RFC 8785 canonical JSON of the fingerprint and the resolved request.

Pure functions only. A request is first *resolved*: fields that cannot change the output are
dropped, omitted sampling parameters take the value the worker would fill in (its
generation_config, else vLLM's defaults), and values are normalised (``stop: "x"`` and
``stop: ["x"]`` are one thing). Anything unknown stays in the key, so a new parameter can never
make two different requests share an entry.

``n`` and ``max_tokens`` are not in the key: choice *i* of a seeded request is stored as choice 0
of the same request with seed + i (vLLM seeds its children that way), and a generation is stored
once and answers any ``max_tokens`` it covers (see ``reuse``).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

import rfc8785

from invariant.gateway.records import is_token_ids

KEY_SCHEMA = 1

# Fields that cannot change the tokens: transport, bookkeeping and per-request identities.
NON_OUTPUT_FIELDS = frozenset({
    "stream", "stream_options", "user", "request_id", "metadata", "store", "service_tier", "priority",
    "cache_salt",  # the gateway sets it per tenant (gateway/config.cache_salt); it changes no bits
})
# Consumed by the gateway itself.
GATEWAY_FIELDS = frozenset({"n", "max_tokens", "max_completion_tokens"})

# What vLLM uses when neither the request nor the model's generation_config sets a value.
VLLM_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}
# Parameters vLLM fills from generation_config when omitted (``default_sampling_params``).
GENERATION_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


class RequestError(ValueError):
    """A request the gateway cannot key; answered as an OpenAI-format 400."""


# vLLM's own bounds on ``seed`` (its protocol: int64); choice i is generated with seed + i.
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 63) - 1
# RFC 8785 numbers are IEEE doubles: integers past 2^53 have no exact canonical form (seeds are
# keyed as strings instead). Deeper JSON than this is refused rather than recursed into.
SAFE_INT = (1 << 53) - 1
MAX_DEPTH = 64


def _no_constants(name: str) -> Any:
    raise RequestError(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> Any:
    """A request body as JSON, strictly: NaN and infinities (which Python's parser takes) and
    nesting deep enough to exhaust the parser are refused as the client's error."""
    try:
        return json.loads(raw, parse_constant=_no_constants)
    except RequestError:
        raise
    except RecursionError:
        raise RequestError("The request body is nested too deeply.") from None
    except ValueError:
        raise RequestError("The request body is not valid JSON.") from None


def check_json(value: Any, where: str = "body", depth: int = 0) -> None:
    """Refuse, with the field named, what the key's canonical JSON cannot hold exactly: integers
    past 2^53, NaN and infinities, strings that are not Unicode (lone surrogates), nesting deeper
    than MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise RequestError(f"'{where}' is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        if abs(value) > SAFE_INT:
            raise RequestError(f"'{where}': integers beyond +-2^53 are not supported")
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise RequestError(f"'{where}': NaN and infinities are not JSON numbers")
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(f"'{where}' is not valid Unicode (a lone surrogate)") from None
    elif isinstance(value, Mapping):
        for k, v in value.items():
            check_json(k, where, depth + 1)
            check_json(v, f"{where}.{k}" if depth < 3 else where, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            check_json(v, where, depth + 1)
    else:
        raise RequestError(f"'{where}' holds a value JSON cannot carry")


@dataclass(frozen=True)
class Resolved:
    """A request as the worker will see it, split into what is keyed and what the gateway uses."""

    kind: str  # "completions" or "chat"
    model: str
    keyed: dict[str, Any]  # every output-affecting field, normalised (seed excluded: see key_for_choice)
    seed: int | None
    n: int
    max_tokens: int | None

    @property
    def greedy(self) -> bool:
        return self.keyed.get("temperature") == 0.0 or self.keyed.get("top_k") == 1

    @property
    def cacheable(self) -> bool:
        """Greedy or seeded sampling: outputs are a pure function of the request."""
        return self.greedy or self.seed is not None


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"'{name}' must be a number")
    return float(value)


# The fields the gateway itself reads, with the JSON types it accepts (vLLM checks the rest, and its
# 400s are passed through, never stored).
_BOOL_OR_NULL = ("stream", "return_token_ids", "ignore_eos", "echo")
_OBJECT_OR_NULL = ("stream_options",)


def _check_types(kind: str, body: Mapping[str, Any]) -> None:
    for name in _BOOL_OR_NULL:
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise RequestError(f"'{name}' must be true or false")
    for name in _OBJECT_OR_NULL:
        if body.get(name) is not None and not isinstance(body[name], Mapping):
            raise RequestError(f"'{name}' must be an object")
    prompt = body.get("prompt")
    if kind == "completions" and not isinstance(prompt, (str, list)):
        raise RequestError("'prompt' must be a string or a list of token ids")
    if kind == "chat" and isinstance(body.get("messages"), list) and not all(isinstance(m, Mapping) for m in body["messages"]):
        raise RequestError("each of 'messages' must be an object")
    logprobs = body.get("logprobs")
    if kind == "completions" and logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                                           or not 0 <= logprobs <= 20):
        raise RequestError("'logprobs' must be an integer from 0 to 20")
    if kind == "chat" and logprobs is not None and not isinstance(logprobs, bool):
        raise RequestError("'logprobs' must be true or false")
    if body.get("tools") is not None and not isinstance(body["tools"], list):
        raise RequestError("'tools' must be a list")


def resolve(kind: str, body: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> Resolved:
    """Resolve a request body into its keyed form. ``defaults`` are the worker's sampling defaults."""
    if kind not in ("completions", "chat"):
        raise ValueError(kind)
    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required")
    if kind == "completions" and "prompt" not in body:
        raise RequestError("'prompt' is required")
    _check_types(kind, body)
    prompt = body.get("prompt")
    if kind == "completions" and isinstance(prompt, list) and not is_token_ids(prompt):
        # A list of prompts is a batch: each prompt is its own request (and its own entry).
        raise RequestError("'prompt' must be one prompt (a string or a list of token ids); send one request per prompt")
    check_json({k: v for k, v in body.items() if k != "seed"})
    if kind == "chat" and not isinstance(body.get("messages"), list):
        raise RequestError("'messages' must be a list")
    if kind == "chat" and not body["messages"]:
        raise RequestError("'messages' must hold at least one message")  # OpenAI's rule; nothing to generate from

    keyed = {k: copy.deepcopy(v) for k, v in body.items()
             if k not in NON_OUTPUT_FIELDS and k not in GATEWAY_FIELDS and k != "seed"}
    for name, fallback in VLLM_DEFAULTS.items():
        if keyed.get(name) is None:
            configured = (defaults or {}).get(name) if name in GENERATION_CONFIG_FIELDS else None
            keyed[name] = configured if configured is not None else fallback
    for name in FLOAT_FIELDS:
        keyed[name] = _as_float(name, keyed[name])
    top_k = keyed["top_k"]
    if isinstance(top_k, bool) or not isinstance(top_k, (int, float)) or int(top_k) != top_k:
        raise RequestError("'top_k' must be an integer")
    keyed["top_k"] = 0 if int(top_k) in (-1, 0) else int(top_k)  # both mean "off" in vLLM
    stop = keyed.get("stop")
    if stop is None or stop == []:
        keyed.pop("stop", None)
    elif isinstance(stop, str):
        keyed["stop"] = [stop]
    if kind == "chat" and keyed.get("logprobs") is False:
        keyed.pop("logprobs")

    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 128:
        raise RequestError("'n' must be an integer from 1 to 128")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise RequestError("'max_tokens' must be a positive integer")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("'seed' must be an integer")
    if seed is not None and not (SEED_MIN <= seed and seed + n - 1 <= SEED_MAX):
        raise RequestError(f"'seed' (+ n - 1) must lie in the 64-bit signed range [{SEED_MIN}, {SEED_MAX}]")
    return Resolved(kind=kind, model=model, keyed=keyed, seed=seed, n=n, max_tokens=max_tokens)


def canonical(value: Any) -> bytes:
    """RFC 8785 (JCS) bytes: key order, whitespace and number spelling do not matter."""
    return rfc8785.dumps(value)


def key_for_choice(resolved: Resolved, fingerprint: str, choice: int, namespace: str) -> str:
    """The entry key of one choice. Greedy choices are all the same generation; seeded choice i
    is the generation of seed + i."""
    if resolved.greedy:
        seed = None
    elif resolved.seed is not None:
        seed = resolved.seed + choice
    else:
        raise ValueError("unseeded sampling has no key")
    if seed is not None and abs(seed) > SAFE_INT:
        seed = str(seed)  # exact; a JSON number past 2^53 is not (and never collides: a string)
    payload = {"schema": KEY_SCHEMA, "fingerprint": fingerprint, "kind": resolved.kind,
               "request": resolved.keyed, "seed": seed}
    digest = hashlib.sha256(canonical(payload)).hexdigest()
    # One hash tag per entry, so an entry's data, lock and stream stay in one Redis Cluster slot.
    return f"inv:v{KEY_SCHEMA}:{namespace}:{{{digest}}}"


def bypass_reason(resolved: Resolved, cache_control: str | None) -> str | None:
    """Why this request is not served from the cache, or None."""
    directives = {d.strip().lower() for d in (cache_control or "").split(",") if d.strip()}
    if "no-cache" in directives:
        return "no-cache requested"
    if not resolved.cacheable:
        return "sampling without a seed is not reproducible"
    return None


def store_allowed(cache_control: str | None) -> bool:
    directives = {d.strip().lower() for d in (cache_control or "").split(",") if d.strip()}
    return "no-store" not in directives
