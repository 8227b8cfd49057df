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


def _served_name(obj: dict[str, Any]) -> str:
    return ((obj.get("spec") or {}).get("model") or {}).get("servedName") or obj["metadata"]["name"]


def _age(obj: dict[str, Any]) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return meta.get("creationTimestamp") or "~", meta.get("namespace") or "", meta["name"]


def routes_from_objects(items: list[dict[str, Any]], conflicts: list[str] | None = None
                        ) -> tuple[dict[str, list[str]], dict[str, ModelPolicy]]:
    """(served name -> endpoint URLs, served name -> cache policy), pure.

    A served name belongs to one DeterministicModel: the oldest that claims it (then by namespace
    and name). Merging claimants would let a DeterministicModel in any namespace put its own workers
    behind another team's model and switch its cache to ``shared`` (issue 14); the others are
    ignored, and named in ``conflicts`` when a list is given."""
    owners: dict[str, dict[str, Any]] = {}
    for obj in sorted(items, key=_age):
        name = _served_name(obj)
        if name in owners:
            if conflicts is not None:
                first, meta = owners[name]["metadata"], obj["metadata"]
                conflicts.append(f"{meta.get('namespace')}/{meta['name']} claims `{name}`, which "
                                 f"{first.get('namespace')}/{first['name']} serves: ignored")
            continue
        owners[name] = obj
    models: dict[str, list[str]] = {}
    policies: dict[str, ModelPolicy] = {}
    for name, obj in owners.items():
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        models[name] = [e["url"] for e in status.get("endpoints") or [] if e.get("url")]
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


NAMESPACES_ENV = "INVARIANT_GATEWAY_NAMESPACES"


def parse_namespaces(raw: str | None) -> tuple[str, ...]:
    """``INVARIANT_GATEWAY_NAMESPACES`` (comma-separated; the chart sets the operator's watched
    namespaces): empty means every namespace. With names, the gateway's RBAC is a Role in each, so a
    cluster-wide list would be refused, and a DeterministicModel elsewhere is never routed to."""
    names = tuple(dict.fromkeys(n.strip() for n in (raw or "").split(",") if n.strip()))
    for name in names:
        if not crd.DNS_LABEL.fullmatch(name):
            raise ValueError(f"{NAMESPACES_ENV}: {name!r} is not a namespace name")
    return names


def list_models(api: Any, namespaces: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every DeterministicModel the gateway may route to: cluster-wide, or in the named namespaces."""
    if not namespaces:
        return api.list_cluster_custom_object(GROUP, VERSION, PLURAL).get("items", [])
    items: list[dict[str, Any]] = []
    for namespace in namespaces:
        items += api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL).get("items", [])
    return items


async def watch_kubernetes(gateway: Gateway, interval: float = 5.0) -> None:
    from kubernetes import client, config

    namespaces = gateway.config.discover_namespaces

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    api = client.CustomObjectsApi()
    while True:
        try:
            items = await asyncio.to_thread(list_models, api, namespaces)
            conflicts: list[str] = []
            models, policies = routes_from_objects(items, conflicts)
            for line in conflicts:
                log.warning("DeterministicModel %s", line)
            apply_routes(gateway, models, policies)
            await gateway.upstreams.check_all()
        except Exception as exc:  # noqa: BLE001 - keep serving the last known table
            log.warning("DeterministicModel discovery failed: %s", exc)
        await asyncio.sleep(interval)
