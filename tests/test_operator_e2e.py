"""The operator end to end: kopf's KopfRunner against the emulated API on loopback.

No kubelet runs here, so the test plays its part: it creates the worker pods the Deployment asks
for and points them (podIP + port annotation) at small HTTP servers that answer
``/invariant/fingerprint`` like workers do.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kopf.testing import KopfRunner
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from conftest import free_port
from kube_emulator import EmulatorThread
from operator_cases import IMAGE, dm_spec

NS = "default"
GROUP, VERSION, PLURAL = "invariant.dev", "v1alpha1", "deterministicmodels"
FP_A, FP_B = "inv-aaaaaaaaaaaaaaaa", "inv-bbbbbbbbbbbbbbbb"
GATEWAY_PEERS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "invariant"}},
                  "podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}}}]
METRICS_PORT = free_port()


def drift_metrics(model: str) -> tuple[float, float]:
    """(drifted replicas now, drift detections so far) from the operator's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels == {"namespace": NS, "model": model}:
                values[sample.name] = sample.value
    return (values.get("invariant_operator_drifted_replicas", -1.0),
            values.get("invariant_operator_drift_detected_total", 0.0))


class FakeWorker:
    """Answers /invariant/fingerprint with a fingerprint the test can change."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                body = json.dumps({"fingerprint": outer.fingerprint}).encode()
                self.send_response(200 if self.path == "/invariant/fingerprint" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except ApiException as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture()
def cluster(tmp_path, monkeypatch):
    with EmulatorThread() as emu:
        kubeconfig = emu.write_kubeconfig(tmp_path / "kubeconfig")
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.setenv("INVARIANT_OPERATOR_STATUS_INTERVAL", "0.5")
        monkeypatch.setenv("INVARIANT_OPERATOR_FINGERPRINT_TIMEOUT", "1")
        monkeypatch.setenv("INVARIANT_OPERATOR_WORKER_INGRESS", json.dumps(GATEWAY_PEERS))
        monkeypatch.setenv("INVARIANT_OPERATOR_METRICS_PORT", str(METRICS_PORT))
        config.load_kube_config(config_file=str(kubeconfig))
        yield emu


@pytest.fixture()
def operator(cluster):
    # The handlers module is first imported here, by kopf, with the test's status interval set.
    with KopfRunner(["run", "--standalone", "--all-namespaces", "-m", "invariant.operator.handlers"],
                    timeout=60) as runner:
        yield runner
    assert runner.exception is None, runner.output


def dm(name):
    return client.CustomObjectsApi().get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)


def status_of(name):
    return dm(name).get("status") or {}


def condition(name, ctype):
    return next((c for c in status_of(name).get("conditions", []) if c["type"] == ctype), {})


def serving_pods() -> list[str]:
    return sorted(p.metadata.name for p in client.CoreV1Api().list_namespaced_pod(NS).items
                  if (p.metadata.labels or {}).get("invariant.dev/serving") == "true")


def add_pod(deployment: dict, name: str, worker: FakeWorker) -> None:
    """Do the kubelet's job: a pod from the Deployment's template, running and ready."""
    template = deployment.spec.template
    core = client.CoreV1Api()
    core.create_namespaced_pod(NS, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": template.metadata.labels,
                     "annotations": {"invariant.dev/worker-port": str(worker.port)},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                          "name": deployment.metadata.name, "uid": deployment.metadata.uid}]},
        "spec": {"containers": [{"name": "worker", "image": template.spec.containers[0].image}]},
    })
    core.patch_namespaced_pod_status(name, NS, {"status": {"podIP": "127.0.0.1", "phase": "Running",
                                                           "conditions": [{"type": "Ready", "status": "True"}]}})


def test_lifecycle(operator):
    workers = [FakeWorker(FP_A), FakeWorker(FP_A), FakeWorker(FP_B)]
    api, apps, core = client.CustomObjectsApi(), client.AppsV1Api(), client.CoreV1Api()
    try:
        # create -> Deployment and Service appear with the pins
        api.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "DeterministicModel", "metadata": {"name": "qwen"},
            "spec": dm_spec()})
        deployment = wait_for(lambda: apps.read_namespaced_deployment("qwen-worker", NS), what="deployment")
        assert deployment.spec.template.spec.containers[0].image == IMAGE
        assert deployment.metadata.owner_references[0].uid == dm("qwen")["metadata"]["uid"]
        expressions = deployment.spec.template.spec.affinity.node_affinity \
            .required_during_scheduling_ignored_during_execution.node_selector_terms[0].match_expressions
        assert {e.key: e.values for e in expressions}["nvidia.com/gpu.product"] == ["NVIDIA-H100-80GB-HBM3"]
        assert wait_for(lambda: core.read_namespaced_service("qwen-worker", NS), what="service")
        # the workers admit only the peers the chart names (here: the gateway), on the worker port
        policy = wait_for(lambda: client.NetworkingV1Api().read_namespaced_network_policy("qwen-worker", NS),
                          what="network policy")
        assert policy.spec.pod_selector.match_labels == deployment.spec.selector.match_labels
        assert policy.spec.policy_types == ["Ingress", "Egress"]  # and egress: DNS, the Hub's HTTPS
        assert [e.ports[0].port for e in policy.spec.egress] == [53, 443]
        assert [client.ApiClient().sanitize_for_serialization(p) for p in policy.spec.ingress[0]._from] == GATEWAY_PEERS
        assert policy.metadata.owner_references[0].uid == dm("qwen")["metadata"]["uid"]
        assert wait_for(lambda: status_of("qwen").get("phase") == "Pending", what="Pending")

        # worker pods become ready -> status Ready with fingerprints and endpoints
        add_pod(deployment, "qwen-worker-1", workers[0])
        add_pod(deployment, "qwen-worker-2", workers[1])
        wait_for(lambda: status_of("qwen").get("phase") == "Ready", what="Ready")
        status = status_of("qwen")
        assert status["readyReplicas"] == 2 and status["declaredFingerprint"] == FP_A
        assert sorted(e["url"] for e in status["endpoints"]) == sorted(
            f"http://127.0.0.1:{w.port}" for w in workers[:2])
        assert condition("qwen", "Ready")["status"] == "True"
        # verified pods are labelled serving: the worker Service selects only them
        service = core.read_namespaced_service("qwen-worker", NS)
        assert service.spec.selector["invariant.dev/serving"] == "true"
        assert wait_for(lambda: serving_pods() == ["qwen-worker-1", "qwen-worker-2"], what="serving labels")
        assert wait_for(lambda: drift_metrics("qwen")[0] == 0, what="drift gauge 0")
        assert drift_metrics("qwen")[1] == 0

        # one pod reports another fingerprint -> FingerprintMismatch, kept out of the endpoints, counted
        workers[1].fingerprint = FP_B
        wait_for(lambda: condition("qwen", "FingerprintMismatch").get("status") == "True", what="mismatch")
        status = status_of("qwen")
        assert [e["pod"] for e in status["endpoints"]] == ["qwen-worker-1"]
        assert "qwen-worker-2 reports " + FP_B in condition("qwen", "FingerprintMismatch")["message"]
        assert [r["pod"] for r in status["replicas"] if r["matches"] is False] == ["qwen-worker-2"]
        assert status["phase"] == "Degraded"
        assert wait_for(lambda: drift_metrics("qwen") == (1, 1), what="drift counted")
        assert wait_for(lambda: serving_pods() == ["qwen-worker-1"], what="drifted pod out of the Service")
        time.sleep(1.2)  # more folds while it stays drifted: the gauge holds, the counter does not climb
        assert drift_metrics("qwen") == (1, 1)
        workers[1].fingerprint = FP_A
        wait_for(lambda: status_of("qwen").get("phase") == "Ready", what="recovered")
        assert wait_for(lambda: drift_metrics("qwen") == (0, 1), what="drift gauge back to 0")
        assert wait_for(lambda: serving_pods() == ["qwen-worker-1", "qwen-worker-2"], what="back in the Service")

        # spec change of a pin -> rollout: new pins on the template, old pods keep serving
        old_pins = deployment.spec.template.metadata.labels["invariant.dev/pins"]
        new_image = f"registry.example.com/invariant/worker@sha256:{'cd' * 32}"
        api.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "qwen",
                                           {"spec": {"numerics": {"image": new_image}}})
        rolled = wait_for(lambda: (d := apps.read_namespaced_deployment("qwen-worker", NS))
                          .spec.template.metadata.labels["invariant.dev/pins"] != old_pins and d, what="rollout")
        assert rolled.spec.template.spec.containers[0].image == new_image
        wait_for(lambda: condition("qwen", "Progressing").get("reason") == "RollingOut", what="RollingOut")
        add_pod(rolled, "qwen-worker-3", workers[2])
        wait_for(lambda: any(e["pod"] == "qwen-worker-3" and e["current"] for e in status_of("qwen")["endpoints"]),
                 what="new pod serving")
        status = status_of("qwen")
        assert status["declaredFingerprint"] == FP_B  # new pins, new numerics
        # the status describes the edited spec: generation 2 (the emulator bumps it on spec changes)
        assert dm("qwen")["metadata"]["generation"] == 2
        wait_for(lambda: status_of("qwen").get("observedGeneration") == 2, what="observedGeneration 2")
        assert {e["pod"]: e["fingerprint"] for e in status["endpoints"]} == {
            "qwen-worker-1": FP_A, "qwen-worker-2": FP_A, "qwen-worker-3": FP_B}

        # delete -> children gone
        api.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "qwen")
        wait_for(lambda: not any(i["metadata"]["name"] == "qwen" for i in api.list_namespaced_custom_object(
            GROUP, VERSION, NS, PLURAL)["items"]), what="dm gone")
        for read in (lambda: apps.read_namespaced_deployment("qwen-worker", NS),
                     lambda: core.read_namespaced_service("qwen-worker", NS)):
            with pytest.raises(ApiException) as err:
                read()
            assert err.value.status == 404
        assert core.list_namespaced_pod(NS).items == []
    finally:
        for w in workers:
            w.close()


def test_invalid_spec_is_a_status_condition(operator):
    api, apps = client.CustomObjectsApi(), client.AppsV1Api()
    api.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "DeterministicModel", "metadata": {"name": "bad"},
        "spec": dm_spec(**{"numerics.image": "registry.example.com/invariant/worker:latest",
                           "engineArgs": ["--speculative-config={}"]})})
    wait_for(lambda: status_of("bad").get("phase") == "Invalid", what="Invalid")
    ready = condition("bad", "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "must be pinned by digest" in ready["message"]
    assert "speculative decoding breaks batch invariance" in ready["message"]
    with pytest.raises(ApiException):
        apps.read_namespaced_deployment("bad-worker", NS)
    # fixing the spec recovers
    api.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "bad", {"spec": {
        "numerics": {"image": IMAGE}, "engineArgs": []}})
    wait_for(lambda: apps.read_namespaced_deployment("bad-worker", NS), what="deployment after fix")
    wait_for(lambda: status_of("bad").get("phase") == "Pending", what="Pending after fix")


@pytest.mark.parametrize("env,value,message", [
    ("INVARIANT_OPERATOR_WORKER_INGRESS", "{not json", "INVARIANT_OPERATOR_WORKER_INGRESS is not JSON"),
    ("INVARIANT_OPERATOR_WORKER_EGRESS", '[{"to": "all"}]', "INVARIANT_OPERATOR_WORKER_EGRESS must be a JSON list"),
    ("INVARIANT_OPERATOR_METRICS_PORT", "http", "INVARIANT_OPERATOR_METRICS_PORT='http': expected a TCP port"),
])
def test_a_bad_setting_stops_the_operator_with_its_reason(cluster, monkeypatch, env, value, message):
    monkeypatch.setenv(env, value)
    started = time.monotonic()
    with KopfRunner(["run", "--standalone", "--all-namespaces", "-m", "invariant.operator.handlers"],
                    timeout=30, reraise=False) as runner:
        runner._thread.join(timeout=20)  # the operator must end by itself, not when the test stops it
    # it stops at start-up (no retrying for ever), and says why in one line
    assert time.monotonic() - started < 25
    assert runner.exit_code != 0 and runner.exception is not None
    assert message in str(runner.exception.__cause__), repr(runner.exception.__cause__)
