"""Render a DeterministicModel's children as pure functions of its validated spec.

Same spec, same manifests, byte for byte: applying them again is a no-op (server-side apply),
and a change of any pin changes the pod template (its ``invariant.dev/pins`` label), which is
a rollout to a new fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from invariant.operator.spec import API_GROUP, API_VERSION, KIND, ModelSpecView
from invariant.contract import routes
from invariant.contract.engine_args import GPU_GEMM_DEFAULT
from invariant.contract.worker_argv import worker_argv

WORKER_PORT = 8000
MODEL_MOUNT = "/model"
LABEL_MODEL = f"{API_GROUP}/model"
LABEL_PINS = f"{API_GROUP}/pins"
# Set by the operator on a worker pod once its reported fingerprint matches the declared one, and
# removed when it drifts: the worker Service selects it, so only verified pods receive its traffic.
LABEL_SERVING = f"{API_GROUP}/serving"
ANNOTATION_PORT = f"{API_GROUP}/worker-port"
FIELD_MANAGER = "invariant-operator"

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
DRIVER_LABELS = ("nvidia.com/cuda.driver-version.major", "nvidia.com/cuda.driver-version.minor",
                 "nvidia.com/cuda.driver-version.revision")


def pins_hash(view: ModelSpecView) -> str:
    """16 hex digits over the pins and the model source: what decides the bits, as declared."""
    m = view.model
    payload = {"numerics": view.numerics.pins(),
               "model": {"hf": [m.hf_repo, m.hf_revision], "pvc": [m.pvc_claim, m.pvc_path]}}
    raw = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def worker_name(view: ModelSpecView) -> str:
    return f"{view.name}-worker"


def selector_labels(view: ModelSpecView) -> dict[str, str]:
    return {"app.kubernetes.io/name": "invariant-worker", LABEL_MODEL: view.name}


def common_labels(view: ModelSpecView) -> dict[str, str]:
    return {**selector_labels(view), "app.kubernetes.io/managed-by": "invariant-operator",
            "app.kubernetes.io/part-of": "invariant"}


def owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    meta = owner["metadata"]
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def node_affinity(view: ModelSpecView) -> dict[str, Any]:
    """Require the pinned GPU product and driver, as NVIDIA GPU feature discovery labels them."""
    parts = view.numerics.driver_version.split(".")
    expressions = [{"key": GPU_PRODUCT_LABEL, "operator": "In", "values": [view.numerics.gpu_product]}]
    expressions += [{"key": key, "operator": "In", "values": [value]} for key, value in zip(DRIVER_LABELS, parts)]
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": expressions}]}}}


def worker_args(view: ModelSpecView) -> list[str]:
    n = view.numerics
    return worker_argv(MODEL_MOUNT if view.model.hf_repo else f"{MODEL_MOUNT}/{view.model.pvc_path}",
                       host="0.0.0.0", port=WORKER_PORT, dtype=n.dtype, served_model_name=view.model.served_name,
                       tensor_parallel_size=n.tensor_parallel_size, expect_gpu_product=n.gpu_product,
                       expect_driver_version=n.driver_version, expect_fingerprint=n.expected_fingerprint or None,
                       gpu_gemm=n.gemm if n.gemm != GPU_GEMM_DEFAULT else None, engine_args=view.engine_args)


def _resources(view: ModelSpecView) -> dict[str, Any]:
    gpus = str(view.numerics.tensor_parallel_size)
    res = {k: dict(v) for k, v in view.resources.items()}
    res.setdefault("limits", {})["nvidia.com/gpu"] = gpus
    res.setdefault("requests", {})["nvidia.com/gpu"] = gpus
    return res


# Pod Security Standard "restricted", and more: no root, no privilege escalation, no capabilities,
# the runtime's seccomp profile, a read-only root filesystem (vLLM's and Triton's caches go to a
# scratch emptyDir), and no service-account token (a worker never calls the Kubernetes API).
WORKER_UID = 10001
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": WORKER_UID, "runAsGroup": WORKER_UID, "fsGroup": WORKER_UID,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
SCRATCH_MOUNT = {"name": "scratch", "mountPath": "/tmp"}
SCRATCH_ENV = [{"name": "HOME", "value": "/tmp"}, {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"}]


def _volumes(view: ModelSpecView) -> tuple[list[dict], list[dict], list[dict]]:
    """(volumes, worker mounts, init containers) for the model source."""
    if view.model.hf_repo:
        init = [{
            "name": "fetch-model",
            "image": view.numerics.image,
            "command": ["hf", "download", view.model.hf_repo, "--revision", view.model.hf_revision,
                        "--local-dir", MODEL_MOUNT],
            "env": SCRATCH_ENV,
            "volumeMounts": [{"name": "model", "mountPath": MODEL_MOUNT}, SCRATCH_MOUNT],
            "securityContext": CONTAINER_SECURITY,
        }]
        return [{"name": "model", "emptyDir": {}}], [{"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}], init
    volumes = [{"name": "model", "persistentVolumeClaim": {"claimName": view.model.pvc_claim, "readOnly": True}}]
    return volumes, [{"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}], []


def render_deployment(view: ModelSpecView, owner: dict[str, Any]) -> dict[str, Any]:
    pins = pins_hash(view)
    volumes, mounts, init = _volumes(view)
    probe = {"httpGet": {"path": routes.READY, "port": "http"}, "periodSeconds": 5, "failureThreshold": 3}
    container = {
        "name": "worker",
        "image": view.numerics.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["invariant"],
        "args": worker_args(view),
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "VLLM_NO_USAGE_STATS", "value": "1"}, *SCRATCH_ENV],
        "ports": [{"name": "http", "containerPort": WORKER_PORT, "protocol": "TCP"}],
        "startupProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "failureThreshold": 90},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 15, "failureThreshold": 4},
        "readinessProbe": probe,
        "resources": _resources(view),
        "volumeMounts": mounts + [{"name": "shm", "mountPath": "/dev/shm"}, SCRATCH_MOUNT],
        "securityContext": CONTAINER_SECURITY,
    }
    pod_spec: dict[str, Any] = {
        "affinity": node_affinity(view),
        "automountServiceAccountToken": False,
        "securityContext": POD_SECURITY,
        "containers": [container],
        "volumes": volumes + [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
                              {"name": "scratch", "emptyDir": {"sizeLimit": "32Gi"}}],
        "terminationGracePeriodSeconds": 60,
    }
    if init:
        pod_spec["initContainers"] = init
    if view.node_selector:
        pod_spec["nodeSelector"] = dict(view.node_selector)
    if view.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in view.tolerations]
    labels = common_labels(view)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": worker_name(view), "namespace": view.namespace, "labels": labels,
                     "ownerReferences": [owner_reference(owner)]},
        "spec": {
            "replicas": view.replicas,
            "selector": {"matchLabels": selector_labels(view)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {**labels, LABEL_PINS: pins},
                             "annotations": {ANNOTATION_PORT: str(WORKER_PORT)}},
                "spec": pod_spec,
            },
        },
    }


def render_service(view: ModelSpecView, owner: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": worker_name(view), "namespace": view.namespace, "labels": common_labels(view),
                     "ownerReferences": [owner_reference(owner)]},
        "spec": {"type": "ClusterIP", "selector": {**selector_labels(view), LABEL_SERVING: "true"},
                 "ports": [{"name": "http", "port": WORKER_PORT, "targetPort": "http", "protocol": "TCP"}]},
    }


# Where a worker pod may connect: cluster DNS, and for a model fetched from the Hub, HTTPS to public
# addresses only (no private range: nothing inside the cluster). A worker needs nothing else (its
# engine runs offline), and one that is taken over cannot reach Redis, the API server or a tenant.
DNS_EGRESS = {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                      "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
              "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
PRIVATE_RANGES = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10"]
HUB_EGRESS = {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": PRIVATE_RANGES}}],
              "ports": [{"port": 443, "protocol": "TCP"}]}


def worker_egress(view: ModelSpecView, extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The egress rules of a model's worker pods (``extra``: the chart's ``networkPolicy.workerTo``)."""
    rules = [DNS_EGRESS] + ([HUB_EGRESS] if view.model.hf_repo else [])
    return [json.loads(json.dumps(r)) for r in rules + list(extra)]


