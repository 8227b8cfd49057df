"""Each extension of kmock's emulator (tests/kube_emulator.py) does what the real API server does."""

from __future__ import annotations

import json

import httpx
import pytest

from kube_emulator import EmulatorThread

DM = "/apis/invariant.dev/v1alpha1/namespaces/default/deterministicmodels"
DEPLOY = "/apis/apps/v1/namespaces/default/deployments"
MERGE = {"Content-Type": "application/merge-patch+json"}
APPLY = {"Content-Type": "application/apply-patch+yaml"}


@pytest.fixture()
def api():
    with EmulatorThread() as emu, httpx.Client(base_url=emu.url, timeout=10) as http:
        yield http


def create_dm(api, name="a", **extra):
    body = {"apiVersion": "invariant.dev/v1alpha1", "kind": "DeterministicModel", "metadata": {"name": name},
            "spec": {"replicas": 1}, **extra}
    resp = api.post(DM, json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_create_fills_metadata(api):
    obj = create_dm(api)
    meta = obj["metadata"]
    assert meta["uid"] and meta["resourceVersion"] and meta["generation"] == 1 and meta["creationTimestamp"]
    assert create_dm(api, "b")["metadata"]["uid"] != meta["uid"]


def test_resource_version_moves_and_stale_writes_conflict(api):
    rv = create_dm(api)["metadata"]["resourceVersion"]
    newer = api.patch(f"{DM}/a", json={"spec": {"replicas": 2}}, headers=MERGE).json()["metadata"]["resourceVersion"]
    assert int(newer) > int(rv)
    stale = api.patch(f"{DM}/a", json={"metadata": {"resourceVersion": rv}, "spec": {"replicas": 3}}, headers=MERGE)
    assert stale.status_code == 409 and stale.json()["reason"] == "Conflict"
    assert api.get(f"{DM}/a").json()["spec"]["replicas"] == 2
    fresh = api.patch(f"{DM}/a", json={"metadata": {"resourceVersion": newer}, "spec": {"replicas": 3}}, headers=MERGE)
    assert fresh.status_code == 200 and fresh.json()["spec"]["replicas"] == 3


def test_status_subresource(api):
    assert "status" not in create_dm(api, status={"phase": "Forged"})
    main = api.patch(f"{DM}/a", json={"status": {"phase": "Forged"}, "spec": {"replicas": 2}}, headers=MERGE).json()
    assert "status" not in main and main["metadata"]["generation"] == 2
    sub = api.patch(f"{DM}/a/status", json={"status": {"phase": "Ready"}, "spec": {"replicas": 9}}, headers=MERGE).json()
    assert sub["status"] == {"phase": "Ready"} and sub["spec"]["replicas"] == 2
    assert sub["metadata"]["generation"] == 2  # status writes never move the generation
    same = api.patch(f"{DM}/a", json={"spec": {"replicas": 2}}, headers=MERGE).json()
    assert same["metadata"]["generation"] == 2  # nor does a no-op spec write


def test_put_replaces(api):
    obj = create_dm(api)
    obj["spec"] = {"other": True}
    resp = api.put(f"{DM}/a", json=obj)
    assert resp.status_code == 200 and api.get(f"{DM}/a").json()["spec"] == {"other": True}


def test_server_side_apply_creates_then_updates(api):
    manifest = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "default"},
                "spec": {"replicas": 1}}
    created = api.patch(f"{DEPLOY}/d", content=json.dumps(manifest), headers=APPLY)
    assert created.status_code == 200 and created.json()["metadata"]["uid"]
    manifest["spec"]["replicas"] = 4
    updated = api.patch(f"{DEPLOY}/d", content=json.dumps(manifest), headers=APPLY).json()
    assert updated["spec"]["replicas"] == 4 and updated["metadata"]["uid"] == created.json()["metadata"]["uid"]
    assert api.patch(f"{DEPLOY}/missing", json={"spec": {}}, headers=MERGE).status_code == 404


def test_finalizers_hold_deletion_until_removed(api):
    create_dm(api, metadata={"name": "a", "finalizers": ["invariant.dev/finalizer"]})
    assert api.delete(f"{DM}/a").status_code == 200
    held = api.get(f"{DM}/a").json()
    assert held["metadata"]["deletionTimestamp"]
    api.patch(f"{DM}/a", json={"metadata": {"finalizers": None}}, headers=MERGE)
    assert api.get(f"{DM}/a").status_code == 404


def test_owner_reference_cascade(api):
    owner = create_dm(api)
    ref = [{"apiVersion": "invariant.dev/v1alpha1", "kind": "DeterministicModel", "name": "a",
            "uid": owner["metadata"]["uid"], "controller": True}]
    dep = api.post(DEPLOY, json={"apiVersion": "apps/v1", "kind": "Deployment",
                                 "metadata": {"name": "d", "ownerReferences": ref}, "spec": {}}).json()
    pod_ref = [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "d", "uid": dep["metadata"]["uid"]}]
    api.post("/api/v1/namespaces/default/pods", json={"apiVersion": "v1", "kind": "Pod",
                                                      "metadata": {"name": "p", "ownerReferences": pod_ref}})
    api.post(DEPLOY, json={"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "bystander"}})
    api.delete(f"{DM}/a")
    assert api.get(f"{DEPLOY}/d").status_code == 404
    assert api.get("/api/v1/namespaces/default/pods/p").status_code == 404  # cascades chain
    assert api.get(f"{DEPLOY}/bystander").status_code == 200


def test_label_selectors_on_lists(api):
    for name, labels in [("x", {"app": "w", "tier": "a"}), ("y", {"app": "w"}), ("z", {"app": "other"})]:
        api.post(DEPLOY, json={"apiVersion": "apps/v1", "kind": "Deployment",
                               "metadata": {"name": name, "labels": labels}})

    def names(selector):
        items = api.get(DEPLOY, params={"labelSelector": selector}).json()["items"]
        return sorted(i["metadata"]["name"] for i in items)

    assert names("app=w") == ["x", "y"]
    assert names("app=w,tier=a") == ["x"]
    assert names("app!=w") == ["z"]
    assert names("tier") == ["x"]


def test_json_patch_as_kopf_sends_it(api):
    rv = create_dm(api)["metadata"]["resourceVersion"]
    patch = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
             {"op": "add", "path": "/metadata/finalizers", "value": ["invariant.dev/finalizer"]}]
    headers = {"Content-Type": "application/json-patch+json"}
    done = api.patch(f"{DM}/a", content=json.dumps(patch), headers=headers)
    assert done.status_code == 200 and done.json()["metadata"]["finalizers"] == ["invariant.dev/finalizer"]
    again = api.patch(f"{DM}/a", content=json.dumps(patch), headers=headers)  # the rv test now fails
    assert again.status_code == 409
    removed = api.patch(f"{DM}/a", content=json.dumps([{"op": "remove", "path": "/metadata/finalizers"}]),
                        headers=headers).json()
    assert "finalizers" not in removed["metadata"] and removed["spec"] == {"replicas": 1}
