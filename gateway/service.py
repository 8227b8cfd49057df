"""The gateway's request path: authenticate -> resolve (defaults filled as the worker would) ->
pick a healthy worker (its fingerprint is part of the key) -> look up each choice's entry ->
answer from the records, or generate the missing choices once (single flight) and store them.

The routes that call it are in gateway/app.py; configuration in gateway/config.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from invariant.gateway import live as live_mod
from invariant.gateway.auth import Tenant
from invariant.gateway.call import Call, CallError
from invariant.gateway.config import PATHS, GatewayConfig, ModelPolicy
from invariant.gateway.errors import openai_error
from invariant.gateway.keys import RequestError, Resolved, bypass_reason, parse_json, resolve
from invariant.gateway.limits import RateLimiter
from invariant.gateway.live import Live
from invariant.gateway.lru import Lru
from invariant.gateway.metrics import Metrics
from invariant.gateway.singleflight import LOCAL, SingleFlight
from invariant.gateway.records import Record, covers, etag, record_from_choice, render_response, render_stream, truncate
from invariant.gateway.store import Store
from invariant.gateway.upstream import Endpoint, UpstreamError, UpstreamRejected, Upstreams

log = logging.getLogger("invariant.gateway")


@dataclass
class HotEntry:
    model: str
    fingerprint: str
    expires: float
    records: list[Record]
    headers: dict[str, str]
    body_tail: bytes | None  # the JSON response after its "id" and "created"; None for streamed requests
    call: Call  # the call it answered (streaming flags)

    def size(self) -> int:
        """Bytes it holds, near enough for the tier's byte bound: its records as stored, its body."""
        return sum(len(r.dumps()) for r in self.records) + len(self.body_tail or b"") + 512


HOT_ENTRIES = 4096
HOT_SECONDS = 60.0


