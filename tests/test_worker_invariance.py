"""Batch invariance through the worker's HTTP API, the start-up canary, and --no-invariance."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from conftest import hooked_env, invariant_cli, start_worker, wait_ready
from invariant.modelmaker import ModelSpec, make_model

pytestmark = pytest.mark.engine

PROMPT = "The same request gives the same numbers, whatever else the server is doing at the time"
CROWDS = (2, 5, 16, 33, 64, 128)


def fillers(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = PROMPT.split()
    return [{"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(1, 200))),
             "max_tokens": rng.randint(1, 40)} for _ in range(n)]


async def _complete(client: httpx.AsyncClient, name: str, body: dict) -> dict:
    res = await client.post("/v1/completions", json={"model": name, "return_token_ids": True, "logprobs": 1, **body})
    assert res.status_code == 200, res.text
    choice = res.json()["choices"][0]
    return {"token_ids": choice["token_ids"], "logprobs": choice["logprobs"]["token_logprobs"]}


async def crowd_run(url: str, name: str, n: int, params: dict, seed: int, tokens: int = 16) -> dict:
    """The prompt sent at a random moment among n-1 concurrent fillers; returns the prompt's result."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=300,
                                 limits=httpx.Limits(max_connections=1024)) as client:
        async def prompt_later():
            await asyncio.sleep(rng.uniform(0, 0.05))
            return await _complete(client, name, {"prompt": PROMPT, "max_tokens": tokens, **params})

        tasks = [asyncio.create_task(_complete(client, name, {**f, "temperature": 0})) for f in fillers(n - 1, seed)]
        mine = await prompt_later()
        await asyncio.gather(*tasks)
        return mine


@pytest.mark.parametrize("params", [{"temperature": 0}, {"temperature": 0.8, "seed": 4242}], ids=["greedy", "seeded"])
def test_concurrent_http_requests_do_not_change_the_bits(worker, params):
    alone = asyncio.run(crowd_run(worker.url, worker.name, 1, params, seed=0))
    assert len(alone["token_ids"]) == 16
    for n in CROWDS:
        got = asyncio.run(crowd_run(worker.url, worker.name, n, params, seed=n))
        assert got["token_ids"] == alone["token_ids"], f"crowd {n}: token ids differ"
        assert got["logprobs"] == alone["logprobs"], f"crowd {n}: logprobs differ"


@pytest.fixture(scope="module")
def stock_fp32_worker(tmp_path_factory):
    """Control for the test above: --no-invariance on vLLM's own fallback GEMM in fp32 (MKL, which
    picks another kernel for one row than for several on every x86 we measured; this machine kind's
    default CPU kernels happen to be row-invariant, docs/cpu-invariance.md)."""
    model = make_model(tmp_path_factory.mktemp("fp32") / "tiny-fp32", ModelSpec(dtype="float32"))
    stock = start_worker(model, tmp_path_factory.mktemp("fp32-logs"), "--no-invariance", name="tiny",
                         env=hooked_env(INVARIANT_TEST_STOCK_GEMM="torch"))
    try:
        wait_ready(stock)
        yield stock
    finally:
        stock.stop()


@pytest.mark.parametrize("params", [{"temperature": 0}, {"temperature": 0.8, "seed": 4242}], ids=["greedy", "seeded"])
def test_control_the_same_crowds_vary_without_invariance(stock_fp32_worker, params):
    url, name = stock_fp32_worker.url, stock_fp32_worker.name
    alone = asyncio.run(crowd_run(url, name, 1, params, seed=0))
    if "seed" in params:  # the seeded request really sampled: not the greedy answer
        greedy = asyncio.run(crowd_run(url, name, 1, {"temperature": 0}, seed=0))
        assert alone["token_ids"] != greedy["token_ids"], "temperature 0.8 gave the greedy tokens"
    varied = [n for n in CROWDS if asyncio.run(crowd_run(url, name, n, params, seed=n)) != alone]
    assert varied, f"no crowd changed the stock worker's {params} bits: the HTTP invariance test proves nothing"


