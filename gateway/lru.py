"""The one in-process cache tier type: a bounded LRU map whose entries expire.

Both in-process tiers use it: the store's copy of Redis entries (gateway/store.py) and the hot
responses keyed by a request's exact bytes (gateway/service.py). An entry is dropped when it is
read after its expiry (``expires`` is on the clock the owner passes), when the map outgrows its
bound (least recently used first), or when its owner drops it.
"""

from __future__ import annotations

import collections
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Lru(Generic[K, V]):
    def __init__(self, max_entries: int, clock: Callable[[], float]):
        self.max_entries = max_entries
        self._clock = clock
        self._items: collections.OrderedDict[K, tuple[float, V]] = collections.OrderedDict()

    def get(self, key: K) -> V | None:
        """The live value (now the most recently used), or None (absent or expired: then dropped)."""
        hit = self._items.get(key)
        if hit is None:
            return None
        expires, value = hit
        if expires and expires < self._clock():
            self._items.pop(key, None)
            return None
        self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V, expires: float = 0.0) -> None:
        """Store ``value`` until ``expires`` (0: until evicted); the oldest go past the bound."""
        self._items[key] = (expires, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def pop(self, key: K) -> None:
        self._items.pop(key, None)

    def drop_where(self, doomed: Callable[[V], bool]) -> int:
        """Drop every entry whose value ``doomed`` accepts; returns how many."""
        keys = [k for k, (_, v) in self._items.items() if doomed(v)]
        for k in keys:
            self._items.pop(k, None)
        return len(keys)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items
