"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the right status.

Every client mistake becomes a 4xx here (llama-server answers several with a 500); anything
unexpected becomes a logged 500 with the same body shape, so clients always get JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("llamatron.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    501: "not_supported_error",
    503: "unavailable_error",
}


class APIError(Exception):
    """An error the API answers with; `extra` keys are merged into the error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        err.update(self.extra)
        return {"error": err}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def context_length_exceeded(prompt_tokens: int, max_tokens: int | None, context: int, param: str) -> APIError:
    asked = prompt_tokens + (max_tokens or 0)
    what = "messages" if param == "messages" else "prompt"
    msg = (f"This model's maximum context length is {context} tokens. However, you requested {asked} tokens "
           f"({prompt_tokens} in the {what}, {max_tokens or 0} in the completion). "
           f"Please reduce the length of the {what} or completion.")
    return APIError(400, msg, param=param, code="context_length_exceeded",
                    extra={"n_prompt_tokens": prompt_tokens, "n_ctx": context})


def overloaded(retry_after_s: int = 1) -> APIError:
    return APIError(503, "The server is overloaded; retry later.", code="overloaded",
                    headers={"Retry-After": str(retry_after_s)})


def loading() -> APIError:
    return APIError(503, "Loading model", code="model_loading", headers={"Retry-After": "1"})


_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "null", "json-or-python", "lax-or-strict"}


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content' (OpenAI's param spelling). Skips the
    union-branch tags pydantic inserts into locations ('str', 'list[int]', 'function-after[...]')."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or part in _TAGS or part.startswith("function-")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or None


def from_validation_error(exc: ValidationError) -> APIError:
    first = exc.errors(include_url=False)[0]
    param = _loc_to_param(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if param:
        msg = f"Invalid value for '{param}': {msg}"
    return invalid(msg, param=param)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        err = APIError(404, f"Not found: {request.method} {request.url.path}", code="not_found")
    elif exc.status_code == 405:
        err = APIError(405, f"Method {request.method} not allowed on {request.url.path}",
                       code="method_not_allowed")
    else:
        err = APIError(exc.status_code, str(exc.detail))
    err.headers.update(headers)
    return err.response()


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ValidationError)
    return from_validation_error(exc).response()


EXCEPTION_HANDLERS = {
    APIError: _api_error,
    HTTPException: _http_error,
    ValidationError: _validation_error,
}


class CatchAllMiddleware:
    """Unexpected exceptions -> a logged 500 with an error body. Handled here rather than by
    Starlette's ServerErrorMiddleware, which re-raises and makes uvicorn drop the connection
    (pooled keep-alive clients would then fail their next request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            # uvicorn cancels what is still running when its shutdown grace ends: answer 503 rather
            # than let it write a bare 500 (a stream already started just ends)
            if not started:
                err = APIError(503, "The server is shutting down.", code="shutting_down", headers={"Retry-After": "5"})
                with contextlib.suppress(BaseException):
                    await err.response()(scope, receive, send)
            raise
        except Exception as exc:  # noqa: BLE001 - the whole point
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            if not started:
                err = APIError(500, f"Internal server error: {type(exc).__name__}", code="internal_error")
                await err.response()(scope, receive, send)
