"""The gateway's side of the operator interface: routes from DeterministicModel status."""

from __future__ import annotations

from invariant.gateway.config import GatewayConfig
from invariant.gateway.service import Gateway
from invariant.gateway.discovery import apply_routes, routes_from_objects
from invariant.gateway.server import GatewayConfigError, build_config
from invariant.operator.status import PodView, fold_status

import pytest


def dm(name, served, endpoints, sharing="tenant", namespace="default", created="2026-12-01T00:00:00Z"):
    return {"metadata": {"name": name, "namespace": namespace, "creationTimestamp": created},
            "spec": {"model": {"servedName": served}, "cache": {"ttlSeconds": 60, "sharing": sharing}},
            "status": {"endpoints": endpoints}}


def test_a_model_in_another_namespace_cannot_take_over_a_served_name():
    """Issue 14: discovery merged every namespace's DeterministicModels by served name, the last one's
    policy winning: a DM anywhere could add its workers behind a model and share its cache."""
    owner = dm("qwen", "qwen", [{"url": "http://10.0.0.1:8000"}], "tenant", "team-a", "2026-12-01T00:00:00Z")
    hijack = dm("evil", "qwen", [{"url": "http://10.6.6.6:8000"}], "shared", "intruder", "2026-12-02T00:00:00Z")
    for order in ([owner, hijack], [hijack, owner]):  # the list order the API server happens to give
        conflicts: list[str] = []
        models, policies = routes_from_objects(order, conflicts)
        assert models == {"qwen": ["http://10.0.0.1:8000"]} and policies["qwen"].sharing == "tenant"
        assert conflicts == ["intruder/evil claims `qwen`, which team-a/qwen serves: ignored"]


def test_routes_follow_operator_status():
    # the status the operator writes, folded by its own pure function
    status = fold_status(previous={}, generation=1, desired_replicas=2, pins="p", expected_fingerprint=None,
                         pods=[PodView("w1", "p", "10.0.0.1", 8000, True, "1"),
                               PodView("w2", "p", "10.0.0.2", 8000, True, "2")],
                         observed={"w1": "inv-aaaaaaaaaaaaaaaa", "w2": "inv-bbbbbbbbbbbbbbbb"}, now="t")
    models, policies = routes_from_objects([dm("q", "qwen", status["endpoints"], "shared"), dm("l", "llama", [])])
    assert models == {"qwen": ["http://10.0.0.1:8000"], "llama": []}  # the mismatching pod is not routed to
    assert policies["qwen"].sharing == "shared" and policies["qwen"].ttl_seconds == 60


def test_apply_routes_keeps_known_endpoints():
    gw = Gateway(GatewayConfig(models={"qwen": ["http://a:1"]}, redis_url="redis://127.0.0.1:1/0"))
    known = gw.upstreams.models["qwen"][0]
    known.healthy = True
    apply_routes(gw, {"qwen": ["http://a:1", "http://b:1"]}, {})
    assert gw.upstreams.models["qwen"][0] is known and len(gw.upstreams.models["qwen"]) == 2
    apply_routes(gw, {}, {})
    assert gw.upstreams.models == {}


def test_gateway_config_errors():
    with pytest.raises(GatewayConfigError, match="no models"):
        build_config(model_flags=[], redis_url=None, config_file=None, api_keys_file=None)
    with pytest.raises(GatewayConfigError, match="must look like NAME=http"):
        build_config(model_flags=["qwen"], redis_url=None, config_file=None, api_keys_file=None)
    cfg = build_config(model_flags=[], redis_url=None, config_file=None, api_keys_file=None, discover="kubernetes")
    assert cfg.models == {} and cfg.discover == "kubernetes"
