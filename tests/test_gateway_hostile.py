"""Issue 14: the attacks and faults a production gateway meets, each against a real redis-server and
a real gateway process, with a programmable stand-in worker (tests/fake_worker.py) where the worker
must misbehave on cue. Every answer is OpenAI-shaped; nothing a hostile request or a broken worker
produces is ever stored or served as a hit.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

from conftest import free_port
from fake_worker import FakeWorker
from invariant.gateway.entries import seal
from test_gateway_service import Gateway, redis_server  # noqa: F401 - fixture
from test_gateway_service import redis_cli as service_redis_cli

ENTRY_KEY = "test-entry-key-0123456789abcdef"
FAST = {"INVARIANT_GATEWAY_CHECK_INTERVAL": "0.2", "INVARIANT_GATEWAY_ENTRY_KEY": ENTRY_KEY}


@pytest.fixture()
def fake():
    worker = FakeWorker().start()
    yield worker
    worker.stop()


class _W:  # what Gateway() reads of a worker
    def __init__(self, name: str, url: str):
        self.name, self.url = name, url


@pytest.fixture()
def gateway(fake, redis_server, tmp_path):
    redis_cli(redis_server, "FLUSHALL")
    gw = Gateway([_W("m", fake.url)], redis_server.url, tmp_path, env=FAST)
    yield gw
    gw.stop()


def redis_cli(server, *args: str) -> str:
    """test_gateway_service's, without the trailing newline (values are compared and re-sealed here)."""
    return service_redis_cli(server, *args).strip()


def entries(server) -> list[str]:
    return [k for k in redis_cli(server, "--scan", "--pattern", "inv:*").split() if not k.endswith((":lock", ":live"))]


def metric(gw, name: str) -> float:
    """The sum of a counter over its labels."""
    text = httpx.get(f"{gw.url}/metrics").text
    return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", text, re.M))


def raw_post(gw, data: bytes | str, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(f"{gw.url}{path}", content=data, headers={"content-type": "application/json"}, timeout=30)


def assert_openai_error(resp: httpx.Response, status: int | tuple[int, ...]) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert resp.status_code in statuses, (resp.status_code, resp.text[:300])
    body = resp.json()
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# --- 4. ordinary hostile input: a 4xx with an OpenAI error, never a 500, nothing stored -------------

DEEP = "[" * 50_000 + "]" * 50_000
HOSTILE = {
    "seed beyond 64 bits": '{"model":"m","prompt":"x","temperature":0.8,"seed":%d}' % (1 << 70),
    "seed past int64 (vLLM's range)": '{"model":"m","prompt":"x","temperature":0.8,"seed":%d}' % (1 << 63),
    "seed + n past int64": '{"model":"m","prompt":"x","temperature":0.8,"n":2,"seed":%d}' % ((1 << 63) - 1),
    "negative seed beyond 64 bits": '{"model":"m","prompt":"x","temperature":0.8,"seed":%d}' % -(1 << 70),
    "an integer beyond 2^53 elsewhere": '{"model":"m","prompt":"x","temperature":0,"logit_bias":{"5":%d}}' % (1 << 60),
    "NaN": '{"model":"m","prompt":"x","temperature":NaN}',
    "Infinity": '{"model":"m","prompt":"x","temperature":0,"top_p":Infinity}',
    "-Infinity": '{"model":"m","prompt":"x","temperature":-Infinity}',
    "deep nesting": '{"model":"m","prompt":%s}' % DEEP,
    "deep nesting in a keyed field": '{"model":"m","prompt":"x","temperature":0,"extra":%s}' % ("[" * 5000 + "]" * 5000),
    "model is a list": '{"model":[],"prompt":"x"}',
    "model is an object": '{"model":{"a":1},"prompt":"x"}',
    "a list of prompts": '{"model":"m","prompt":["a","b"],"temperature":0}',
    "no messages": '{"model":"m","messages":[],"temperature":0}',
    "a list of token-id prompts": '{"model":"m","prompt":[[1,2],[3]],"temperature":0}',
    "seed is a float": '{"model":"m","prompt":"x","temperature":0.8,"seed":1.5}',
    "n times max_tokens beyond the limit": '{"model":"m","prompt":"x","temperature":0,"n":128,"max_tokens":32768}',
    "invalid UTF-8": b'{"model":"m","prompt":"\xff\xfe","temperature":0}',
    "a lone surrogate": '{"model":"m","prompt":"\\ud800","temperature":0}',
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_bodies_get_an_openai_error_and_store_nothing(gateway, fake, redis_server, case):
    before = redis_cli(redis_server, "DBSIZE")
    chat = '"messages"' in str(HOSTILE[case])
    err = assert_openai_error(raw_post(gateway, HOSTILE[case], "/v1/chat/completions" if chat else "/v1/completions"),
                              (400, 404, 413))
    assert "Traceback" not in err["message"]
    if case == "no messages":
        assert "at least one message" in err["message"]
    assert redis_cli(redis_server, "DBSIZE") == before


@pytest.mark.parametrize("seed", [(1 << 63) - 1, -(1 << 63), (1 << 53) + 1])
def test_a_64_bit_seed_is_served_and_cached(gateway, fake, seed):
    body = {"model": "m", "prompt": "x", "temperature": 0.8, "seed": seed, "max_tokens": 4}
    first = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=30)
    again = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=30)
    assert first.status_code == 200 and again.headers["x-invariant-cache"] == "HIT"
    assert fake.behaviour.bodies[-1]["seed"] == seed and fake.behaviour.calls == 1


