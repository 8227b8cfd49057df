"""Records and canonical rendering (pure)."""

from __future__ import annotations

import json

from invariant.gateway.records import Record, covers, etag, record_from_choice, render_response, render_stream, truncate

CHOICE = {"text": "Hello world!", "token_ids": [5, 6, 7], "finish_reason": "stop", "stop_reason": None,
          "logprobs": {"tokens": ["Hello", " world", "!"], "token_logprobs": [-0.5, -0.25, -0.125],
                       "text_offset": [0, 5, 11], "top_logprobs": None}}


def record(**kw):
    return record_from_choice("completions", {**CHOICE, **kw}, prompt_tokens=4, fingerprint="inv-x", created=1)


def stream_content(kind, records, **kw):
    text, ids, lps = {}, {}, {}
    for raw in render_stream(kind, records, request_id="r", model="m", created=1, want_logprobs=True,
                             want_token_ids=True, include_usage=True, **kw):
        if raw == b"data: [DONE]\n\n":
            continue
        chunk = json.loads(raw[len(b"data: "):])
        for c in chunk["choices"]:
            i = c["index"]
            text[i] = text.get(i, "") + (c.get("text") or (c.get("delta") or {}).get("content") or "")
            ids.setdefault(i, []).extend(c.get("token_ids") or [])
            lps.setdefault(i, []).extend(((c.get("logprobs") or {}).get("token_logprobs")) or [])
    return text, ids, lps


def test_stream_and_response_carry_the_same_content():
    rec = record()
    resp = render_response("completions", [rec], request_id="r", model="m", created=1, want_logprobs=True,
                           want_token_ids=True)
    text, ids, lps = stream_content("completions", [rec])
    assert text[0] == resp["choices"][0]["text"] == "Hello world!"
    assert ids[0] == resp["choices"][0]["token_ids"] == [5, 6, 7]
    assert lps[0] == resp["choices"][0]["logprobs"]["token_logprobs"]


def test_stream_is_canonical_one_chunk_per_token():
    """The exact bytes of a replayed stream: one chunk per token piece, then the finish chunk and
    [DONE], compact JSON, the entry's fingerprint; what a client sees from a HIT, byte for byte."""
    chunks = list(render_stream("completions", [record()], request_id="r", model="m", created=1,
                                want_logprobs=False, want_token_ids=False, include_usage=False))
    head = b'data: {"id":"r","object":"text_completion","created":1,"model":"m","choices":[{"index":0,'
    tail = b'"system_fingerprint":"inv-x"}\n\n'
    assert chunks == [
        head + b'"finish_reason":null,"text":"Hello","logprobs":null}],' + tail,
        head + b'"finish_reason":null,"text":" world","logprobs":null}],' + tail,
        head + b'"finish_reason":null,"text":"!","logprobs":null}],' + tail,
        head + b'"finish_reason":"stop","stop_reason":null,"text":""}],' + tail,
        b"data: [DONE]\n\n",
    ]


def test_prefix_rules():
    stopped = record()  # 3 tokens, stopped by itself
    assert covers(stopped, None) and covers(stopped, 3) and covers(stopped, 100) and covers(stopped, 2)
    cut = truncate(stopped, 2)
    assert cut.token_ids == [5, 6] and cut.text == "Hello world" and cut.finish_reason == "length"
    assert cut.logprobs["token_logprobs"] == [-0.5, -0.25]
    capped = record(finish_reason="length")
    assert covers(capped, 3) and covers(capped, 1) and not covers(capped, 4) and not covers(capped, None)


def test_unspellable_tokens_are_never_truncated():
    odd = record(text="\ufffdHello", logprobs={"tokens": ["", "Hel", "lo"], "token_logprobs": [-1, -1, -1],
                                               "text_offset": [0, 0, 3]})
    assert odd.pieces == ["\ufffdHello"]
    assert not covers(odd, 2) and covers(odd, 3)


def test_etag_is_the_token_ids():
    """A strong ETag over the token ids alone (a client can compare two answers without the text):
    SHA-256 of their compact JSON, choices kept apart."""
    import hashlib

    assert etag([[1, 2]]) == '"' + hashlib.sha256(b"[[1,2]]").hexdigest() + '"'
    assert etag([[1, 2]]) != etag([[1, 3]])
    assert etag([[1], [2]]) != etag([[1, 2]])  # the choice boundary counts
    assert etag([[5, 6, 7]]) == etag([record().token_ids]) == etag([record(text="other").token_ids])


def test_a_record_survives_its_redis_bytes():
    rec = record()
    raw = rec.dumps()
    assert json.loads(raw)["token_ids"] == [5, 6, 7] and b": " not in raw and b", " not in raw  # compact
    assert Record.loads(raw) == rec and Record.loads(raw.decode()) == rec


