"""Spec -> manifests, as pure functions: table-driven, refusals included."""

from __future__ import annotations

import json

import pytest

from invariant.operator.render import (ANNOTATION_PORT, LABEL_PINS, pins_hash, render_children,
                                       render_deployment, render_service)
from invariant.operator.spec import SpecError, parse_spec
from operator_cases import DELETE, DIGEST, IMAGE, dm_spec

OWNER = {"metadata": {"name": "qwen", "uid": "1234-uid"}}


def render(spec, name="qwen"):
    return render_children(parse_spec(name, "models", spec), OWNER)


def test_deployment_carries_every_pin():
    dep, svc = render(dm_spec())
    pod = dep["spec"]["template"]["spec"]
    worker = pod["containers"][0]
    assert worker["image"] == IMAGE and dep["spec"]["replicas"] == 2
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {e["key"]: e["values"] for e in terms[0]["matchExpressions"]} == {
        "nvidia.com/gpu.product": ["NVIDIA-H100-80GB-HBM3"],
        "nvidia.com/cuda.driver-version.major": ["580"],
        "nvidia.com/cuda.driver-version.minor": ["95"],
        "nvidia.com/cuda.driver-version.revision": ["05"],
    }
    args = worker["args"]
    for flag, value in [("--dtype", "bfloat16"), ("--tensor-parallel-size", "1"), ("--served-model-name", "qwen3-8b"),
                        ("--expect-gpu-product", "NVIDIA-H100-80GB-HBM3"), ("--expect-driver-version", "580.95.05")]:
        assert args[args.index(flag) + 1] == value
    assert "--engine-arg=--max-model-len=8192" in args
    assert worker["readinessProbe"]["httpGet"]["path"] == "/invariant/ready"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    init = pod["initContainers"][0]
    assert init["command"][:3] == ["hf", "download", "Qwen/Qwen3-8B"] and "0123456789abcdef0123456789abcdef01234567" in init["command"]
    assert dep["metadata"]["ownerReferences"] == [{"apiVersion": "invariant.dev/v1alpha1", "kind": "DeterministicModel",
                                                   "name": "qwen", "uid": "1234-uid", "controller": True,
                                                   "blockOwnerDeletion": True}]
    assert dep["spec"]["template"]["metadata"]["annotations"][ANNOTATION_PORT] == "8000"
    # the Service takes the Deployment's pods the operator verified (serving label), no others
    assert svc["spec"]["selector"] == {**dep["spec"]["selector"]["matchLabels"], "invariant.dev/serving": "true"}
    assert svc["metadata"]["ownerReferences"] == dep["metadata"]["ownerReferences"]


def test_rendering_is_a_pure_function():
    assert json.dumps(render(dm_spec()), sort_keys=True) == json.dumps(render(dm_spec()), sort_keys=True)


@pytest.mark.parametrize("change", [
    {"numerics.image": f"registry.example.com/invariant/worker@sha256:{'cd' * 32}"},
    {"numerics.gpuProduct": "NVIDIA-H200"},
    {"numerics.driverVersion": "580.95.06"},
    {"numerics.dtype": "float16"},
    {"numerics.tensorParallelSize": 2},
    {"model.huggingFace.revision": "f" * 40},
    {"numerics.gemm": "invariant"},
    {"numerics.gemm": "vllm"},  # upstream's Triton matmul, named: other bits than the default's cuBLASLt
])
def test_every_pin_change_is_a_rollout(change):
    before = render(dm_spec())[0]["spec"]["template"]["metadata"]["labels"][LABEL_PINS]
    after = render(dm_spec(**change))[0]["spec"]["template"]["metadata"]["labels"][LABEL_PINS]
    assert before != after


@pytest.mark.parametrize("change", [{"replicas": 5}, {"cache.ttlSeconds": 10}, {"engineArgs": ["--max-num-seqs=8"]},
                                    {"numerics.gemm": "auto"}])  # the default, as the API server fills it in
def test_non_pins_do_not_change_the_pins_hash(change):
    assert pins_hash(parse_spec("q", "ns", dm_spec())) == pins_hash(parse_spec("q", "ns", dm_spec(**change)))