VERIFY_HOSTILE = ['[]', '[{"request": {}}]', '{"kind": [], "request": {"model": "m", "prompt": "x"}}',
                  '{"kind": {"a": 1}, "request": {"model": "m", "prompt": "x"}}', '{"request": []}',
                  '{"request": {"model": "m", "prompt": "x", "temperature": NaN}}']


@pytest.mark.parametrize("data", VERIFY_HOSTILE)
def test_hostile_verify_bodies_get_an_openai_error(gateway, data):
    assert_openai_error(raw_post(gateway, data, "/invariant/verify"), (400, 404))


# --- 3. what the worker answered is checked before it is stored ----------------------------------

@pytest.mark.parametrize("finish", ["abort", None, "weird"], ids=["abort", "missing", "unknown"])
def test_an_unfinished_generation_is_not_stored(gateway, fake, redis_server, finish):
    fake.behaviour.finish_reason = finish
    body = {"model": "m", "prompt": f"unfinished {finish}", "temperature": 0, "max_tokens": 4}
    first = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=30)
    assert_openai_error(first, 502)
    assert entries(redis_server) == []
    fake.behaviour.finish_reason = "length"
    ok = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=30)
    assert ok.status_code == 200 and ok.headers["x-invariant-cache"] == "MISS"


@pytest.mark.parametrize("ids", [["a"], "1 2", None, [True]], ids=["strings", "a string", "null", "booleans"])
def test_a_malformed_worker_answer_is_a_502_and_not_stored(gateway, fake, redis_server, ids):
    fake.behaviour.token_ids = ids if ids is not None else {"not": "a list"}
    resp = httpx.post(f"{gateway.url}/v1/completions", json={"model": "m", "prompt": f"p {ids}", "temperature": 0},
                      timeout=30)
    assert_openai_error(resp, 502)
    assert entries(redis_server) == []


# --- 2. entries in Redis are authenticated: forged or corrupt -> MISS and a metric ------------------

def _stored_key(gateway, redis_server, prompt: str) -> tuple[dict, str]:
    body = {"model": "m", "prompt": prompt, "temperature": 0, "max_tokens": 4}
    assert httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=30).status_code == 200
    (key,) = entries(redis_server)
    return body, key


