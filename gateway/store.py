"""Where entries live: a small in-process LRU in front of Redis, failing open.

Redis errors or timeouts never fail a request: the gateway answers uncached (and says so in a
header) and stops asking Redis for a few seconds (a circuit breaker), so a dead Redis costs one
timeout, not one per request. redis-py's socket timeouts default to none; we always set them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any, Awaitable, Callable, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from invariant.gateway import entries
from invariant.gateway.lru import Lru
from invariant.gateway.metrics import Metrics
from invariant.gateway.records import Record, RecordError

log = logging.getLogger("invariant.gateway")
T = TypeVar("T")

RELEASE_LOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end
"""


def tls_options(url: str, ca_file: str | None, cert_file: str | None = None,
                key_file: str | None = None) -> dict[str, Any]:
    """redis-py's TLS arguments for ``url`` (pure): none for ``redis://``; for ``rediss://`` the
    certificate is required and checked, hostname included, against ``ca_file`` when one is given,
    and ``cert_file`` + ``key_file`` are this client's certificate for a Redis that asks for one
    (``--tls-auth-clients yes``: mutual TLS)."""
    if not url.startswith("rediss://"):
        given = [f for f in (ca_file, cert_file, key_file) if f]
        if given:
            what = "CA file" if ca_file else "client certificate"
            raise ValueError(f"a Redis {what} ({given[0]}) is given but the Redis URL is not rediss://")
        return {}
    if bool(cert_file) != bool(key_file):
        raise ValueError("a Redis client certificate needs its key and a key its certificate "
                         f"(certificate {cert_file or 'missing'}, key {key_file or 'missing'})")
    options: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    if ca_file:
        options["ssl_ca_certs"] = ca_file
    if cert_file:
        options["ssl_certfile"], options["ssl_keyfile"] = cert_file, key_file
    return options


