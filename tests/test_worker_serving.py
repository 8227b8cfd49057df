"""The worker serves vLLM's OpenAI API on a made model, stamped with the numerics fingerprint."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from conftest import invariant_cli

pytestmark = pytest.mark.engine

PROMPT = "Tell me about reproducibility"


@pytest.fixture(scope="module")
def client(worker) -> OpenAI:
    return OpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def expected_fingerprint(worker) -> str:
    res = invariant_cli("fingerprint", "--model", str(worker.model_dir))
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_completion_and_its_stream_agree(client, worker, expected_fingerprint):
    full = client.completions.create(model=worker.name, prompt=PROMPT, max_tokens=24, temperature=0, logprobs=1)
    assert full.system_fingerprint == expected_fingerprint
    choice = full.choices[0]
    assert choice.finish_reason == "length" and full.usage.completion_tokens == 24
    chunks = list(client.completions.create(model=worker.name, prompt=PROMPT, max_tokens=24, temperature=0,
                                            logprobs=1, stream=True))
    # vLLM stamps the fingerprint on some chunks of a stream, not all (the gateway stamps every one)
    assert {c.system_fingerprint for c in chunks} - {None} == {expected_fingerprint}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    streamed_lp = [lp for c in chunks if c.choices and c.choices[0].logprobs
                   for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed_lp == choice.logprobs.token_logprobs  # bitwise: floats compared with ==


def test_chat_and_its_stream_agree(client, worker, expected_fingerprint):
    messages = [{"role": "user", "content": "What is batch invariance?"}]
    full = client.chat.completions.create(model=worker.name, messages=messages, max_tokens=16, temperature=0)
    assert full.system_fingerprint == expected_fingerprint
    assert full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens == 16
    chunks = list(client.chat.completions.create(model=worker.name, messages=messages, max_tokens=16,
                                                 temperature=0, stream=True))
    assert {c.system_fingerprint for c in chunks} - {None} == {expected_fingerprint}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_health_ready_and_fingerprint_routes(worker, expected_fingerprint):
    with httpx.Client(base_url=worker.url, timeout=30) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [worker.name]
        assert http.get("/health").status_code == 200
        ready = http.get("/invariant/ready")
        body = ready.json()
        assert ready.status_code == 200 and body["ready"] is True and body["reasons"] == []
        assert body["fingerprint"] == expected_fingerprint and body["canary"]["ok"] is True
        body = http.get("/invariant/fingerprint").json()
    assert body["fingerprint"] == expected_fingerprint
    parts = body["parts"]
    assert parts["dtype"] == "bfloat16" and parts["tensor_parallel_size"] == 1
    assert set(parts["versions"]) >= {"vllm", "torch", "triton", "invariant"}
    assert parts["device"]["kind"] == "cpu"


def test_two_workers_on_the_same_pins_print_the_same_fingerprint(worker_pair):
    prints = set()
    for w in worker_pair:
        resp = httpx.post(f"{w.url}/v1/completions", timeout=60,
                          json={"model": w.name, "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
        prints.add(resp.json()["system_fingerprint"])
        prints.add(httpx.get(f"{w.url}/invariant/fingerprint").json()["fingerprint"])
    assert len(prints) == 1


def test_bad_request_is_an_openai_error(client, worker):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=worker.name, prompt=PROMPT, max_tokens=-1)
    assert err.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=1)
