"""Folding pods and reported fingerprints into status (pure)."""

from __future__ import annotations

from invariant.operator.status import PodView, fold_status, invalid_status, pod_view

NOW = "2026-11-23T00:00:00Z"
FP, OTHER = "inv-aaaaaaaaaaaaaaaa", "inv-bbbbbbbbbbbbbbbb"


def pod(name, pins="p1", ready=True, created="2026-11-23T00:00:0%d", port=8000):
    return PodView(name=name, pins=pins, ip="10.0.0.1", port=port, ready=ready, created=created % int(name[-1]))


def fold(pods, observed, previous=None, expected=None, desired=2, pins="p1"):
    return fold_status(previous=previous or {}, generation=3, desired_replicas=desired, pins=pins,
                       expected_fingerprint=expected, pods=pods, observed=observed, now=NOW)


def conditions(status):
    return {c["type"]: c["status"] for c in status["conditions"]}


def test_all_ready_and_agreeing():
    s = fold([pod("w1"), pod("w2")], {"w1": FP, "w2": FP})
    assert s["phase"] == "Ready" and s["readyReplicas"] == 2 and s["declaredFingerprint"] == FP
    assert conditions(s) == {"Ready": "True", "Progressing": "False", "Degraded": "False", "FingerprintMismatch": "False"}
    assert [e["pod"] for e in s["endpoints"]] == ["w1", "w2"]
    # observedGeneration follows the object's spec edits: test_operator_e2e.py::test_lifecycle


def test_mismatching_replica_is_reported_and_kept_out():
    s = fold([pod("w1"), pod("w2")], {"w1": FP, "w2": OTHER})
    assert s["phase"] == "Degraded"
    assert conditions(s)["FingerprintMismatch"] == "True" and conditions(s)["Ready"] == "False"
    assert [e["pod"] for e in s["endpoints"]] == ["w1"]
    mismatch = next(c for c in s["conditions"] if c["type"] == "FingerprintMismatch")
    assert mismatch["message"] == f"declared {FP}; w2 reports {OTHER}"
    assert {r["pod"]: r["matches"] for r in s["replicas"]} == {"w1": True, "w2": False}


def test_learned_fingerprint_sticks_while_pins_stay():
    first = fold([pod("w1")], {"w1": FP}, desired=1)
    # later the only replica reports something else: that is a mismatch, not a new declaration
    later = fold([pod("w1")], {"w1": OTHER}, previous=first, desired=1)
    assert later["declaredFingerprint"] == FP and conditions(later)["FingerprintMismatch"] == "True"


def test_expected_fingerprint_wins():
    s = fold([pod("w1"), pod("w2")], {"w1": FP, "w2": FP}, expected=OTHER)
    assert s["declaredFingerprint"] == OTHER and s["endpoints"] == [] and s["phase"] == "Degraded"


def test_rollout_keeps_old_pods_serving_under_their_own_fingerprint():
    s = fold([pod("w1", pins="old"), pod("w2")], {"w1": OTHER, "w2": FP}, desired=1)
    assert s["phase"] == "Progressing" and conditions(s)["Progressing"] == "True"
    assert conditions(s)["FingerprintMismatch"] == "False"
    assert {e["pod"]: (e["fingerprint"], e["current"]) for e in s["endpoints"]} == {"w1": (OTHER, False),
                                                                                   "w2": (FP, True)}


def test_unready_and_unreadable_pods():
    s = fold([pod("w1", ready=False), pod("w2")], {"w2": None})
    assert s["phase"] == "Pending" and s["endpoints"] == []
    assert "fingerprint unreadable from w2" in next(c for c in s["conditions"] if c["type"] == "Degraded")["message"]


def test_transition_times_move_only_on_change():
    first = fold([pod("w1"), pod("w2")], {"w1": FP, "w2": FP})
    again = fold_status(previous=first, generation=3, desired_replicas=2, pins="p1", expected_fingerprint=None,
                        pods=[pod("w1"), pod("w2")], observed={"w1": FP, "w2": FP}, now="2026-11-24T00:00:00Z")
    assert [c["lastTransitionTime"] for c in again["conditions"]] == [NOW] * 4
    broken = fold_status(previous=first, generation=3, desired_replicas=2, pins="p1", expected_fingerprint=None,
                         pods=[pod("w1"), pod("w2")], observed={"w1": FP, "w2": OTHER}, now="2026-11-24T00:00:00Z")
    times = {c["type"]: c["lastTransitionTime"] for c in broken["conditions"]}
    assert times["FingerprintMismatch"] == "2026-11-24T00:00:00Z"


def test_invalid_status():
    s = invalid_status({}, ["a", "b"], 4, NOW)
    assert s["phase"] == "Invalid" and conditions(s)["Ready"] == "False"
    assert next(c for c in s["conditions"] if c["type"] == "Ready")["message"] == "a; b"
    assert s["endpoints"] == [] and s["readyReplicas"] == 0


def test_an_invalid_edit_keeps_the_serving_endpoints():
    """The last valid spec's workers keep running (nothing is rolled out for an invalid one), so
    gateways must keep routing to them."""
    serving = fold_status(previous={}, generation=1, desired_replicas=1, pins="p", expected_fingerprint=None,
                          pods=[PodView("w1", "p", "10.0.0.1", 8000, True, "1")],
                          observed={"w1": "inv-aaaaaaaaaaaaaaaa"}, now=NOW)
    assert serving["endpoints"]
    s = invalid_status(serving, ["bad"], 2, NOW)
    assert s["endpoints"] == serving["endpoints"] and s["readyReplicas"] == serving["readyReplicas"]
    assert s["phase"] == "Invalid" and conditions(s)["Degraded"] == "True"


def test_pod_view_reads_pod_objects():
    view = pod_view({"metadata": {"name": "w", "labels": {"invariant.dev/pins": "p"},
                                  "annotations": {"invariant.dev/worker-port": "9000"},
                                  "creationTimestamp": "t"},
                     "status": {"podIP": "10.1.2.3", "conditions": [{"type": "Ready", "status": "True"}]}})
    assert view.url == "http://10.1.2.3:9000" and view.ready and view.pins == "p"
    terminating = pod_view({"metadata": {"name": "w", "deletionTimestamp": "t"},
                            "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    assert not terminating.ready and terminating.url is None


def test_only_the_endpoints_carry_the_serving_label():
    from invariant.operator.status import serving_label_changes

    label = "invariant.dev/serving"

    def pod(name, serving):
        return {"metadata": {"name": name, "labels": {label: "true"} if serving else {}}}

    status = {"endpoints": [{"pod": "a"}, {"pod": "b"}]}
    pods = [pod("a", True), pod("b", False), pod("c", True), pod("d", False)]
    # b becomes verified: labelled; c drifted or unready: unlabelled; a and d are left alone
    assert serving_label_changes(pods, status, label) == {"b": "true", "c": None}
    assert serving_label_changes([pod("a", True), pod("b", True)], status, label) == {}
    assert serving_label_changes(pods, {"endpoints": []}, label) == {"a": None, "c": None}