FORGERIES = ["garbage", "truncated", "unsigned record", "signed with another secret", "signed for another key",
             "signed, wrong types"]


@pytest.mark.parametrize("how", FORGERIES)
def test_a_forged_or_corrupt_entry_is_a_miss_and_counted(fake, redis_server, tmp_path, how):
    redis_cli(redis_server, "FLUSHALL")
    gw = Gateway([_W("m", fake.url)], redis_server.url, tmp_path, env=FAST)
    try:
        body, key = _stored_key(gw, redis_server, f"forge {how}")
        truth = httpx.post(f"{gw.url}/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
        stored = redis_cli(redis_server, "GET", key)
        record = stored.split(".", 2)[2]
        evil = json.dumps({"token_ids": [1, 2, 3, 4], "pieces": ["e", "v", "i", "l"], "finish_reason": "length",
                           "prompt_tokens": 3, "fingerprint": "inv-fake-a"})
        forged = {"garbage": "not an entry", "truncated": stored[: len(stored) // 2], "unsigned record": evil,
                  "signed with another secret": seal(key, evil.encode(), b"another secret").decode(),
                  "signed for another key": seal(key + "x", record.encode(), ENTRY_KEY.encode()).decode(),
                  "signed, wrong types": seal(key, json.dumps({"token_ids": "x", "pieces": 1}).encode(),
                                              ENTRY_KEY.encode()).decode()}[how]
        redis_cli(redis_server, "SET", key, forged)
        # a fresh replica (no in-process copy of the true entry) reads the forged one
        other = Gateway([_W("m", fake.url)], redis_server.url, tmp_path, env=FAST)
        try:
            calls = fake.behaviour.calls
            resp = httpx.post(f"{other.url}/v1/completions", json=body, timeout=30)
            assert resp.status_code == 200 and resp.headers["x-invariant-cache"] == "MISS"
            assert resp.json()["choices"][0]["text"] == truth
            assert fake.behaviour.calls == calls + 1
            refused = metric(other, "invariant_gateway_rejected_entries_total")
            assert refused >= 1  # each read of it is refused (the lookup, and the leader's second look)
            again = httpx.post(f"{other.url}/v1/completions", json=body, timeout=30)
            assert again.headers["x-invariant-cache"] == "HIT"  # the regenerated entry replaced the forged one
            assert metric(other, "invariant_gateway_rejected_entries_total") == refused
        finally:
            other.stop()
    finally:
        gw.stop()


def test_the_control_a_true_entry_from_redis_is_a_hit_on_a_fresh_replica(fake, redis_server, tmp_path):
    """Control of the test above: without forgery, a fresh replica serves the stored entry."""
    redis_cli(redis_server, "FLUSHALL")
    gw = Gateway([_W("m", fake.url)], redis_server.url, tmp_path, env=FAST)
    other = Gateway([_W("m", fake.url)], redis_server.url, tmp_path, env=FAST)
    try:
        body, _ = _stored_key(gw, redis_server, "a true entry")
        calls = fake.behaviour.calls
        assert httpx.post(f"{other.url}/v1/completions", json=body, timeout=30).headers["x-invariant-cache"] == "HIT"
        assert fake.behaviour.calls == calls and metric(other, "invariant_gateway_rejected_entries_total") == 0
    finally:
        other.stop()
        gw.stop()


# --- 5. followers do not wait out the lock when the leader gives up ---------------------------------

def test_followers_stop_waiting_when_the_leader_fails(fake, redis_server, tmp_path):
    redis_cli(redis_server, "FLUSHALL")
    fake.behaviour.delay, fake.behaviour.status = 1.0, 500
    a = Gateway([_W("m", fake.url)], redis_server.url, tmp_path, env=FAST)
    b = Gateway([_W("m", fake.url)], redis_server.url, tmp_path, env=FAST)
    try:
        body = {"model": "m", "prompt": "leader fails", "temperature": 0, "max_tokens": 4}

        async def scenario():
            async with httpx.AsyncClient(timeout=60) as client:
                lead = asyncio.create_task(client.post(f"{a.url}/v1/completions", json=body))
                await asyncio.sleep(0.3)
                t0 = time.monotonic()
                follow = await client.post(f"{b.url}/v1/completions", json=body)
                return await lead, follow, time.monotonic() - t0

        lead, follow, waited = asyncio.run(scenario())
        assert_openai_error(lead, 502)
        assert_openai_error(follow, 502)  # it led itself once the leader gave up, and failed the same way
        assert waited < 10, f"the follower waited {waited:.1f}s"
        print(f"follower answered {waited:.2f}s after it arrived (the lock's TTL is 600 s)")
        assert entries(redis_server) == []
    finally:
        a.stop()
        b.stop()


# --- 6. a fingerprint that changes mid-call never stores its output under the old key ---------------

def test_a_fingerprint_switch_mid_call_stores_nothing_under_the_old_key(gateway, fake, redis_server):
    # longer than the default health-check interval (5 s), so it reproduces without our interval knob
    fake.behaviour.switch_to, fake.behaviour.delay = "inv-fake-b", 6.0  # health checks see B meanwhile
    fake.behaviour.answer_fingerprint = "inv-fake-b"
    body = {"model": "m", "prompt": "switch", "temperature": 0, "max_tokens": 4}
    resp = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=30)
    assert_openai_error(resp, 502)
    assert entries(redis_server) == []
    fake.behaviour.switch_to, fake.behaviour.delay = None, 0.0
    ok = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=30)
    assert ok.status_code == 200 and ok.headers["x-invariant-fingerprint"] == "inv-fake-b"


