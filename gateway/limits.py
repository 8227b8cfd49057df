"""Per-tenant rate limits: requests per minute, and tokens a tenant's requests may generate per minute."""

from __future__ import annotations

import time

from invariant.gateway.auth import Tenant


class _Buckets:
    """A token bucket per tenant, per gateway replica: ``rate`` a minute, bursts up to ``rate``."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, name: str, rate: int, amount: float) -> bool:
        now = time.monotonic()
        tokens, last = self._buckets.get(name, (float(rate), now))
        tokens = min(float(rate), tokens + (now - last) * rate / 60.0)
        if tokens < amount:
            self._buckets[name] = (tokens, now)
            return False
        self._buckets[name] = (tokens - amount, now)
        return True


class RateLimiter:
    def __init__(self) -> None:
        self._requests = _Buckets()
        self._tokens = _Buckets()

    def allow(self, tenant: Tenant) -> bool:
        """One request of ``tenant`` within its requests per minute."""
        return not tenant.rate_per_minute or self._requests.take(tenant.name, tenant.rate_per_minute, 1)

    def allow_tokens(self, tenant: Tenant, amount: int) -> bool:
        """A request that may generate ``amount`` tokens (n x max_tokens) within the tenant's tokens
        per minute; one larger than the whole budget never passes."""
        if not tenant.tokens_per_minute:
            return True
        return amount <= tenant.tokens_per_minute and self._tokens.take(tenant.name, tenant.tokens_per_minute, amount)
