"""The operator's edge to the Kubernetes API (official client) and to the workers (HTTP)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import httpx

from invariant.operator.render import FIELD_MANAGER
from invariant.contract import routes

log = logging.getLogger("invariant.operator")


def load_config() -> None:
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        # Read KUBECONFIG now: the client's own default is frozen when it is first imported.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))


def apply(manifest: dict[str, Any]) -> None:
    """Server-side apply, forcing our field manager: idempotent, and no read-modify-write race."""
    from kubernetes import client

    meta = manifest["metadata"]
    body = manifest  # the client serialises +yaml bodies as JSON, which is valid YAML
    kwargs = dict(field_manager=FIELD_MANAGER, force=True, _content_type="application/apply-patch+yaml")
    if manifest["kind"] == "Deployment":
        client.AppsV1Api().patch_namespaced_deployment(meta["name"], meta["namespace"], body, **kwargs)
    elif manifest["kind"] == "Service":
        client.CoreV1Api().patch_namespaced_service(meta["name"], meta["namespace"], body, **kwargs)
    elif manifest["kind"] == "NetworkPolicy":
        client.NetworkingV1Api().patch_namespaced_network_policy(meta["name"], meta["namespace"], body, **kwargs)
    else:  # pragma: no cover - render_children() produces only these kinds
        raise ValueError(f"cannot apply kind {manifest['kind']}")


def label_pod(namespace: str, name: str, label: str, value: str | None) -> None:
    """Set (or, with None, remove) one label of a pod: a merge patch of that label alone."""
    from kubernetes import client

    client.CoreV1Api().patch_namespaced_pod(name, namespace, {"metadata": {"labels": {label: value}}})


def list_pods(namespace: str, selector: str) -> list[dict[str, Any]]:
    from kubernetes import client

    api = client.CoreV1Api()
    pods = api.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
    return json.loads(pods.data).get("items", [])


def fetch_fingerprint(url: str | None, timeout: float) -> str | None:
    """The fingerprint a worker reports at /invariant/fingerprint, or None if it cannot be read."""
    if not url:
        return None
    try:
        resp = httpx.get(f"{url}{routes.FINGERPRINT}", timeout=timeout)
        resp.raise_for_status()
        value = resp.json().get(routes.F_FINGERPRINT)
        return value if isinstance(value, str) else None
    except (httpx.HTTPError, ValueError) as exc:
        log.info("fingerprint of %s unreadable: %s", url, exc)
        return None
