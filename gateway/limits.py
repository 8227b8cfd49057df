"""Per-tenant request rate limits."""

from __future__ import annotations

import time

from invariant.gateway.auth import Tenant


class RateLimiter:
    """Token bucket per tenant, per gateway replica."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, tenant: Tenant) -> bool:
        if not tenant.rate_per_minute:
            return True
        now = time.monotonic()
        rate = tenant.rate_per_minute / 60.0
        tokens, last = self._buckets.get(tenant.name, (float(tenant.rate_per_minute), now))
        tokens = min(float(tenant.rate_per_minute), tokens + (now - last) * rate)
        if tokens < 1:
            self._buckets[tenant.name] = (tokens, now)
            return False
        self._buckets[tenant.name] = (tokens - 1, now)
        return True
