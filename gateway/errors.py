"""Errors as OpenAI's API writes them: every refusal a client gets from the gateway has this shape."""

from __future__ import annotations

from fastapi.responses import JSONResponse


def openai_error(status: int, message: str, type_: str, code: str | None = None, param: str | None = None,
                 headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)
