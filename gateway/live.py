"""Generations in flight that streamed requests can join: the prefix so far, then the live tail.

The leader of a single-flight generation streams from the worker and feeds a :class:`Live`; local
followers read it directly, and the leader also appends each worker chunk to a Redis Stream
(``{key}:live``) so that followers on other gateway replicas can replay the prefix and follow the
tail (:func:`follow_remote`). Every reader renders canonical SSE (``records.render_live_token`` and
``render_stream_rest``): the bytes are those a replay from the stored entry gives.

If the worker fails mid-stream the leader retries on another replica of the same fingerprint and
starts the progress over; readers keep their count of tokens sent, and since the numerics are the
same, the regenerated tokens are the same ones.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any, AsyncIterator, Awaitable, Callable

from invariant.gateway.entries import seal_event, unseal_event

from invariant.gateway.records import (Progress, Record, covers, render_live_token, render_role_chunk,
                                       render_stream_rest, truncate)


def joinable(leader_max: int | None, mine: int | None) -> bool:
    """A generation for ``leader_max`` tokens answers a request for ``mine`` (its prefix does)."""
    return leader_max is None or (mine is not None and mine <= leader_max)


class Live:
    def __init__(self, kind: str, fingerprint: str, max_tokens: int | None = None) -> None:
        self.kind = kind
        self.fingerprint = fingerprint
        self.max_tokens = max_tokens  # the leader's: who may join (see ``joinable``)
        self.unjoinable = False  # a peer's generation turned out shorter than this request wants
        self.progress = Progress(kind)
        self.record: Record | None = None
        self.error: str | None = None
        self.exception: BaseException | None = None
        self._changed = asyncio.Event()
        self._started = asyncio.Event()

    @property
    def done(self) -> bool:
        return self.record is not None or self.error is not None

    def _notify(self) -> None:
        self._started.set()
        self._changed.set()
        self._changed = asyncio.Event()

    async def started(self) -> None:
        """The first chunk arrived, or the generation ended (a rejected request ends before any)."""
        await self._started.wait()

    def feed(self, chunk: dict[str, Any]) -> None:
        self.progress.feed(chunk)
        self._notify()

    def restart(self) -> None:
        self.progress = Progress(self.kind)
        self._changed.set()
        self._changed = asyncio.Event()

    def finish(self, record: Record) -> None:
        self.record = record
        self._notify()

    def fail(self, message: str, exception: BaseException | None = None) -> None:
        self.error = message
        self.exception = exception
        self._notify()

    async def changed(self) -> None:
        await self._changed.wait()


async def render(live: Live, *, request_id: str, model: str, created: int, want_logprobs: bool,
                 want_token_ids: bool, include_usage: bool, max_tokens: int | None = None,
                 own: Callable[[], Awaitable[Record]] | None = None) -> AsyncIterator[bytes]:
    """Canonical SSE of a live generation: what is known now at once, then each token as it comes.
    ``max_tokens`` (this request's, at most the leader's) ends the stream as a shorter entry would.

    ``own`` generates this request on its own: the leader's longer entry cannot always be cut to a
    shorter one (token strings that split a UTF-8 character do not say where the text of the first
    ``max_tokens`` tokens ends), and then the rest of this stream comes from its own generation."""
    if live.kind == "chat":
        yield render_role_chunk(request_id=request_id, model=model, created=created, fingerprint=live.fingerprint)
    sent = sent_chars = 0
    sent_ids: list[int] = []  # what this client has been sent (a replica taking over must agree)
    prefix: Record | None = None
    while True:
        waiter = asyncio.ensure_future(live.changed())
        try:
            ready = live.progress.live_tokens()
            if max_tokens is not None:
                ready = min(ready, max_tokens)
            while sent < ready:
                yield render_live_token(live.kind, live.progress, sent, request_id=request_id, model=model,
                                        created=created, fingerprint=live.fingerprint,
                                        want_logprobs=want_logprobs, want_token_ids=want_token_ids)
                sent_chars += len(live.progress.deltas[sent])
                sent_ids.append(live.progress.token_ids[sent])
                sent += 1
            if max_tokens is not None and sent == max_tokens and not (
                    live.record is not None and len(live.record.token_ids) <= max_tokens):
                try:
                    prefix = live.progress.prefix_record(max_tokens)  # final: decoding is deterministic
                    break
                except ValueError:
                    pass  # not a truncatable prefix (split UTF-8): wait for the whole entry
            if live.done:
                break
            await waiter
        finally:
            waiter.cancel()
    if prefix is not None:
        for chunk in render_stream_rest(live.kind, prefix, sent, request_id=request_id, model=model,
                                        created=created, want_logprobs=want_logprobs,
                                        want_token_ids=want_token_ids, include_usage=include_usage):
            yield chunk
        return
    if live.record is None:
        for chunk in _failed(str(live.error)):
            yield chunk
        return
    record = live.record
    if max_tokens is not None and len(record.token_ids) > max_tokens:
        if covers(record, max_tokens):
            record = truncate(record, max_tokens)
        else:
            try:
                if own is None:
                    raise ValueError("the longer generation it followed cannot be cut to its max_tokens")
                record = await own()
                if record.token_ids[:sent] != live.progress.token_ids[:sent]:
                    raise ValueError("its own generation disagreed with the tokens already sent")
            except Exception as exc:  # the stream has begun: the error goes in it, as a worker's would
                for chunk in _failed(str(exc)):
                    yield chunk
                return
    if record.token_ids[:sent] != sent_ids:
        # A replica that took over mid-stream (the first one died) gave other tokens than were sent:
        # never splice two generations; the client gets the error instead.
        for chunk in _failed("the replica that took over disagreed with the tokens already sent"):
            yield chunk
        return
    for chunk in render_stream_rest(live.kind, record, sent, request_id=request_id, model=model,
                                    created=created, want_logprobs=want_logprobs, want_token_ids=want_token_ids,
                                    include_usage=include_usage, sent_chars=sent_chars):
        yield chunk


def _failed(message: str) -> tuple[bytes, bytes]:
    """An OpenAI error event and the end: what a stream that has begun says when it cannot go on."""
    error = {"error": {"message": f"the generation failed: {message}", "type": "server_error",
                       "param": None, "code": "upstream_error"}}
    return b"data: " + json.dumps(error).encode() + b"\n\n", b"data: [DONE]\n\n"


# --- the Redis side -------------------------------------------------------------------------------
def event_chunk(chunk: dict[str, Any], index: int) -> dict[str, str]:
    """A worker chunk and the number of tokens before it (a follower detects a lost event by it)."""
    return {"c": json.dumps(chunk, separators=(",", ":")), "i": str(index)}


EVENT_RESTART = {"restart": "1"}


def event_max_tokens(max_tokens: int | None) -> dict[str, str]:
    return {"max_tokens": "none" if max_tokens is None else str(max_tokens)}
EVENT_DONE = {"done": "1"}


def event_error(message: str) -> dict[str, str]:
    return {"error": message}


class Publisher:
    """The leader's side of ``{key}:live``: each event sealed with this generation's random id and
    its number (0, 1, ...), so that a follower takes only this deployment's events, in order, once."""

    def __init__(self, store, key: str, ttl_ms: int) -> None:
        self.store, self.key, self.ttl_ms = store, key, ttl_ms
        self.generation = secrets.token_hex(8)
        self.seq = 0

    async def __call__(self, fields: dict[str, str]) -> bool:
        sealed = seal_event(self.key, self.generation, self.seq, fields, self.store.entry_key)
        self.seq += 1  # also when the publish failed: the follower sees the gap and waits for the entry
        return await self.store.live_publish(self.key, sealed, self.ttl_ms)


