"""A Kubernetes API for tests: kmock's KubernetesEmulator plus the semantics our operator relies on.

kmock keeps objects in memory and serves them over HTTP (lists, watches, fetch, merge-patch,
finalizers on delete). We add, each with a test in test_kube_emulator.py:

- object metadata on create: ``uid``, ``resourceVersion``, ``generation``, ``creationTimestamp``;
- ``resourceVersion`` bumped on every write, and a stale one answered with 409 Conflict;
- the status subresource: writes to ``/status`` change only status, writes to the object never do,
  and ``generation`` moves only when the spec changes;
- ``PUT`` as a full replacement;
- server-side apply (``application/apply-patch+yaml``) creating a missing object;
- ownerReference cascade: dependents of a removed owner are deleted (or marked, if finalized);
- equality label selectors on lists.

It runs in its own thread with its own event loop, so synchronous clients (the kubernetes client,
kubectl, KopfRunner's operator thread) can use it like a real API server.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import threading
import uuid
from pathlib import Path
from typing import Any

import attrs
import kmock
import yaml
from kmock._internal import enums, rendering

APPLY_PATCH = "application/apply-patch+yaml"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif labels.get(term) is None:
            return False
    return True


def _as_replacement(old: Any, new: Any) -> Any:
    """A merge patch that turns ``old`` into ``new`` (keys absent from ``new`` become None, i.e. removed)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {**{k: None for k in old if k not in new},
                **{k: _as_replacement(old.get(k), v) if k in old else v for k, v in new.items()}}
    return new


def _apply_json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 (add, replace, remove, test) on a copy; kopf uses it for finalizers."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        parent = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent.setdefault(part, {})
        last = parts[-1]
        if op["op"] == "test":
            current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if current != op["value"]:
                raise kmock.KubernetesError(status=409, reason="Conflict",
                                            message=f"the test of {op['path']} failed: the object has been modified")
        elif op["op"] in ("add", "replace"):
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                if op["op"] == "add":
                    parent.insert(index, op["value"])
                else:
                    parent[index] = op["value"]
            else:
                parent[last] = op["value"]
        elif op["op"] == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                parent.pop(last, None)
        else:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=f"unsupported op {op['op']}")
    return doc


