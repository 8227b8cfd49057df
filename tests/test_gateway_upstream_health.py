"""The gateway's health checks of its workers (gateway/upstream.py), against a worker stand-in on
loopback whose /invariant/ready and /invariant/fingerprint can be made late, "not ready" or gone:
a late answer is tolerated twice in a row (a busy worker on a loaded node), anything else drops the
endpoint at once, and a good answer brings it back."""

from __future__ import annotations

import asyncio
import json

from invariant.contract import routes
from invariant.gateway.upstream import HEALTH_TIMEOUTS_TO_EVICT, Upstreams

FINGERPRINT = "inv-0123456789abcdef"


class Stub:
    """A raw HTTP/1.1 server: ``delay`` seconds before each answer, ``ready`` decides 200 or 503."""

    def __init__(self) -> None:
        self.delay, self.ready, self.server, self.writers = 0.0, True, None, set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                path = head.split(" ", 2)[1]
                await asyncio.sleep(self.delay)
                if path == routes.READY:
                    status, body = (200, {"ready": True}) if self.ready else (503, {"ready": False, "reasons": ["canary failed"]})
                else:
                    status, body = 200, {routes.F_FINGERPRINT: FINGERPRINT, routes.F_SAMPLING_DEFAULTS: {}}
                data = json.dumps(body).encode()
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                             .encode() + data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        """Gone as a killed worker is: the port closed and its open connections with it."""
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()


def test_late_health_answers_are_tolerated_twice_then_the_endpoint_is_dropped():
    async def scenario():
        stub = Stub()
        ups = Upstreams({"m": [await stub.start()]})
        (ep,) = ups.models["m"]
        try:
            await ups.check(ep)
            assert ep.healthy and ep.fingerprint == FINGERPRINT and ups.candidates("m") == [ep]
            stub.delay = 2.5  # past the checks' 2 s
            for n in range(1, HEALTH_TIMEOUTS_TO_EVICT):
                await ups.check(ep)
                assert ep.healthy and f"{n} health checks in a row timed out" in ep.error
            await ups.check(ep)
            assert not ep.healthy and ups.candidates("m") == []
            stub.delay = 0.0
            await ups.check(ep)
            assert ep.healthy and ep.timeouts == 0 and ep.error == ""
        finally:
            await ups.close()
            await stub.stop()

    asyncio.run(scenario())


def test_not_ready_or_gone_drops_the_endpoint_at_once_and_a_late_answer_never_makes_one_healthy():
    async def scenario():
        stub = Stub()
        url = await stub.start()
        ups = Upstreams({"m": [url]})
        (ep,) = ups.models["m"]
        try:
            stub.delay = 2.5
            await ups.check(ep)  # never answered well: a timeout does not make it healthy
            assert not ep.healthy and ups.candidates("m") == []
            stub.delay = 0.0
            await ups.check(ep)
            assert ep.healthy
            stub.ready = False  # the worker says so: dropped at once
            await ups.check(ep)
            assert not ep.healthy and "canary failed" in ep.error
            stub.ready = True
            await ups.check(ep)
            assert ep.healthy
            await stub.stop()  # the worker is gone: refused, dropped at once
            await ups.check(ep)
            assert not ep.healthy and ep.timeouts == 0
        finally:
            await ups.close()

    asyncio.run(scenario())
