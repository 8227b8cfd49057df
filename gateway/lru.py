"""The one in-process cache tier type: a bounded LRU map whose entries expire.

Both in-process tiers use it: the store's copy of Redis entries (gateway/store.py) and the hot
responses keyed by a request's exact bytes (gateway/service.py). An entry is dropped when it is
read after its expiry (``expires`` is on the clock the owner passes), when the map outgrows either
bound, entries or bytes (least recently used first), or when its owner drops it. Entries differ in
size by orders of magnitude (one token to a whole context of logprobs), so a bound in entries alone
lets a few huge answers take a replica's memory: the byte bound is what protects the process, and a
value larger than it is not kept at all.
"""

from __future__ import annotations

import collections
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Lru(Generic[K, V]):
    def __init__(self, max_entries: int, clock: Callable[[], float], *, max_bytes: int = 0,
                 size: Callable[[V], int] | None = None):
        self.max_entries = max_entries
        self.max_bytes = max_bytes  # 0: no byte bound
        self._size = size or (lambda value: len(value))  # type: ignore[arg-type]
        self._clock = clock
        self._items: collections.OrderedDict[K, tuple[float, V, int]] = collections.OrderedDict()
        self.bytes = 0

    def get(self, key: K) -> V | None:
        """The live value (now the most recently used), or None (absent or expired: then dropped)."""
        hit = self._items.get(key)
        if hit is None:
            return None
        expires, value, _ = hit
        if expires and expires < self._clock():
            self.pop(key)
            return None
        self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V, expires: float = 0.0) -> bool:
        """Store ``value`` until ``expires`` (0: until evicted); the oldest go past the bounds.
        False (and nothing kept) when the value alone is larger than the byte bound."""
        size = int(self._size(value)) if self.max_bytes else 0
        self.pop(key)
        if self.max_bytes and size > self.max_bytes:
            return False
        self._items[key] = (expires, value, size)
        self.bytes += size
        while len(self._items) > self.max_entries or (self.max_bytes and self.bytes > self.max_bytes):
            _, (_, _, dropped) = self._items.popitem(last=False)
            self.bytes -= dropped
        return True

    def pop(self, key: K) -> None:
        hit = self._items.pop(key, None)
        if hit is not None:
            self.bytes -= hit[2]

    def drop_where(self, doomed: Callable[[V], bool]) -> int:
        """Drop every entry whose value ``doomed`` accepts; returns how many."""
        keys = [k for k, (_, v, _) in self._items.items() if doomed(v)]
        for k in keys:
            self.pop(k)
        return len(keys)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items
