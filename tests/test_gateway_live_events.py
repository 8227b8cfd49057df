"""Live events (``{key}:live``) against a real redis-server: a follower on another replica takes
only the events this deployment's leader sealed for that stream, in order, once. Anyone else who
can write to Redis (a forged, altered, replayed or foreign event) gets nothing served: the follower
stops taking chunks, counts the event, and ends with the sealed entry.

No worker here: the leader's side is :class:`invariant.gateway.live.Publisher` fed the chunks a
real vLLM 0.32 worker streams (tests/test_gateway_records.py), the follower ``follow_remote``.
"""

from __future__ import annotations

import asyncio
import copy

import pytest
import redis

from invariant.gateway import live as live_mod
from invariant.gateway.entries import seal_event, unseal_event
from invariant.gateway.metrics import Metrics
from invariant.gateway.records import Progress
from invariant.gateway.store import Store
from test_gateway_records import STREAM
from test_gateway_service import redis_server  # noqa: F401 - fixture

SECRET = b"entry-key-of-this-deployment"


def _true_record():
    p = Progress("completions")
    for chunk in STREAM:
        p.feed(chunk)
    return p.record()


def _forged_chunk(index: int) -> dict:
    """The chunk an attacker would like served: its own token, at the index the follower expects."""
    chunk = copy.deepcopy(STREAM[1])
    choice = chunk["choices"][0]
    choice["text"], choice["token_ids"] = " PWNED", [31337]
    choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"] = [" PWNED"], [-0.01]
    return live_mod.event_chunk(chunk, index)


async def _follow(url: str, key: str, inject, *, store_entry: bool):
    """A leader publishes the true stream with ``inject(raw_redis, key, publisher, step)`` called
    before each of its events; a follower on a second Store reads it. Returns (follower's Live,
    rejected-event counts)."""
    leader = Store(url, Metrics(), entry_key=SECRET)
    follower_store = Store(url, Metrics(), entry_key=SECRET)
    raw = redis.Redis.from_url(url, decode_responses=True)
    raw.delete(f"{key}:live", key)
    record = _true_record()
    try:
        pub = live_mod.Publisher(leader, key, 60_000)
        events = [live_mod.event_max_tokens(None)]
        index = 0
        for chunk in STREAM:
            events.append(live_mod.event_chunk(chunk, index))
            index += sum(len(c.get("token_ids") or []) for c in chunk["choices"])
        events.append(live_mod.EVENT_DONE)
        for step, fields in enumerate(events):
            inject(raw, key, pub, step)
            if fields is live_mod.EVENT_DONE and store_entry:
                assert await leader.put(key, record, 60)
            assert await pub(fields)

        async def stored():
            got, _ = await follower_store.get(key)
            return got

        follower = live_mod.Live("completions", "inv-x")
        deadline = asyncio.get_running_loop().time() + 10
        await live_mod.follow_remote(follower_store, key, follower, deadline=deadline, block_ms=50, stored=stored)
        counts = {s.labels["reason"]: s.value for m in follower_store.metrics.rejected_entries.collect()
                  for s in m.samples if s.name.endswith("_total")}
        return follower, counts, record
    finally:
        await leader.close()
        await follower_store.close()


def _run(url, key, inject, store_entry=True):
    return asyncio.run(_follow(url, key, inject, store_entry=store_entry))


def test_the_control_true_events_are_followed_token_by_token(redis_server):  # noqa: F811
    follower, counts, record = _run(redis_server.url, "inv:live-true", lambda *a: None, store_entry=False)
    assert follower.record is not None and follower.record.token_ids == record.token_ids
    assert follower.progress.token_ids == [653, 106, 107] and counts == {}


def _xadd(raw, key, fields):
    raw.xadd(f"{key}:live", fields)


ATTACKS = {
    # an unsealed chunk at the very index the follower waits for (today's code fed it)
    "unsealed chunk": lambda raw, key, pub, step: step == 2 and _xadd(raw, key, _forged_chunk(1)),
    # sealed fields copied from a true event, the chunk swapped
    "altered chunk": lambda raw, key, pub, step: step == 2 and _xadd(
        raw, key, {**seal_event(key, pub.generation, pub.seq, _forged_chunk(1), b"not-the-key")}),
    # a forged end: ``error`` would fail the follower's stream, ``done`` end it early
    "unsealed error": lambda raw, key, pub, step: step == 2 and _xadd(raw, key, live_mod.event_error("x")),
    # a true event of this stream, read back and appended again (a replay)
    "replayed true event": lambda raw, key, pub, step: step == 3 and _xadd(
        raw, key, raw.xrange(f"{key}:live")[1][1]),
    # a true event of another generation (another key's stream copied in)
    "event of another stream": lambda raw, key, pub, step: step == 2 and _xadd(
        raw, key, seal_event(key + "-other", pub.generation, pub.seq, _forged_chunk(1), SECRET)),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_forged_or_replayed_live_event_is_never_served_and_is_counted(redis_server, attack):  # noqa: F811
    key = f"inv:live-{attack.replace(' ', '-')}"
    follower, counts, record = _run(redis_server.url, key, ATTACKS[attack])
    assert follower.error is None, follower.error
    assert follower.record is not None and follower.record.token_ids == record.token_ids  # the sealed entry
    assert 31337 not in follower.progress.token_ids
    assert sum(counts.values()) >= 1, counts


def test_a_forged_event_without_a_stored_entry_fails_the_stream_cleanly(redis_server):  # noqa: F811
    """Nothing to fall back on: the follower must fail (an OpenAI error event), not serve the forgery."""
    follower, counts, _ = _run(redis_server.url, "inv:live-nostore", ATTACKS["unsealed chunk"], store_entry=False)
    assert follower.record is None and "lost events" in (follower.error or ""), follower.error
    assert 31337 not in follower.progress.token_ids and counts == {"live": 1.0}


def test_event_seals_bind_key_generation_number_and_fields():
    sealed = seal_event("k", "g1", 3, {"c": "{}", "i": "0"}, SECRET)
    assert unseal_event("k", sealed, SECRET) == ("g1", 3, {"c": "{}", "i": "0"})
    for changed in ({"c": "{ }"}, {"i": "1"}, {"n": "4"}, {"g": "g2"}, {"m": "0" * 64}, {"n": "-3"}, {"n": "9" * 40}):
        assert unseal_event("k", {**sealed, **changed}, SECRET) is None, changed
    assert unseal_event("k2", sealed, SECRET) is None and unseal_event("k", sealed, b"other") is None
    assert unseal_event("k", {k: v for k, v in sealed.items() if k != "m"}, SECRET) is None
