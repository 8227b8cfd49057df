"""The cache key: canonical, complete, and resolved like the worker resolves requests."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invariant.gateway.keys import RequestError, bypass_reason, key_for_choice, resolve, store_allowed

FP = "inv-0123456789abcdef"
DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.0}
BASE = {"model": "m", "prompt": "Tell me about Richard Feynman", "temperature": 0, "max_tokens": 16}


def key(body, kind="completions", fp=FP, choice=0, ns="t:a", defaults=DEFAULTS):
    return key_for_choice(resolve(kind, body, defaults), fp, choice, ns)


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                             st.dictionaries(st.text(max_size=5), c, max_size=3)),
                           max_leaves=8)


@settings(max_examples=60, deadline=None)
@given(extra=st.dictionaries(st.text(min_size=1, max_size=8).map(lambda k: "x_" + k), json_values, max_size=4),
       seed=st.randoms(use_true_random=False))
def test_key_ignores_field_order(extra, seed):
    """The parsed body's field order (a client's choice) never reaches the key. Whitespace and
    escaping never reach it either, since the gateway keys the parsed body: that is tested on the
    HTTP boundary with raw bytes (test_gateway_service.py::test_spellings_of_one_request_share_an_entry)."""
    body = {**BASE, **extra}
    items = list(body.items())
    seed.shuffle(items)
    assert key(dict(items)) == key(body)
    assert key(dict(reversed(list(body.items())))) == key(body)


def test_number_spelling_and_unicode_forms_do_not_matter():
    a = json.loads('{"model":"m","prompt":"caf\\u00e9","temperature":0,"top_p":1.0,"max_tokens":16}')
    b = json.loads('{"max_tokens":16,"top_p":1,"temperature":0.0,"prompt":"café","model":"m"}')
    c = json.loads('{"max_tokens":16,"top_p":1e0,"temperature":-0.0,"prompt":"café","model":"m"}')
    assert key(a) == key(b) == key(c)


CHANGES = {
    "prompt": "Tell me about Emmy Noether",
    "temperature": 0.5,  # with BASE's seedless request this is unseeded: see below
    "top_p": 0.5,
    "top_k": 5,
    "min_p": 0.1,
    "stop": ["\n"],
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "repetition_penalty": 1.2,
    "logit_bias": {"42": 5},
    "logprobs": 2,
    "echo": True,
    "response_format": {"type": "json_object"},
    "min_tokens": 4,
    "ignore_eos": True,
    "some_future_parameter": 1,
}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_every_output_field_changes_the_key(field):
    if field != "temperature":  # BASE has no seed: temperature 0.5 would be unkeyable
        assert key({**BASE, field: CHANGES[field]}) != key(BASE)
    seeded = {**BASE, "temperature": 0.9, "seed": 3}  # the same under seeded sampling
    assert key({**seeded, field: CHANGES[field]}) != key(seeded)


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
CHAT_CHANGES = {
    "messages": [{"role": "user", "content": "hello"}],
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "auto",
    "chat_template_kwargs": {"enable_thinking": False},
    "add_generation_prompt": False,
    "top_logprobs": 3,
    "response_format": {"type": "json_object"},
}


@pytest.mark.parametrize("field", sorted(CHAT_CHANGES))
def test_every_chat_field_changes_the_key(field):
    assert key({**CHAT, field: CHAT_CHANGES[field]}, "chat") != key(CHAT, "chat")


@pytest.mark.parametrize("field,value", [("stream", True), ("stream_options", {"include_usage": True}),
                                         ("user", "alice"), ("request_id", "abc"), ("max_tokens", 99), ("n", 3)])
def test_fields_that_cannot_change_a_choice_are_left_out(field, value):
    assert key({**BASE, field: value}) == key(BASE)


def test_fingerprint_namespace_kind_and_choice_are_in_the_key():
    assert key(BASE, fp="inv-ffffffffffffffff") != key(BASE)
    assert key(BASE, ns="t:b") != key(BASE)
    assert key({**CHAT}, "chat") != key({"model": "m", "prompt": "p", "messages": CHAT["messages"], "temperature": 0})


def test_omitted_sampling_parameters_resolve_to_the_models_defaults():
    omitted = {"model": "m", "prompt": "p", "seed": 1}
    explicit = {**omitted, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.0, "min_p": 0}
    assert key(omitted) == key(explicit)
    assert key({**omitted, "temperature": 1.0}) != key(omitted)
    # without generation_config defaults, vLLM's own apply
    assert key(omitted, defaults={}) == key({**omitted, "temperature": 1, "top_p": 1, "top_k": -1}, defaults={})


def test_stop_string_and_list_are_one_thing():
    assert key({**BASE, "stop": "\n"}) == key({**BASE, "stop": ["\n"]})
    assert key({**BASE, "stop": []}) == key({**BASE, "stop": None}) == key(BASE)


def test_greedy_choices_share_one_entry_seeded_choices_follow_the_seed():
    greedy = resolve("completions", {**BASE, "n": 3, "seed": 7}, DEFAULTS)
    assert len({key_for_choice(greedy, FP, i, "ns") for i in range(3)}) == 1
    seeded = resolve("completions", {**BASE, "temperature": 0.8, "seed": 7, "n": 2}, DEFAULTS)
    single = resolve("completions", {**BASE, "temperature": 0.8, "seed": 8}, DEFAULTS)
    assert key_for_choice(seeded, FP, 1, "ns") == key_for_choice(single, FP, 0, "ns")
    assert key_for_choice(seeded, FP, 0, "ns") != key_for_choice(single, FP, 0, "ns")


def test_cacheability_and_cache_control():
    assert bypass_reason(resolve("completions", BASE, DEFAULTS), None) is None
    sampled = resolve("completions", {**BASE, "temperature": 0.8}, DEFAULTS)
    assert bypass_reason(sampled, None) == "sampling without a seed is not reproducible"
    assert bypass_reason(resolve("completions", {**BASE, "temperature": 0.8, "seed": 1}, DEFAULTS), None) is None
    assert bypass_reason(resolve("completions", BASE, DEFAULTS), "max-age=0, no-cache") == "no-cache requested"
    assert store_allowed(None) and not store_allowed("no-store")
    with pytest.raises(ValueError):
        key_for_choice(sampled, FP, 0, "ns")


@pytest.mark.parametrize("body,message", [
    ({"prompt": "p"}, "'model' is required"),
    ({"model": "m"}, "'prompt' is required"),
    ({**BASE, "temperature": "hot"}, "'temperature' must be a number"),
    ({**BASE, "n": 0}, "'n' must be an integer from 1 to 128"),
    ({**BASE, "max_tokens": -5}, "'max_tokens' must be a positive integer"),
    ({**BASE, "seed": "x"}, "'seed' must be an integer"),
    ({**BASE, "top_k": 1.5}, "'top_k' must be an integer"),
])
def test_bad_requests(body, message):
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace("*", r"\*")):
        resolve("completions", body, DEFAULTS)


@pytest.mark.parametrize("seed", [(1 << 53) + 1, (1 << 63) - 1, -(1 << 63)])
def test_seeds_past_2_53_are_keyed_exactly(seed):
    """As JSON numbers (IEEE doubles) 2^53 + 1 and 2^53 + 2 are one value: keyed as strings, each
    64-bit seed is its own entry, and choice i (seed + i) too."""
    body = {"model": "m", "prompt": "p", "temperature": 0.8}
    neighbours = {key({**body, "seed": s}) for s in (seed, seed + 1 if seed < (1 << 63) - 1 else seed - 1)}
    assert len(neighbours) == 2
    if seed < (1 << 63) - 1:
        assert key({**body, "seed": seed}, choice=1) == key({**body, "seed": seed + 1})