# --- 7. one model without workers does not take the gateway out of its Service ----------------------

def test_ready_while_one_model_has_no_worker(fake, redis_server, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    gw = Gateway([_W("m", fake.url), _W("gone", dead)], redis_server.url, tmp_path, env=FAST)
    try:
        ready = httpx.get(f"{gw.url}/ready", timeout=5)
        assert ready.status_code == 200 and ready.json()["models"]["gone"][0]["healthy"] is False
        ok = httpx.post(f"{gw.url}/v1/completions", json={"model": "m", "prompt": "x", "temperature": 0}, timeout=30)
        assert ok.status_code == 200
        assert_openai_error(httpx.post(f"{gw.url}/v1/completions", json={"model": "gone", "prompt": "x"}, timeout=30),
                            503)
        fake.behaviour.ready = False
        time.sleep(1.0)
        assert httpx.get(f"{gw.url}/ready", timeout=5).status_code == 503  # no model can be served at all
    finally:
        gw.stop()



# --- 8. denial of service: a body is refused from its size, not after buffering it ------------------

def test_an_announced_huge_body_is_refused_before_it_is_sent(gateway):
    """Content-Length of 1 GiB with only a few bytes sent: the gateway answers 413 at once, where
    it used to wait for (and buffer) the whole body."""
    import socket

    host, port = "127.0.0.1", int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1073741824\r\n\r\n{\"model\":")
        sock.settimeout(5)
        reply = b""
        while b'"}}' not in reply:  # the end of the error's JSON
            part = sock.recv(4096)
            if not part:
                break
            reply += part
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"request_too_large"' in reply


def test_a_chunked_body_past_the_limit_is_refused(gateway):
    def chunks():
        yield b'{"model":"m","prompt":"'
        for _ in range(40):
            yield b"x" * 65536  # 2.5 MiB in all, past the 1 MiB default; no Content-Length
        yield b'"}'

    resp = httpx.post(f"{gateway.url}/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                      timeout=30)
    assert assert_openai_error(resp, 413)["code"] == "request_too_large"


# --- tenants are kept apart in the engine's prefix cache too ---------------------------------------

def test_each_tenant_gets_its_own_cache_salt_and_a_shared_model_none(fake, redis_server, tmp_path):
    from invariant.gateway.auth import hash_key

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({hash_key("key-a"): {"tenant": "a"}, hash_key("key-b"): {"tenant": "b"}}))
    config = tmp_path / "gw.json"
    config.write_text(json.dumps({"models": {"open": {"urls": [fake.url], "sharing": "shared"}}}))
    gw = Gateway([_W("m", fake.url)], redis_server.url, tmp_path, "--api-keys", str(keys), "--config", str(config),
                 env=FAST)
    try:
        salts = {}
        for who in ("a", "b", "a"):
            for model in ("m", "open"):
                body = {"model": model, "prompt": f"salted {who} {len(salts)}", "temperature": 0, "max_tokens": 2,
                        "cache_salt": "client-chosen"}
                resp = httpx.post(f"{gw.url}/v1/completions", json=body, timeout=30,
                                  headers={"Authorization": f"Bearer key-{who}"})
                assert resp.status_code == 200, resp.text
                salts.setdefault((who, model), set()).add(fake.behaviour.bodies[-1].get("cache_salt"))
        assert len(salts[("a", "m")]) == 1 and salts[("a", "m")] != salts[("b", "m")]
        assert None not in salts[("a", "m")] | salts[("b", "m")]
        assert salts[("a", "open")] == salts[("b", "open")] == {None}  # shared: one cache, by choice
        assert "key-a" not in str(salts) and "client-chosen" not in str(salts)
    finally:
        gw.stop()


# --- fuzzed bodies: never a 500, never a rejected request in Redis ---------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FIELDS = ["model", "prompt", "messages", "temperature", "top_p", "top_k", "seed", "n", "max_tokens", "stop",
          "logprobs", "top_logprobs", "stream", "stream_options", "logit_bias", "echo", "min_p", "user",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "return_token_ids", "ignore_eos",
          "max_completion_tokens", "cache_salt", "tools", "response_format"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=False),
                    st.text(max_size=20), st.sampled_from(["m", "", "nope", 0, -1, 1, 2, 128, 129, 1e308]))