@attrs.define(kw_only=True)
class ClusterEmulator(kmock.KubernetesEmulator):
    _versions: itertools.count = attrs.field(factory=lambda: itertools.count(1), init=False)
    _write_lock: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)

    # --- helpers -----------------------------------------------------------------------------
    def _has_status_subresource(self, resource: kmock.resource) -> bool:
        for known in self.resources:
            if known == resource:
                return "status" in self.resources[known].subresources
        return False

    def _find(self, resource, namespace, name):
        key = (resource, namespace, name)
        if key in self.objects and not self.objects[key].deleted:
            return self.objects[key]
        return None

    def _live(self):
        return [((res, ns, name), obj) for (res, ns, name), obj in self.objects.items() if not obj.deleted]

    # --- request rewriting --------------------------------------------------------------------
    def _prepare_create(self, request: rendering.Request) -> rendering.Request:
        data = copy.deepcopy(request.data or {})
        meta = data.setdefault("metadata", {})
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        meta.update(uid=str(uuid.uuid4()), resourceVersion=str(next(self._versions)), generation=1,
                    creationTimestamp=_now())
        if self._has_status_subresource(request.resource):
            data.pop("status", None)
        return attrs.evolve(request, data=data)

    def _prepare_update(self, request: rendering.Request, current, *, replace: bool) -> rendering.Request:
        if isinstance(request.data, list):  # JSON Patch: apply it, then write the result as a replacement
            patched = _apply_json_patch(current.raw, request.data)
            patched.setdefault("metadata", {})["resourceVersion"] = current.get("metadata", {}).get("resourceVersion")
            request = attrs.evolve(request, data=patched)
            replace = True
        data = copy.deepcopy(request.data or {})
        meta_in = data.get("metadata") or {}
        cur_meta = current.get("metadata", {})
        if meta_in.get("resourceVersion") and meta_in["resourceVersion"] != cur_meta.get("resourceVersion"):
            raise kmock.KubernetesError(
                status=409, reason="Conflict",
                message=f"Operation cannot be fulfilled on {request.resource.plural} \"{request.name}\": the object "
                        "has been modified; please apply your changes to the latest version and try again")
        status_sub = self._has_status_subresource(request.resource)
        if request.subresource == "status":
            data = {"status": data.get("status")}
        elif status_sub:
            data.pop("status", None)
        if replace and request.subresource is None:
            for key, old in current.raw.items():
                if key != "status":
                    data[key] = _as_replacement(old, data.get(key))
        meta = data.setdefault("metadata", {})
        for fixed in ("uid", "creationTimestamp", "generation"):
            meta.pop(fixed, None)
        meta["resourceVersion"] = str(next(self._versions))
        if request.subresource is None and "spec" in data:
            merged = kmock.Object(current.raw)
            merged.patch({"spec": data["spec"]})
            if merged.raw.get("spec") != current.raw.get("spec"):
                meta["generation"] = int(cur_meta.get("generation", 1)) + 1
        return attrs.evolve(request, data=data, action=enums.action.UPDATE)

    # --- the handler --------------------------------------------------------------------------
    async def _handle(self, request: rendering.Request):
        if request.resource is None or request.action in (enums.action.LIST, enums.action.WATCH,
                                                          enums.action.FETCH):
            return await super()._handle(request)
        is_put = request.method == enums.method.PUT and request.name is not None
        if request.action is None and not is_put:
            return await super()._handle(request)
        original = request
        async with self._write_lock:
            try:
                if request.action == enums.action.CREATE:
                    request = self._prepare_create(request)
                elif request.action == enums.action.UPDATE or is_put:
                    current = self._find(request.resource, request.namespace, request.name)
                    content_type = request.headers.get("Content-Type", "")
                    if current is None and content_type.startswith(APPLY_PATCH) and request.subresource is None:
                        data = copy.deepcopy(request.data or {})
                        data.setdefault("metadata", {}).update(name=request.name, namespace=request.namespace)
                        request = self._prepare_create(attrs.evolve(request, data=data, action=enums.action.CREATE))
                    elif current is not None:
                        request = self._prepare_update(request, current, replace=is_put)
                    else:
                        request = attrs.evolve(request, action=enums.action.UPDATE)
            except kmock.KubernetesError as exc:
                return await self._render_error(exc)
            if request is not original:
                # kmock matches reactions against the requests it recorded: record the rewrite.
                self._requests[self._requests.index(original)] = request
            response = await super()._handle(request)
            await self._collect_garbage()
            return response

    async def _collect_garbage(self) -> None:
        """Delete dependents whose owners are all gone, until nothing changes (cascades chain)."""
        while True:
            async with self._lock:
                live = self._live()
                uids = {obj.get("metadata", {}).get("uid") for _, obj in live}
                orphans = []
                for key, obj in live:
                    owners = obj.get("metadata", {}).get("ownerReferences") or []
                    if owners and not any(o.get("uid") in uids for o in owners):
                        orphans.append((key, obj))
                for (resource, _, _), obj in orphans:
                    meta = obj.get("metadata", {})
                    if meta.get("finalizers"):
                        if not meta.get("deletionTimestamp"):
                            obj.patch({"metadata": {"deletionTimestamp": _now()}})
                            await self._buses[resource].put({"type": "MODIFIED", "object": obj.raw})
                        continue
                    raw = obj.raw
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": raw})
            if not any(not obj.get("metadata", {}).get("finalizers") for _, obj in orphans):
                return

    async def _serve_list(self, request: rendering.Request):
        result = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            result["items"] = [i for i in result["items"]
                               if _selector_matches(selector, (i.get("metadata") or {}).get("labels") or {})]
        return result


ALL_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
# Resources the operator touches, as API discovery should list them: (path, kind, short names).
WORKLOAD_RESOURCES = [
    ("invariant.dev/v1alpha1/deterministicmodels", "DeterministicModel", {"dm"}),
    ("apps/v1/deployments", "Deployment", set()),
    ("v1/services", "Service", set()),
    ("v1/pods", "Pod", set()),
    ("networking.k8s.io/v1/networkpolicies", "NetworkPolicy", set()),
]


def register_resources(emulator: ClusterEmulator) -> None:
    for path, kind, shortnames in WORKLOAD_RESOURCES:
        emulator.resources[path] = kmock.ResourceInfo(kind=kind, singular=kind.lower(), namespaced=True,
                                                      shortnames=shortnames, verbs=ALL_VERBS, subresources={"status"})
    # kopf watches CRDs to notice new resources; a real cluster always serves them.
    emulator.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False,
        verbs=ALL_VERBS - {"update"}, subresources={"status"})
    # kopf waits for the namespaces resource to be discoverable, even when it watches cluster-wide.
    emulator.resources["v1/namespaces"] = kmock.ResourceInfo(
        kind="Namespace", singular="namespace", namespaced=False, verbs={"get", "list", "watch"})
    emulator.resources["v1/events"] = kmock.ResourceInfo(
        kind="Event", singular="event", namespaced=True, verbs={"create", "get", "list", "patch"})


class EmulatorThread:
    """Run a ClusterEmulator on a loopback port in a background thread."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.emulator: ClusterEmulator | None = None
        self.url: str = ""
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - surfaced to the starting thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with ClusterEmulator() as emulator, kmock.Server(emulator) as server:
            register_resources(emulator)
            self.emulator = emulator
            self.url = f"http://{server.host}:{server.port}"
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> "EmulatorThread":
        self._thread.start()
        self._ready.wait(30)
        if self._error:
            raise self._error
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def call(self, coro_fn, *args):
        """Run a coroutine function on the emulator's loop from another thread."""
        return asyncio.run_coroutine_threadsafe(coro_fn(*args), self._loop).result(30)

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test-token"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester",
                                                          "namespace": "default"}}],
        }))
        return path
