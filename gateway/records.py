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
    # Whether a prefix of this entry answers a smaller max_tokens (its token strings spell its text);
    # None for entries stored before this field existed: then pieces-per-token decides.
    truncatable: bool | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def dumps(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def loads(cls, raw: bytes | str) -> "Record":
        """Bytes this replica wrote or already checked (its in-process copy)."""
        return cls(**json.loads(raw))

    @classmethod
    def checked(cls, raw: bytes | str) -> "Record":
        """Parse and check bytes from outside (Redis); ``RecordError`` when they are not a record
        (nothing that fails here is ever served)."""
        try:
            rec = cls(**json.loads(raw))
        except (ValueError, TypeError) as exc:
            raise RecordError(f"not a record: {exc}") from None
        if not (is_token_ids(rec.token_ids) and isinstance(rec.pieces, list)
                and all(isinstance(p, str) for p in rec.pieces) and rec.finish_reason in FINISHED
                and isinstance(rec.prompt_tokens, int) and isinstance(rec.fingerprint, str)
                and isinstance(rec.extra, dict)):
            raise RecordError("a record field has the wrong type or value")
        return rec


def is_token_ids(value: Any) -> bool:
    """A JSON list of integers (booleans are not token ids)."""
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


class RecordError(ValueError):
    """Bytes that are not a stored record (corrupt, forged, or from another schema)."""


# The finish reasons of a generation that ended as the model or the request decided: only these are
# stored. vLLM says "abort" when it cut a generation short; a missing reason means a broken answer.
FINISHED = frozenset({"stop", "length", "tool_calls"})


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
    if record.truncatable is not None:
        return record.truncatable and len(record.pieces) == len(record.token_ids)
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
    cut.logprobs = slice_logprobs(record.logprobs, 0, max_tokens)
    return cut


def slice_logprobs(logprobs: Any, start: int, stop: int | None = None) -> Any:
    """The logprobs of tokens ``start:stop`` (chat: ``content``; completions: every per-token list)."""
    if not logprobs:
        return logprobs
    if "content" in logprobs:  # chat
        return {**logprobs, "content": (logprobs.get("content") or [])[start:stop]}
    return {key: (value[start:stop] if isinstance(value, list) else value) for key, value in logprobs.items()}


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
                       created: int, deltas: list[str] | None = None) -> Record:
    """``deltas``: the worker's streamed text per token, when the entry was generated streamed. They
    always spell the text (the worker holds back a split UTF-8 character until it is whole), so a
    streamed generation is stored - and replayed - one piece per token, as it was sent live."""
    finish = choice.get("finish_reason")
    if finish not in FINISHED:
        raise RecordError(f"the worker's generation did not finish (finish_reason {finish!r}): not stored")
    ids = choice.get("token_ids")
    if not is_token_ids(ids):
        raise RecordError("the worker's answer has no list of integer token_ids")
    text = choice.get("text") if kind == "completions" else (choice.get("message") or {}).get("content")
    if text is not None and not isinstance(text, str):
        raise RecordError("the worker's answer text is not a string")
    ids = list(ids)
    pieces = pieces_from_completion(choice) if kind == "completions" else pieces_from_chat(choice)
    truncatable = len(pieces) == len(ids)
    if deltas is not None and len(deltas) == len(ids) and "".join(deltas) == (text or ""):
        pieces = list(deltas)
    extra = {}
    if kind == "chat":
        message = choice.get("message") or {}
        extra = {k: v for k, v in message.items() if k not in ("content",) and v not in (None, [], "")}
    return Record(token_ids=ids, pieces=pieces, finish_reason=finish,
                  stop_reason=choice.get("stop_reason"), prompt_tokens=prompt_tokens,
                  logprobs=choice.get("logprobs"), fingerprint=fingerprint, created=created, extra=extra,
                  truncatable=truncatable)


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
    return {
        "id": request_id,
        "object": "text_completion" if kind == "completions" else "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "system_fingerprint": records[0].fingerprint if records else None,
        "usage": _usage(records),
    }


def _piece_logprobs(kind: str, logprobs: Any, i: int) -> Any:
    if not logprobs:
        return None
    if kind == "chat":
        content = logprobs.get("content") or []
        return {"content": content[i:i + 1]}
    return {key: (value[i:i + 1] if isinstance(value, list) else value) for key, value in logprobs.items()}


def _event(kind: str, request_id: str, model: str, created: int, fingerprint: str | None,
           choices: list[dict[str, Any]], usage: dict | None = None) -> bytes:
    obj = "text_completion" if kind == "completions" else "chat.completion.chunk"
    body = {"id": request_id, "object": obj, "created": created, "model": model, "choices": choices,
            "system_fingerprint": fingerprint}
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _token_choice(kind: str, index: int, piece: str, logprobs: Any, token_ids: list[int] | None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "finish_reason": None}
    if kind == "completions":
        choice["text"] = piece
    else:
        choice["delta"] = {"content": piece}
    choice["logprobs"] = logprobs
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def _final_choice(kind: str, index: int, rec: Record, logprobs: Any) -> dict[str, Any]:
    final: dict[str, Any] = {"index": index, "finish_reason": rec.finish_reason, "stop_reason": rec.stop_reason}
    if kind == "completions":
        final["text"] = ""
    else:
        final["delta"] = {k: v for k, v in rec.extra.items() if k != "role"}
    if logprobs is not None:
        final["logprobs"] = logprobs
    return final


