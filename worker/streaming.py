"""One token per streamed chunk, however loaded the worker is.

vLLM's ``RequestOutputCollector`` merges a request's pending delta outputs when the engine gets
ahead of the HTTP task that reads them: under load, one SSE chunk carries several tokens, and which
ones depends on timing. The numbers stay the same, but the stream's bytes do not, and something is
lost: the text of a merged chunk is one string, so where one token's text ends is gone. For most
tokens the token strings in the logprobs recover it; for byte-level tokens that split a UTF-8
character they do not (the detokenizer holds the partial bytes back and sends the character with the
token that completes it). The gateway stores what a stream sent, one piece per token, and replays
it; a merged chunk of such tokens left it a single piece, so a replay no longer matched what the
first client had been sent (tests/test_gateway_live.py).

The collector here queues delta outputs instead of merging them, so every chunk is one engine step
of one request: the stream is a function of the request alone, like its tokens. Other output kinds
(final, cumulative) keep vLLM's behaviour, which only ever keeps the newest output.
"""

from __future__ import annotations

import collections
from typing import Any


def collector_class() -> type:
    """A subclass of the installed vLLM's collector (built on demand: this module is imported
    where vLLM is not, e.g. by the docs' tooling)."""
    from vllm.outputs import RequestOutput
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.output_processor import RequestOutputCollector

    class TokenByTokenCollector(RequestOutputCollector):
        """``put`` appends; ``get`` returns the oldest output. An exception drops what is pending
        and is raised next, as vLLM's own collector does (it replaces the pending output)."""

        def __init__(self, output_kind: RequestOutputKind, request_id: str) -> None:
            super().__init__(output_kind, request_id)
            self.pending: collections.deque[Any] = collections.deque()

        def put(self, output: Any) -> None:
            if not self.aggregate or not isinstance(output, (RequestOutput, Exception)):
                super().put(output)
                return
            if isinstance(output, Exception):
                self.pending.clear()
            self.pending.append(output)
            self.ready.set()

        def _pop(self) -> Any:
            if self.pending:
                output = self.pending.popleft()
                if not self.pending:
                    self.ready.clear()
            else:
                output, self.output = self.output, None
                self.ready.clear()
            if isinstance(output, Exception):
                raise output
            return output

        async def get(self) -> Any:
            while not self.pending and self.output is None:
                await self.ready.wait()
            return self._pop()

        def get_nowait(self) -> Any:
            if not self.pending and self.output is None:
                return None
            return self._pop()

    TokenByTokenCollector.__invariant__ = True
    return TokenByTokenCollector


def install() -> None:
    """Make vLLM's async engine create our collector for every request; idempotent. Called in the
    API server process, the one that holds the collectors."""
    import vllm.v1.engine.async_llm as async_llm

    if not getattr(async_llm.RequestOutputCollector, "__invariant__", False):
        async_llm.RequestOutputCollector = collector_class()
