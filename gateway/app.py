"""The gateway's HTTP edge: the OpenAI-compatible routes, health, readiness, metrics and replay,
each a thin call into the request path (gateway/service.py)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from invariant.contract import routes
from invariant.gateway.call import CallError
from invariant.gateway.config import PATHS, GatewayConfig
from invariant.gateway import openapi
from invariant.gateway.errors import openai_error
from invariant.gateway.keys import RequestError, parse_json
from invariant.gateway.service import Gateway
from invariant.gateway.upstream import UpstreamError

log = logging.getLogger("invariant.gateway")


def create_app(config: GatewayConfig) -> FastAPI:
    gateway = Gateway(config)

    async def lifespan(app: FastAPI):
        await gateway.upstreams.start()
        watcher = None
        if config.discover == "kubernetes":
            from invariant.gateway.discovery import watch_kubernetes

            watcher = asyncio.get_running_loop().create_task(watch_kubernetes(gateway))
        yield
        if watcher:
            watcher.cancel()
        await gateway.upstreams.close()
        await gateway.store.close()

    app = FastAPI(title="invariant gateway", lifespan=lifespan)
    app.state.gateway = gateway

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        """A bug answers in OpenAI's error shape too (and is logged with its traceback), never as text."""
        log.error("unhandled error on %s: %s", request.url.path, exc, exc_info=exc)
        return openai_error(500, "The gateway failed on this request (logged).", "server_error", "internal_error")

    @app.post(routes.COMPLETIONS, openapi_extra=openapi.body(openapi.COMPLETIONS_BODY))
    async def completions(request: Request) -> Response:
        return await gateway.handle("completions", request)

    @app.post(routes.CHAT_COMPLETIONS, openapi_extra=openapi.body(openapi.CHAT_BODY))
    async def chat(request: Request) -> Response:
        return await gateway.handle("chat", request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = []
        for name, eps in gateway.upstreams.models.items():
            data.append({"id": name, "object": "model", "owned_by": "invariant",
                         "fingerprints": sorted({ep.fingerprint for ep in eps if ep.healthy and ep.fingerprint})})
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        status = {name: [{"url": ep.url, "healthy": ep.healthy, "fingerprint": ep.fingerprint, "error": ep.error}
                         for ep in eps] for name, eps in gateway.upstreams.models.items()}
        # Ready while it can serve some model: one model without workers (scaled to zero, or not
        # rolled out yet) must not take every gateway out of its Service (its requests get a 503).
        ok = any(ep["healthy"] for eps in status.values() for ep in eps)
        if not status:
            ok = bool(config.discover)  # nothing declared yet is not a failure of a discovering gateway
        return JSONResponse({"ready": ok, "redis": gateway.store.available, "models": status},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(routes.VERIFY, openapi_extra=openapi.body(openapi.VERIFY_BODY))
    async def verify(request: Request) -> Response:
        admitted = await gateway.admit(request)  # a replay is a generation: key, rate and size apply
        if isinstance(admitted, Response):
            return admitted
        tenant, raw = admitted
        try:
            payload = parse_json(raw)
            if not isinstance(payload, dict) or not isinstance(payload.get("request"), dict):
                raise RequestError("the body must be a JSON object with a 'request' object in it")
            kind = payload.get("kind", "completions")
            if not isinstance(kind, str) or kind not in PATHS:
                raise RequestError("'kind' must be completions or chat")
            report = await gateway.verify(kind, payload["request"], tenant)
            # 409: a stored entry differs from its replay (it was evicted); 200: all stored ones match.
            return JSONResponse(report, status_code=200 if report["match"] else 409)
        except CallError as exc:
            return openai_error(exc.status, exc.message, exc.type_, exc.code, exc.param)
        except (ValueError, RequestError) as exc:
            return openai_error(400, str(exc), "invalid_request_error")
        except UpstreamError as exc:
            return openai_error(exc.status, exc.message, "server_error", "upstream_error")

    return app