VALUES = st.recursive(SCALARS, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=6), c,
                                                                                          max_size=4)), max_leaves=12)
BODIES = st.fixed_dictionaries({"model": st.sampled_from(["m", "m", "m", "other", 1])},
                               optional={f: VALUES for f in FIELDS if f != "model"})


@pytest.fixture(scope="module")
def fuzz_target(redis_server, tmp_path_factory):
    worker = FakeWorker().start()
    gw = Gateway([_W("m", worker.url)], redis_server.url, tmp_path_factory.mktemp("fuzz"), env=FAST)
    yield gw
    gw.stop()
    worker.stop()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES, path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/invariant/verify"]))
def test_fuzzed_bodies_never_get_a_500_and_rejected_ones_store_nothing(fuzz_target, redis_server, body, path):
    if path == "/invariant/verify":
        body = {"request": body, "kind": "completions"}
    before = redis_cli(redis_server, "DBSIZE")
    resp = httpx.post(f"{fuzz_target.url}{path}", content=json.dumps(body), timeout=30,  # Infinity too
                      headers={"content-type": "application/json"})
    assert resp.status_code != 500 and resp.status_code < 600, resp.text[:300]
    if resp.status_code >= 400:
        if resp.headers.get("content-type", "").startswith("application/json"):
            error = resp.json()["error"]
            assert isinstance(error["message"], str) and error["message"]
        if 400 <= resp.status_code < 500:
            assert redis_cli(redis_server, "DBSIZE") == before, (resp.status_code, resp.text[:200])


