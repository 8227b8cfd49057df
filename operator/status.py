"""Fold pods and their workers' reported fingerprints into a DeterministicModel status (pure).

The declared fingerprint is ``spec.numerics.expectedFingerprint`` when the user pinned one;
otherwise it is learned from the oldest ready pod of the current pins and kept until the pins
change. A pod of the current pins that reports another fingerprint is a mismatch: reported and
kept out of the endpoints. Pods of older pins (a rollout in progress) keep serving under their own
fingerprint: the gateway keys on it, so old and new never share cache entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from invariant.operator.render import ANNOTATION_PORT, LABEL_PINS, WORKER_PORT

CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "FingerprintMismatch")


@dataclass(frozen=True)
class PodView:
    name: str
    pins: str
    ip: str | None
    port: int
    ready: bool
    created: str

    @property
    def url(self) -> str | None:
        return f"http://{self.ip}:{self.port}" if self.ip else None


def pod_view(pod: Mapping[str, Any]) -> PodView:
    meta, status = pod.get("metadata", {}), pod.get("status", {}) or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    port = int((meta.get("annotations") or {}).get(ANNOTATION_PORT, WORKER_PORT))
    return PodView(name=meta["name"], pins=(meta.get("labels") or {}).get(LABEL_PINS, ""),
                   ip=status.get("podIP"), port=port, ready=ready and not meta.get("deletionTimestamp"),
                   created=meta.get("creationTimestamp") or "")


def _condition(previous: Mapping[str, Any], ctype: str, ok: bool, reason: str, message: str, now: str) -> dict:
    status = "True" if ok else "False"
    old = next((c for c in previous.get("conditions") or [] if c.get("type") == ctype), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status and old.get("lastTransitionTime") else now
    return {"type": ctype, "status": status, "reason": reason, "message": message, "lastTransitionTime": since}


def invalid_status(previous: Mapping[str, Any], errors: list[str], generation: int, now: str) -> dict[str, Any]:
    """An invalid edit is not rolled out, so the workers of the last valid spec keep running: their
    endpoints stay published (gateways route by them; issue 14: clearing them took a serving model
    off every gateway for a typo)."""
    message = "; ".join(errors)
    return {
        "phase": "Invalid",
        "observedGeneration": generation,
        "readyReplicas": int(previous.get("readyReplicas") or 0),
        "conditions": [
            _condition(previous, "Ready", False, "InvalidSpec", message, now),
            _condition(previous, "Progressing", False, "InvalidSpec", "nothing is rolled out for an invalid spec", now),
            _condition(previous, "Degraded", True, "InvalidSpec", message, now),
            _condition(previous, "FingerprintMismatch", False, "InvalidSpec", "", now),
        ],
        "endpoints": list(previous.get("endpoints") or []),
        "replicas": list(previous.get("replicas") or []),
    }


def fold_status(
    *,
    previous: Mapping[str, Any],
    generation: int,
    desired_replicas: int,
    pins: str,
    expected_fingerprint: str | None,
    pods: list[PodView],
    observed: Mapping[str, str | None],
    now: str,
) -> dict[str, Any]:
    """``observed`` maps pod name to the fingerprint its worker reported (None: could not be read)."""
    current = sorted((p for p in pods if p.pins == pins), key=lambda p: (p.created, p.name))
    older = [p for p in pods if p.pins != pins]

    declared = expected_fingerprint
    if declared is None and previous.get("pinsHash") == pins:
        declared = previous.get("declaredFingerprint")
    if declared is None:
        declared = next((observed[p.name] for p in current if p.ready and observed.get(p.name)), None)

    replicas, endpoints, mismatched, unreadable = [], [], [], []
    for pod in current + sorted(older, key=lambda p: p.name):
        fp = observed.get(pod.name) if pod.ready else None
        is_current = pod.pins == pins
        matches = fp is not None and (fp == declared if is_current else True)
        replicas.append({"pod": pod.name, "pins": pod.pins, "ready": pod.ready, "fingerprint": fp,
                         "matches": bool(matches) if fp is not None else None})
        if pod.ready and fp is None:
            unreadable.append(pod.name)
        if is_current and fp is not None and fp != declared:
            mismatched.append(f"{pod.name} reports {fp}")
        if matches and pod.url:
            endpoints.append({"pod": pod.name, "url": pod.url, "fingerprint": fp, "current": is_current})

    ready_current = sum(1 for e in endpoints if e["current"])
    rolling = bool(older) or ready_current < desired_replicas
    ready = ready_current >= desired_replicas and not older
    degraded_reasons = []
    if mismatched:
        degraded_reasons.append(f"{len(mismatched)} replica(s) disagree with the declared fingerprint")
    if unreadable:
        degraded_reasons.append(f"fingerprint unreadable from {', '.join(sorted(unreadable))}")

    if mismatched:
        phase = "Degraded"
    elif ready:
        phase = "Ready"
    elif ready_current == 0 and not older:
        phase = "Pending"
    else:
        phase = "Progressing"

    conditions = [
        _condition(previous, "Ready", ready, "ReplicasReady" if ready else "ReplicasNotReady",
                   f"{ready_current}/{desired_replicas} replicas ready with fingerprint {declared}", now),
        _condition(previous, "Progressing", rolling, "RollingOut" if older else ("Scaling" if rolling else "Stable"),
                   f"{len(older)} pod(s) of older pins still serving" if older else
                   f"{ready_current}/{desired_replicas} replicas ready", now),
        _condition(previous, "Degraded", bool(degraded_reasons), "ReplicaProblems" if degraded_reasons else "Healthy",
                   "; ".join(degraded_reasons), now),
        _condition(previous, "FingerprintMismatch", bool(mismatched),
                   "ObservedDiffers" if mismatched else "AllMatch",
                   (f"declared {declared}; " + "; ".join(mismatched)) if mismatched else "", now),
    ]
    return {
        "phase": phase,
        "observedGeneration": generation,
        "pinsHash": pins,
        "declaredFingerprint": declared,
        "readyReplicas": ready_current,
        "replicas": replicas,
        "endpoints": endpoints,
        "conditions": conditions,
    }


def serving_label_changes(pods: list[Mapping[str, Any]], status: Mapping[str, Any], label: str
                          ) -> dict[str, str | None]:
    """Pod name -> the serving label's new value ("true", or None to remove it), for the pods whose
    label disagrees with the folded status: a pod serves while it is one of the endpoints (ready,
    and its fingerprint matches), pure."""
    serving = {e["pod"] for e in status.get("endpoints") or []}
    changes: dict[str, str | None] = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        has = (meta.get("labels") or {}).get(label) == "true"
        want = meta.get("name") in serving
        if has != want:
            changes[meta["name"]] = "true" if want else None
    return changes
