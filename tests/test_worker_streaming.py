"""A worker's stream is one chunk per token however far the engine gets ahead of the HTTP task
(invariant.worker.streaming); with vLLM's own collector (the control) the same load merges tokens."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from conftest import hooked_env, start_worker, wait_ready
from invariant.contract.routes import CHAT_COMPLETIONS, COMPLETIONS

PROMPT = "A reader that falls behind"
TOKENS = 160


# --- the collector, without a server ------------------------------------------------------------

def _output(token: int, *, finished: bool = False):
    from vllm.outputs import CompletionOutput, RequestOutput

    completion = CompletionOutput(index=0, text=f"<{token}>", token_ids=[token], cumulative_logprob=None,
                                  logprobs=None, finish_reason="length" if finished else None)
    return RequestOutput(request_id="r", prompt=None, prompt_token_ids=[1], prompt_logprobs=None,
                         outputs=[completion], finished=finished)


def _drain(collector) -> list:
    got = []
    while (out := collector.get_nowait()) is not None:
        got.append(out)
    return got


def _collectors():
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.output_processor import RequestOutputCollector

    from invariant.worker.streaming import collector_class

    return RequestOutputKind, RequestOutputCollector, collector_class()


def test_pending_outputs_stay_one_per_step_and_vllms_collector_merges_them():
    kind, stock, ours = _collectors()
    for cls, expected in ((ours, [[1], [2], [3]]), (stock, [[1, 2, 3]])):
        collector = cls(kind.DELTA, "r")
        for t in (1, 2, 3):
            collector.put(_output(t, finished=t == 3))
        got = _drain(collector)
        assert [list(o.outputs[0].token_ids) for o in got] == expected, cls
        assert got[-1].finished and not collector.ready.is_set()


def test_get_waits_for_the_next_output_in_order():
    kind, _, ours = _collectors()

    async def scenario():
        collector = ours(kind.DELTA, "r")
        reader = asyncio.ensure_future(collector.get())
        await asyncio.sleep(0)
        assert not reader.done()
        collector.put(_output(7))
        collector.put(_output(8))
        first = await reader
        second = await collector.get()
        return [list(first.outputs[0].token_ids), list(second.outputs[0].token_ids)]

    assert asyncio.run(scenario()) == [[7], [8]]


def test_an_error_drops_what_is_pending_and_is_raised_next():
    kind, _, ours = _collectors()
    collector = ours(kind.DELTA, "r")
    collector.put(_output(1))
    collector.put(RuntimeError("engine died"))
    collector.put(_output(2))  # vLLM puts nothing after an error; if it did, the error still comes first
    with pytest.raises(RuntimeError, match="engine died"):
        collector.get_nowait()
    assert [list(o.outputs[0].token_ids) for o in _drain(collector)] == [[2]]


def test_final_and_cumulative_outputs_keep_only_the_newest_as_vllm_does():
    kind, _, ours = _collectors()
    for output_kind in (kind.FINAL_ONLY, kind.CUMULATIVE):
        collector = ours(output_kind, "r")
        collector.put(_output(1))
        collector.put(_output(2, finished=True))
        assert [list(o.outputs[0].token_ids) for o in _drain(collector)] == [[2]]


def test_install_is_idempotent_and_reaches_the_engine():
    import vllm.v1.engine.async_llm as async_llm

    from invariant.worker import streaming

    before = async_llm.RequestOutputCollector
    try:
        streaming.install()
        installed = async_llm.RequestOutputCollector
        streaming.install()
        assert async_llm.RequestOutputCollector is installed and getattr(installed, "__invariant__", False)
    finally:
        async_llm.RequestOutputCollector = before


# --- a real worker whose HTTP task falls behind the engine ----------------------------------------

@pytest.fixture(scope="module")
def slow_readers(tiny_model, tmp_path_factory):
    """Two workers whose engine pauses 20 ms after each output it hands over (several decode steps
    of the tiny model): ours, and the control on vLLM's collector."""
    logs = tmp_path_factory.mktemp("slow-logs")
    workers = {
        "ours": start_worker(tiny_model, logs, name="tiny", env=hooked_env(INVARIANT_TEST_SLOW_CONSUMER="0.02")),
        "vllm": start_worker(tiny_model, logs, name="tiny", env=hooked_env(INVARIANT_TEST_SLOW_CONSUMER="0.02",
                                                                          INVARIANT_TEST_STOCK_STREAM="1")),
    }
    try:
        for w in workers.values():
            wait_ready(w)
        yield workers
    finally:
        for w in workers.values():
            w.stop()


def _stream(url: str, path: str, payload: dict) -> list[dict]:
    with httpx.stream("POST", url + path, json={**payload, "stream": True}, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        return [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]


def _tokens_per_chunk(chunks: list[dict]) -> list[int]:
    return [len(c.get("token_ids") or []) for chunk in chunks for c in chunk["choices"] if c.get("token_ids")]


@pytest.mark.engine
def test_a_completion_stream_is_one_token_per_chunk_when_the_reader_falls_behind(slow_readers):
    payload = dict(model="tiny", prompt=PROMPT, max_tokens=TOKENS, temperature=0, logprobs=1,
                   return_token_ids=True, ignore_eos=True)
    ours = _stream(slow_readers["ours"].url, COMPLETIONS, payload)
    control = _stream(slow_readers["vllm"].url, COMPLETIONS, payload)
    assert _tokens_per_chunk(ours) == [1] * TOKENS
    assert max(_tokens_per_chunk(control)) > 1, "the control did not merge: the test shows nothing"
    assert sum(_tokens_per_chunk(control)) == TOKENS
    # the same generation either way: one stream is the other, cut differently
    full = httpx.post(slow_readers["ours"].url + COMPLETIONS, json=payload, timeout=120).json()["choices"][0]
    for chunks in (ours, control):
        choices = [c for chunk in chunks for c in chunk["choices"]]
        assert [t for c in choices for t in c.get("token_ids") or []] == full["token_ids"]
        assert "".join(c["text"] for c in choices) == full["text"]
        assert [v for c in choices for v in (c.get("logprobs") or {}).get("token_logprobs") or []] == \
            full["logprobs"]["token_logprobs"]
    # each of our chunks carries its token's own logprob entry, so a chunk is a whole step
    assert all(len(c["logprobs"]["tokens"]) == 1 for chunk in ours for c in chunk["choices"] if c.get("token_ids"))


@pytest.mark.engine
def test_a_chat_stream_is_one_token_per_chunk_too(slow_readers):
    payload = dict(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=TOKENS,
                   temperature=0, return_token_ids=True, ignore_eos=True)
    assert _tokens_per_chunk(_stream(slow_readers["ours"].url, CHAT_COMPLETIONS, payload)) == [1] * TOKENS
    assert max(_tokens_per_chunk(_stream(slow_readers["vllm"].url, CHAT_COMPLETIONS, payload))) > 1
