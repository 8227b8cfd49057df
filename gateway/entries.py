"""How an entry lies in Redis: its record, bound to its key and sealed with an HMAC (pure).

Redis is shared infrastructure: anything that can write to it (a neighbour on the network, a
restored backup, a bug) must not be able to make the gateway serve its bytes as the model's answer.
An entry is ``v1.<hex HMAC-SHA256 over key NUL record>.<record JSON>``; the key is inside the MAC, so
a true entry copied under another key is refused too. The secret comes from a Secret in the chart
(``INVARIANT_GATEWAY_ENTRY_KEY``); without one the MAC is a checksum (corruption is caught,
forgery is not) and the gateway says so at start.
"""

from __future__ import annotations

import hashlib
import hmac

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
