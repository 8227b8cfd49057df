"""The Helm chart, the CRD, the examples and the Dockerfiles, with the real tools."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from invariant.operator.crd import crd, crd_yaml
from invariant.operator.spec import parse_spec
from k8s_tools import binary
from pod_security import violations

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "invariant"
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.yaml"))
K8S_VERSION = "1.35.0"

KEYS = ["--set", "gateway.apiKeysSecret=gateway-keys"]  # the defaults require API keys for the gateway
VARIANTS = {
    "defaults": KEYS,
    "no-auth-no-network-policies": ["--set", "gateway.auth.required=false", "--set", "networkPolicy.enabled=false",
                                    "--set", "cache.existingSecret=my-cache"],
    "external-redis-no-gateway": ["--set", "redis.enabled=false", "--set", "redis.externalUrl=redis://cache:6379/0",
                                  "--set", "gateway.enabled=false"],
    "digests-namespaces-persistence": [
        "--set", "images.operator.digest=sha256:" + "1" * 64, "--set", "images.gateway.digest=sha256:" + "2" * 64,
        "--set", "operator.watchNamespaces={models,staging}", "--set", "redis.persistence.enabled=true",
        "--set", "gateway.apiKeysSecret=gateway-keys", "--set", "operator.logLevel=debug"],
    "redis-tls": [*KEYS, "--set", "redis.tls.enabled=true", "--set", "redis.tls.existingSecret=redis-tls"],
    "redis-mtls": [*KEYS, "--set", "redis.tls.enabled=true", "--set", "redis.tls.existingSecret=redis-tls",
                   "--set", "redis.tls.clientSecret=gateway-redis-client"],
}


@pytest.fixture(scope="module")
def helm() -> Path:
    return binary("helm")


def template(helm: Path, *args: str) -> list[dict]:
    res = subprocess.run([str(helm), "template", "rel", str(CHART), "--namespace", "invariant", "--include-crds",
                          *args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [doc for doc in yaml.safe_load_all(res.stdout) if doc]


def test_helm_lint(helm):
    res = subprocess.run([str(helm), "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in res.stdout


def custom_resource_schemas(docs: list[dict]) -> dict[tuple[str, str], dict]:
    schemas = {}
    for doc in docs:
        if doc["kind"] == "CustomResourceDefinition":
            for version in doc["spec"]["versions"]:
                key = (f"{doc['spec']['group']}/{version['name']}", doc["spec"]["names"]["kind"])
                schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_rendered_object_is_valid(helm, variant):
    docs = template(helm, *VARIANTS[variant])
    crs = custom_resource_schemas(docs)
    kinds = set()
    for doc in docs:
        kinds.add(doc["kind"])
        key = (doc["apiVersion"], doc["kind"])
        if key in crs:
            jsonschema.validate(doc, crs[key])
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"} <= kinds
    assert ("KopfPeering" if "namespaces" in variant else "ClusterKopfPeering") in kinds
    assert ("StatefulSet" in kinds) == (variant != "external-redis-no-gateway")


def by_kind_name(docs, kind, suffix):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix))


def test_defaults_wire_the_components(helm):
    docs = template(helm, *KEYS)
    gateway = by_kind_name(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in gateway["env"]}
    # the password comes from the cache Secret and is expanded into the URL by Kubernetes
    assert env["REDIS_URL"] == "redis://:$(REDIS_PASSWORD)@rel-invariant-redis:6379/0"
    assert [e["name"] for e in gateway["env"]].index("REDIS_PASSWORD") < [e["name"] for e in gateway["env"]].index("REDIS_URL")
    assert env["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "rel-invariant-cache", "key": "redis-password"}}
    assert env["INVARIANT_GATEWAY_ENTRY_KEY"] == {"secretKeyRef": {"name": "rel-invariant-cache", "key": "entry-key"}}
    config = by_kind_name(docs, "ConfigMap", "-redis")["data"]["redis.conf"]
    assert "maxmemory-policy allkeys-lru" in config and "maxmemory 1gb" in config
    operator = by_kind_name(docs, "Deployment", "-operator")
    assert operator["spec"]["strategy"]["type"] == "Recreate"
    assert "--peering=rel-invariant" in operator["spec"]["template"]["spec"]["containers"][0]["args"]


def rules_of(role: dict) -> dict[tuple, set]:
    return {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}


def test_operator_rbac_is_least_privilege(helm):
    role = by_kind_name(template(helm, *KEYS), "ClusterRole", "-operator")
    rules = rules_of(role)
    # pods are read, and patched for one label (the serving label); never created or deleted
    assert rules[(("",), ("pods",))] == {"get", "list", "watch", "patch"}
    assert rules[(("invariant.dev",), ("deterministicmodels/status",))] == {"get", "patch"}
    assert rules[(("networking.k8s.io",), ("networkpolicies",))] == {"get", "list", "watch", "create", "patch"}
    every_verb = set().union(*rules.values())
    assert "delete" not in every_verb and "*" not in every_verb  # children go by ownerReferences
    gateway_role = by_kind_name(template(helm, *KEYS), "ClusterRole", "-gateway")
    assert gateway_role["rules"] == [{"apiGroups": ["invariant.dev"], "resources": ["deterministicmodels"],
                                      "verbs": ["get", "list", "watch"]}]


def test_rbac_is_scoped_to_the_watched_namespaces(helm):
    """With operator.watchNamespaces, every write (and the gateway's read) is granted by a Role in each
    watched namespace; what stays cluster-wide is read-only discovery of CRDs."""
    scoped = template(helm, *KEYS, "--set", "operator.watchNamespaces={models,staging}")
    cluster_wide = template(helm, *KEYS)
    clusterroles = [d for d in scoped if d["kind"] == "ClusterRole"]
    assert [r["metadata"]["name"] for r in clusterroles] == ["rel-invariant-operator"]
    assert clusterroles[0]["rules"] == [{"apiGroups": ["apiextensions.k8s.io"],
                                         "resources": ["customresourcedefinitions"], "verbs": ["get", "list", "watch"]}]
    roles = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in scoped if d["kind"] == "Role"}
    assert set(roles) == {(ns, f"rel-invariant-{c}") for ns in ("models", "staging") for c in ("operator", "gateway")}
    bindings = {(d["metadata"]["namespace"], d["roleRef"]["name"]): d["subjects"] for d in scoped
                if d["kind"] == "RoleBinding"}
    assert bindings[("models", "rel-invariant-operator")] == [
        {"kind": "ServiceAccount", "name": "rel-invariant-operator", "namespace": "invariant"}]
    assert set(bindings) == set(roles) and not [d for d in scoped if d["kind"] == "ClusterRoleBinding"
                                                 and d["roleRef"]["name"].endswith("-gateway")]
    # the namespaced Role grants what the cluster-wide role grants for namespaced objects, kopfpeerings
    # in place of clusterkopfpeerings, and nothing for cluster-scoped objects
    wide = rules_of(by_kind_name(cluster_wide, "ClusterRole", "-operator"))
    local = rules_of(roles[("models", "rel-invariant-operator")])
    namespaced_wide = {k: v for k, v in wide.items() if k[1][0] not in (
        "customresourcedefinitions", "namespaces", "clusterkopfpeerings")}
    assert local == {**namespaced_wide, (("kopf.dev",), ("kopfpeerings",)): {"get", "list", "watch", "patch"}}
    assert rules_of(roles[("staging", "rel-invariant-gateway")]) == {
        (("invariant.dev",), ("deterministicmodels",)): {"get", "list", "watch"}}
    # kopf peers per namespace when namespaced; the gateway lists only there
    assert {(d["kind"], d["metadata"].get("namespace")) for d in scoped if "KopfPeering" in d["kind"]} == {
        ("KopfPeering", "models"), ("KopfPeering", "staging")}
    assert {d["kind"] for d in cluster_wide if "KopfPeering" in d["kind"]} == {"ClusterKopfPeering"}
    env = {e["name"]: e.get("value") for e in by_kind_name(scoped, "Deployment", "-gateway")[
        "spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["INVARIANT_GATEWAY_NAMESPACES"] == "models,staging"
    assert "INVARIANT_GATEWAY_NAMESPACES" not in {e["name"] for e in by_kind_name(
        cluster_wide, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_workers_and_the_operator_get_network_policies(helm):
    """The operator renders a NetworkPolicy beside each model's workers from the peers the chart gives it:
    this release's gateway and operator (from the release's namespace) and networkPolicy.workerFrom."""
    from invariant.operator.render import parse_ingress_from

    trainer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "rl"}}}
    docs = template(helm, *KEYS, "--set-json", f"networkPolicy.workerFrom=[{json.dumps(trainer)}]")
    container = by_kind_name(docs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    peers = parse_ingress_from(env["INVARIANT_OPERATOR_WORKER_INGRESS"])
    release_ns = {"matchLabels": {"kubernetes.io/metadata.name": "invariant"}}
    assert peers == [
        {"namespaceSelector": release_ns, "podSelector": {"matchLabels": {
            "app.kubernetes.io/component": "gateway", "app.kubernetes.io/instance": "rel"}}},
        {"namespaceSelector": release_ns, "podSelector": {"matchLabels": {
            "app.kubernetes.io/component": "operator", "app.kubernetes.io/instance": "rel"}}},
        trainer]
    policy = by_kind_name(docs, "NetworkPolicy", "-operator")["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    assert policy["ingress"] == [{"ports": [{"port": 8080, "protocol": "TCP"}, {"port": 9090, "protocol": "TCP"}]}]
    assert env["INVARIANT_OPERATOR_METRICS_PORT"] == "9090"
    from invariant.operator.render import parse_egress_to

    assert parse_egress_to(env["INVARIANT_OPERATOR_WORKER_EGRESS"]) == []
    mirror = {"to": [{"podSelector": {"matchLabels": {"app": "hf-mirror"}}}], "ports": [{"port": 8080}]}
    with_mirror = template(helm, *KEYS, "--set-json", f"networkPolicy.workerTo=[{json.dumps(mirror)}]")
    env = {e["name"]: e.get("value") for e in by_kind_name(with_mirror, "Deployment", "-operator")[
        "spec"]["template"]["spec"]["containers"][0]["env"]}
    assert parse_egress_to(env["INVARIANT_OPERATOR_WORKER_EGRESS"]) == [mirror]
    off = template(helm, *KEYS, "--set", "networkPolicy.enabled=false")
    assert not [d for d in off if d["kind"] == "NetworkPolicy"]
    assert "INVARIANT_OPERATOR_WORKER_INGRESS" not in {e["name"] for e in by_kind_name(
        off, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]["env"]}


@pytest.mark.parametrize("args,message", [
    (["--set", "redis.maxmemoryPolicy=noeviction"], "at '/redis/maxmemoryPolicy'"),
    (["--set", "operator.replicas=0"], "at '/operator/replicas': minimum: got 0, want 1"),
    (["--set", "images.gateway.digest=latest"], "at '/images/gateway/digest'"),
    (["--set", "gateway.unknownKey=1"], "additional properties 'unknownKey' not allowed"),
    (["--set", "redis.enabled=false", *KEYS], "redis.externalUrl is required when redis.enabled is false"),
    ([], "gateway.auth.required: set gateway.apiKeysSecret"),
    (["--set", "networkPolicy.gatewayFrom=x", *KEYS], "at '/networkPolicy/gatewayFrom'"),
    (["--set", "networkPolicy.workerFrom=x", *KEYS], "at '/networkPolicy/workerFrom'"),
    (["--set", "redis.tls.enabled=true", *KEYS], "set redis.tls.existingSecret to a kubernetes.io/tls Secret"),
    (["--set", "redis.tls.enabled=true", "--set", "redis.tls.existingSecret=t", "--set", "redis.enabled=false",
      "--set", "redis.externalUrl=redis://cache:6379/0", *KEYS], "redis.externalUrl must be a rediss:// URL"),
    (["--set", "operator.metricsPort=8080", *KEYS], "at '/operator/metricsPort'"),
    (["--set", "operator.watchNamespaces={team-*}", *KEYS], "at '/operator/watchNamespaces/0'"),
])
def test_bad_values_are_refused(helm, args, message):
    res = subprocess.run([str(helm), "template", "rel", str(CHART), *args], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and message in res.stderr, res.stderr


def test_redis_needs_its_password_and_only_the_gateway_reaches_it(helm):
    docs = template(helm, *KEYS)
    redis = by_kind_name(docs, "StatefulSet", "-redis")["spec"]["template"]["spec"]["containers"][0]
    assert redis["command"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in redis["env"]}
    assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"] == {"name": "rel-invariant-cache", "key": "redis-password"}
    secret = by_kind_name(docs, "Secret", "-cache")
    assert set(secret["data"]) == {"redis-password", "entry-key"}
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    policy = by_kind_name(docs, "NetworkPolicy", "-redis")["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
    assert policy["ingress"] == [{"from": [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/instance": "rel", "app.kubernetes.io/component": "gateway"}}}],
        "ports": [{"port": 6379, "protocol": "TCP"}]}]
    gateway_policy = by_kind_name(docs, "NetworkPolicy", "-gateway")["spec"]
    assert gateway_policy["ingress"] == [{"ports": [{"port": 8080, "protocol": "TCP"}]}]
    # with a Secret of one's own the chart generates none
    own = template(helm, *KEYS, "--set", "cache.existingSecret=my-cache")
    assert not [d for d in own if d["kind"] == "Secret"]
    env = {e["name"]: e.get("valueFrom") for e in by_kind_name(own, "Deployment", "-gateway")[
        "spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["INVARIANT_GATEWAY_ENTRY_KEY"]["secretKeyRef"]["name"] == "my-cache"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_pod_meets_the_restricted_pod_security_standard(helm, variant):
    pods = [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in template(helm, *VARIANTS[variant])
            if d["kind"] in ("Deployment", "StatefulSet")]
    assert pods
    assert {name: violations(pod) for name, pod in pods} == {name: [] for name, _ in pods}


def test_control_the_pod_security_check_refuses_each_rule():
    """The check above can fail: each rule broken in a pod that otherwise passes is named."""
    good = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": False,
                                                            "readOnlyRootFilesystem": True,
                                                            "capabilities": {"drop": ["ALL"]}}}],
            "volumes": [{"name": "v", "emptyDir": {}}]}
    assert violations(good) == []
    broken = {
        "hostNetwork": lambda p: p.update(hostNetwork=True),
        "hostPath": lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "privileged": lambda p: p["containers"][0]["securityContext"].update(privileged=True),
        "allowPrivilegeEscalation": lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        "capabilities do not drop": lambda p: p["containers"][0]["securityContext"].pop("capabilities"),
        "capabilities added": lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
        "runAsNonRoot": lambda p: p["securityContext"].pop("runAsNonRoot"),
        "runAsUser 0": lambda p: p["containers"][0]["securityContext"].update(runAsUser=0),
        "seccompProfile": lambda p: p["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        "hostPort": lambda p: p["containers"][0].update(ports=[{"containerPort": 80, "hostPort": 80}]),
        "writable": lambda p: p["containers"][0]["securityContext"].pop("readOnlyRootFilesystem"),
    }
    import copy

    for rule, breaks in broken.items():
        pod = copy.deepcopy(good)
        breaks(pod)
        assert any(rule in v for v in violations(pod)), rule


def test_chart_crd_is_generated_from_the_operator():
    assert (CHART / "crds" / "deterministicmodels.yaml").read_text() == crd_yaml()


def test_crd_is_structural_with_status_subresource_and_printer_columns():
    version = crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]][:5] == [
        "Model", "Phase", "Ready", "Desired", "Fingerprint"]
    kubernetes_validate.validate(crd(), K8S_VERSION, strict=True)
    assert crd()["spec"]["names"]["shortNames"] == ["dm"]


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_examples_validate_against_the_crd_and_the_operator(example):
    doc = yaml.safe_load(example.read_text())
    jsonschema.validate(doc, crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    parse_spec(doc["metadata"]["name"], doc["metadata"]["namespace"], doc["spec"])  # raises if refused


def test_crd_schema_refuses_a_tag():
    doc = yaml.safe_load(EXAMPLES[0].read_text())
    doc["spec"]["numerics"]["image"] = "ghcr.io/invariant-dev/invariant-worker:0.1.0"
    with pytest.raises(jsonschema.ValidationError, match="does not match"):
        jsonschema.validate(doc, crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


@pytest.mark.parametrize("dockerfile", ["worker/Dockerfile", "gateway/Dockerfile", "operator/Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile):
    import shutil
    import sys

    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    res = subprocess.run([hadolint, "--no-color", str(ROOT / dockerfile)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_worker_image_is_from_the_pinned_vllm():
    """The GPU image's vLLM is the `gpu` extra's pin (the version verified on the device)."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pin = next(d.split("==")[1] for d in extras["gpu"] if d.startswith("vllm=="))
    first = next(line for line in (ROOT / "worker" / "Dockerfile").read_text().splitlines() if line.startswith("FROM"))
    assert first == f"FROM vllm/vllm-openai:v{pin}"