def test_the_token_rate_counts_n_times_max_tokens_and_the_request_rate_counts_requests(fake, redis_server, tmp_path):  # noqa: F811
    """A key's budget of generated tokens per minute: a request that may generate n x max_tokens is
    charged that much before any worker sees it; one past the budget is a 429 in OpenAI's shape."""
    import hashlib
    import json as json_

    keys = {"sha256:" + hashlib.sha256(b"sk-tokens").hexdigest(): {"tenant": "t", "tokens_per_minute": 100},
            "sha256:" + hashlib.sha256(b"sk-requests").hexdigest(): {"tenant": "r", "rate_per_minute": 3}}
    (tmp_path / "keys.json").write_text(json_.dumps(keys))
    gw = Gateway([_W("m", fake.url)], redis_server.url, tmp_path, "--api-keys", str(tmp_path / "keys.json"), env=FAST)
    try:
        def post(key, **body):
            return httpx.post(f"{gw.url}/v1/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                              json={"model": "m", "prompt": f"tokens {body}", "temperature": 0, **body})

        assert post("sk-tokens", max_tokens=30, n=2).status_code == 200  # 60 of 100
        refused = post("sk-tokens", max_tokens=30, n=2, seed=1)  # 60 more: over the budget
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "may generate 60 tokens" in error["message"]
        assert post("sk-tokens", max_tokens=40).status_code == 200  # 40 fit in what is left
        too_big = post("sk-tokens", max_tokens=101)
        assert too_big.status_code == 429 and "budget is 100 tokens per minute" in too_big.json()["error"]["message"]
        # the request rate: three requests a minute, however small
        codes = [post("sk-requests", max_tokens=1, seed=i).status_code for i in range(4)]
        assert codes == [200, 200, 200, 429], codes
    finally:
        gw.stop()


# --- the OpenAPI schema, fuzzed by schemathesis: valid and invalid bodies from /openapi.json -------

def _schema_cases():
    """Hypothesis strategies of schemathesis cases for each POST route of the gateway's OpenAPI
    document (gateway/openapi.py), valid (positive) and schema-breaking (negative) bodies."""
    import schemathesis
    from schemathesis import GenerationMode

    from invariant.gateway.app import create_app
    from invariant.gateway.config import GatewayConfig

    app = create_app(GatewayConfig(models={"m": ["http://127.0.0.1:1"]}, redis_url="redis://127.0.0.1:1/0"))
    schema = schemathesis.openapi.from_dict(app.openapi())
    operations = [op.ok() for op in schema.get_all_operations()]
    posts = [op for op in operations if op.method.upper() == "POST"]
    assert {op.path for op in posts} == {"/v1/completions", "/v1/chat/completions", "/invariant/verify"}
    return st.one_of(*(op.as_strategy(generation_mode=mode) for op in posts
                       for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)))


@settings(max_examples=240, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.data_too_large])
@given(case=_schema_cases(), served=st.booleans())
def test_the_openapi_schema_fuzzed_never_gets_a_500_and_rejected_requests_store_nothing(fuzz_target, redis_server,
                                                                                       case, served):
    body = case.body
    if served and isinstance(body, dict) and "model" in body:
        body = {**body, "model": "m"}  # reach past model routing into keying and generation
    if served and isinstance(body, dict) and isinstance(body.get("request"), dict):
        body = {**body, "request": {**body["request"], "model": "m"}}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    before = redis_cli(redis_server, "DBSIZE")
    resp = httpx.post(f"{fuzz_target.url}{case.formatted_path}", content=data, timeout=30,
                      headers={"content-type": "application/json"})
    assert 200 <= resp.status_code < 300 or 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        error = resp.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and error["type"]
        assert redis_cli(redis_server, "DBSIZE") == before, (resp.status_code, resp.text[:200])


# --- hostile headers: the three the gateway reads (Authorization, Cache-Control, Content-Length) ----

KEY = "sk-header-test"
OK_BODY = json.dumps({"model": "m", "prompt": "headers", "max_tokens": 4, "temperature": 0})


@pytest.fixture(scope="module")
def keyed(redis_server, tmp_path_factory):  # noqa: F811
    from invariant.gateway.auth import hash_key

    d = tmp_path_factory.mktemp("keyed")
    (d / "keys.json").write_text(json.dumps({hash_key(KEY): {"tenant": "t"}}))
    worker = FakeWorker().start()
    gw = Gateway([_W("m", worker.url)], redis_server.url, d, "--api-keys", str(d / "keys.json"), env=FAST)
    yield gw
    gw.stop()
    worker.stop()


