"""The gateway against real workers (vLLM) and a real redis-server, all on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from conftest import free_port, wait_listening
from invariant.gateway.auth import hash_key
from invariant.gateway.entries import seal, unseal

pytestmark = pytest.mark.engine
PROMPT = "Tell me about reproducibility"


class RedisServer:
    def __init__(self, port: int):
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (bash .ci/install installs Debian's)")
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--maxmemory", "64mb", "--maxmemory-policy",
                                      "allkeys-lru"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.proc, self.port, "redis-server")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Gateway:
    def __init__(self, workers, redis_url: str, tmp: Path, *extra: str, redis_timeout: float = 2.0,
                 env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "invariant", "gateway", "--port", str(self.port), "--redis-url", redis_url]
        for w in workers:
            args += ["--model", f"{w.name}={w.url}"]
        self.log = tmp / f"gateway-{self.port}.log"
        # A generous Redis timeout: two vLLM engines load both cores of a CI machine, and a cache
        # write that times out is (correctly) skipped, which would make hit/miss assertions flaky.
        env = {**os.environ, "INVARIANT_GATEWAY_REDIS_TIMEOUT": str(redis_timeout), **(env or {})}
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen([*args, *extra], stdout=fh, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"gateway did not become ready:\n{self.log.read_text()[-3000:]}")

    def upstream_calls(self) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        m = re.search(r'invariant_gateway_upstream_calls_total\{model="[^"]+",outcome="ok"\} ([0-9.e+]+)', text)
        return float(m.group(1)) if m else 0.0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer(free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(worker_pair, redis_server, tmp_path_factory):
    gw = Gateway(worker_pair, redis_server.url, tmp_path_factory.mktemp("gw"))
    yield gw
    gw.stop()


def post(gw, path="/v1/completions", headers=None, **body):
    return httpx.post(f"{gw.url}{path}", json=body, headers=headers or {}, timeout=120)


def test_miss_then_hit_with_identical_content(gateway, worker):
    body = dict(model=worker.name, prompt=PROMPT + " 1", max_tokens=12, temperature=0, logprobs=1,
                return_token_ids=True)
    first, second = post(gateway, **body), post(gateway, **body)
    assert first.headers["x-invariant-cache"] == "MISS" and second.headers["x-invariant-cache"] == "HIT"
    assert first.headers["etag"] == second.headers["etag"]
    a, b = first.json()["choices"][0], second.json()["choices"][0]
    assert (a["text"], a["token_ids"], a["logprobs"]) == (b["text"], b["token_ids"], b["logprobs"])
    direct = httpx.post(f"{worker.url}/v1/completions", json=body, timeout=120).json()["choices"][0]
    assert direct["token_ids"] == a["token_ids"]
    assert direct["logprobs"]["token_logprobs"] == a["logprobs"]["token_logprobs"]
    assert first.headers["x-invariant-fingerprint"] == first.json()["system_fingerprint"]


def test_bypass_no_cache_and_no_store(gateway, worker):
    unseeded = post(gateway, model=worker.name, prompt=PROMPT, max_tokens=4, temperature=0.8)
    assert unseeded.headers["x-invariant-cache"] == "BYPASS"
    assert unseeded.headers["x-invariant-bypass-reason"] == "sampling without a seed is not reproducible"
    body = dict(model=worker.name, prompt=PROMPT + " 2", max_tokens=4, temperature=0)
    assert post(gateway, headers={"Cache-Control": "no-store"}, **body).headers["x-invariant-cache"] == "MISS"
    assert post(gateway, **body).headers["x-invariant-cache"] == "MISS"  # nothing was stored
    assert post(gateway, **body).headers["x-invariant-cache"] == "HIT"
    assert post(gateway, headers={"Cache-Control": "no-cache"}, **body).headers["x-invariant-cache"] == "BYPASS"


def stream_content(resp_lines):
    text, ids, lps = "", [], []
    for line in resp_lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for c in json.loads(line[6:])["choices"]:
            text += c.get("text") or (c.get("delta") or {}).get("content") or ""
            ids += c.get("token_ids") or []
            lps += ((c.get("logprobs") or {}).get("token_logprobs")) or []
    return text, ids, lps


def test_replayed_stream_equals_the_live_one(gateway, worker):
    body = dict(model=worker.name, prompt="The weather today", max_tokens=16, temperature=0, logprobs=1,
                return_token_ids=True, stream=True)
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=120) as live:
        assert live.headers["x-invariant-cache"] == "MISS"
        live_content = stream_content(list(live.iter_lines()))
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=120) as replay:
        assert replay.headers["x-invariant-cache"] == "HIT"
        replay_content = stream_content(list(replay.iter_lines()))
    assert live_content == replay_content and len(live_content[1]) == 16
    whole = post(gateway, **{**body, "stream": False}).json()["choices"][0]  # a non-streamed HIT of the same entry
    assert (whole["text"], whole["token_ids"], whole["logprobs"]["token_logprobs"]) == live_content


def spellable_prompt(worker, max_tokens):
    """A prompt whose greedy output's tokens spell its text exactly (no byte token splits a
    character): only such entries can be truncated, see records.pieces_from_completion."""
    for prompt in ("The library opens at", "Numbers: 0 1 2 3", "Questions are welcome.", "Code looks like this:",
                   "The river runs", "Good engineering is", "System: you are"):
        out = httpx.post(f"{worker.url}/v1/completions", timeout=120, json=dict(
            model=worker.name, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0)).json()["choices"][0]
        if "".join(out["logprobs"]["tokens"]) == out["text"]:
            return prompt
    pytest.fail("no prompt with a spellable output on this model")


def test_prefix_reuse_equals_a_fresh_generation(gateway, worker):
    prompt = spellable_prompt(worker, 24)
    long = dict(model=worker.name, prompt=prompt, max_tokens=24, temperature=0, logprobs=1, return_token_ids=True)
    assert post(gateway, **long).headers["x-invariant-cache"] == "MISS"
    for k in (9, 1, 23):
        short = {**long, "max_tokens": k}
        reused = post(gateway, **short)
        assert reused.headers["x-invariant-cache"] == "HIT"
        fresh = httpx.post(f"{worker.url}/v1/completions", json=short, timeout=120).json()["choices"][0]
        got = reused.json()["choices"][0]
        assert len(got["token_ids"]) == k and got["finish_reason"] == "length"
        assert got["token_ids"] == fresh["token_ids"]
        assert got["logprobs"] == fresh["logprobs"]  # every logprob field, bit for bit
        assert got["text"] == fresh["text"]
    longer = post(gateway, **{**long, "max_tokens": 30})
    assert longer.headers["x-invariant-cache"] == "MISS"  # a 24-token entry cannot answer 30


def test_fifty_concurrent_identical_requests_make_one_generation(gateway, worker):
    body = dict(model=worker.name, prompt="Fifty at once", max_tokens=32, temperature=0)
    before = gateway.upstream_calls()

    async def crowd():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{gateway.url}/v1/completions", json=body) for _ in range(50)))

    responses = asyncio.run(crowd())
    assert gateway.upstream_calls() - before == 1
    # every one of the fifty got the one generation: the worker's own answer, byte for byte in its choice
    direct = httpx.post(f"{worker.url}/v1/completions", json=body, timeout=120).json()["choices"][0]
    choices = [r.json()["choices"][0] for r in responses]
    assert all(c["text"] == direct["text"] and c["finish_reason"] == direct["finish_reason"] for c in choices)
    assert direct["text"] and len({r.headers["etag"] for r in responses}) == 1
    outcomes = [r.headers["x-invariant-cache"] for r in responses]
    assert outcomes.count("MISS") == 1 and set(outcomes) <= {"MISS", "COALESCED", "HIT"}


def test_omitted_parameters_and_generation_config_values_share_a_key(gateway, worker):
    # the made model's generation_config: temperature 0.7, top_p 0.9, top_k 40, repetition_penalty 1.0
    omitted = dict(model=worker.name, prompt="Defaults", max_tokens=6, seed=11)
    explicit = {**omitted, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.0}
    assert post(gateway, **omitted).headers["x-invariant-cache"] == "MISS"
    assert post(gateway, **explicit).headers["x-invariant-cache"] == "HIT"
    assert post(gateway, **{**explicit, "temperature": 0.71}).headers["x-invariant-cache"] == "MISS"


def test_seeded_choices_are_stored_per_choice(gateway, worker):
    both = post(gateway, model=worker.name, prompt="Pick", max_tokens=6, temperature=0.9, seed=21, n=2,
                return_token_ids=True)
    assert both.headers["x-invariant-cache"] == "MISS"
    second = post(gateway, model=worker.name, prompt="Pick", max_tokens=6, temperature=0.9, seed=22,
                  return_token_ids=True)
    assert second.headers["x-invariant-cache"] == "HIT"
    assert second.json()["choices"][0]["token_ids"] == both.json()["choices"][1]["token_ids"]
    direct = httpx.post(f"{worker.url}/v1/completions", timeout=120, json=dict(
        model=worker.name, prompt="Pick", max_tokens=6, temperature=0.9, seed=21, n=2, return_token_ids=True)).json()
    assert [c["token_ids"] for c in sorted(direct["choices"], key=lambda c: c["index"])] == \
        [c["token_ids"] for c in both.json()["choices"]]


def test_openai_client_streaming_and_chat(gateway, worker):
    client = OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "What is a fingerprint?"}]
    full = client.chat.completions.create(model=worker.name, messages=messages, max_tokens=10, temperature=0)
    streamed = list(client.chat.completions.create(model=worker.name, messages=messages, max_tokens=10,
                                                   temperature=0, stream=True,
                                                   stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full.choices[0].message.content
    assert streamed[-1].usage.completion_tokens == full.usage.completion_tokens == 10
    comp = client.completions.create(model=worker.name, prompt=PROMPT, max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in comp if c.choices)
    assert [m.id for m in client.models.list().data] == [worker.name]


def test_errors_are_openai_shaped_and_never_cached(gateway, worker):
    missing = post(gateway, model="nope", prompt="x", max_tokens=1)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    bad = post(gateway, model=worker.name, prompt="x", max_tokens=-1)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    too_long = post(gateway, model=worker.name, prompt="x" * 5000, max_tokens=5, temperature=0)
    assert too_long.status_code == 400  # the worker refuses (context length): passed through, not stored
    again = post(gateway, model=worker.name, prompt="x" * 5000, max_tokens=5, temperature=0)
    assert again.status_code == 400 and "x-invariant-cache" not in again.headers
    garbage = httpx.post(f"{gateway.url}/v1/completions", content=b"{not json", timeout=10)
    assert garbage.status_code == 400 and garbage.json()["error"]["message"] == "The request body is not valid JSON."


def test_spellings_of_one_request_share_an_entry(gateway, worker):
    """The same request in other bytes (whitespace, key order, escapes, number spelling) is the same
    entry: the first spelling generates, the others are HITs with the same bytes of content."""
    spellings = [
        '{"model": "%s", "prompt": "Spell me caf\\u00e9", "max_tokens": 6, "temperature": 0}',
        '{"temperature":0.0,"max_tokens":6,"prompt":"Spell me café","model":"%s"}',
        '{\n  "max_tokens" : 6,\n  "model" : "%s",\n  "prompt" : "Spell me caf\\u00e9",\n  "temperature" : -0.0\n}',
    ]
    raws = [(sp % worker.name).encode() for sp in spellings]
    assert len(set(raws)) == 3  # three byte strings, one request
    outcomes, texts = [], set()
    for raw in raws:
        res = httpx.post(f"{gateway.url}/v1/completions", content=raw, timeout=120,
                         headers={"content-type": "application/json"})
        assert res.status_code == 200, res.text
        outcomes.append(res.headers["x-invariant-cache"])
        texts.add((res.json()["choices"][0]["text"], res.headers["etag"]))
    assert outcomes == ["MISS", "HIT", "HIT"] and len(texts) == 1


def verify_counts(gw) -> dict[str, float]:
    text = httpx.get(f"{gw.url}/metrics").text
    return {m[0]: float(m[1]) for m in re.findall(r'invariant_gateway_verify_total\{result="(\w+)"\} ([0-9.e+]+)', text)}


def redis_cli(server, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(server.port), *args], capture_output=True, text=True,
                          check=True).stdout


def test_verify_replays_an_entry_bitwise(gateway, worker):
    body = dict(model=worker.name, prompt="Verify me", max_tokens=8, temperature=0)
    post(gateway, **body)
    res = httpx.post(f"{gateway.url}/invariant/verify", json={"kind": "completions", "request": body}, timeout=120)
    report = res.json()
    assert res.status_code == 200 and report["match"] is True, report
    assert report["results"][0]["token_ids_match"] is True and report["results"][0]["logprobs_match"] is True


@pytest.mark.parametrize("tamper", ["token_ids", "logprobs"])
def test_verify_reports_a_tampered_entry_and_evicts_it(worker_pair, redis_server, tmp_path, tamper):
    """Control of the test above: an entry altered in Redis is a mismatch (409, counted), is
    evicted, and the next request regenerates the true bits."""
    writer = Gateway(worker_pair, redis_server.url, tmp_path)
    name = worker_pair[0].name
    body = dict(model=name, prompt=f"Tamper with my {tamper}", max_tokens=8, temperature=0, logprobs=1,
                return_token_ids=True)
    try:
        first = post(writer, **body)
        assert first.headers["x-invariant-cache"] == "MISS"
    finally:
        writer.stop()
    truth = first.json()["choices"][0]
    # The poisoner holds the deployment's entry key (these gateways run without one: a checksum),
    # so its entry is sealed like a true one: what only a replay can tell from the truth.
    entries = {}
    for k in redis_cli(redis_server, "--scan", "--pattern", "inv:*").split():
        if redis_cli(redis_server, "TYPE", k).strip() == "string":
            raw = unseal(k, redis_cli(redis_server, "GET", k).rstrip("\n"), b"")
            if raw is not None:  # a lock token is not an entry
                entries[k] = json.loads(raw)
    [key] = [k for k, e in entries.items() if e.get("token_ids") == truth["token_ids"]]
    entry = entries[key]
    if tamper == "token_ids":
        entry["token_ids"][3] = (entry["token_ids"][3] + 1) % 1000
    else:
        entry["logprobs"]["token_logprobs"][2] = entry["logprobs"]["token_logprobs"][2] - 2.0**-20
    redis_cli(redis_server, "SET", key, seal(key, json.dumps(entry).encode(), b"").decode())
    gw = Gateway(worker_pair, redis_server.url, tmp_path)  # a replica without the true entry in memory
    try:
        poisoned = post(gw, **body)
        assert poisoned.headers["x-invariant-cache"] == "HIT"  # the tampered entry is served until checked
        assert poisoned.json()["choices"][0][tamper if tamper == "token_ids" else "logprobs"] != \
            truth[tamper if tamper == "token_ids" else "logprobs"]
        before = verify_counts(gw)
        res = httpx.post(f"{gw.url}/invariant/verify", json={"kind": "completions", "request": body}, timeout=120)
        report = res.json()
        assert res.status_code == 409 and report["match"] is False, report
        [r] = report["results"]
        assert r[f"{tamper}_match"] is False and r["evicted"] is True, r
        assert verify_counts(gw).get("mismatch", 0) == before.get("mismatch", 0) + 1
        assert redis_cli(redis_server, "EXISTS", key).strip() == "0"
        again = post(gw, **body)
        assert again.headers["x-invariant-cache"] == "MISS"  # regenerated, not the hot or local copy
        assert again.json()["choices"][0]["token_ids"] == truth["token_ids"]
        assert again.json()["choices"][0]["logprobs"] == truth["logprobs"]
        assert json.loads(unseal(key, redis_cli(redis_server, "GET", key).rstrip("\n"), b""))["token_ids"] == truth["token_ids"]
        ok = httpx.post(f"{gw.url}/invariant/verify", json={"kind": "completions", "request": body}, timeout=120)
        assert ok.status_code == 200 and ok.json()["match"] is True
    finally:
        gw.stop()


def test_redis_down_then_back(worker_pair, tmp_path):
    redis = RedisServer(free_port()).start()
    gw = Gateway(worker_pair, redis.url, tmp_path, redis_timeout=0.25)
    name = worker_pair[0].name
    try:
        body = dict(model=name, prompt="Redis outage", max_tokens=6, temperature=0)
        assert post(gw, **body).headers["x-invariant-cache"] == "MISS"
        redis.stop()
        started = time.monotonic()
        down = post(gw, **{**body, "prompt": "During the outage"})
        assert down.status_code == 200 and time.monotonic() - started < 30
        assert down.headers.get("x-invariant-cache-degraded") == "redis-unavailable"
        redis.start()
        time.sleep(2.5)  # the circuit breaker retries Redis after 2 s
        fresh = dict(body, prompt="After the outage")
        outcomes = [post(gw, **fresh).headers["x-invariant-cache"] for _ in range(4)]
        assert "HIT" in outcomes  # caching resumed
    finally:
        gw.stop()
        redis.stop()


def test_auth_and_tenant_isolation(worker_pair, redis_server, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({hash_key("key-a"): {"tenant": "a"}, hash_key("key-b"): {"tenant": "b"}}))
    gw = Gateway(worker_pair, redis_server.url, tmp_path, "--api-keys", str(keys))
    name = worker_pair[0].name
    try:
        body = dict(model=name, prompt="A secret question of tenant A", max_tokens=6, temperature=0)
        assert post(gw, **body).status_code == 401
        wrong = post(gw, headers={"Authorization": "Bearer nope"}, **body)
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        a = {"Authorization": "Bearer key-a"}
        b = {"Authorization": "Bearer key-b"}
        assert post(gw, headers=a, **body).headers["x-invariant-cache"] == "MISS"
        assert post(gw, headers=a, **body).headers["x-invariant-cache"] == "HIT"
        assert post(gw, headers=b, **body).headers["x-invariant-cache"] == "MISS"  # never A's entry
        stored = subprocess.run(["redis-cli", "-p", str(redis_server.port), "--scan", "--pattern", "inv:v1:t:*"],
                                capture_output=True, text=True).stdout
        assert ":t:a:" in stored and ":t:b:" in stored  # entries are namespaced by tenant name
        # the API keys themselves appear nowhere the gateway writes: Redis keys, entries, its log
        dump = stored + "".join(redis_cli(redis_server, "GET", k) for k in stored.split()
                                if redis_cli(redis_server, "TYPE", k).strip() == "string")
        written = dump + gw.log.read_text()
        assert "key-a" not in written and "key-b" not in written
    finally:
        gw.stop()


def prefix_cache_hits(worker) -> float:
    text = httpx.get(f"{worker.url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r"^vllm:prefix_cache_hits_total(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M))


def test_tenants_share_no_prefix_cache_blocks(worker_pair, redis_server, tmp_path):
    """Issue 14: vLLM's prefix cache was shared across tenants (a hit shows in the time to first
    token). Each tenant's requests now carry their own cache_salt; control: the same tenant's next
    request with the same prompt does hit its own blocks."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({hash_key("key-a"): {"tenant": "a"}, hash_key("key-b"): {"tenant": "b"}}))
    worker = worker_pair[0]
    gw = Gateway([worker], redis_server.url, tmp_path, "--api-keys", str(keys))
    prompt = " ".join(f"w{i % 97}" for i in range(300))  # several KV blocks, within the 1024-token model length
    try:
        def ask(who: str, **extra) -> None:
            resp = post(gw, headers={"Authorization": f"Bearer key-{who}"}, model=worker.name, prompt=prompt,
                        max_tokens=2, temperature=0, **extra)
            assert resp.status_code == 200 and resp.headers["x-invariant-cache"] == "MISS", resp.text

        ask("a")
        before = prefix_cache_hits(worker)
        ask("b")
        assert prefix_cache_hits(worker) == before, "tenant b's prefill reused tenant a's cached blocks"
        ask("a", stop=["never-said"])  # another entry, the same prompt, tenant a again
        assert prefix_cache_hits(worker) > before, "control: a tenant's own blocks were not reused"
    finally:
        gw.stop()


