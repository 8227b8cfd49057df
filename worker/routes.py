"""The routes invariant adds to vLLM's app: the fingerprint and a readiness probe.

vLLM already answers ``GET /health`` (alive: the engine loop runs). Readiness is ours: it turns
200 only after a real generation succeeded, and the invariance canary adds its verdict here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from invariant.contract import routes


@dataclass
class WorkerState:
    fingerprint: str
    parts: dict[str, Any]
    model_name: str
    pin_problems: list[str] = field(default_factory=list)
    # The sampling parameters vLLM fills in when a request omits them (from generation_config):
    # the gateway needs them to key an omitted parameter and its explicit default alike.
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    # The start-up canary's verdict (invariant mode): alone vs in a crowd, bitwise.
    canary: dict[str, Any] = field(default_factory=lambda: {"ok": None, "message": "canary has not run yet"})
    # The kernel canary's verdict (invariant.worker.kernel_canary): each kernel, row alone vs amid batches.
    kernel_canary: dict[str, Any] = field(default_factory=lambda: {"ok": None, "message": "kernel canary has not run yet"})
    # What each vLLM model process reported it runs (invariant.worker.probe), once the engine is up.
    kernel_reports: list[dict[str, Any]] = field(default_factory=list)
    ready: bool = False
    reasons: list[str] = field(default_factory=lambda: ["starting: warm-up generation has not finished"])

    def mark_ready(self) -> None:
        """Ready only if the observed numerics agree with the declared pins."""
        self.ready, self.reasons = not self.pin_problems, [f"pin mismatch: {p}" for p in self.pin_problems]

    def mark_failed(self, reason: str) -> None:
        self.ready, self.reasons = False, [reason]

    @property
    def failure(self) -> str:
        return "; ".join(self.reasons)


def invariant_router(state: WorkerState) -> APIRouter:
    router = APIRouter(prefix=routes.PREFIX, tags=["invariant"])

    @router.get(routes.FINGERPRINT.removeprefix(routes.PREFIX))
    async def fingerprint() -> dict[str, Any]:
        return {"fingerprint": state.fingerprint, "model": state.model_name, "parts": state.parts,
                "sampling_defaults": state.sampling_defaults, "canary": state.canary,
                "kernel_canary": state.kernel_canary, "kernel_reports": state.kernel_reports}

    @router.get(routes.READY.removeprefix(routes.PREFIX))
    async def ready() -> JSONResponse:
        body = {"ready": state.ready, "fingerprint": state.fingerprint, "reasons": state.reasons,
                "canary": state.canary, "kernel_canary": state.kernel_canary}
        return JSONResponse(body, status_code=200 if state.ready else 503)

    return router
