"""The store against a real redis-server: a Redis hiccup never loses a generation."""

from __future__ import annotations

import asyncio

import redis

from conftest import free_port
from invariant.gateway.entries import unseal
from invariant.gateway.metrics import Metrics
from invariant.gateway.records import Record
from invariant.gateway.store import Store
from test_gateway_service import RedisServer, redis_server  # noqa: F401 - fixture

RECORD = Record(token_ids=[5, 6, 7], pieces=["a", "b", "c"], finish_reason="length", prompt_tokens=3)


def test_a_slow_live_publish_does_not_make_the_entry_skip_redis(redis_server):  # noqa: F811
    """Under load a live event may time out; the entry's store right after it must still reach
    Redis (another replica's followers and later requests read it there)."""
    async def scenario():
        store = Store(redis_server.url, Metrics(), timeout=0.1)
        try:
            assert await store.live_publish("k1", {"t": "x"}, 10_000)
            redis.Redis.from_url(redis_server.url).execute_command("CLIENT", "PAUSE", 600, "WRITE")
            assert not await store.live_publish("k1", {"t": "y"}, 10_000)  # timed out
            await asyncio.sleep(0.7)
            assert await store.put("k1", RECORD, 60)
        finally:
            await store.close()

    asyncio.run(scenario())
    assert Record.loads(unseal("k1", redis.Redis.from_url(redis_server.url).get("k1"), b"")) == RECORD


def _with_a_redis_to_kill(scenario) -> None:
    """Run ``scenario(server, store)`` against a redis-server of its own, which it may stop."""
    server = RedisServer(free_port()).start()

    async def run():
        store = Store(server.url, Metrics(), timeout=0.1)
        try:
            await scenario(server, store)
        finally:
            await store.close()

    try:
        asyncio.run(run())
    finally:
        server.stop()


def test_a_failed_put_keeps_the_entry_on_this_replica():
    async def scenario(server, store):
        server.stop()
        assert not await store.put("k2", RECORD, 60)  # Redis could not take it ...
        record, _ = await store.get("k2")
        assert record == RECORD  # ... but the generation is not lost here
        missing, _ = await store.get("other")
        assert missing is None

    _with_a_redis_to_kill(scenario)


def test_evicting_with_redis_down_still_drops_the_local_copy():
    """A poisoned entry found while Redis is unreachable: this replica stops serving it at once
    (its copy goes), and the evict reports that Redis did not take the delete."""
    async def scenario(server, store):
        assert await store.put("k3", RECORD, 60)
        server.stop()
        assert await store.evict("k3") is False  # Redis gone mid-way: the delete did not land
        record, ok = await store.get("k3")
        assert record is None and ok is False  # not served from the local copy any more

    _with_a_redis_to_kill(scenario)