# --- live generations (pure): chunks as vLLM 0.32 streams them, recorded from a real worker ----------
STREAM = [
    {"id": "c", "object": "text_completion", "created": 7, "model": "m", "choices": [{"index": 0, "text": "So", "logprobs": {"text_offset": [0], "token_logprobs": [-4.35], "tokens": ["So"], "top_logprobs": [{"So": -4.35}]}, "finish_reason": None, "stop_reason": None, "prompt_token_ids": [258, 76, 325, 261, 265], "token_ids": [653]}]},
    {"id": "c", "object": "text_completion", "created": 7, "model": "m", "choices": [{"index": 0, "text": "", "logprobs": {"text_offset": [2], "token_logprobs": [-3.81], "tokens": [""], "top_logprobs": [{"": -3.81}]}, "finish_reason": None, "stop_reason": None, "prompt_token_ids": None, "token_ids": [106]}]},
    {"id": "c", "object": "text_completion", "created": 7, "model": "m", "choices": [{"index": 0, "text": "", "logprobs": {"text_offset": [2], "token_logprobs": [-3.91], "tokens": [""], "top_logprobs": [{"": -3.91}]}, "finish_reason": "length", "stop_reason": None, "prompt_token_ids": None, "token_ids": [107]}]},
    {"id": "c", "object": "text_completion", "created": 7, "model": "m", "choices": [], "usage": {"prompt_tokens": 5, "total_tokens": 8, "completion_tokens": 3}, "system_fingerprint": "inv-x"},
]
WHOLE = {"index": 0, "text": "So", "logprobs": {"text_offset": [0, 2, 2], "token_logprobs": [-4.35, -3.81, -3.91], "tokens": ["So", "", ""], "top_logprobs": [{"So": -4.35}, {"": -3.81}, {"": -3.91}]}, "finish_reason": "length", "stop_reason": None, "token_ids": [653, 106, 107]}


def test_a_streamed_generation_records_what_the_non_streamed_one_does():
    from invariant.gateway.records import Progress, record_from_choice

    p = Progress("completions")
    for chunk in STREAM:
        p.feed(chunk)
    streamed = p.record()
    whole = record_from_choice("completions", WHOLE, 5, "inv-x", 7)
    for field in ("token_ids", "pieces", "finish_reason", "prompt_tokens", "logprobs", "fingerprint", "created"):
        assert getattr(streamed, field) == getattr(whole, field), field
    assert p.live_tokens() == 3 and p.spelled(3)


def test_live_tokens_render_the_canonical_stream_bytes():
    from invariant.gateway.records import Progress, render_live_token, render_stream, render_stream_rest

    p = Progress("completions")
    for chunk in STREAM:
        p.feed(chunk)
    kw = dict(request_id="r", model="m", created=1, want_logprobs=True, want_token_ids=True)
    canonical = list(render_stream("completions", [p.record()], include_usage=True, **kw))
    live = [render_live_token("completions", p, i, fingerprint="inv-x", **kw) for i in range(2)]
    live += list(render_stream_rest("completions", p.record(), 2, include_usage=True, **kw))
    assert live == canonical
    prefix = p.prefix_record(2)
    assert prefix.token_ids == [653, 106] and prefix.finish_reason == "length" and prefix.pieces == ["So", ""]


# A generation whose token strings do not spell its text (split UTF-8 characters), streamed one
# token per chunk for three tokens, then two in one chunk (vLLM merges when its reader falls behind)
# that cannot be cut per token either.
SPLIT = [
    {"created": 7, "choices": [{"index": 0, "text": "So", "token_ids": [653], "logprobs": {"tokens": ["So"], "token_logprobs": [-4.25]}}]},
    {"created": 7, "choices": [{"index": 0, "text": "", "token_ids": [106], "logprobs": {"tokens": ["\ufffd"], "token_logprobs": [-3.5]}}]},
    {"created": 7, "choices": [{"index": 0, "text": "\u00e9", "token_ids": [107], "logprobs": {"tokens": ["\ufffd"], "token_logprobs": [-3.75]}}]},
    {"created": 7, "choices": [{"index": 0, "text": " \u00e9", "token_ids": [9, 10], "logprobs": {"tokens": [" \ufffd", "\ufffd"], "token_logprobs": [-1.5, -2.5]}, "finish_reason": "length"}]},
    {"created": 7, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}, "system_fingerprint": "inv-x"},
]