async def follow_remote(store, key: str, live: Live, *, deadline: float, block_ms: int = 500,
                        stored=None, wanted: int | None = None) -> None:
    """Feed ``live`` from a peer replica's ``{key}:live`` stream until it is done, fails, or the
    deadline passes. ``stored`` (an async function) returns the entry once the peer has stored it:
    a stream that never appears (the peer generated without streaming, or Redis dropped it) ends
    with the stored entry instead."""
    try:
        await _follow(store, key, live, deadline=deadline, block_ms=block_ms, stored=stored, wanted=wanted)
    except Exception as exc:  # noqa: BLE001 - a reader that dies must end its stream, not hang it
        live.fail(f"following the replica that generates this entry failed: {type(exc).__name__}: {exc}")


async def _follow(store, key: str, live: Live, *, deadline: float, block_ms: int, stored, wanted) -> None:
    last = "0"
    frozen = False
    generation: str | None = None  # the first event's; every later one must carry it
    expected = 0  # the number of the next event
    failures = 0
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        events, ok = await store.live_read(key, last, block_ms)
        if not ok:  # Redis slow or away for a moment: the stored entry may still come; retry a while
            failures += 1
            record = await stored() if stored is not None else None
            if record is not None:
                live.finish(record)
                return
            if failures >= 40:
                break
            await asyncio.sleep(0.1)
            continue
        failures = 0
        for event_id, sealed in events:
            last = event_id
            opened = unseal_event(key, sealed, store.entry_key)
            if opened is None:  # forged or altered: never acted on; the sealed entry decides
                store.metrics.rejected_entries.labels("live").inc()
                frozen = True
                continue
            event_generation, seq, fields = opened
            if generation is None:
                generation = event_generation
            if event_generation != generation or seq < expected:  # replayed or from another generation
                store.metrics.rejected_entries.labels("live-replay").inc()
                frozen = True
                continue
            if seq > expected:  # events lost (a publish timed out): chunks stop counting until a restart
                frozen = True
            expected = seq + 1
            if "max_tokens" in fields:
                leader = None if fields["max_tokens"] == "none" else int(fields["max_tokens"])
                if not joinable(leader, wanted):
                    live.unjoinable = True
                    live.fail("the replica generating this entry generates fewer tokens than asked")
                    return
            elif "c" in fields:
                if frozen or int(fields.get("i", -1)) != len(live.progress.token_ids):
                    frozen = True  # an event was lost (a publish timed out): stop here, take the entry
                    continue
                live.feed(json.loads(fields["c"]))
            elif "restart" in fields:
                live.restart()
                frozen = False
            elif "done" in fields:
                # The leader stored the entry before saying done: it is the truth; the replayed
                # chunks are only a fallback when Redis did not keep the entry.
                record = await stored() if stored is not None else None
                if record is not None:
                    live.finish(record)
                elif not frozen:
                    try:
                        live.finish(live.progress.record())
                    except ValueError as exc:
                        live.fail(str(exc))
                else:
                    live.fail("the live stream lost events and the entry was not stored")
                return
            elif "error" in fields:
                live.fail(fields["error"])
                return
        if not events and stored is not None:
            record = await stored()
            if record is not None:
                live.finish(record)
                return
    if not live.done:
        live.fail("the replica generating this entry went quiet")