def render_network_policy(view: ModelSpecView, owner: dict[str, Any], ingress_from: list[dict[str, Any]],
                          egress_to: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Only the named peers (the chart passes its gateway and this operator, plus any the user adds)
    reach a worker's port: a worker serves whoever reaches it, and the cache trusts what it serves.
    Egress is closed but for ``worker_egress``."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": worker_name(view), "namespace": view.namespace, "labels": common_labels(view),
                     "ownerReferences": [owner_reference(owner)]},
        "spec": {"podSelector": {"matchLabels": selector_labels(view)}, "policyTypes": ["Ingress", "Egress"],
                 "ingress": [{"from": [dict(peer) for peer in ingress_from],
                              "ports": [{"port": WORKER_PORT, "protocol": "TCP"}]}],
                 "egress": worker_egress(view, egress_to or [])},
    }


def render_children(view: ModelSpecView, owner: dict[str, Any],
                    ingress_from: list[dict[str, Any]] | None = None,
                    egress_to: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The Deployment and Service; with ``ingress_from`` (peers; [] admits none) a NetworkPolicy too."""
    children = [render_deployment(view, owner), render_service(view, owner)]
    if ingress_from is not None:
        children.append(render_network_policy(view, owner, ingress_from, egress_to))
    return children


PEER_KEYS = {"podSelector", "namespaceSelector", "ipBlock"}  # what a NetworkPolicy peer may hold


def _is_peer(p: Any) -> bool:
    return isinstance(p, dict) and bool(p) and set(p) <= PEER_KEYS


def _json_setting(name: str, raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{name} is not JSON: {exc}") from None


def parse_ingress_from(raw: str | None) -> list[dict[str, Any]] | None:
    """``INVARIANT_OPERATOR_WORKER_INGRESS``: a JSON list of NetworkPolicy peers, or unset (no policy).
    ValueError, in one line, for anything else (the operator refuses to start on it)."""
    if raw is None or not raw.strip():
        return None
    peers = _json_setting("INVARIANT_OPERATOR_WORKER_INGRESS", raw)
    if not isinstance(peers, list) or not all(_is_peer(p) for p in peers):
        raise ValueError("INVARIANT_OPERATOR_WORKER_INGRESS must be a JSON list of NetworkPolicy peers "
                         "(objects of podSelector, namespaceSelector, ipBlock)")
    return peers


def parse_egress_to(raw: str | None) -> list[dict[str, Any]]:
    """``INVARIANT_OPERATOR_WORKER_EGRESS``: a JSON list of NetworkPolicy egress rules (objects of
    ``to`` and ``ports``) added to the workers' own; unset: none. ValueError, in one line, otherwise."""
    if raw is None or not raw.strip():
        return []
    rules = _json_setting("INVARIANT_OPERATOR_WORKER_EGRESS", raw)
    ok = isinstance(rules, list) and all(
        isinstance(r, dict) and r and set(r) <= {"to", "ports"}
        and isinstance(r.get("to", []), list) and isinstance(r.get("ports", []), list)
        and all(_is_peer(p) for p in r.get("to", []))
        and all(isinstance(p, dict) and p for p in r.get("ports", []))
        for r in rules)
    if not ok:
        raise ValueError("INVARIANT_OPERATOR_WORKER_EGRESS must be a JSON list of NetworkPolicy egress rules "
                         "(objects of to: [peers], ports: [ports])")
    return rules
