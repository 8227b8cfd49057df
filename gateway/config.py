"""The gateway's configuration: its routes to workers, per-model cache policy, limits."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from invariant.contract import cache as cache_policy
from invariant.contract import routes
from invariant.gateway.auth import KeyStore, Tenant

# The OpenAI routes the gateway serves (and forwards to workers), by request kind.
PATHS = {"completions": routes.COMPLETIONS, "chat": routes.CHAT_COMPLETIONS}


@dataclass
class ModelPolicy:
    ttl_seconds: int = cache_policy.DEFAULT_TTL_SECONDS
    sharing: str = cache_policy.DEFAULT_SHARING  # or SHARING_SHARED: one namespace for all tenants (opt-in)


@dataclass
class GatewayConfig:
    models: dict[str, list[str]]
    redis_url: str
    redis_ca_file: str | None = None  # rediss://: the CA that signed Redis's certificate
    redis_cert_file: str | None = None  # rediss:// with mutual TLS: our client certificate
    redis_key_file: str | None = None  # ... and its key
    policies: dict[str, ModelPolicy] = field(default_factory=dict)
    api_keys: KeyStore = field(default_factory=lambda: KeyStore(None))
    redis_timeout: float = 0.25
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 32768
    max_total_tokens: int = 131072  # n x max_tokens of one request
    entry_key: bytes = b""  # HMAC key of Redis entries (gateway/entries.py); empty: checksum only
    lock_ttl_ms: int = 600_000
    check_interval: float = 5.0
    discover: str | None = None  # "kubernetes": routes from DeterministicModel status
    discover_namespaces: tuple[str, ...] = ()  # where discovery lists them; empty: every namespace
    verify_sample: float = 0.0  # share of hits replayed in the background and compared bit for bit
    # In-process tiers, each bounded in bytes (gateway/lru.py): the copy of Redis entries and the
    # hot responses. 256 MiB each by default; the entry bounds (4096 each) stay as well.
    l1_bytes: int = 256 << 20
    hot_bytes: int = 256 << 20


def cache_salt(policy: ModelPolicy, tenant: Tenant) -> str | None:
    """The engine-side twin of ``cache_namespace``: vLLM keeps prefix-cache blocks of different salts
    apart. None for a shared model (one cache for all, by the operator's choice)."""
    if policy.sharing == cache_policy.SHARING_SHARED:
        return None
    return "inv-tenant-" + hashlib.sha256(tenant.name.encode()).hexdigest()[:32]


def cache_namespace(policy: ModelPolicy, tenant: Tenant) -> str:
    """Per tenant unless the model opted into sharing (a shared exact cache is a timing side channel)."""
    return "shared" if policy.sharing == cache_policy.SHARING_SHARED else f"t:{tenant.name}"