def test_background_reverification_of_hits(worker_pair, redis_server, tmp_path):
    gw = Gateway(worker_pair, redis_server.url, tmp_path, env={"INVARIANT_GATEWAY_VERIFY_SAMPLE": "1.0"})
    name = worker_pair[0].name
    try:
        body = dict(model=name, prompt="Check me in the background", max_tokens=6, temperature=0)
        assert post(gw, **body).headers["x-invariant-cache"] == "MISS"
        assert post(gw, **body).headers["x-invariant-cache"] == "HIT"

        def verified():
            text = httpx.get(f"{gw.url}/metrics").text
            m = re.search(r'invariant_gateway_verify_total\{result="(match|mismatch)"\} ([0-9.]+)', text)
            return m.groups() if m else None

        deadline = time.monotonic() + 60
        while verified() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert verified() == ("match", "1.0")
    finally:
        gw.stop()


def test_single_flight_across_two_gateway_replicas(worker_pair, redis_server, tmp_path):
    replicas = [Gateway(worker_pair, redis_server.url, tmp_path), Gateway(worker_pair, redis_server.url, tmp_path)]
    name = worker_pair[0].name
    try:
        body = dict(model=name, prompt="Two replicas, one generation", max_tokens=32, temperature=0)
        before = sum(g.upstream_calls() for g in replicas)

        async def crowd():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(client.post(f"{replicas[i % 2].url}/v1/completions", json=body)
                                              for i in range(40)))

        responses = asyncio.run(crowd())
        assert sum(g.upstream_calls() for g in replicas) - before == 1  # coordinated through Redis
        assert len({r.headers["etag"] for r in responses}) == 1
        assert [r.headers["x-invariant-cache"] for r in responses].count("MISS") == 1
    finally:
        for g in replicas:
            g.stop()


def test_verify_refuses_malformed_bodies_and_unknown_models(gateway, worker):
    for bad in ([1, 2], {"request": [1]}, {"request": "x"}, {"kind": "images", "request": {"model": worker.name}}):
        res = httpx.post(f"{gateway.url}/invariant/verify", json=bad, timeout=30)
        assert res.status_code == 400 and res.json()["error"]["type"] == "invalid_request_error", (bad, res.text)
    res = httpx.post(f"{gateway.url}/invariant/verify", json={"request": {"model": "nope", "prompt": "x"}}, timeout=30)
    assert res.status_code == 404 and res.json()["error"]["code"] == "model_not_found"
    res = httpx.post(f"{gateway.url}/invariant/verify", timeout=30,
                     json={"request": {"model": worker.name, "prompt": "x", "temperature": "hot"}})
    assert res.status_code == 400 and "temperature" in res.json()["error"]["message"]