def _usage(records: list[Record]) -> dict[str, int]:
    completion_tokens = sum(len(r.token_ids) for r in records)
    prompt_tokens = records[0].prompt_tokens if records else 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


ROLE_CHOICE = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def render_stream(kind: str, records: list[Record], *, request_id: str, model: str, created: int,
                  want_logprobs: bool, want_token_ids: bool, include_usage: bool) -> Iterator[bytes]:
    """Canonical SSE: one chunk per token piece per choice, then the finish chunk, usage, [DONE]."""
    fingerprint = records[0].fingerprint if records else None

    def event(choices: list[dict[str, Any]], usage: dict | None = None) -> bytes:
        return _event(kind, request_id, model, created, fingerprint, choices, usage)

    for index, rec in enumerate(records):
        if kind == "chat":
            yield event([{**ROLE_CHOICE, "index": index}])
        per_token = len(rec.pieces) == len(rec.token_ids)
        for i in range(len(rec.pieces)):
            lp = _piece_logprobs(kind, rec.logprobs, i) if (want_logprobs and per_token) else None
            ids = (rec.token_ids[i:i + 1] if per_token else rec.token_ids) if want_token_ids else None
            yield event([_token_choice(kind, index, rec.pieces[i], lp, ids)])
        yield event([_final_choice(kind, index, rec, rec.logprobs if (want_logprobs and not per_token) else None)])
    if include_usage:
        yield event([], _usage(records))
    yield b"data: [DONE]\n\n"


# --- live generations ---------------------------------------------------------------------------

class Progress:
    """A generation in progress, assembled from the worker's stream (one choice).

    ``feed`` takes the worker's SSE chunks; ``record()`` is then what the worker's non-streamed
    response would have given (the same text, token ids, logprobs, finish reason and usage), so the
    stored entry does not depend on whether it was generated streamed. ``tokens`` are the per-token
    steps known so far, for followers who stream the tail live.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.texts: list[str] = []
        self.deltas: list[str] = []  # text per token, while every chunk carries exactly one token
        self.per_token = True
        self.token_ids: list[int] = []
        self.lp_tokens: list[str] = []
        self.lp: dict[str, list] = {}  # completions: text_offset, token_logprobs, tokens, top_logprobs
        self.lp_content: list[Any] = []  # chat
        self.extra: dict[str, Any] = {}
        self.finish_reason: str | None = None
        self.stop_reason: Any = None
        self.prompt_tokens = 0
        self.created = 0
        self.fingerprint = ""

    def feed(self, chunk: dict[str, Any]) -> None:
        self.created = self.created or int(chunk.get("created") or 0)
        self.fingerprint = chunk.get("system_fingerprint") or self.fingerprint
        usage = chunk.get("usage")
        if usage:
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        if chunk.get("prompt_token_ids"):  # chat: on the first chunk
            self.prompt_tokens = len(chunk["prompt_token_ids"])
        for choice in chunk.get("choices") or []:
            if choice.get("prompt_token_ids"):  # completions: on the first chunk
                self.prompt_tokens = len(choice["prompt_token_ids"])
            if self.kind == "completions":
                self.texts.append(choice.get("text") or "")
                for key, value in (choice.get("logprobs") or {}).items():
                    self.lp.setdefault(key, []).extend(value or [])
                self.lp_tokens = self.lp.get("tokens", [])
            else:
                delta = choice.get("delta") or {}
                self.texts.append(delta.get("content") or "")
                self.extra.update({k: v for k, v in delta.items() if k not in ("content", "role")})
                content = (choice.get("logprobs") or {}).get("content") or []
                self.lp_content.extend(content)
                self.lp_tokens = [c.get("token", "") for c in self.lp_content]
            ids = choice.get("token_ids") or []
            piece = self.texts[-1]
            split = self._split(piece, len(ids)) if len(ids) > 1 and self.per_token else None
            if len(ids) == 1:
                self.deltas.append(piece)
            elif split is not None:
                self.deltas.extend(split)
            elif ids or piece:
                self.per_token = False
            self.token_ids.extend(ids)
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]
                self.stop_reason = choice.get("stop_reason")

    def _split(self, piece: str, k: int) -> list[str] | None:
        """A chunk's text cut per token, when the worker merged k tokens into one chunk (vLLM does
        when its reader falls behind) and their token strings spell that text exactly."""
        start = len(self.token_ids)
        strings = self.lp_tokens[start:start + k]
        return list(strings) if len(strings) == k and "".join(strings) == piece else None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def live_tokens(self) -> int:
        """How many leading tokens can be sent now exactly as the canonical stream of the stored
        entry will send them: all of them, one chunk each, while the worker sends one per chunk
        (or several whose token strings spell their text)."""
        return len(self.deltas) if self.per_token else 0

    def spelled(self, k: int) -> bool:
        """Whether the first k token strings spell the first k tokens' text (then a request for
        max_tokens = k gets exactly this prefix from a fresh generation too)."""
        return len(self.lp_tokens) >= k and "".join(self.lp_tokens[:k]) == "".join(self.deltas[:k])

    def token_logprobs(self, i: int) -> Any:
        if self.kind == "chat":
            return {"content": self.lp_content[i:i + 1]}
        return {key: value[i:i + 1] for key, value in self.lp.items()}

    def choice(self) -> dict[str, Any]:
        """The worker's non-streamed choice, rebuilt."""
        base = {"index": 0, "finish_reason": self.finish_reason, "stop_reason": self.stop_reason,
                "token_ids": list(self.token_ids)}
        if self.kind == "completions":
            base["text"] = self.text
            base["logprobs"] = dict(self.lp) if self.lp else None
        else:
            base["message"] = {"role": "assistant", "content": self.text, **self.extra}
            base["logprobs"] = {"content": list(self.lp_content)} if self.lp_content else None
        return base

    def prefix_record(self, k: int) -> Record:
        """The first k tokens as the entry for max_tokens = k (k <= live_tokens(): they spell
        their text), before the generation has ended; deterministic decoding makes it final."""
        if k > self.live_tokens() or not self.spelled(k):
            raise ValueError(f"the first {k} tokens are not known as a truncatable prefix")
        rec = Record(token_ids=self.token_ids[:k], pieces=self.deltas[:k], finish_reason="length",
                     prompt_tokens=self.prompt_tokens, fingerprint=self.fingerprint, created=self.created,
                     extra=dict(self.extra) if self.kind == "chat" else {}, truncatable=True)
        if self.kind == "chat":
            rec.logprobs = {"content": self.lp_content[:k]} if self.lp_content else None
        else:
            rec.logprobs = {key: value[:k] for key, value in self.lp.items()} if self.lp else None
        return rec

    def record(self) -> Record:
        if self.finish_reason is None:
            raise ValueError("the worker's stream ended without a finish reason")
        return record_from_choice(self.kind, self.choice(), self.prompt_tokens, self.fingerprint, self.created,
                                  deltas=self.deltas if self.per_token else None)