def test_validator_control_rejects_a_broken_object(helm):
    """The validation above must be able to fail: a rendered object with one bad field is refused."""
    dep = by_kind_name(template(helm, *KEYS), "Deployment", "-operator")
    dep["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    dep["spec"]["replicas"] = 1
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolizy"] = "Always"  # unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_redis_tls_closes_the_plaintext_port_and_the_gateway_verifies_redis(helm):
    docs = template(helm, *VARIANTS["redis-tls"])
    redis = by_kind_name(docs, "StatefulSet", "-redis")["spec"]["template"]["spec"]
    command = redis["containers"][0]["command"]
    assert command[command.index("--port") + 1] == "0" and command[command.index("--tls-port") + 1] == "6379"
    assert command[-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert "--tls" in redis["containers"][0]["readinessProbe"]["exec"]["command"]
    assert {v["name"]: v.get("secret", {}).get("secretName") for v in redis["volumes"]}["tls"] == "redis-tls"
    gateway = by_kind_name(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in gateway["containers"][0]["env"]}
    assert env["REDIS_URL"] == "rediss://:$(REDIS_PASSWORD)@rel-invariant-redis:6379/0"
    assert env["INVARIANT_GATEWAY_REDIS_CA_FILE"] == "/etc/invariant/redis-tls/ca.crt"
    ca = next(v for v in gateway["volumes"] if v["name"] == "redis-tls")["secret"]
    assert ca == {"secretName": "redis-tls", "items": [{"key": "ca.crt", "path": "ca.crt"}]}  # never the key
    mounts = {m["name"]: m["mountPath"] for m in gateway["containers"][0]["volumeMounts"]}
    assert mounts == {"api-keys": "/etc/invariant/api-keys", "redis-tls": "/etc/invariant/redis-tls"}
    # off by default: plaintext inside the NetworkPolicy, no CA file
    plain = by_kind_name(template(helm, *KEYS), "Deployment", "-gateway")["spec"]["template"]["spec"]
    assert "INVARIANT_GATEWAY_REDIS_CA_FILE" not in {e["name"] for e in plain["containers"][0]["env"]}
    assert command[command.index("--tls-auth-clients") + 1] == "no"  # TLS alone: the password authenticates


def test_redis_mutual_tls_takes_only_the_gateway_certificate(helm):
    docs = template(helm, *VARIANTS["redis-mtls"])
    redis = by_kind_name(docs, "StatefulSet", "-redis")["spec"]["template"]["spec"]
    command = redis["containers"][0]["command"]
    assert command[command.index("--tls-auth-clients") + 1] == "yes"
    probe = redis["containers"][0]["readinessProbe"]["exec"]["command"]
    assert probe[probe.index("--cert") + 1] == "/etc/redis/tls/tls.crt" and probe[-1] == "ping"
    gateway = by_kind_name(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in gateway["containers"][0]["env"]}
    assert env["INVARIANT_GATEWAY_REDIS_CERT_FILE"] == "/etc/invariant/redis-client/tls.crt"
    assert env["INVARIANT_GATEWAY_REDIS_KEY_FILE"] == "/etc/invariant/redis-client/tls.key"
    client = next(v for v in gateway["volumes"] if v["name"] == "redis-client")["secret"]
    assert client["secretName"] == "gateway-redis-client" and client["defaultMode"] == 0o440
    assert gateway["securityContext"]["fsGroup"] == 10001  # the key is readable by the gateway's group only
    mounts = {m["name"]: m["mountPath"] for m in gateway["containers"][0]["volumeMounts"]}
    assert mounts["redis-client"] == "/etc/invariant/redis-client"
    # the checksum rolls Redis when client authentication is switched on
    plain = by_kind_name(template(helm, *VARIANTS["redis-tls"]), "StatefulSet", "-redis")
    assert (plain["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            != by_kind_name(docs, "StatefulSet", "-redis")["spec"]["template"]["metadata"]["annotations"]["checksum/config"])
