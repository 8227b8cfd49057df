"""The numerics fingerprint's format: ``inv-`` and 16 hex digits of a SHA-256 (the worker computes
it, the operator validates and compares it, the gateway keys its cache on it)."""

from __future__ import annotations

import re

PREFIX = "inv-"
HEX_DIGITS = 16
PATTERN = rf"^{PREFIX}[0-9a-f]{{{HEX_DIGITS}}}$"
_RE = re.compile(PATTERN)


def is_fingerprint(value: object) -> bool:
    """Whether ``value`` is a well-formed fingerprint (a string in the format above)."""
    return isinstance(value, str) and _RE.fullmatch(value) is not None
