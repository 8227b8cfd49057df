"""One request as the gateway handles it, shaped once: the parsed body, its resolution, the model's
policy and the tenant's namespace, the workers that may answer it, and the flags read from the body.

Everything after the request's parsing takes a ``Call`` instead of threading the body, the resolved
request, the candidates and the flags through each method separately.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from invariant.gateway.auth import Tenant
from invariant.gateway.config import ModelPolicy, cache_namespace, cache_salt
from invariant.gateway.keys import Resolved, key_for_choice, store_allowed
from invariant.gateway.upstream import Endpoint


class CallError(Exception):
    """A request that cannot be shaped into a call: answered as an OpenAI-format error."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type_, self.code, self.param = status, message, type_, code, param


@dataclass(frozen=True)
class Call:
    kind: str
    body: dict[str, Any]
    resolved: Resolved
    tenant: Tenant
    policy: ModelPolicy
    candidates: tuple[Endpoint, ...]
    cache_control: str | None = None
    # The numerics this call is keyed on: the first healthy worker's when the call was shaped. A
    # snapshot, since health checks update endpoints in place while the call runs: every worker
    # answer is held against it, and one stamped otherwise is never stored under this call's keys.
    keyed_fingerprint: str = ""

    @property
    def model(self) -> str:
        return self.resolved.model

    @property
    def fingerprint(self) -> str:
        return self.keyed_fingerprint

    @property
    def namespace(self) -> str:
        return cache_namespace(self.policy, self.tenant)

    @property
    def cache_salt(self) -> str | None:
        """vLLM's per-request ``cache_salt`` for this call: per tenant unless the model shares its cache
        (a prefix-cache hit shows in the time to first token: another tenant's prompts would leak)."""
        return cache_salt(self.policy, self.tenant)

    @property
    def store_allowed(self) -> bool:
        return store_allowed(self.cache_control)

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def want_logprobs(self) -> bool:
        """As vLLM reads it: completions' ``logprobs: 0`` asks for the sampled tokens' logprobs
        (no alternatives); only an absent, null or false ``logprobs`` asks for none."""
        value = self.body.get("logprobs")
        return value is not None and value is not False

    @property
    def want_token_ids(self) -> bool:
        return bool(self.body.get("return_token_ids"))

    @property
    def include_usage(self) -> bool:
        return bool((self.body.get("stream_options") or {}).get("include_usage"))

    @property
    def live_capable(self) -> bool:
        """Streamed, one choice, and no tool calls (whose streamed deltas are fragments, not tokens)."""
        return self.stream and self.resolved.n == 1 and not self.body.get("tools") and not self.body.get("functions")

    def key(self, choice: int) -> str:
        return key_for_choice(self.resolved, self.fingerprint, choice, self.namespace)

    def with_body(self, **fields: Any) -> "Call":
        """The same call with some body fields replaced (a replay to an entry's own length)."""
        return dataclasses.replace(self, body=dict(self.body, **fields))