def _client_view(raw: list[bytes]) -> tuple[str, list[int], list[float], list[dict]]:
    text, ids, lps, errors = "", [], [], []
    for line in raw:
        if line == b"data: [DONE]\n\n":
            continue
        chunk = json.loads(line[len(b"data: "):])
        if "error" in chunk:
            errors.append(chunk["error"])
        for c in chunk.get("choices") or []:
            text += c.get("text") or ""
            ids += c.get("token_ids") or []
            lps += ((c.get("logprobs") or {}).get("token_logprobs")) or []
    return text, ids, lps, errors


def _follow(max_tokens: int, own=None) -> list[bytes]:
    import asyncio

    from invariant.gateway.live import Live, render

    async def go() -> list[bytes]:
        live = Live("completions", "inv-x", max_tokens=5)
        stream = render(live, request_id="r", model="m", created=1, want_logprobs=True, want_token_ids=True,
                        include_usage=True, max_tokens=max_tokens, own=own)
        for chunk in SPLIT[:3]:
            live.feed(chunk)
        out = [await anext(stream) for _ in range(3)]  # the three single-token chunks, sent live
        for chunk in SPLIT[3:]:
            live.feed(chunk)
        live.finish(live.progress.record())
        return out + [b async for b in stream]
    return asyncio.run(go())


def test_a_follower_gets_each_token_once_when_the_entry_is_stored_whole():
    text, ids, lps, errors = _client_view(_follow(5))
    assert not errors and text == "So\u00e9 \u00e9" and ids == [653, 106, 107, 9, 10]
    assert lps == [-4.25, -3.5, -3.75, -1.5, -2.5]  # the three sent live are not repeated at the end


def test_a_shorter_follower_of_an_uncuttable_entry_finishes_from_its_own_generation():
    calls = []
    fresh = {"text": "So\u00e9", "token_ids": [653, 106, 107], "finish_reason": "length",
             "logprobs": {"tokens": ["So", "\ufffd", "\ufffd"], "token_logprobs": [-4.25, -3.5, -3.75]}}

    async def own():
        calls.append(1)
        return record_from_choice("completions", fresh, 5, "inv-x", 7)

    text, ids, lps, errors = _client_view(_follow(3, own))
    assert calls and not errors
    assert (text, ids, lps) == ("So\u00e9", [653, 106, 107], [-4.25, -3.5, -3.75])
    # Without one, the stream ends in an error rather than in the longer entry's text.
    text, ids, lps, errors = _client_view(_follow(3))
    assert errors and "cannot be cut" in errors[0]["message"] and text == "So\u00e9"

    async def other():  # a generation that disagrees with what was sent is not spliced in
        return record_from_choice("completions", {**fresh, "token_ids": [653, 106, 108]}, 5, "inv-x", 7)

    assert "disagreed" in _client_view(_follow(3, other))[3][0]["message"]


def test_tokens_merged_into_one_chunk_are_cut_by_their_strings():
    """vLLM merges tokens into one chunk when its reader falls behind (a loaded gateway): where the
    token strings spell the chunk's text, the live stream stays one chunk per token, the bytes a
    replay of the entry gives, and the entry stays cuttable."""
    from invariant.gateway.records import Progress, render_live_token, render_stream_rest

    merged = [STREAM[0], {**STREAM[1], "choices": [{**STREAM[1]["choices"][0], "token_ids": [106, 107],
                                                    "logprobs": {"text_offset": [2, 2], "token_logprobs": [-3.81, -3.91],
                                                                 "tokens": ["", ""], "top_logprobs": [{"": -3.81}, {"": -3.91}]},
                                                    "finish_reason": "length"}]}, STREAM[3]]
    whole, cut = Progress("completions"), Progress("completions")
    for chunk in STREAM:
        whole.feed(chunk)
    for chunk in merged:
        cut.feed(chunk)
    assert cut.live_tokens() == 3 and cut.record() == whole.record()
    kw = dict(request_id="r", model="m", created=1, want_logprobs=True, want_token_ids=True)
    live = [render_live_token("completions", cut, i, fingerprint="inv-x", **kw) for i in range(3)]
    live += list(render_stream_rest("completions", cut.record(), 3, include_usage=True, **kw))
    assert live == list(render_stream("completions", [whole.record()], include_usage=True, **kw))
    assert covers(cut.record(), 2)


def test_entries_are_sealed_to_their_key_and_secret():
    from invariant.gateway.entries import seal, unseal

    blob = seal("inv:k", b'{"a":1}', b"secret")
    assert unseal("inv:k", blob, b"secret") == b'{"a":1}'
    assert unseal("inv:other", blob, b"secret") is None  # a true entry copied under another key
    assert unseal("inv:k", blob, b"other secret") is None
    assert unseal("inv:k", blob.replace(b'"a":1', b'"a":2'), b"secret") is None
    assert unseal("inv:k", b'{"a":1}', b"secret") is None and unseal("inv:k", b"", b"secret") is None
