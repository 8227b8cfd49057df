"""Prometheus metrics of the gateway, in a registry of its own (several apps can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("invariant_gateway_requests", "Requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.cache = Counter("invariant_gateway_cache", "Cache outcomes (hit, miss, bypass, coalesced)",
                             ["outcome"], registry=self.registry)
        self.upstream_latency = Histogram("invariant_gateway_upstream_seconds", "Worker call latency",
                                          ["model"], registry=self.registry,
                                          buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.upstream_calls = Counter("invariant_gateway_upstream_calls", "Generations sent to workers",
                                      ["model", "outcome"], registry=self.registry)
        self.redis_errors = Counter("invariant_gateway_redis_errors", "Redis operations that failed or timed out",
                                    ["op"], registry=self.registry)
        self.rejected_entries = Counter("invariant_gateway_rejected_entries",
                                        "Entries and live events read from Redis and refused (seal: not sealed by this deployment's "
                                        "key, or for another key; record: sealed but not a record; live: a live event not "
                                        "sealed for its stream; live-replay: a sealed live event out of its turn)",
                                        ["reason"], registry=self.registry)
        self.verify = Counter("invariant_gateway_verify", "Replays of stored entries (match, mismatch)",
                              ["result"], registry=self.registry)
