"""Cache-policy defaults and values shared by the CRD (operator), the gateway's config and its keys."""

from __future__ import annotations

DEFAULT_TTL_SECONDS = 86400
# Whose requests share cache entries: each tenant its own (the default), or all tenants one.
SHARING_TENANT = "tenant"
SHARING_SHARED = "shared"
SHARING = (SHARING_TENANT, SHARING_SHARED)
DEFAULT_SHARING = SHARING_TENANT
