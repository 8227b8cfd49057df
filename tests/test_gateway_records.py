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
    chunks = list(render_stream("completions", [record()], request_id="r", model="m", created=1,
                                want_logprobs=False, want_token_ids=False, include_usage=False))
    assert len(chunks) == 3 + 1 + 1  # tokens, finish, [DONE]
    assert chunks == list(render_stream("completions", [record()], request_id="r", model="m", created=1,
                                        want_logprobs=False, want_token_ids=False, include_usage=False))


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
    assert etag([[1, 2]]) == etag([[1, 2]]) != etag([[1, 3]])
    assert Record.loads(record().dumps()) == record()


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
