"""The operator's Prometheus metrics: replicas whose fingerprint drifted from their model's.

A drifted replica is already out of the endpoints and named in the DeterministicModel's status
(``FingerprintMismatch``); the metric is what pages someone. It lives in its own registry so the
operator exports only what it owns.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

METRICS_PORT_ENV = "INVARIANT_OPERATOR_METRICS_PORT"
REGISTRY = CollectorRegistry()
DRIFTED = Gauge("invariant_operator_drifted_replicas",
                "Replicas of the current pins whose worker reports another fingerprint than declared",
                ["namespace", "model"], registry=REGISTRY)
DRIFT_EVENTS = Counter("invariant_operator_drift_detected",
                       "Times a replica was newly seen reporting another fingerprint than declared",
                       ["namespace", "model"], registry=REGISTRY)
_seen: dict[tuple[str, str], set[str]] = {}


def drifted_pods(status: dict[str, Any]) -> list[str]:
    """The pods of a folded status whose fingerprint disagrees with the declared one (pure)."""
    return sorted(r["pod"] for r in status.get("replicas") or [] if r.get("matches") is False)


def record(namespace: str, model: str, pods: list[str]) -> None:
    key = (namespace, model)
    DRIFTED.labels(namespace, model).set(len(pods))
    new = set(pods) - _seen.get(key, set())
    if new:
        DRIFT_EVENTS.labels(namespace, model).inc(len(new))
    _seen[key] = set(pods)


def forget(namespace: str, model: str) -> None:
    _seen.pop((namespace, model), None)
    for metric in (DRIFTED, DRIFT_EVENTS):
        try:
            metric.remove(namespace, model)
        except KeyError:
            pass


def parse_port(raw: str | None) -> int | None:
    """``INVARIANT_OPERATOR_METRICS_PORT``: unset or empty serves no metrics."""
    if raw is None or not raw.strip():
        return None
    if not raw.strip().isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"{METRICS_PORT_ENV}={raw!r}: expected a TCP port number")
    return int(raw)


def serve(port: int, host: str = "0.0.0.0") -> Any:
    """Start /metrics in a thread; returns the server (``shutdown()`` it on cleanup)."""
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    return server