def render_live_token(kind: str, progress: Progress, i: int, *, request_id: str, model: str, created: int,
                      fingerprint: str, want_logprobs: bool, want_token_ids: bool) -> bytes:
    """Token i of a live generation, byte for byte the chunk ``render_stream`` gives for it."""
    lp = progress.token_logprobs(i) if want_logprobs else None
    ids = progress.token_ids[i:i + 1] if want_token_ids else None
    return _event(kind, request_id, model, created, fingerprint,
                  [_token_choice(kind, 0, progress.deltas[i], lp, ids)])


def render_stream_rest(kind: str, rec: Record, sent: int, *, request_id: str, model: str, created: int,
                       want_logprobs: bool, want_token_ids: bool, include_usage: bool,
                       sent_chars: int = 0) -> Iterator[bytes]:
    """What ``render_stream([rec])`` sends after its first ``sent`` token chunks (and the role chunk);
    for an entry stored whole after ``sent`` tokens went out live, the rest of it without repeats."""
    chunks = list(render_stream(kind, [rec], request_id=request_id, model=model, created=created,
                                want_logprobs=want_logprobs, want_token_ids=want_token_ids,
                                include_usage=include_usage))
    head = 1 if kind == "chat" else 0
    per_token = len(rec.pieces) == len(rec.token_ids)
    if per_token or sent == 0:
        yield from chunks[head + (sent if per_token else 0):]
        return
    # Rare: tokens were sent live one per chunk, but the entry is stored whole (a worker chunk carried
    # several tokens later on). Send the rest of the text and ids in one chunk, then the end with the
    # logprobs of the tokens not sent yet: each token's ids and logprobs reach the client once.
    ids = rec.token_ids[sent:] if want_token_ids else None
    yield _event(kind, request_id, model, created, rec.fingerprint,
                 [_token_choice(kind, 0, rec.text[sent_chars:], None, ids)])
    rest = slice_logprobs(rec.logprobs, sent) if want_logprobs and rec.logprobs else None
    yield _event(kind, request_id, model, created, rec.fingerprint, [_final_choice(kind, 0, rec, rest)])
    yield from chunks[head + len(rec.pieces) + 1:]  # after the pieces and the final chunk: usage, [DONE]


def render_role_chunk(*, request_id: str, model: str, created: int, fingerprint: str) -> bytes:
    return _event("chat", request_id, model, created, fingerprint, [dict(ROLE_CHOICE)])
