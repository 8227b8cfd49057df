"""Worker endpoints per served model: health, fingerprints, and calls with retry on another replica."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import httpx
from invariant.contract import routes

log = logging.getLogger("invariant.gateway")


class UpstreamError(Exception):
    """No worker could answer; ``status`` is what the client gets (502 or 503)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class UpstreamRejected(Exception):
    """The worker answered with a 4xx: the client's request is at fault; passed through, not stored."""

    def __init__(self, status: int, body: Any):
        super().__init__(str(body))
        self.status = status
        self.body = body


# A worker busy streaming on a loaded node can answer a health check late (a 2-core CI machine: a
# request got "no worker is ready" between two checks). One late answer is not a dead worker: a
# known-good endpoint is dropped after this many timed-out checks in a row; a refused connection, an
# error or a "not ready" answer drops it at once.
HEALTH_TIMEOUTS_TO_EVICT = 3


@dataclass
class Endpoint:
    url: str
    healthy: bool = False
    fingerprint: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    checked: float = 0.0
    error: str = "not checked yet"
    timeouts: int = 0  # health checks timed out in a row


class Upstreams:
    def __init__(self, models: dict[str, list[str]], *, timeout: float = 600.0, check_interval: float = 5.0):
        self.models = {name: [Endpoint(u.rstrip("/")) for u in urls] for name, urls in models.items()}
        self.check_interval = check_interval
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=2.0),
                                        limits=httpx.Limits(max_connections=512, max_keepalive_connections=128))
        self._rr = itertools.count()
        self._task: asyncio.Task | None = None

    async def check(self, ep: Endpoint) -> None:
        try:
            ready = await self.client.get(f"{ep.url}{routes.READY}", timeout=2.0)
            info = (await self.client.get(f"{ep.url}{routes.FINGERPRINT}", timeout=2.0)).json()
            ep.fingerprint = info[routes.F_FINGERPRINT]
            ep.defaults = info.get(routes.F_SAMPLING_DEFAULTS) or {}
            ep.healthy = ready.status_code == 200
            ep.error = "" if ep.healthy else f"not ready: {ready.json().get('reasons')}"
            ep.timeouts = 0
        except httpx.TimeoutException as exc:
            ep.timeouts += 1
            ep.error = f"{type(exc).__name__}: {exc} ({ep.timeouts} health checks in a row timed out)"
            if ep.timeouts >= HEALTH_TIMEOUTS_TO_EVICT:
                ep.healthy = False
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            ep.healthy, ep.error, ep.timeouts = False, f"{type(exc).__name__}: {exc}", 0
        ep.checked = time.monotonic()

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(ep) for eps in self.models.values() for ep in eps))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            await self.check_all()

    async def start(self) -> None:
        await self.check_all()
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        await self.client.aclose()

    def candidates(self, model: str) -> list[Endpoint]:
        """Healthy endpoints, rotated for balance; unknown model -> KeyError."""
        eps = [ep for ep in self.models[model] if ep.healthy and ep.fingerprint]
        if not eps:
            return []
        start = next(self._rr) % len(eps)
        return eps[start:] + eps[:start]

    async def post(self, ep: Endpoint, path: str, body: dict[str, Any], *, expected: str | None = None) -> dict[str, Any]:
        """One call; connection failures and 5xx mark the endpoint unhealthy and raise UpstreamError.
        ``expected``: the fingerprint the call is keyed on (default: the endpoint's). Compared with
        the answer's, not with the endpoint's current one: a health check that lands mid-call may
        already have moved the endpoint to the worker's new numerics."""
        expected = ep.fingerprint if expected is None else expected
        try:
            resp = await self.client.post(f"{ep.url}{path}", json=body)
        except httpx.HTTPError as exc:
            ep.healthy, ep.error = False, f"{type(exc).__name__}: {exc}"
            raise UpstreamError(502, f"worker {ep.url} failed: {type(exc).__name__}") from exc
        if resp.status_code >= 500:
            ep.healthy, ep.error = False, f"HTTP {resp.status_code}"
            raise UpstreamError(502, f"worker {ep.url} answered {resp.status_code}")
        try:
            data = resp.json()
        except ValueError as exc:
            raise UpstreamError(502, f"worker {ep.url} answered non-JSON") from exc
        if resp.status_code >= 400:
            raise UpstreamRejected(resp.status_code, data)
        if not isinstance(data, dict) or data.get("system_fingerprint") != expected:
            # The worker's numerics changed under us (restart on another node?): never store this.
            asyncio.get_running_loop().create_task(self.check(ep))
            got = data.get("system_fingerprint") if isinstance(data, dict) else None
            raise UpstreamError(502, f"worker {ep.url} answered with fingerprint {got}, expected {expected}")
        return data

    async def stream(self, ep: Endpoint, path: str, body: dict[str, Any], *,
                     expected: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """One streamed call: the worker's SSE chunks, parsed. Failures as for ``post``; a chunk
        stamped with another fingerprint than ``expected`` (the call's) aborts the call (nothing is stored)."""
        expected = ep.fingerprint if expected is None else expected
        try:
            async with self.client.stream("POST", f"{ep.url}{path}", json={**body, "stream": True}) as resp:
                if resp.status_code >= 500:
                    ep.healthy, ep.error = False, f"HTTP {resp.status_code}"
                    raise UpstreamError(502, f"worker {ep.url} answered {resp.status_code}")
                if resp.status_code >= 400:
                    raw = await resp.aread()
                    try:
                        raise UpstreamRejected(resp.status_code, json.loads(raw))
                    except ValueError as exc:
                        raise UpstreamError(502, f"worker {ep.url} answered non-JSON") from exc
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        return
                    try:
                        chunk = json.loads(data)
                    except ValueError as exc:
                        raise UpstreamError(502, f"worker {ep.url} streamed non-JSON") from exc
                    if "error" in chunk and "choices" not in chunk:
                        raise UpstreamError(502, f"worker {ep.url} failed mid-stream: {chunk['error']}")
                    fp = chunk.get("system_fingerprint")
                    if fp is not None and fp != expected:
                        asyncio.get_running_loop().create_task(self.check(ep))
                        raise UpstreamError(502, f"worker {ep.url} answered with fingerprint {fp}, expected {expected}")
                    yield chunk
        except httpx.HTTPError as exc:
            ep.healthy, ep.error = False, f"{type(exc).__name__}: {exc}"
            raise UpstreamError(502, f"worker {ep.url} failed: {type(exc).__name__}") from exc
