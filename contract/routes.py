"""The worker's own HTTP routes and the JSON fields other components read from them.

``READY`` answers 200 once the worker may serve (503 with ``reasons`` before); ``FINGERPRINT``
gives the numerics fingerprint and its parts. vLLM's OpenAI routes are vLLM's; their paths are named here once. ``VERIFY`` is the
gateway's replay route.
"""

from __future__ import annotations

# vLLM's OpenAI routes, as the gateway forwards them and the tools call them
COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"

PREFIX = "/invariant"
READY = f"{PREFIX}/ready"
FINGERPRINT = f"{PREFIX}/fingerprint"
VERIFY = f"{PREFIX}/verify"

# JSON fields of READY's and FINGERPRINT's bodies
F_READY = "ready"
F_REASONS = "reasons"
F_FINGERPRINT = "fingerprint"
F_MODEL = "model"
F_PARTS = "parts"
F_SAMPLING_DEFAULTS = "sampling_defaults"
F_CANARY = "canary"
F_KERNEL_CANARY = "kernel_canary"
F_KERNEL_REPORTS = "kernel_reports"