class Gateway:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.metrics = Metrics()
        self.store = Store(config.redis_url, self.metrics, timeout=config.redis_timeout, entry_key=config.entry_key,
                           l1_bytes=config.l1_bytes, tls_ca_file=config.redis_ca_file,
                           tls_cert_file=config.redis_cert_file, tls_key_file=config.redis_key_file)
        self.upstreams = Upstreams(config.models, check_interval=config.check_interval)
        if not config.entry_key:
            log.warning("no INVARIANT_GATEWAY_ENTRY_KEY: Redis entries carry a checksum, not a signature; "
                        "anyone who can write to Redis can forge a cache hit")
        self.limiter = RateLimiter()
        self.flights = SingleFlight(self.store, config.lock_ttl_ms)  # gateway/singleflight.py
        # Hot responses: the exact request bytes (per tenant and Cache-Control) -> what answered
        # them. Sound because entries are immutable: same bytes, same fingerprint, same answer.
        self._hot: Lru[tuple, HotEntry] = Lru(HOT_ENTRIES, time.monotonic, max_bytes=config.hot_bytes,
                                              size=HotEntry.size)
        self._verifying = asyncio.Semaphore(1)
        self._background: set[asyncio.Task] = set()

    # --- generation -----------------------------------------------------------------------------
    def upstream_body(self, resolved: Resolved, body: dict[str, Any], choice: int,
                      cache_salt: str | None = None) -> dict[str, Any]:
        """The request one choice is generated with: n=1, seed + choice, token ids and per-token
        logprobs on (they only report; the tokens do not change); ``cache_salt`` separates vLLM's
        prefix cache per tenant (it changes no bits: a prefix hit reuses the same numbers)."""
        up = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "n", "cache_salt")}
        if cache_salt is not None:
            up["cache_salt"] = cache_salt
        up["n"] = 1
        if resolved.seed is not None and not resolved.greedy:
            up["seed"] = resolved.seed + choice
        up["return_token_ids"] = True
        if resolved.kind == "completions":
            if up.get("logprobs") is None:
                up["logprobs"] = 0
        elif not up.get("logprobs"):
            up["logprobs"], up["top_logprobs"] = True, 0
        return up

    async def generate(self, ep: Endpoint, call: Call, choice: int) -> Record:
        resolved = call.resolved
        started = time.perf_counter()
        try:
            data = await self.upstreams.post(ep, PATHS[resolved.kind],
                                             self.upstream_body(resolved, call.body, choice, call.cache_salt),
                                             expected=call.fingerprint)
        except (UpstreamError, UpstreamRejected):
            self.metrics.upstream_calls.labels(resolved.model, "error").inc()
            raise
        try:
            usage = data.get("usage") or {}
            record = record_from_choice(resolved.kind, data["choices"][0], int(usage.get("prompt_tokens", 0)),
                                        data["system_fingerprint"], int(data.get("created") or time.time()))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            self.metrics.upstream_calls.labels(resolved.model, "error").inc()
            raise UpstreamError(502, f"worker {ep.url} gave an answer that cannot be served: {exc}") from exc
        self.metrics.upstream_calls.labels(resolved.model, "ok").inc()
        self.metrics.upstream_latency.labels(resolved.model).observe(time.perf_counter() - started)
        return record

    async def generate_with_retry(self, call: Call, choice: int) -> Record:
        """Try replicas of the same fingerprint in turn; a different fingerprint is another key."""
        fingerprint = call.fingerprint
        last: UpstreamError | None = None
        for ep in [c for c in call.candidates if c.fingerprint == fingerprint]:
            try:
                return await self.generate(ep, call, choice)
            except UpstreamError as exc:
                last = exc
                log.warning("retrying on another replica: %s", exc.message)
        raise last or UpstreamError(503, "no healthy worker")

    async def generate_live(self, call: Call, live: Live, publish: live_mod.Publisher | None) -> Record:
        """Like ``generate_with_retry`` (choice 0), but streamed from the worker into ``live`` (and,
        with ``publish``, into that entry's Redis Stream for followers on other replicas)."""
        resolved, candidates = call.resolved, call.candidates
        fingerprint = call.fingerprint
        up = {**self.upstream_body(resolved, call.body, 0, call.cache_salt), "stream_options": {"include_usage": True}}
        last: UpstreamError | None = None
        for ep in [c for c in candidates if c.fingerprint == fingerprint]:
            started = time.perf_counter()
            try:
                async for chunk in self.upstreams.stream(ep, PATHS[resolved.kind], up, expected=fingerprint):
                    index = len(live.progress.token_ids)  # followers check continuity with it
                    live.feed(chunk)
                    if publish:
                        await publish(live_mod.event_chunk(chunk, index))
                record = live.progress.record()
            except UpstreamRejected:
                self.metrics.upstream_calls.labels(resolved.model, "error").inc()
                raise
            except (UpstreamError, ValueError) as exc:
                self.metrics.upstream_calls.labels(resolved.model, "error").inc()
                last = exc if isinstance(exc, UpstreamError) else UpstreamError(502, str(exc))
                log.warning("retrying on another replica: %s", last.message)
                live.restart()
                if publish:
                    await publish(live_mod.EVENT_RESTART)
                continue
            self.metrics.upstream_calls.labels(resolved.model, "ok").inc()
            self.metrics.upstream_latency.labels(resolved.model).observe(time.perf_counter() - started)
            return record
        raise last or UpstreamError(503, "no healthy worker")

    async def fill_live(self, call: Call, key: str, store: bool) -> tuple[Live | None, str]:
        """``fill`` for a streamed request: returns at once with a ``Live`` view of the generation,
        led here (MISS), or followed (COALESCED) here or on another replica, from its first token."""
        resolved, flights = call.resolved, self.flights
        fingerprint, mine = call.fingerprint, resolved.max_tokens
        live, task = flights.live.get(key), flights.tasks.get(key)
        if live is not None and live_mod.joinable(live.max_tokens, mine):
            return live, "COALESCED"
        if task is not None and live_mod.joinable(flights.max_tokens.get(key), mine):
            # a non-streamed generation of this entry is under way here
            return self._live_from_task(resolved.kind, fingerprint, task), "COALESCED"
        if task is not None:  # a shorter one is under way here: not for us
            return None, "MISS"
        claim = await flights.claim(key, mine, store)
        if claim.how == "peer":  # another replica leads: follow its stream
            follower = Live(resolved.kind, fingerprint)

            async def stored() -> Record | None:
                record, _ = await self.store.get(key)
                return record if record is not None and covers(record, mine) else None

            deadline = asyncio.get_running_loop().time() + self.config.lock_ttl_ms / 1000
            self._spawn(live_mod.follow_remote(self.store, key, follower, deadline=deadline, stored=stored,
                                               wanted=mine))
            return follower, "COALESCED"
        if claim.how == "stored":
            done = Live(resolved.kind, fingerprint)
            done.finish(claim.record)
            return done, "COALESCED"
        if claim.how == "raced":  # another request here started it meanwhile: join that one instead
            return await self.fill_live(call, key, store)
        token = claim.token
        live = Live(resolved.kind, fingerprint, mine)
        lock_ttl = self.config.lock_ttl_ms
        publish = live_mod.Publisher(self.store, key, lock_ttl) if store and token != LOCAL else None

        async def lead() -> Record:
            try:
                if publish:
                    await publish(live_mod.event_max_tokens(mine))
                record = await self.generate_live(call, live, publish)
                if store:
                    await self.store.put(key, record, call.policy.ttl_seconds)
                live.finish(record)
                if publish:
                    await publish(live_mod.EVENT_DONE)
                return record
            except BaseException as exc:
                live.fail(getattr(exc, "message", None) or str(exc) or type(exc).__name__, exc)
                if publish:
                    await publish(live_mod.event_error(live.error or "failed"))
                raise
            finally:
                flights.untrack(key, task)
                await flights.release(key, token)

        task = asyncio.get_running_loop().create_task(lead())
        task.add_done_callback(_retrieve)
        flights.track(key, task, mine, live)
        return live, "MISS"

    def _live_from_task(self, kind: str, fingerprint: str, task: asyncio.Task) -> Live:
        view = Live(kind, fingerprint)

        def done(t: asyncio.Task) -> None:
            if t.cancelled():
                view.fail("cancelled")
            elif t.exception() is not None:
                exc = t.exception()
                view.fail(getattr(exc, "message", None) or str(exc), exc)
            else:
                view.finish(t.result())

        task.add_done_callback(done)
        return view

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def fill(self, call: Call, key: str, choice: int, store: bool) -> tuple[Record, str]:
        """Generate one entry once across concurrent requests (here and on other replicas).

        Returns the record and how this caller got it: MISS (it led) or COALESCED (it followed).
        The generation runs in its own task: a leader's client hanging up does not cancel it.
        """
        flights, mine = self.flights, call.resolved.max_tokens
        task = flights.tasks.get(key)
        if task is not None and live_mod.joinable(flights.max_tokens.get(key), mine):
            return await asyncio.shield(task), "COALESCED"
        if task is not None:  # a shorter generation of this entry is under way: make our own, unshared
            return await self.generate_with_retry(call, choice), "MISS"
        claim = await flights.claim(key, mine, store)
        if claim.how == "peer":  # another replica generates: wait for its entry
            record = await self._await_peer(key, mine)
            if record is not None:
                return record, "COALESCED"
            claim = await flights.claim(key, mine, store, lock=False)  # it gave up: lead, unlocked
        if claim.how == "stored":
            return claim.record, "COALESCED"
        if claim.how == "raced":
            return await self.fill(call, key, choice, store)
        token = claim.token

        async def lead() -> Record:
            try:
                record = await self.generate_with_retry(call, choice)
                if store:
                    await self.store.put(key, record, call.policy.ttl_seconds)
                return record
            finally:
                flights.untrack(key, task)
                await flights.release(key, token)

        task = asyncio.get_running_loop().create_task(lead())
        flights.track(key, task, mine)
        return await asyncio.shield(task), "MISS"

    async def _await_peer(self, key: str, max_tokens: int | None) -> Record | None:
        deadline = time.monotonic() + self.config.lock_ttl_ms / 1000
        delay = 0.01
        while time.monotonic() < deadline:
            record, ok = await self.store.get(key)
            if record is not None and covers(record, max_tokens):
                return record
            if not ok or record is not None:  # Redis gone, or the peer's entry is too short for us
                return None
            if not await self.store.locked(key):
                # The leader released its lock without storing (it failed), or its lock expired:
                # nobody is generating this entry; one more look, then lead ourselves.
                record, _ = await self.store.get(key)
                return record if record is not None and covers(record, max_tokens) else None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
        return None

    # --- requests ---------------------------------------------------------------------------------
    async def handle(self, kind: str, request: Request) -> Response:
        endpoint = PATHS[kind]
        response = await self._handle(kind, request)
        self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    async def admit(self, request: Request) -> tuple[Tenant, bytes] | Response:
        """Who asks and what they sent, or the refusal: the API key (401), the tenant's rate (429),
        the body's size (413, read in bounded chunks). Every route that generates passes here."""
        tenant = self.config.api_keys.tenant_for(request.headers.get("authorization"))
        if tenant is None:
            return openai_error(401, "Incorrect or missing API key.", "invalid_request_error", "invalid_api_key")
        if not self.limiter.allow(tenant):
            return openai_error(429, "Rate limit reached for this API key.", "rate_limit_error", "rate_limit_exceeded")
        raw = await read_body(request, self.config.max_body_bytes)
        if raw is None:
            return openai_error(413, f"Request body exceeds {self.config.max_body_bytes} bytes.",
                                "invalid_request_error", "request_too_large")
        return tenant, raw

    async def _handle(self, kind: str, request: Request) -> Response:
        admitted = await self.admit(request)
        if isinstance(admitted, Response):
            return admitted
        tenant, raw = admitted
        hot_key = (kind, tenant.name, request.headers.get("cache-control"), hashlib.sha256(raw).digest())
        hot = self._hot_get(hot_key)
        if hot is not None:
            self.metrics.cache.labels("hit").inc()
            self._maybe_reverify(hot.call)
            return self._hot_response(hot)
        try:
            body = parse_json(raw)
        except RequestError as exc:
            return openai_error(400, str(exc), "invalid_request_error")
        if not isinstance(body, dict):
            return openai_error(400, "The request body must be a JSON object.", "invalid_request_error")
        try:
            call = self.shape(kind, body, tenant, request.headers.get("cache-control"))
        except CallError as exc:
            return openai_error(exc.status, exc.message, exc.type_, exc.code, exc.param)
        resolved, model = call.resolved, call.model
        headers = {"x-invariant-fingerprint": call.fingerprint}
        reason = bypass_reason(resolved, call.cache_control)
        try:
            if reason is not None:
                self.metrics.cache.labels("bypass").inc()
                records = await asyncio.gather(*(self.generate_with_retry(call, i) for i in range(resolved.n)))
                outcome = "BYPASS"
                headers["x-invariant-bypass-reason"] = reason
            elif call.live_capable:
                live_response = await self._live_response(call, headers)
                if live_response is not None:
                    return live_response
                records, outcome, redis_ok = await self._cached(call)
            else:
                records, outcome, redis_ok = await self._cached(call)
                if not redis_ok:
                    headers["x-invariant-cache-degraded"] = "redis-unavailable"
        except UpstreamRejected as exc:
            return JSONResponse(exc.body, status_code=exc.status, headers=headers)
        except UpstreamError as exc:
            return openai_error(exc.status, exc.message, "server_error", "upstream_error", headers=headers)

        records = [truncate(r, resolved.max_tokens) for r in records]
        headers["x-invariant-cache"] = outcome
        if outcome == "HIT":
            self._maybe_reverify(call)
        headers["etag"] = etag([r.token_ids for r in records])
        request_id, created = new_response_id(kind), int(time.time())
        tail = None
        if not call.stream:
            payload = render_response(kind, records, request_id=request_id, model=model, created=created,
                                      want_logprobs=call.want_logprobs, want_token_ids=call.want_token_ids)
            tail = _json_tail(payload)
        if outcome != "BYPASS" and call.store_allowed and "x-invariant-cache-degraded" not in headers:
            self._hot_put(hot_key, HotEntry(model=model, fingerprint=call.fingerprint,
                                            expires=time.monotonic() + min(HOT_SECONDS, call.policy.ttl_seconds),
                                            records=records, headers=dict(headers, **{"x-invariant-cache": "HIT"}),
                                            body_tail=tail, call=call))
        if tail is None:
            return self._stream(call, records, request_id, created, headers)
        return Response(_json_with_head(request_id, created, tail), media_type="application/json", headers=headers)

    async def _live_response(self, call: Call, headers: dict[str, str]) -> Response | None:
        """A streamed miss: stream the generation as it happens (None: it is a hit, answer as usual)."""
        key = call.key(0)
        record, redis_ok = await self.store.get(key)
        if record is not None and covers(record, call.resolved.max_tokens):
            return None
        live, outcome = await self.fill_live(call, key, call.store_allowed and redis_ok)
        if live is None:  # a shorter generation of this entry runs here: answer on the ordinary path
            return None
        await live.started()
        if live.unjoinable:  # a peer generates a shorter one: answer this request on its own
            return None
        if isinstance(live.exception, UpstreamRejected):
            return JSONResponse(live.exception.body, status_code=live.exception.status, headers=headers)
        if live.error is not None and not live.progress.token_ids:
            status = getattr(live.exception, "status", 502)
            return openai_error(status, live.error, "server_error", "upstream_error", headers=headers)
        self.metrics.cache.labels(outcome.lower()).inc()
        headers = dict(headers, **{"x-invariant-cache": outcome, "x-invariant-live": "1"})
        if not (redis_ok and self.store.available):
            headers["x-invariant-cache-degraded"] = "redis-unavailable"
        stream = live_mod.render(live, request_id=new_response_id(call.kind), model=call.model, created=int(time.time()),
                                 want_logprobs=call.want_logprobs, want_token_ids=call.want_token_ids,
                                 include_usage=call.include_usage, max_tokens=call.resolved.max_tokens,
                                 own=lambda: self.generate_with_retry(call, 0))
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)

    def _stream(self, call: Call, records: list[Record], request_id: str, created: int,
                headers: dict[str, str]) -> StreamingResponse:
        chunks = list(render_stream(call.kind, records, request_id=request_id, model=call.model, created=created,
                                    want_logprobs=call.want_logprobs, want_token_ids=call.want_token_ids,
                                    include_usage=call.include_usage))
        return StreamingResponse(iter(chunks), media_type="text/event-stream", headers=headers)

    def _maybe_reverify(self, call: Call) -> None:
        """Replay a sample of hits on a worker in the background: a determinism canary and a
        cache-poisoning alarm (mismatches are counted in invariant_gateway_verify_total)."""
        if self.config.verify_sample <= 0 or random.random() >= self.config.verify_sample or self._verifying.locked():
            return

        async def run() -> None:
            async with self._verifying:
                try:
                    report = await self.verify(call.kind, call.body, call.tenant)
                    if not report["match"]:
                        log.error("cache entry differs from a fresh generation: %s", report)
                except Exception as exc:  # noqa: BLE001 - a failed replay is not a request failure
                    log.warning("background verify failed: %s", exc)

        self._spawn(run())

    # --- hot responses -----------------------------------------------------------------------------
    def _hot_get(self, key: tuple) -> HotEntry | None:
        hot = self._hot.get(key)
        if hot is None:
            return None
        served = any(ep.healthy and ep.fingerprint == hot.fingerprint for ep in self.upstreams.models.get(hot.model, ()))
        if not served:
            self._hot.pop(key)  # no worker serves these numerics any more
            return None
        return hot

    def _drop_hot(self, model: str, fingerprint: str) -> None:
        """Forget the hot responses of one model's numerics (after a failed replay among them)."""
        self._hot.drop_where(lambda e: e.model == model and e.fingerprint == fingerprint)

    def _hot_put(self, key: tuple, entry: HotEntry) -> None:
        self._hot.put(key, entry, entry.expires)

    def _hot_response(self, hot: HotEntry) -> Response:
        request_id, created = new_response_id(hot.call.kind), int(time.time())
        if hot.body_tail is None:  # a streamed request
            return self._stream(hot.call, hot.records, request_id, created, dict(hot.headers))
        return Response(_json_with_head(request_id, created, hot.body_tail), media_type="application/json",
                        headers=hot.headers)

    async def _cached(self, call: Call) -> tuple[list[Record], str, bool]:
        resolved, store = call.resolved, call.store_allowed
        keys = [call.key(i) for i in range(resolved.n)]
        unique = list(dict.fromkeys(keys))
        found: dict[str, Record] = {}
        redis_ok = True
        for key in unique:
            record, ok = await self.store.get(key)
            redis_ok = redis_ok and ok
            if record is not None and covers(record, resolved.max_tokens):
                found[key] = record
        missing = [k for k in unique if k not in found]
        if not missing:
            self.metrics.cache.labels("hit").inc()
            return [found[k] for k in keys], "HIT", redis_ok
        results = await asyncio.gather(*(self.fill(call, k, keys.index(k), store and redis_ok) for k in missing))
        outcomes = {how for _, how in results}
        for k, (record, _) in zip(missing, results):
            found[k] = record
        outcome = "MISS" if "MISS" in outcomes else "COALESCED"
        self.metrics.cache.labels(outcome.lower()).inc()
        return [found[k] for k in keys], outcome, redis_ok and self.store.available

    def shape(self, kind: str, body: dict[str, Any], tenant: Tenant, cache_control: str | None = None) -> Call:
        """The request as one call: model known, a worker ready, resolved as that worker resolves it,
        within this gateway's limits; otherwise the refusal (CallError) a client gets."""
        model = body.get("model")
        if not isinstance(model, str) or model not in self.upstreams.models:
            raise CallError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model")
        candidates = self.upstreams.candidates(model)
        if not candidates:
            raise CallError(503, f"No worker for `{model}` is ready.", "server_error", "model_unavailable")
        try:
            resolved = resolve(kind, body, candidates[0].defaults)
        except RequestError as exc:
            raise CallError(400, str(exc)) from exc
        if resolved.max_tokens is not None and resolved.max_tokens > self.config.max_tokens_limit:
            raise CallError(400, f"'max_tokens' exceeds this gateway's limit of {self.config.max_tokens_limit}.",
                            param="max_tokens")
        total = resolved.n * (resolved.max_tokens or self.config.max_tokens_limit)
        if resolved.n > 1 and total > self.config.max_total_tokens:
            raise CallError(400, f"'n' x 'max_tokens' ({total}) exceeds this gateway's limit of "
                                 f"{self.config.max_total_tokens} tokens per request.", param="n")
        if not self.limiter.allow_tokens(tenant, total):
            raise CallError(429, f"Token rate limit reached for this API key: this request may generate {total} "
                                 f"tokens ('n' x 'max_tokens'); the key's budget is {tenant.tokens_per_minute} "
                                 "tokens per minute.", "rate_limit_error", "rate_limit_exceeded")
        return Call(kind=kind, body=body, resolved=resolved, tenant=tenant,
                    policy=self.config.policies.get(model, ModelPolicy()), candidates=tuple(candidates),
                    cache_control=cache_control, keyed_fingerprint=candidates[0].fingerprint or "")

    async def verify(self, kind: str, body: dict[str, Any], tenant: Tenant) -> dict[str, Any]:
        """Replay a stored entry on a worker, bypassing the cache, and compare bits."""
        call = self.shape(kind, body, tenant)
        model = call.model
        results = []
        for i in range(call.resolved.n):
            key = call.key(i)
            stored, _ = await self.store.get(key)
            if stored is None:
                results.append({"choice": i, "stored": False})
                continue
            fresh = await self.generate_with_retry(call.with_body(max_tokens=len(stored.token_ids)), i)
            same_ids = fresh.token_ids == stored.token_ids
            same_lp = fresh.logprobs == stored.logprobs
            self.metrics.verify.labels("match" if same_ids and same_lp else "mismatch").inc()
            result = {"choice": i, "stored": True, "token_ids_match": same_ids, "logprobs_match": same_lp}
            if not (same_ids and same_lp):
                # The entry is not what these numerics give: poisoned or corrupted. Never serve it
                # again: out of Redis, this replica's copy and its hot responses; the next request
                # for it regenerates.
                result["evicted"] = await self.store.evict(key)
                self._drop_hot(model, call.fingerprint)
                log.warning("verify: entry %s of %s differs from its replay (token ids %s, logprobs %s): evicted",
                            key, model, "match" if same_ids else "differ", "match" if same_lp else "differ")
            results.append(result)
        return {"fingerprint": call.fingerprint, "results": results,
                "match": all(r.get("token_ids_match") and r.get("logprobs_match") for r in results if r["stored"])}


async def read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None once it is known to exceed ``limit``: from its Content-Length before any of
    it is read, else as soon as the chunks read pass the limit (never buffered whole first)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return None
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


def _retrieve(task: asyncio.Task) -> None:
    """Mark a leader task's exception as seen (its followers and client got it)."""
    if not task.cancelled():
        task.exception()


def new_response_id(kind: str) -> str:
    return ("cmpl-" if kind == "completions" else "chatcmpl-") + uuid.uuid4().hex


def _json_tail(payload: dict[str, Any]) -> bytes:
    """The response JSON without its per-response "id" and "created" (which _json_with_head adds)."""
    rest = {k: v for k, v in payload.items() if k not in ("id", "created")}
    return json.dumps(rest, separators=(",", ":"), ensure_ascii=False).encode()[1:]


def _json_with_head(request_id: str, created: int, tail: bytes) -> bytes:
    return b'{"id":"' + request_id.encode() + b'","created":' + str(created).encode() + b"," + tail


