"""The gateway's one in-process cache tier type (gateway/lru.py)."""

from __future__ import annotations

from invariant.gateway.lru import Lru


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_on_the_owners_clock_and_zero_never_expires():
    clock = Clock()
    lru: Lru[str, int] = Lru(8, clock)
    lru.put("a", 1, expires=110.0)
    lru.put("b", 2)
    assert lru.get("a") == 1 and lru.get("b") == 2
    clock.now = 110.5
    assert lru.get("a") is None and "a" not in lru  # read after expiry: dropped
    assert lru.get("b") == 2


def test_the_least_recently_used_go_past_the_bound():
    lru: Lru[str, int] = Lru(2, Clock())
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # a is now the most recent
    lru.put("c", 3)
    assert "b" not in lru and lru.get("a") == 1 and lru.get("c") == 3 and len(lru) == 2


def test_drop_where_and_pop():
    lru: Lru[str, dict] = Lru(8, Clock())
    for i in range(5):
        lru.put(f"k{i}", {"model": "m" if i % 2 else "n"})
    assert lru.drop_where(lambda v: v["model"] == "m") == 2
    assert len(lru) == 3 and lru.get("k1") is None
    lru.pop("k0")
    lru.pop("absent")
    assert len(lru) == 2
