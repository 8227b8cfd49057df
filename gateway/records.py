"""Stored generations and how responses are rendered from them (pure).

An entry is one choice's generation: token ids, per-token text pieces, per-token logprobs, finish
reason and prompt usage. Responses, streamed or not, are rendered from it canonically, so a
streamed request can be answered from a non-streamed entry and the other way round, and the bytes
of a replay never depend on how the worker happened to chunk its stream.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator


@dataclass
class Record:
    token_ids: list[int]
    pieces: list[str]  # text of each token; "".join(pieces) == text
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    stop_reason: Any = None
    logprobs: Any = None  # the choice's logprobs object as the worker returned it, for the full run
    fingerprint: str = ""
    created: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # chat: role, tool_calls, reasoning...

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def dumps(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def loads(cls, raw: bytes | str) -> "Record":
        return cls(**json.loads(raw))


def etag(token_ids_per_choice: list[list[int]]) -> str:
    """SHA-256 of the token ids (all choices, in order): equal tokens, equal tag."""
    raw = json.dumps(token_ids_per_choice, separators=(",", ":")).encode()
    return '"' + hashlib.sha256(raw).hexdigest() + '"'


def covers(record: Record, max_tokens: int | None) -> bool:
    """Whether a stored generation answers a request for ``max_tokens`` exactly as a fresh one would.

    Deterministic decoding makes a generation's first k tokens the answer for max_tokens = k, and a
    generation that stopped by itself after L tokens the answer for any max_tokens >= L.
    """
    length = len(record.token_ids)
    if max_tokens is not None and max_tokens < length:
        return _can_truncate(record)
    if record.finish_reason == "length":
        return max_tokens == length
    return True


def _can_truncate(record: Record) -> bool:
    return len(record.pieces) == len(record.token_ids)


def truncate(record: Record, max_tokens: int | None) -> Record:
    """The record a request for ``max_tokens`` gets (``covers`` must hold)."""
    if max_tokens is None or max_tokens >= len(record.token_ids):
        return record
    cut = Record(**{**asdict(record)})
    cut.token_ids = record.token_ids[:max_tokens]
    cut.pieces = record.pieces[:max_tokens]
    cut.finish_reason = "length"
    cut.stop_reason = None
    cut.logprobs = truncate_logprobs(record.logprobs, max_tokens)
    return cut


def truncate_logprobs(logprobs: Any, k: int) -> Any:
    if not logprobs:
        return logprobs
    if "content" in logprobs:  # chat
        return {**logprobs, "content": (logprobs.get("content") or [])[:k]}
    return {key: (value[:k] if isinstance(value, list) else value) for key, value in logprobs.items()}


def pieces_from_completion(choice: dict[str, Any]) -> list[str]:
    """Per-token text when the logprobs' token strings spell the text exactly; else one piece.

    Byte-level tokens that split a UTF-8 character do not spell the text (the text has U+FFFD where
    the tokens have partial bytes): such an entry is kept whole and never truncated.
    """
    text = choice.get("text") or ""
    tokens = (choice.get("logprobs") or {}).get("tokens") or []
    ids = choice.get("token_ids") or []
    if tokens and len(tokens) == len(ids) and "".join(tokens) == text:
        return list(tokens)
    return [text] if text else []


def pieces_from_chat(choice: dict[str, Any]) -> list[str]:
    """Per-token text from chat logprobs when their tokens spell the content exactly."""
    content = (choice.get("message") or {}).get("content") or ""
    tokens = [t.get("token", "") for t in ((choice.get("logprobs") or {}).get("content") or [])]
    ids = choice.get("token_ids") or []
    if tokens and len(tokens) == len(ids) and "".join(tokens) == content:
        return tokens
    return [content] if content else []


def record_from_choice(kind: str, choice: dict[str, Any], prompt_tokens: int, fingerprint: str,
                       created: int) -> Record:
    ids = list(choice.get("token_ids") or [])
    pieces = pieces_from_completion(choice) if kind == "completions" else pieces_from_chat(choice)
    extra = {}
    if kind == "chat":
        message = choice.get("message") or {}
        extra = {k: v for k, v in message.items() if k not in ("content",) and v not in (None, [], "")}
    return Record(token_ids=ids, pieces=pieces, finish_reason=choice.get("finish_reason") or "stop",
                  stop_reason=choice.get("stop_reason"), prompt_tokens=prompt_tokens,
                  logprobs=choice.get("logprobs"), fingerprint=fingerprint, created=created, extra=extra)


def render_response(kind: str, records: list[Record], *, request_id: str, model: str, created: int,
                    want_logprobs: bool, want_token_ids: bool) -> dict[str, Any]:
    """A non-streamed OpenAI response from stored records (one per choice)."""
    choices = []
    for index, rec in enumerate(records):
        base: dict[str, Any] = {"index": index, "finish_reason": rec.finish_reason, "stop_reason": rec.stop_reason,
                                "logprobs": rec.logprobs if want_logprobs else None}
        if want_token_ids:
            base["token_ids"] = rec.token_ids
        if kind == "completions":
            base["text"] = rec.text
        else:
            base["message"] = {"role": "assistant", "content": rec.text, **{k: v for k, v in rec.extra.items()
                                                                          if k != "role"}}
        choices.append(base)
    completion_tokens = sum(len(r.token_ids) for r in records)
    prompt_tokens = records[0].prompt_tokens if records else 0
    return {
        "id": request_id,
        "object": "text_completion" if kind == "completions" else "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "system_fingerprint": records[0].fingerprint if records else None,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def _piece_logprobs(kind: str, logprobs: Any, i: int) -> Any:
    if not logprobs:
        return None
    if kind == "chat":
        content = logprobs.get("content") or []
        return {"content": content[i:i + 1]}
    return {key: (value[i:i + 1] if isinstance(value, list) else value) for key, value in logprobs.items()}


def render_stream(kind: str, records: list[Record], *, request_id: str, model: str, created: int,
                  want_logprobs: bool, want_token_ids: bool, include_usage: bool) -> Iterator[bytes]:
    """Canonical SSE: one chunk per token piece per choice, then the finish chunk, usage, [DONE]."""
    obj = "text_completion" if kind == "completions" else "chat.completion.chunk"

    def event(choices: list[dict[str, Any]], usage: dict | None = None) -> bytes:
        body = {"id": request_id, "object": obj, "created": created, "model": model, "choices": choices,
                "system_fingerprint": records[0].fingerprint if records else None}
        if usage is not None:
            body["usage"] = usage
        return b"data: " + json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"

    for index, rec in enumerate(records):
        if kind == "chat":
            yield event([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        per_token = len(rec.pieces) == len(rec.token_ids)
        steps = len(rec.pieces)
        for i in range(steps):
            choice: dict[str, Any] = {"index": index, "finish_reason": None}
            if kind == "completions":
                choice["text"] = rec.pieces[i]
            else:
                choice["delta"] = {"content": rec.pieces[i]}
            choice["logprobs"] = _piece_logprobs(kind, rec.logprobs, i) if (want_logprobs and per_token) else None
            if want_token_ids:
                choice["token_ids"] = rec.token_ids[i:i + 1] if per_token else rec.token_ids
            yield event([choice])
        final: dict[str, Any] = {"index": index, "finish_reason": rec.finish_reason, "stop_reason": rec.stop_reason}
        if kind == "completions":
            final["text"] = ""
        else:
            final["delta"] = {k: v for k, v in rec.extra.items() if k != "role"}
        if want_logprobs and not per_token:
            final["logprobs"] = rec.logprobs
        yield event([final])
    if include_usage:
        completion_tokens = sum(len(r.token_ids) for r in records)
        prompt_tokens = records[0].prompt_tokens if records else 0
        yield event([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens})
    yield b"data: [DONE]\n\n"
