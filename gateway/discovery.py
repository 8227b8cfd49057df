"""Kubernetes discovery: route to what the operator publishes in DeterministicModel status.

The interface agreed with the operator: per ``spec.model.servedName`` (default: the object's
name), the worker URLs are ``status.endpoints[].url``, and ``spec.cache`` gives the TTL and the
sharing scope. The gateway reads them (list, every few seconds); it never imports the operator.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from invariant.gateway.config import ModelPolicy
from invariant.gateway.service import Gateway
from invariant.gateway.upstream import Endpoint
from invariant.contract import cache as contract_cache, crd

log = logging.getLogger("invariant.gateway")
GROUP, VERSION, PLURAL = crd.GROUP, crd.VERSION, crd.PLURAL


def routes_from_objects(items: list[dict[str, Any]]) -> tuple[dict[str, list[str]], dict[str, ModelPolicy]]:
    """(served name -> endpoint URLs, served name -> cache policy), pure."""
    models: dict[str, list[str]] = {}
    policies: dict[str, ModelPolicy] = {}
    for obj in items:
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        name = (spec.get("model") or {}).get("servedName") or obj["metadata"]["name"]
        urls = [e["url"] for e in status.get("endpoints") or [] if e.get("url")]
        models.setdefault(name, []).extend(urls)
        cache = spec.get("cache") or {}
        policies[name] = ModelPolicy(ttl_seconds=int(cache.get("ttlSeconds", contract_cache.DEFAULT_TTL_SECONDS)),
                                     sharing=cache.get("sharing", contract_cache.DEFAULT_SHARING))
    return models, policies


def apply_routes(gateway: Gateway, models: dict[str, list[str]], policies: dict[str, ModelPolicy]) -> None:
    """Replace the routing table, keeping the health state of endpoints that stay."""
    current = gateway.upstreams.models
    table = {}
    for name, urls in models.items():
        known = {ep.url: ep for ep in current.get(name, [])}
        table[name] = [known.get(u.rstrip("/")) or Endpoint(u.rstrip("/")) for u in dict.fromkeys(urls)]
    gateway.upstreams.models = table
    gateway.config.policies.update(policies)


async def watch_kubernetes(gateway: Gateway, interval: float = 5.0) -> None:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    api = client.CustomObjectsApi()
    while True:
        try:
            listing = await asyncio.to_thread(api.list_cluster_custom_object, GROUP, VERSION, PLURAL)
            models, policies = routes_from_objects(listing.get("items", []))
            apply_routes(gateway, models, policies)
            await gateway.upstreams.check_all()
        except Exception as exc:  # noqa: BLE001 - keep serving the last known table
            log.warning("DeterministicModel discovery failed: %s", exc)
        await asyncio.sleep(interval)