def request_head(*headers: bytes) -> bytes:
    """A completions request's head with these header lines (each ending in CRLF), sent as bytes."""
    return b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + b"".join(headers)


def raw_request(gw, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes as they are (httpx refuses to send malformed headers); (status, body) or (0, b"")
    when the server closed the connection without an answer."""
    import socket

    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as sock:
        sock.sendall(head + b"\r\n" + body)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head_end = data.index(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", data[:head_end])
                if length and len(data) >= head_end + 4 + int(length.group(1)):
                    break
    if not data:
        return 0, b""
    return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[1]


HOSTILE_AUTH = {
    "missing": None,
    "a bare scheme": "Bearer",
    "the scheme and a space": "Bearer ",
    "another scheme": f"Basic {KEY}",
    "the key without a scheme": KEY,
    "the key with a suffix": f"Bearer {KEY}x",
    "a prefix of the key": f"Bearer {KEY[:-1]}",
    "a NUL inside": f"Bearer {KEY}\x00",
    "a 12 KB key": "Bearer " + "k" * 12_000,
}


@pytest.mark.parametrize("case", list(HOSTILE_AUTH))
def test_hostile_authorization_headers_are_401s_and_store_nothing(keyed, redis_server, case):
    value = HOSTILE_AUTH[case]
    head = request_head(f"Content-Length: {len(OK_BODY)}\r\n".encode())
    if value is not None:
        head += b"Authorization: " + value.encode("latin-1") + b"\r\n"
    before = redis_cli(redis_server, "DBSIZE")
    status, body = raw_request(keyed, head, OK_BODY.encode())
    if case == "a NUL inside":  # h11 refuses a control character in a header value itself
        assert status in (0, 400), status
    else:
        assert status == 401, (status, body[:200])
        error = json.loads(body)["error"]
        assert error["message"] and error["type"]
    assert redis_cli(redis_server, "DBSIZE") == before


def test_authorization_in_other_forms_of_the_right_key(keyed):
    """The control: the scheme in any case, one key; and Latin-1 bytes in a key are a 401, not a 500."""
    for value in (f"Bearer {KEY}", f"bearer {KEY}", f"BEARER   {KEY}"):
        resp = httpx.post(f"{keyed.url}/v1/completions", content=OK_BODY, timeout=30,
                          headers={"content-type": "application/json", "authorization": value})
        assert resp.status_code == 200, (value, resp.text[:200])
    head = request_head(f"Content-Length: {len(OK_BODY)}\r\n".encode(), b"Authorization: Bearer \xff\xfe\xe9\r\n")
    assert raw_request(keyed, head, OK_BODY.encode())[0] == 401


@pytest.mark.parametrize("value,stored", [
    ("no-store", False), ("NO-STORE", False), (" no-cache ,  no-store ", False), ("max-age=0, no-store", False),
    ("no-cache", False), ("No-Cache", False), ("," * 6000, True), ("no-storex", True), ("\xff\xfe", True),
])  # no-cache: generated fresh and not stored (docs/gateway.md); unknown directives are ignored
def test_hostile_cache_control_headers_are_served_and_no_store_is_kept(keyed, redis_server, value, stored):
    body = json.dumps({"model": "m", "prompt": f"cache-control {value!r}", "max_tokens": 4, "temperature": 0})
    head = request_head(f"Content-Length: {len(body)}\r\nAuthorization: Bearer {KEY}\r\n".encode(),
                        b"Cache-Control: " + value.encode("latin-1") + b"\r\n")
    before = len(entries(redis_server))
    status, answer = raw_request(keyed, head, body.encode())
    assert status == 200, (status, answer[:200])
    assert json.loads(answer)["choices"][0]["text"] is not None
    assert len(entries(redis_server)) == before + (1 if stored else 0)


@pytest.mark.parametrize("length", [b"-1", b"abc", b"1e3", b"99999999999999999999999", b"5, 7"])
def test_malformed_content_lengths_are_refused_before_the_body(keyed, redis_server, length):
    before = redis_cli(redis_server, "DBSIZE")
    head = request_head(f"Authorization: Bearer {KEY}\r\n".encode(), b"Content-Length: " + length + b"\r\n")
    status, _ = raw_request(keyed, head, OK_BODY.encode())
    assert status in (0, 400, 413), status  # h11's 400 or our 413; never a 500, never served
    assert redis_cli(redis_server, "DBSIZE") == before


def test_forged_response_headers_in_a_request_change_nothing(keyed):
    """A client that sends the gateway's own headers (cache outcome, fingerprint) gets a real MISS
    first and the true fingerprint: the gateway never reads them from a request."""
    body = json.dumps({"model": "m", "prompt": "forged headers", "max_tokens": 4, "temperature": 0})
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}",
               "x-invariant-cache": "HIT", "x-invariant-fingerprint": "sha256:" + "0" * 64,
               "if-none-match": '"forged"', "x-forwarded-for": "10.0.0.1"}
    first = httpx.post(f"{keyed.url}/v1/completions", content=body, headers=headers, timeout=30)
    again = httpx.post(f"{keyed.url}/v1/completions", content=body, headers=headers, timeout=30)
    assert first.status_code == again.status_code == 200
    assert (first.headers["x-invariant-cache"], again.headers["x-invariant-cache"]) == ("MISS", "HIT")
    assert first.json()["system_fingerprint"] != "sha256:" + "0" * 64
    assert first.json()["choices"] == again.json()["choices"]  # (ids and times differ by design)


def test_too_many_or_too_large_headers_are_refused_without_a_500(keyed):
    many = b"".join(f"X-H{i}: v\r\n".encode() for i in range(3000))
    huge = b"X-Big: " + b"v" * 200_000 + b"\r\n"
    for extra in (many, huge):
        head = request_head(f"Content-Length: {len(OK_BODY)}\r\nAuthorization: Bearer {KEY}\r\n".encode(), extra)
        status, _ = raw_request(keyed, head, OK_BODY.encode())
        assert status in (0, 200, 400, 413, 431), status
    # and the gateway still serves
    ok = httpx.post(f"{keyed.url}/v1/completions", content=OK_BODY, timeout=30,
                    headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.data_too_large])
@given(case=_schema_cases(), with_key=st.booleans())
def test_the_openapi_headers_fuzzed_on_a_keyed_gateway_never_get_a_500(keyed, redis_server, case, with_key):
    """schemathesis fills the headers the schema declares (Authorization, Cache-Control) with
    valid and schema-breaking values; a wrong key is a 401, nothing else changes that."""
    headers = {k: v for k, v in (case.headers or {}).items() if isinstance(v, str)}
    if with_key:
        headers["Authorization"] = f"Bearer {KEY}"
    body = case.body
    if isinstance(body, dict) and "model" in body:
        body = {**body, "model": "m"}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    before = redis_cli(redis_server, "DBSIZE")
    try:
        resp = httpx.post(f"{keyed.url}{case.formatted_path}", content=data, timeout=30,
                          headers={**headers, "content-type": "application/json"})
    except (httpx.LocalProtocolError, UnicodeEncodeError):
        return  # a header value httpx itself will not send (a newline, a non-Latin-1 character)
    assert 200 <= resp.status_code < 300 or 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        assert resp.json()["error"]["message"]
        assert redis_cli(redis_server, "DBSIZE") == before, (resp.status_code, resp.text[:200])
    if not with_key and not headers.get("Authorization", "").lower().startswith("bearer "):
        assert resp.status_code == 401, (headers, resp.status_code)
