"""How an entry lies in Redis: its record, bound to its key and sealed with an HMAC (pure).

Redis is shared infrastructure: anything that can write to it (a neighbour on the network, a
restored backup, a bug) must not be able to make the gateway serve its bytes as the model's answer.
An entry is ``v1.<hex HMAC-SHA256 over key NUL record>.<record JSON>``; the key is inside the MAC, so
a true entry copied under another key is refused too. The secret comes from a Secret in the chart
(``INVARIANT_GATEWAY_ENTRY_KEY``); without one the MAC is a checksum (corruption is caught,
forgery is not) and the gateway says so at start.

Live events (``{key}:live``, the Redis Stream through which followers on other replicas read a
generation in flight) are sealed the same way, each with its generation's id and its number: a
forged or altered event fails the MAC, a true one replayed, reordered or copied from another
generation fails the numbering (gateway/live.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json

VERSION = b"v1"


def _mac(key: str, record: bytes, secret: bytes) -> bytes:
    return hmac.new(secret, key.encode() + b"\0" + record, hashlib.sha256).hexdigest().encode()


def seal(key: str, record: bytes, secret: bytes) -> bytes:
    return VERSION + b"." + _mac(key, record, secret) + b"." + record


def unseal(key: str, blob: bytes | str, secret: bytes) -> bytes | None:
    """The record bytes, or None when the blob is not a sealed entry of this key under this secret."""
    if isinstance(blob, str):
        blob = blob.encode()
    version, _, rest = blob.partition(b".")
    mac, _, record = rest.partition(b".")
    if version != VERSION or len(mac) != 64 or not hmac.compare_digest(mac, _mac(key, record, secret)):
        return None
    return record


def _event_mac(key: str, generation: str, seq: int, fields: dict[str, str], secret: bytes) -> str:
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    message = b"\0".join([b"live", key.encode(), generation.encode(), str(seq).encode(), body.encode()])
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def seal_event(key: str, generation: str, seq: int, fields: dict[str, str], secret: bytes) -> dict[str, str]:
    """The event's fields plus its generation (``g``), number (``n``) and MAC (``m``)."""
    return {**fields, "g": generation, "n": str(seq), "m": _event_mac(key, generation, seq, fields, secret)}


def unseal_event(key: str, sealed: dict[str, str], secret: bytes) -> tuple[str, int, dict[str, str]] | None:
    """(generation, number, fields), or None when the event is not one this deployment sealed for ``key``."""
    fields = {k: v for k, v in sealed.items() if k not in ("g", "n", "m")}
    generation, seq, mac = sealed.get("g"), sealed.get("n"), sealed.get("m")
    if not isinstance(generation, str) or not isinstance(mac, str) or not isinstance(seq, str) or \
            not seq.isdigit() or len(seq) > 18:
        return None
    if not hmac.compare_digest(mac.encode(), _event_mac(key, generation, int(seq), fields, secret).encode()):
        return None
    return generation, int(seq), fields