def test_the_gemm_choice_reaches_the_worker():
    args = render(dm_spec(**{"numerics.gemm": "invariant"}))[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--gpu-gemm") + 1] == "invariant"
    assert "--gpu-gemm" not in render(dm_spec())[0]["spec"]["template"]["spec"]["containers"][0]["args"]


def test_pvc_source_mounts_the_claim_read_only():
    spec = dm_spec(**{"model.huggingFace": DELETE, "model.pvc": {"claimName": "models", "path": "qwen3-8b"}})
    dep = render_deployment(parse_spec("qwen", "models", spec), OWNER)
    pod = dep["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "/model/qwen3-8b"


def test_node_selector_tolerations_resources_and_expected_fingerprint():
    spec = dm_spec(**{"nodeSelector": {"pool": "h100"},
                      "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                      "resources": {"limits": {"memory": "64Gi"}}, "numerics.tensorParallelSize": 2,
                      "numerics.expectedFingerprint": "inv-0123456789abcdef"})
    pod = render_deployment(parse_spec("qwen", "models", spec), OWNER)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["containers"][0]["resources"]["limits"] == {"memory": "64Gi", "nvidia.com/gpu": "2"}
    args = pod["containers"][0]["args"]
    assert args[args.index("--expect-fingerprint") + 1] == "inv-0123456789abcdef"


REFUSALS = [
    ({"numerics.image": "registry.example.com/invariant/worker:0.1.0"},
     "spec.numerics.image 'registry.example.com/invariant/worker:0.1.0' must be pinned by digest (repo@sha256:...): a tag can move"),
    ({"numerics.image": "registry.example.com/invariant/worker@sha256:abc"},
     "spec.numerics.image 'registry.example.com/invariant/worker@sha256:abc' has a malformed digest: expected @sha256: and 64 hex digits"),
    ({"engineArgs": ["--speculative-config={}"]},
     "engine arg --speculative-config is refused: speculative decoding breaks batch invariance"),
    ({"engineArgs": ["--kv-cache-dtype=fp8"]}, "engine arg --kv-cache-dtype is refused: a KV-cache dtype changes the numerics"),
    ({"engineArgs": ["--dtype=float16"]}, "engine arg --dtype is refused: the dtype is a pin (spec.numerics.dtype, or the worker's --dtype)"),
    ({"engineArgs": ["--frobnicate"]}, "engine arg --frobnicate is not in the allow-list (--enable-chunked-prefill, "
     "--enable-prefix-caching, --gpu-memory-utilization, --kv-cache-memory-bytes, --max-model-len, --max-num-batched-tokens, --max-num-seqs, "
     "--no-enable-prefix-caching, --swap-space)"),
    ({"engineArgs": ["--max-model-len"]}, "engine arg --max-model-len needs a value: write --max-model-len=VALUE"),
    ({"engineArgs": ["--max-num-seqs=lots"]}, "engine arg --max-num-seqs needs an integer, got 'lots'"),
    ({"engineArgs": ["--kv-cache-memory-bytes=8GiB"]}, "engine arg --kv-cache-memory-bytes needs an integer, got '8GiB'"),
    ({"engineArgs": ["--kv-cache-memory-bytes=-1"]}, "engine arg --kv-cache-memory-bytes must be positive, got -1"),
    ({"replicas": -1}, "spec.replicas -1 must be an integer from 0 to 64"),
    ({"replicas": "two"}, "spec.replicas 'two' must be an integer from 0 to 64"),
    ({"replicas": 65}, "spec.replicas 65 must be an integer from 0 to 64"),
    ({"model.huggingFace.revision": "main"},
     "spec.model.huggingFace.revision 'main' must be a 40-hex commit hash: a branch or tag can move"),
    ({"model.pvc": {"claimName": "models", "path": "x"}}, "spec.model needs exactly one of huggingFace or pvc"),
    ({"numerics.driverVersion": "latest"}, "spec.numerics.driverVersion 'latest' must look like 580.95.05"),
    ({"numerics.dtype": "int8"}, "spec.numerics.dtype 'int8' must be one of bfloat16, float16, float32"),
    ({"numerics.tensorParallelSize": 0}, "spec.numerics.tensorParallelSize 0 must be an integer from 1 to 8"),
    ({"numerics.gemm": "cublas"}, "spec.numerics.gemm 'cublas' must be one of auto, cublaslt, vllm, invariant"),
    ({"numerics.expectedFingerprint": "vllm-0.32.0"},
     "spec.numerics.expectedFingerprint 'vllm-0.32.0' must look like inv- and 16 hex digits"),
    ({"cache.sharing": "everyone"}, "spec.cache.sharing 'everyone' must be one of tenant, shared"),
]


@pytest.mark.parametrize("change,message", REFUSALS, ids=[m[:40] for _, m in REFUSALS])
def test_refusals(change, message):
    with pytest.raises(SpecError) as err:
        parse_spec("qwen", "models", dm_spec(**change))
    assert err.value.errors == [message]


def test_all_problems_are_reported_at_once():
    with pytest.raises(SpecError) as err:
        parse_spec("Bad_Name", "ns", dm_spec(**{"replicas": -1, "numerics.image": "w:1"}))
    assert len(err.value.errors) == 3


def test_service_only_depends_on_name():
    svc = render_service(parse_spec("qwen", "models", dm_spec()), OWNER)
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert DIGEST not in json.dumps(svc)


def test_the_rendered_worker_command_is_one_the_worker_accepts():
    """The pod's args parse with the image's CLI into the options the spec asked for."""
    from invariant.cli import _worker_options, build_parser

    spec = dm_spec(**{"numerics.gemm": "invariant", "numerics.expectedFingerprint": "inv-0123456789abcdef"})
    args = build_parser().parse_args(render(spec)[0]["spec"]["template"]["spec"]["containers"][0]["args"])
    options = _worker_options(args)
    assert (options.gpu_gemm, options.expect_fingerprint, options.served_model_name) == (
        "invariant", "inv-0123456789abcdef", "qwen3-8b")
    assert options.extra_vllm_args == ("--max-model-len=8192",)


@pytest.mark.parametrize("source", ["huggingFace", "pvc"])
def test_worker_pods_meet_the_restricted_pod_security_standard(source):
    """Issue 14: worker pods ran as root with a writable root filesystem, capabilities kept, no seccomp
    profile and a service-account token mounted. Now the restricted profile (tests/pod_security.py),
    a read-only root with a scratch emptyDir for the caches, and no token."""
    from pod_security import violations

    spec = dm_spec() if source == "huggingFace" else dm_spec(
        **{"model.huggingFace": DELETE, "model.pvc": {"claimName": "models", "path": "qwen3-8b"}})
    pod = render_deployment(parse_spec("qwen", "models", spec), OWNER)["spec"]["template"]["spec"]
    assert violations(pod) == []
    assert pod["automountServiceAccountToken"] is False
    assert (source == "huggingFace") == bool(pod.get("initContainers"))
    for c in pod["containers"] + pod.get("initContainers", []):
        assert {"name": "HOME", "value": "/tmp"} in c["env"]
        assert {"name": "scratch", "mountPath": "/tmp"} in c["volumeMounts"]


GATEWAY_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "invariant"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/instance": "rel",
                                                "app.kubernetes.io/component": "gateway"}}}


