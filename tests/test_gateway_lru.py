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


def test_the_byte_bound_evicts_the_oldest_and_keeps_nothing_larger_than_itself():
    """A few huge answers must not take a replica's memory: the tier is bounded in bytes too."""
    lru: Lru[str, bytes] = Lru(1000, Clock(), max_bytes=100)
    for i in range(10):
        assert lru.put(f"k{i}", b"x" * 30)
    assert lru.bytes <= 100 and len(lru) == 3 and [k for k in ("k7", "k8", "k9") if k in lru] == ["k7", "k8", "k9"]
    assert lru.get("k7") == b"x" * 30  # now the most recent: k8 goes first
    assert lru.put("big", b"y" * 40) and "k8" not in lru and "k7" in lru and lru.bytes == 100
    assert not lru.put("huge", b"z" * 101) and "huge" not in lru and lru.bytes == 100
    lru.put("k7", b"w")  # replaced: its bytes are counted once
    assert lru.bytes == 71
    lru.pop("k9")
    assert lru.drop_where(lambda v: v.startswith(b"y")) == 1 and lru.bytes == 1 and len(lru) == 1


def test_the_gateway_tiers_are_bounded_in_bytes_by_default():
    from invariant.gateway.config import GatewayConfig
    from invariant.gateway.service import Gateway

    gw = Gateway(GatewayConfig(models={}, redis_url="redis://127.0.0.1:1/0", hot_bytes=1 << 20, l1_bytes=2 << 20))
    assert gw._hot.max_bytes == 1 << 20 and gw.store._l1.max_bytes == 2 << 20
    assert GatewayConfig(models={}, redis_url="").l1_bytes == GatewayConfig(models={}, redis_url="").hot_bytes == 256 << 20
