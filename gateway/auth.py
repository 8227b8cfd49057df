"""API keys, stored hashed, mapped to tenants.

The cache is namespaced per tenant by default: a shared exact cache is a timing side channel (a
fast answer tells one tenant what another asked). A model opts into sharing explicitly.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path


def hash_key(api_key: str) -> str:
    return "sha256:" + hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    rate_per_minute: int | None = None
    # What this key's requests may generate per minute, counted as n x max_tokens (the limit of the
    # gateway where max_tokens is absent): a request's cost to the workers, not its count.
    tokens_per_minute: int | None = None


class KeyStore:
    """``{"sha256:<hex of key>": {"tenant": NAME, "rate_per_minute": N, "tokens_per_minute": T}}``
    (both rates optional); None means auth is off."""

    def __init__(self, entries: dict[str, dict] | None):
        self.enabled = entries is not None
        self._entries = {h: Tenant(v["tenant"], v.get("rate_per_minute"), v.get("tokens_per_minute"))
                         for h, v in (entries or {}).items()}

    @classmethod
    def from_file(cls, path: str | None) -> "KeyStore":
        if not path:
            return cls(None)
        return cls(json.loads(Path(path).read_text()))

    def tenant_for(self, authorization: str | None) -> Tenant | None:
        if not self.enabled:
            return Tenant("default")
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        digest = hash_key(authorization[7:].strip())
        for stored, tenant in self._entries.items():
            if hmac.compare_digest(stored, digest):
                return tenant
        return None
