"""The gateway's side of the operator interface: routes from DeterministicModel status."""

from __future__ import annotations

from invariant.gateway.config import GatewayConfig
from invariant.gateway.service import Gateway
from invariant.gateway.discovery import apply_routes, routes_from_objects
from invariant.gateway.server import GatewayConfigError, build_config
from invariant.operator.status import PodView, fold_status

import time

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


def test_discovery_scoped_to_namespaces_ignores_an_older_claim_elsewhere(tmp_path):
    """With the chart's watched namespaces, a DeterministicModel in another namespace is never read,
    even one older than ours that claims the same served name (it would own the name cluster-wide)."""
    from kubernetes import client, config

    from invariant.gateway.discovery import list_models
    from kube_emulator import EmulatorThread

    with EmulatorThread() as emu:
        config.load_kube_config(config_file=str(emu.write_kubeconfig(tmp_path / "kubeconfig")))
        api = client.CustomObjectsApi()
        for namespace, url in (("rogue", "http://rogue:8000"), ("models", "http://ours:8000")):
            api.create_namespaced_custom_object("invariant.dev", "v1alpha1", namespace, "deterministicmodels", {
                "apiVersion": "invariant.dev/v1alpha1", "kind": "DeterministicModel",
                "metadata": {"name": "qwen", "namespace": namespace},
                "spec": {"model": {"servedName": "qwen"}, "cache": {"sharing": "shared"} if namespace == "rogue" else {}}})
            api.patch_namespaced_custom_object_status("invariant.dev", "v1alpha1", namespace, "deterministicmodels",
                                                      "qwen", {"status": {"endpoints": [{"url": url}]}})
            time.sleep(1.1)  # creationTimestamp has one-second resolution: rogue is the older
        scoped, _ = routes_from_objects(list_models(api, ("models", "staging")))
        assert scoped == {"qwen": ["http://ours:8000"]}
        # control: listed cluster-wide, the older claim owns the name (what a ClusterRole would let it do)
        everywhere, policies = routes_from_objects(list_models(api, ()))
        assert everywhere == {"qwen": ["http://rogue:8000"]} and policies["qwen"].sharing == "shared"


@pytest.mark.parametrize("raw,expected", [("", ()), ("models", ("models",)), (" models, staging ,models", ("models", "staging"))])
def test_discovery_namespaces_setting(monkeypatch, raw, expected):
    monkeypatch.setenv("INVARIANT_GATEWAY_NAMESPACES", raw)
    cfg = build_config(model_flags=[], redis_url=None, config_file=None, api_keys_file=None, discover="kubernetes")
    assert cfg.discover_namespaces == expected


@pytest.mark.parametrize("raw", ["Models", "a/b", "-x", "x" * 64])
def test_a_bad_discovery_namespace_is_a_config_error(monkeypatch, raw):
    monkeypatch.setenv("INVARIANT_GATEWAY_NAMESPACES", raw)
    with pytest.raises(GatewayConfigError, match="INVARIANT_GATEWAY_NAMESPACES: .* is not a namespace name"):
        build_config(model_flags=[], redis_url=None, config_file=None, api_keys_file=None, discover="kubernetes")
