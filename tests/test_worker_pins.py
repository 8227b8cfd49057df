"""Declared pins vs what the worker observes: a disagreement keeps the worker unready."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from invariant.worker.options import WorkerOptions, gfd_product, pin_disagreements
from invariant.worker.routes import WorkerState, invariant_router

GPU = {"device": {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "driver": "580.95.05"}}
CPU = {"device": {"kind": "cpu", "model": "AMD EPYC"}}


def opts(**kw):
    return WorkerOptions(model="/m", **kw)


def test_gfd_product_form():
    assert gfd_product("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"


def test_agreeing_pins():
    o = opts(expect_gpu_product="NVIDIA-H100-80GB-HBM3", expect_driver_version="580.95.05",
             expect_fingerprint="inv-0000000000000001")
    assert pin_disagreements(o, GPU, "inv-0000000000000001") == []


def test_each_disagreement_is_named():
    o = opts(expect_gpu_product="NVIDIA-H200", expect_driver_version="580.95.06", expect_fingerprint="inv-1111111111111111")
    assert pin_disagreements(o, GPU, "inv-0000000000000001") == [
        "GPU product is NVIDIA-H100-80GB-HBM3, pinned NVIDIA-H200",
        "driver is 580.95.05, pinned 580.95.06",
        "numerics fingerprint is inv-0000000000000001, pinned inv-1111111111111111",
    ]
    assert pin_disagreements(opts(expect_gpu_product="NVIDIA-H200"), CPU, "inv-0") == [
        "GPU product is no GPU (AMD EPYC), pinned NVIDIA-H200"]


def ready_response(state: WorkerState):
    app = FastAPI()
    app.include_router(invariant_router(state))
    return TestClient(app).get("/invariant/ready")


def test_ready_route_follows_warm_up_and_pins():
    state = WorkerState(fingerprint="inv-0000000000000001", parts={}, model_name="m")
    starting = ready_response(state)
    assert starting.status_code == 503 and "warm-up" in starting.json()["reasons"][0]
    state.mark_ready()
    assert ready_response(state).status_code == 200

    pinned = WorkerState(fingerprint="inv-0000000000000001", parts={}, model_name="m",
                         pin_problems=["driver is 580.95.05, pinned 580.95.06"])
    pinned.mark_ready()
    resp = ready_response(pinned)
    assert resp.status_code == 503
    assert resp.json()["reasons"] == ["pin mismatch: driver is 580.95.05, pinned 580.95.06"]

    state.mark_failed("warm-up generation failed: boom")
    assert ready_response(state).json() == {"ready": False, "fingerprint": "inv-0000000000000001",
                                            "reasons": ["warm-up generation failed: boom"],
                                            "canary": {"ok": None, "message": "canary has not run yet"},
                                            "kernel_canary": {"ok": None,
                                                              "message": "kernel canary has not run yet"}}
