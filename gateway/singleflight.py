"""Single flight: one generation per cache entry, here and across gateway replicas.

Both ways a miss is generated, buffered (``Gateway.fill``) and streamed as it happens
(``Gateway.fill_live``), follow this one protocol:

1. a generation of the entry already running in this replica is joined when it runs at least as
   far as the request needs (``joinable``), else the request does not share it;
2. otherwise the request claims the entry (:meth:`SingleFlight.claim`): it takes the entry's Redis
   lock (another replica holding it: ``peer``), then checks again, since a leader may have stored
   the entry and released its lock between the lookup and the lock (``stored``), and another
   request here may have started it meanwhile (``raced``);
3. the leader's generation runs in its own task, registered here under the entry's key until it
   ends (:meth:`track`, :meth:`untrack`), so a leader's client hanging up does not cancel it, and
   releases the lock at the end (:meth:`release`).
"""

from __future__ import annotations

import asyncio
from typing import NamedTuple

from invariant.gateway.live import Live
from invariant.gateway.records import Record, covers
from invariant.gateway.store import Store

LOCAL = "local"  # the token of a generation that holds no Redis lock (Redis off for it, or a fallback)


class Claim(NamedTuple):
    how: str  # "lead", "peer", "stored" or "raced"
    token: str | None = None  # with "lead": the lock token to release (LOCAL: none)
    record: Record | None = None  # with "stored": the entry a leader stored meanwhile


class SingleFlight:
    def __init__(self, store: Store, lock_ttl_ms: int):
        self.store = store
        self.lock_ttl_ms = lock_ttl_ms
        self.tasks: dict[str, asyncio.Task] = {}
        self.max_tokens: dict[str, int | None] = {}  # how far each running generation goes
        self.live: dict[str, Live] = {}  # the running generations that are streamed as they happen

    async def claim(self, key: str, max_tokens: int | None, store: bool, *, lock: bool = True) -> Claim:
        """Steps 2 of the protocol (see the module); ``lock=False`` leads without the Redis lock (a
        follower whose peer gave up)."""
        token = await self.store.lock(key, self.lock_ttl_ms) if (store and lock) else LOCAL
        if token is None:
            return Claim("peer")
        if store:
            record, _ = await self.store.get(key)
            if record is not None and covers(record, max_tokens):
                await self.release(key, token)
                return Claim("stored", record=record)
        if key in self.tasks:
            await self.release(key, token)
            return Claim("raced")
        return Claim("lead", token)

    async def release(self, key: str, token: str | None) -> None:
        if token and token != LOCAL:
            await self.store.unlock(key, token)

    def track(self, key: str, task: asyncio.Task, max_tokens: int | None, live: Live | None = None) -> None:
        self.tasks[key] = task
        self.max_tokens[key] = max_tokens
        if live is not None:
            self.live[key] = live

    def untrack(self, key: str, task: asyncio.Task | None) -> None:
        """Forget the entry's generation if ``task`` is still the one registered for it."""
        if self.tasks.get(key) is task:
            self.tasks.pop(key, None)
            self.max_tokens.pop(key, None)
            self.live.pop(key, None)