def test_with_ingress_peers_only_they_reach_the_workers_port():
    view = parse_spec("qwen", "models", dm_spec())
    assert [c["kind"] for c in render_children(view, OWNER)] == ["Deployment", "Service"]  # no peers: no policy
    children = render_children(view, OWNER, [GATEWAY_PEER])
    policy = children[-1]
    assert policy["kind"] == "NetworkPolicy" and policy["metadata"]["namespace"] == "models"
    assert policy["metadata"]["ownerReferences"][0]["uid"] == OWNER["metadata"]["uid"]
    deployment = children[0]
    # the policy selects exactly the worker pods of this model
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert policy["spec"]["podSelector"] == {"matchLabels": deployment["spec"]["selector"]["matchLabels"]}
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["ingress"] == [{"from": [GATEWAY_PEER], "ports": [{"port": 8000, "protocol": "TCP"}]}]
    assert render_children(view, OWNER, [])[-1]["spec"]["ingress"][0]["from"] == []  # [] admits none


KUBE_DNS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}


def test_workers_connect_to_dns_only_and_to_the_hub_over_https_when_they_fetch_from_it():
    """A worker pod taken over must not reach Redis, the API server or another tenant's pods: its
    egress is cluster DNS, plus HTTPS to public addresses for a model its init container downloads."""
    import ipaddress

    import kubernetes_validate

    pvc = parse_spec("qwen", "models", dm_spec(**{"model.huggingFace": DELETE,
                                                  "model.pvc": {"claimName": "models", "path": "q"}}))
    egress = render_children(pvc, OWNER, [GATEWAY_PEER])[-1]["spec"]["egress"]
    assert egress == [{"to": [KUBE_DNS], "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}]
    hub = parse_spec("qwen", "models", dm_spec())
    mirror = {"to": [{"podSelector": {"matchLabels": {"app": "hf-mirror"}}}], "ports": [{"port": 8080}]}
    policy = render_children(hub, OWNER, [GATEWAY_PEER], [mirror])[-1]
    dns, https, extra = policy["spec"]["egress"]
    assert https["ports"] == [{"port": 443, "protocol": "TCP"}] and extra == mirror
    block = https["to"][0]["ipBlock"]
    public = ipaddress.ip_network(block["cidr"])
    excluded = [ipaddress.ip_network(c) for c in block["except"]]
    # the cluster's own ranges (pods, services, the API server, cloud metadata) are all excluded
    for inside in ["10.96.0.1", "172.20.3.4", "192.168.1.10", "169.254.169.254", "100.64.0.5"]:
        assert any(ipaddress.ip_address(inside) in net for net in excluded), inside
    assert ipaddress.ip_address("18.239.50.80") in public and not any(  # a public address (the Hub's CDN)
        ipaddress.ip_address("18.239.50.80") in net for net in excluded)
    kubernetes_validate.validate(policy, "1.35", strict=True)
    # the mirror rule is a copy: rendering twice never shares or grows it
    assert render_children(hub, OWNER, [GATEWAY_PEER], [mirror])[-1]["spec"]["egress"] == policy["spec"]["egress"]


@pytest.mark.parametrize("setting,raw,message", [
    ("ingress", "{not json", "is not JSON"),
    ("ingress", '{"podSelector": {}}', "must be a JSON list"),
    ("ingress", '[{"podSelector": {}, "ports": []}]', "must be a JSON list"),
    ("ingress", "[{}]", "must be a JSON list"),
    ("ingress", '["gateway"]', "must be a JSON list"),
    ("egress", "{not json", "is not JSON"),
    ("egress", '{"to": []}', "must be a JSON list"),
    ("egress", '[{"to": [], "from": []}]', "must be a JSON list"),
    ("egress", '[{"to": [{"service": "x"}]}]', "must be a JSON list"),
    ("egress", '[{"to": "everyone"}]', "must be a JSON list"),
    ("egress", "[{}]", "must be a JSON list"),
])
def test_bad_worker_network_settings_are_refused_in_one_line(setting, raw, message):
    from invariant.operator.render import parse_egress_to, parse_ingress_from

    parse = parse_ingress_from if setting == "ingress" else parse_egress_to
    with pytest.raises(ValueError) as err:
        parse(raw)
    assert message in str(err.value) and f"INVARIANT_OPERATOR_WORKER_{setting.upper()}" in str(err.value)
    assert "\n" not in str(err.value)
    assert parse_egress_to(None) == [] and parse_egress_to("[]") == []


def test_worker_ingress_settings_parse():
    from invariant.operator.render import parse_ingress_from

    assert parse_ingress_from(None) is None and parse_ingress_from("  ") is None
    assert parse_ingress_from(json.dumps([GATEWAY_PEER, {"ipBlock": {"cidr": "10.0.0.0/8"}}])) == [
        GATEWAY_PEER, {"ipBlock": {"cidr": "10.0.0.0/8"}}]
