"""kopf handlers: thin I/O around the pure parts (spec, render, status).

- create / update / resume: validate, render, server-side apply the children; an invalid spec is
  reported as a status condition, never half-applied.
- a timer folds the worker pods and the fingerprints their workers report into status.
- delete: the children go with their owner (ownerReferences); the handler records it.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import kopf

from invariant.operator import kube, metrics
from invariant.operator.render import (LABEL_MODEL, LABEL_SERVING, parse_egress_to, parse_ingress_from, pins_hash,
                                      render_children)
from invariant.operator.spec import API_GROUP, API_VERSION, PLURAL, SpecError, parse_spec
from invariant.operator.status import fold_status, invalid_status, pod_view, serving_label_changes

STATUS_INTERVAL = float(os.environ.get("INVARIANT_OPERATOR_STATUS_INTERVAL", "10"))
FINGERPRINT_TIMEOUT = float(os.environ.get("INVARIANT_OPERATOR_FINGERPRINT_TIMEOUT", "3"))
# Who may reach the workers (NetworkPolicy peers, set by the chart); None: no policy is rendered.
# Read at start-up (configure), not at import, so a bad value stops the operator with its reason.
WORKER_INGRESS: list[dict[str, Any]] | None = None
WORKER_EGRESS: list[dict[str, Any]] = []  # egress rules added to the workers' own (DNS; the Hub's HTTPS)
_metrics_server: Any = None
log = logging.getLogger("invariant.operator")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration")
    # Without these, a watch that the network silently drops stalls forever.
    settings.watching.server_timeout = int(os.environ.get("INVARIANT_OPERATOR_WATCH_TIMEOUT", "300"))
    settings.watching.client_timeout = settings.watching.server_timeout + 30
    settings.posting.level = logging.WARNING
    global WORKER_INGRESS, WORKER_EGRESS, _metrics_server
    try:
        WORKER_INGRESS = parse_ingress_from(os.environ.get("INVARIANT_OPERATOR_WORKER_INGRESS"))
        WORKER_EGRESS = parse_egress_to(os.environ.get("INVARIANT_OPERATOR_WORKER_EGRESS"))
        port = metrics.parse_port(os.environ.get(metrics.METRICS_PORT_ENV))
    except ValueError as exc:
        raise kopf.PermanentError(str(exc)) from None
    if port is not None and _metrics_server is None:
        _metrics_server = metrics.serve(port)
    kube.load_config()


@kopf.on.cleanup()
def stop_metrics(**_: Any) -> None:
    global _metrics_server
    if _metrics_server is not None:
        _metrics_server.shutdown()
        _metrics_server.server_close()
        _metrics_server = None


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account first, then $KUBECONFIG (read now, not at import time)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL)
@kopf.on.resume(API_GROUP, API_VERSION, PLURAL)
def reconcile(body: kopf.Body, spec: kopf.Spec, name: str, namespace: str, meta: kopf.Meta, status: kopf.Status,
              patch: kopf.Patch, **_: Any) -> None:
    try:
        view = parse_spec(name, namespace, dict(spec))
    except SpecError as exc:
        log.warning("DeterministicModel %s/%s refused: %s", namespace, name, exc)
        kopf.warn(body, reason="InvalidSpec", message=str(exc))
        patch.status.update(invalid_status(dict(status), exc.errors, meta.get("generation", 0), _now()))
        return
    owner = {"metadata": {"name": name, "uid": meta["uid"]}}
    for manifest in render_children(view, owner, WORKER_INGRESS, WORKER_EGRESS):
        kube.apply(manifest)
    patch.status["observedGeneration"] = meta.get("generation", 0)
    if status.get("phase") in (None, "Invalid"):
        patch.status["phase"] = "Progressing"


@kopf.timer(API_GROUP, API_VERSION, PLURAL, interval=STATUS_INTERVAL, initial_delay=min(1.0, STATUS_INTERVAL))
def fold(spec: kopf.Spec, name: str, namespace: str, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch,
         **_: Any) -> None:
    try:
        view = parse_spec(name, namespace, dict(spec))
    except SpecError:
        return  # reconcile() already reported it
    raw_pods = kube.list_pods(namespace, f"{LABEL_MODEL}={name}")
    pods = [pod_view(p) for p in raw_pods]
    observed = {p.name: kube.fetch_fingerprint(p.url, FINGERPRINT_TIMEOUT) for p in pods if p.ready and p.url}
    new = fold_status(previous=dict(status), generation=meta.get("generation", 0), desired_replicas=view.replicas,
                      pins=pins_hash(view), expected_fingerprint=view.numerics.expected_fingerprint, pods=pods,
                      observed=observed, now=_now())
    metrics.record(namespace, name, metrics.drifted_pods(new))
    # Only verified pods stay behind the worker Service: a drifted or unverified one is taken out.
    for pod, value in serving_label_changes(raw_pods, new, LABEL_SERVING).items():
        try:
            kube.label_pod(namespace, pod, LABEL_SERVING, value)
        except Exception as exc:  # noqa: BLE001 - a pod gone meanwhile; the next fold retries
            log.info("could not label pod %s/%s: %s", namespace, pod, exc)
    current = {k: status.get(k) for k in new}
    if current != new:
        patch.status.update(new)


@kopf.on.delete(API_GROUP, API_VERSION, PLURAL)
def deleted(name: str, namespace: str, **_: Any) -> None:
    # Deployment and Service carry ownerReferences: Kubernetes' garbage collector removes them.
    metrics.forget(namespace, name)
    log.info("DeterministicModel %s/%s deleted; its workers go with it", namespace, name)
