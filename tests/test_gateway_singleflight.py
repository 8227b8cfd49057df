"""The single-flight protocol (gateway/singleflight.py) against a real redis-server: one leader per
entry across replicas, the double check after the lock, and the local registry."""

from __future__ import annotations

import asyncio

from invariant.gateway.metrics import Metrics
from invariant.gateway.records import Record
from invariant.gateway.singleflight import LOCAL, SingleFlight
from invariant.gateway.store import Store
from test_gateway_service import RedisServer, redis_server  # noqa: F401 - fixture

RECORD = Record(token_ids=[5, 6, 7], pieces=["a", "b", "c"], finish_reason="length", prompt_tokens=3)


def test_one_leader_across_replicas_and_the_double_check(redis_server):  # noqa: F811
    async def scenario():
        a, b = Store(redis_server.url, Metrics()), Store(redis_server.url, Metrics())
        fa, fb = SingleFlight(a, 10_000), SingleFlight(b, 10_000)
        try:
            first = await fa.claim("sf1", 3, True)
            assert first.how == "lead" and first.token not in (None, LOCAL)
            assert (await fb.claim("sf1", 3, True)).how == "peer"  # the other replica must follow
            await a.put("sf1", RECORD, 60)
            await fa.release("sf1", first.token)
            again = await fb.claim("sf1", 3, True)  # lock free now, but the entry is there
            assert again.how == "stored" and again.record == RECORD
            longer = await fb.claim("sf1", 10, True)  # a 3-token entry cannot answer 10
            assert longer.how == "lead"
            await fb.release("sf1", longer.token)
            assert (await fa.claim("sf2", None, False)) == ("lead", LOCAL, None)  # Redis off: no lock
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_a_generation_started_meanwhile_is_raced_and_untrack_keeps_a_newer_one(redis_server):  # noqa: F811
    async def scenario():
        store = Store(redis_server.url, Metrics())
        flights = SingleFlight(store, 10_000)
        try:
            old = asyncio.get_running_loop().create_task(asyncio.sleep(0))
            flights.track("sf3", old, 8)
            assert (await flights.claim("sf3", 8, True)).how == "raced"
            assert (await flights.claim("sf3", 8, True)).how == "raced"  # its lock was released again
            new = asyncio.get_running_loop().create_task(asyncio.sleep(0))
            flights.untrack("sf3", old)
            flights.track("sf3", new, 16)
            flights.untrack("sf3", old)  # a finished old generation must not drop the new one
            assert flights.tasks["sf3"] is new and flights.max_tokens["sf3"] == 16
            flights.untrack("sf3", new)
            assert "sf3" not in flights.tasks and "sf3" not in flights.max_tokens
            await asyncio.gather(old, new)
        finally:
            await store.close()

    asyncio.run(scenario())