def test_the_seeded_request_really_samples(worker):
    seeded = asyncio.run(crowd_run(worker.url, worker.name, 1, {"temperature": 0.8, "seed": 4242}, seed=0))
    greedy = asyncio.run(crowd_run(worker.url, worker.name, 1, {"temperature": 0}, seed=0))
    assert seeded["token_ids"] != greedy["token_ids"]


def test_canary_passed_on_the_invariant_worker(worker):
    body = httpx.get(f"{worker.url}/invariant/ready", timeout=5).json()
    assert body["ready"] and body["canary"]["ok"] is True, body
    parts = httpx.get(f"{worker.url}/invariant/fingerprint", timeout=5).json()["parts"]
    assert parts["invariance"] is True and parts["kernels"]["batch_invariant"] == "invariant-cpu"
    assert parts["kernels"]["attn_split_kv"] is False
    assert set(parts["kernels"]["cpu_kernels_build"]) == {"source_sha256", "compiler", "flags", "gemm_path"}


@pytest.fixture(scope="module")
def side_workers(tiny_model, tmp_path_factory):
    """Started together: one with a GEMM made batch-variant on purpose and the kernel canary blinded
    (so the end-to-end canary must catch the fault by itself), one with --no-invariance."""
    logs = tmp_path_factory.mktemp("side-logs")
    env = hooked_env(INVARIANT_TEST_FAULT="split-k", INVARIANT_TEST_BLIND_KERNEL_CANARY="1")
    faulty = start_worker(tiny_model, logs, name="tiny", env=env)
    stock = start_worker(tiny_model, logs, "--no-invariance", name="tiny")
    try:
        wait_ready(stock)
        yield faulty, stock
    finally:
        faulty.stop()
        stock.stop()


def test_canary_catches_a_batch_variant_op(side_workers):
    faulty, _ = side_workers
    deadline = time.monotonic() + 300
    body = res = None
    while time.monotonic() < deadline:
        assert faulty.proc.poll() is None, f"faulty worker exited:\n{faulty.log.read_text()[-3000:]}"
        try:
            res = httpx.get(f"{faulty.url}/invariant/ready", timeout=2)
            body = res.json()
            if body["canary"]["ok"] is not None:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    assert body is not None and body["canary"]["ok"] is False, body
    assert res.status_code == 503 and body["ready"] is False
    assert body["reasons"][0].startswith("canary failed:") and "first at position" in body["reasons"][0]
    assert body["kernel_canary"]["ok"] is True  # blinded: this verdict is the end-to-end canary's own
    failed = [name for name, c in body["canary"]["cases"].items() if not c["ok"]]
    assert failed and body["reasons"][0].startswith(f"canary failed: {failed[0]} prompt:")
    log = faulty.log.read_text()
    assert f"canary {failed[0]}: alone    token ids" in log and f"canary {failed[0]}: in batch token ids" in log


def test_no_invariance_serves_stock_under_its_own_fingerprint(worker, side_workers, tiny_model):
    _, stock = side_workers
    inv = httpx.get(f"{worker.url}/invariant/fingerprint", timeout=5).json()
    off = httpx.get(f"{stock.url}/invariant/fingerprint", timeout=5).json()
    assert off["parts"]["invariance"] is False and off["parts"]["kernels"]["batch_invariant"] == "off"
    assert off["fingerprint"] != inv["fingerprint"]
    assert off["canary"]["ok"] is None and "skipped" in off["canary"]["message"]
    res = httpx.post(f"{stock.url}/v1/completions", timeout=60,
                     json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert res.json()["system_fingerprint"] == off["fingerprint"]
    cli = invariant_cli("fingerprint", "--model", str(tiny_model), "--no-invariance")
    assert cli.stdout.strip() == off["fingerprint"]
