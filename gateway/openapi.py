"""The request bodies the gateway reads, as JSON Schema in its OpenAPI document.

The routes read raw bytes (the body is size-checked while it arrives, parsed strictly and keyed
exactly; a pydantic model would coerce what must be refused), so FastAPI cannot derive these. They
describe what the gateway itself checks; other OpenAI fields pass through to vLLM, which checks them
(``additionalProperties`` stays open). Fuzzers read them from /openapi.json
(tests/test_gateway_hostile.py, with schemathesis).
"""

from __future__ import annotations

from typing import Any

_INT64 = {"type": "integer", "minimum": -(1 << 63), "maximum": (1 << 63) - 1}
_NUMBER = {"type": "number"}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_SAMPLING: dict[str, Any] = {
    "temperature": _NUMBER, "top_p": _NUMBER, "top_k": {"type": "integer"}, "min_p": _NUMBER,
    "presence_penalty": _NUMBER, "frequency_penalty": _NUMBER, "repetition_penalty": _NUMBER,
    "seed": _INT64, "n": {"type": "integer", "minimum": 1, "maximum": 128},
    "max_tokens": {"type": "integer", "minimum": 1}, "max_completion_tokens": {"type": "integer", "minimum": 1},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}},
    "ignore_eos": {"type": ["boolean", "null"]}, "return_token_ids": {"type": ["boolean", "null"]},
    "user": {"type": "string"},
}

COMPLETIONS_BODY: dict[str, Any] = {
    "type": "object", "required": ["model", "prompt"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "prompt": {"oneOf": [{"type": "string"}, _TOKEN_IDS],
                   "description": "one prompt: a list of prompts is refused (one request per prompt)"},
        "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20},
        "echo": {"type": ["boolean", "null"]},
        **_SAMPLING,
    },
}
CHAT_BODY: dict[str, Any] = {
    "type": "object", "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role", "content"],
            "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant"]},
                           "content": {"type": "string"}}}},
        "logprobs": {"type": ["boolean", "null"]},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "tools": {"type": "array", "items": {"type": "object"}},
        **_SAMPLING,
    },
}
VERIFY_BODY: dict[str, Any] = {
    "type": "object", "required": ["request"],
    "properties": {"kind": {"type": "string", "enum": ["completions", "chat"]},
                   "request": {"type": "object", "description": "the body of the request to replay"}},
}

_ERROR = {"description": "an OpenAI-format error", "content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "code": {"type": ["string", "null"]}, "param": {"type": ["string", "null"]}}}}}}}}


# The request headers the gateway reads (gateway/auth.py, gateway/keys.py); fuzzers fuzz them too.
HEADERS = [
    {"name": "Authorization", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "Bearer <API key> when the gateway has keys (else ignored)"},
    {"name": "Cache-Control", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "no-cache: generate, neither look up nor store; no-store: look up, store no miss"},
]


def body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads ``schema`` from its raw body."""
    return {"parameters": [dict(h) for h in HEADERS],
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {str(code): _ERROR for code in (400, 401, 404, 409, 413, 429, 502, 503)}}
