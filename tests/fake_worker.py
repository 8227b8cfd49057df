"""A programmable stand-in worker for the gateway's hostile tests (issue 14), in a thread of the test.

It speaks the worker's contract (``/invariant/ready``, ``/invariant/fingerprint``, the OpenAI
routes), answers each prompt with tokens derived from its bytes, and misbehaves on request: another
finish reason or none, another fingerprint (all at once, or only on the answer, or switched while a
call is in flight), a delay, a 500. What a real vLLM worker cannot be made to do on cue; the
gateway's ordinary behaviour is tested against real workers elsewhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from conftest import free_port
from invariant.contract import routes


@dataclass
class Behaviour:
    fingerprint: str = "inv-fake-a"
    finish_reason: Any = "length"  # "abort", None (missing) ...
    answer_fingerprint: str | None = None  # stamp answers with this instead of ``fingerprint``
    switch_to: str | None = None  # ``fingerprint`` becomes this while an answer is being made
    token_ids: Any = None  # answer with these token_ids instead of the true ones (a broken answer)
    delay: float = 0.0
    status: int = 200
    ready: bool = True
    calls: int = 0
    bodies: list = field(default_factory=list)


def tokens_for(prompt: Any, n: int) -> list[int]:
    digest = hashlib.sha256(repr(prompt).encode()).digest()
    return [5 + digest[i % len(digest)] for i in range(n)]


class FakeWorker:
    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = self._app()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def _app(self) -> FastAPI:
        app = FastAPI()
        b = lambda: self.behaviour  # noqa: E731 - the current behaviour, replaced by tests

        @app.get(routes.READY)
        async def ready():
            return JSONResponse({routes.F_READY: b().ready, routes.F_REASONS: [] if b().ready else ["down"]},
                                status_code=200 if b().ready else 503)

        @app.get(routes.FINGERPRINT)
        async def fingerprint():
            return {routes.F_FINGERPRINT: b().fingerprint, routes.F_SAMPLING_DEFAULTS: {}}

        async def answer(kind: str, request: Request):
            body = await request.json()
            beh = b()
            beh.calls += 1
            beh.bodies.append(body)
            stamped = beh.answer_fingerprint or beh.fingerprint
            if beh.switch_to:
                beh.fingerprint = beh.switch_to  # a health check now sees the new numerics
            if beh.delay:
                await asyncio.sleep(beh.delay)
            if beh.status != 200:
                return JSONResponse({"error": {"message": "boom"}}, status_code=beh.status)
            n = int(body.get("max_tokens") or 8)
            ids = tokens_for(body.get("prompt", body.get("messages")), n)
            text = "".join(f" t{t}" for t in ids)
            choice: dict[str, Any] = {"index": 0, "token_ids": ids if beh.token_ids is None else beh.token_ids,
                                      "stop_reason": None}
            if beh.finish_reason is not None:
                choice["finish_reason"] = beh.finish_reason
            if kind == "completions":
                choice.update(text=text, logprobs={"tokens": [f" t{t}" for t in ids],
                                                   "token_logprobs": [-0.5] * n, "top_logprobs": None,
                                                   "text_offset": list(range(n))})
            else:
                choice.update(message={"role": "assistant", "content": text},
                              logprobs={"content": [{"token": f" t{t}", "logprob": -0.5, "top_logprobs": []}
                                                    for t in ids]})
            usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
            if body.get("stream"):
                return StreamingResponse(sse(kind, body, choice, ids, stamped, usage), media_type="text/event-stream")
            return {"id": "x", "object": "text_completion", "created": int(time.time()), "model": body.get("model"),
                    "choices": [choice], "system_fingerprint": stamped, "usage": usage}

        def sse(kind: str, body: dict, choice: dict, ids: list[int], stamped: str, usage: dict):
            """The answer as vLLM streams it: one chunk per token, the finish reason on the last one,
            usage when asked for, then [DONE]."""
            def event(choices: list, **extra) -> bytes:
                obj = "text_completion" if kind == "completions" else "chat.completion.chunk"
                data = {"id": "x", "object": obj, "created": int(time.time()), "model": body.get("model"),
                        "choices": choices, "system_fingerprint": stamped, **extra}
                return f"data: {json.dumps(data)}\n\n".encode()

            sent_ids = choice["token_ids"]
            for i, t in enumerate(ids):
                last = i == len(ids) - 1
                c: dict[str, Any] = {"index": 0, "token_ids": sent_ids[i:i + 1] if isinstance(sent_ids, list) else sent_ids,
                                     "finish_reason": choice.get("finish_reason") if last else None,
                                     "stop_reason": None}
                if kind == "completions":
                    c.update(text=f" t{t}", logprobs={"tokens": [f" t{t}"], "token_logprobs": [-0.5],
                                                      "top_logprobs": None, "text_offset": [i]})
                else:
                    c.update(delta={"content": f" t{t}", **({"role": "assistant"} if i == 0 else {})},
                             logprobs={"content": [{"token": f" t{t}", "logprob": -0.5, "top_logprobs": []}]})
                yield event([c])
            if (body.get("stream_options") or {}).get("include_usage"):
                yield event([], usage=usage)
            yield b"data: [DONE]\n\n"

        @app.post(routes.COMPLETIONS)
        async def completions(request: Request):
            return await answer("completions", request)

        @app.post(routes.CHAT_COMPLETIONS)
        async def chat(request: Request):
            return await answer("chat", request)

        return app

    def start(self) -> "FakeWorker":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake worker did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