class Store:
    def __init__(self, url: str, metrics: Metrics, *, timeout: float = 0.25, breaker_seconds: float = 2.0,
                 l1_entries: int = 4096, l1_bytes: int = 256 << 20, entry_key: bytes = b"",
                 tls_ca_file: str | None = None, tls_cert_file: str | None = None,
                 tls_key_file: str | None = None):
        self.url = url
        # rediss://: verify Redis's certificate against this CA (else the system's) and its hostname;
        # with a client certificate, Redis verifies ours too.
        self._tls = tls_options(url, tls_ca_file, tls_cert_file, tls_key_file)
        self.entry_key = entry_key  # the HMAC secret of entries (gateway/entries.py)
        self.metrics = metrics
        self.timeout = timeout
        self.breaker_seconds = breaker_seconds
        self._redis = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                        retry_on_timeout=False, health_check_interval=0, **self._tls)
        self._open_until = 0.0
        # This replica's copy of entries (raw bytes), expiring with their Redis TTL (wall clock).
        self._l1: Lru[str, bytes] = Lru(l1_entries, time.time, max_bytes=l1_bytes)
        self._release = self._redis.register_script(RELEASE_LOCK)
        self._reader: aioredis.Redis | None = None

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._open_until

    async def close(self) -> None:
        await self._redis.aclose()
        if self._reader is not None:
            await self._reader.aclose()

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]], default: T, *,
                    breaker: bool = True) -> tuple[T, bool]:
        """Run a Redis call; on failure return (default, False) and open the breaker. Best-effort
        calls (``breaker=False``: live events, whose loss followers detect and repair) neither
        respect nor open the breaker, so one slow publish under load cannot make the entry's own
        store that follows it skip Redis."""
        if breaker and not self.available:
            return default, False
        try:
            return await asyncio.wait_for(fn(), self.timeout * 4), True
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self.metrics.redis_errors.labels(op).inc()
            if not breaker:
                log.warning("redis %s failed (%s)", op, type(exc).__name__)
                return default, False
            self._open_until = time.monotonic() + self.breaker_seconds
            log.warning("redis %s failed (%s); serving uncached for %.1fs", op, type(exc).__name__,
                        self.breaker_seconds)
            return default, False

    # --- entries ---------------------------------------------------------------------------------
    # The L1 copy holds record bytes this replica stored or already checked; Redis holds them sealed.
    def _l1_get(self, key: str) -> Record | None:
        raw = self._l1.get(key)
        return None if raw is None else Record.loads(raw)

    def _open(self, key: str, blob: bytes) -> tuple[Record | None, bytes | None]:
        """A sealed entry from Redis, checked: (record, its bytes), or (None, None) and a count."""
        raw = entries.unseal(key, blob, self.entry_key)
        if raw is None:
            self.metrics.rejected_entries.labels("seal").inc()
            log.warning("entry %s in Redis is not sealed by this deployment's key: ignored (a MISS)", key)
            return None, None
        try:
            return Record.checked(raw), raw
        except RecordError as exc:
            self.metrics.rejected_entries.labels("record").inc()
            log.warning("entry %s in Redis is not a record (%s): ignored (a MISS)", key, exc)
            return None, None

    def _l1_put(self, key: str, raw: bytes, ttl: int) -> None:
        self._l1.put(key, raw, time.time() + ttl if ttl else 0.0)

    async def get(self, key: str) -> tuple[Record | None, bool]:
        """(record or None, whether Redis answered)."""
        local = self._l1_get(key)
        if local is not None:
            return local, True
        async def get_with_ttl():
            # One round trip: the entry and its remaining TTL (the L1 copy expires with it).
            return await self._redis.pipeline(transaction=False).get(key).ttl(key).execute()

        (blob, ttl), ok = await self._call("get", get_with_ttl, (None, -1))
        if blob is None:
            return None, ok
        record, raw = self._open(key, blob)
        if record is None:
            return None, ok  # forged or corrupt: a miss; the regenerated entry overwrites it
        # Entries are immutable (same key, same bytes), so the L1 copy can never be stale.
        self._l1_put(key, raw, max(int(ttl), 0))
        return record, ok

    async def put(self, key: str, record: Record, ttl: int) -> bool:
        """Store an entry; returns whether Redis took it. The in-process copy is kept either way:
        entries are exact (same key, same bytes), so this replica may serve it even when Redis
        could not take it, and a generation is never thrown away for a Redis hiccup."""
        raw = record.dumps()
        self._l1_put(key, raw, ttl)
        sealed = entries.seal(key, raw, self.entry_key)
        _, ok = await self._call("set", lambda: self._redis.set(key, sealed, ex=ttl or None), None)
        return ok

    async def evict(self, key: str) -> bool:
        """Remove an entry that failed a replay (a poisoned or corrupted one) from Redis and from this
        replica's copy; returns whether Redis took the delete. The next request regenerates it."""
        self._l1.pop(key)
        _, ok = await self._call("del", lambda: self._redis.delete(key), None)
        return ok

    # --- single flight across replicas -------------------------------------------------------------
    async def lock(self, key: str, ttl_ms: int) -> str | None:
        """Take the generation lock of an entry; returns the token, or None if another holds it
        (or Redis is down: then each replica generates on its own)."""
        token = secrets.token_hex(8)
        got, ok = await self._call("lock", lambda: self._redis.set(f"{key}:lock", token, nx=True, px=ttl_ms), None)
        if not ok:
            return token  # no coordination possible: generate
        return token if got else None

    async def locked(self, key: str) -> bool:
        """Whether some replica holds the entry's generation lock (True when Redis cannot say)."""
        held, ok = await self._call("locked", lambda: self._redis.exists(f"{key}:lock"), 1)
        return bool(held) or not ok

    async def unlock(self, key: str, token: str) -> None:
        await self._call("unlock", lambda: self._release(keys=[f"{key}:lock"], args=[token]), 0)

    # --- live tails across replicas (a Redis Stream per entry in flight) ---------------------------
    async def live_publish(self, key: str, fields: dict[str, str], ttl_ms: int) -> bool:
        """Append one event of a generation in flight to ``{key}:live`` (expires with the lock)."""
        async def add():
            pipe = self._redis.pipeline(transaction=False)
            pipe.xadd(f"{key}:live", fields, maxlen=100_000, approximate=True)
            pipe.pexpire(f"{key}:live", ttl_ms)
            return await pipe.execute()

        _, ok = await self._call("live", add, None, breaker=False)
        return ok

    async def live_read(self, key: str, last_id: str, block_ms: int) -> tuple[list[tuple[str, dict]], bool]:
        """Events after ``last_id`` (blocking up to ``block_ms``): [(id, fields)], whether Redis answered.
        Uses its own connection: a blocking read must not hold the short-timeout pool's sockets."""
        try:
            res = await self._live_reader().xread({f"{key}:live": last_id}, count=1000, block=block_ms)
        except (RedisError, OSError, asyncio.TimeoutError):
            return [], False
        events = []
        for _stream, stream_entries in res or []:
            for event_id, fields in stream_entries:
                events.append((event_id.decode() if isinstance(event_id, bytes) else event_id,
                               {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                                for k, v in fields.items()}))
        return events, True

    def _live_reader(self):
        if self._reader is None:
            self._reader = aioredis.from_url(self.url, socket_timeout=5.0, socket_connect_timeout=self.timeout,
                                             retry_on_timeout=False, health_check_interval=0, **self._tls)
        return self._reader
