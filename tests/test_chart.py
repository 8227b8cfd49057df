"""The Helm chart, the CRD, the examples and the Dockerfiles, with the real tools."""

from __future__ import annotations

import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from invariant.operator.crd import crd, crd_yaml
from invariant.operator.spec import parse_spec
from k8s_tools import binary

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "invariant"
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.yaml"))
K8S_VERSION = "1.35.0"

VARIANTS = {
    "defaults": [],
    "external-redis-no-gateway": ["--set", "redis.enabled=false", "--set", "redis.externalUrl=redis://cache:6379/0",
                                  "--set", "gateway.enabled=false"],
    "digests-namespaces-persistence": [
        "--set", "images.operator.digest=sha256:" + "1" * 64, "--set", "images.gateway.digest=sha256:" + "2" * 64,
        "--set", "operator.watchNamespaces={models,staging}", "--set", "redis.persistence.enabled=true",
        "--set", "gateway.apiKeysSecret=gateway-keys", "--set", "operator.logLevel=debug"],
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
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
            "ClusterKopfPeering"} <= kinds
    assert ("StatefulSet" in kinds) == (variant != "external-redis-no-gateway")


def by_kind_name(docs, kind, suffix):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix))


def test_defaults_wire_the_components(helm):
    docs = template(helm)
    gateway = by_kind_name(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in gateway["env"]}
    assert env["REDIS_URL"] == "redis://rel-invariant-redis:6379/0"
    config = by_kind_name(docs, "ConfigMap", "-redis")["data"]["redis.conf"]
    assert "maxmemory-policy allkeys-lru" in config and "maxmemory 1gb" in config
    operator = by_kind_name(docs, "Deployment", "-operator")
    assert operator["spec"]["strategy"]["type"] == "Recreate"
    assert "--peering=rel-invariant" in operator["spec"]["template"]["spec"]["containers"][0]["args"]


def test_operator_rbac_is_least_privilege(helm):
    role = by_kind_name(template(helm), "ClusterRole", "-operator")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
    assert rules[(("",), ("pods",))] == {"get", "list", "watch"}  # pods are only read
    assert rules[(("invariant.dev",), ("deterministicmodels/status",))] == {"get", "patch"}
    every_verb = set().union(*rules.values())
    assert "delete" not in every_verb and "*" not in every_verb  # children go by ownerReferences
    gateway_role = by_kind_name(template(helm), "ClusterRole", "-gateway")
    assert gateway_role["rules"] == [{"apiGroups": ["invariant.dev"], "resources": ["deterministicmodels"],
                                      "verbs": ["get", "list", "watch"]}]


@pytest.mark.parametrize("args,message", [
    (["--set", "redis.maxmemoryPolicy=noeviction"], "at '/redis/maxmemoryPolicy'"),
    (["--set", "operator.replicas=0"], "at '/operator/replicas': minimum: got 0, want 1"),
    (["--set", "images.gateway.digest=latest"], "at '/images/gateway/digest'"),
    (["--set", "gateway.unknownKey=1"], "additional properties 'unknownKey' not allowed"),
    (["--set", "redis.enabled=false"], "redis.externalUrl is required when redis.enabled is false"),
])
def test_bad_values_are_refused(helm, args, message):
    res = subprocess.run([str(helm), "template", "rel", str(CHART), *args], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and message in res.stderr, res.stderr


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
    dep = by_kind_name(template(helm), "Deployment", "-operator")
    dep["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    dep["spec"]["replicas"] = 1
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolizy"] = "Always"  # unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
