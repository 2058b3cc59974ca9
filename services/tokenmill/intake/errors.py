"""The intake's errors, in the shape each route family answers them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Scope

OPENAI_PREFIXES = ("/v1/chat/", "/v1/completions", "/v1/models")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers or {}


def error_response(request: Request, error: ApiError) -> JSONResponse:
    """OpenAI-shaped errors on the OpenAI routes, RFC 9457 problem details everywhere else."""
    if request.url.path.startswith(OPENAI_PREFIXES):
        kind = "invalid_request_error" if error.status < 500 else "server_error"
        if error.status == 401:
            kind = "authentication_error"
        body: dict[str, Any] = {
            "error": {
                "message": error.message,
                "type": kind,
                "param": error.param,
                "code": error.code,
            }
        }
        return JSONResponse(body, status_code=error.status, headers=error.headers)
    problem = {
        "type": f"https://tokenmill.dev/problems/{error.code}",
        "title": error.code.replace("_", " "),
        "status": error.status,
        "detail": error.message,
    }
    if error.param:
        problem["param"] = error.param
    return JSONResponse(
        problem,
        status_code=error.status,
        headers=error.headers,
        media_type="application/problem+json",
    )


def answering(error: ApiError) -> Callable[[Scope], Response]:
    """How a middleware answers `error` before any route runs, in the route's error shape."""
    return lambda scope: error_response(Request(scope), error)
