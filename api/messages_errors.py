"""Errors in Anthropic's shape on the /v1/messages paths.

Every error the server answers (a handler's APIError, a validation error, the key check, the
loading gate, the catch-all 500) is written once, in OpenAI's shape, by api/errors.py. For paths
under /v1/messages, `AnthropicErrors` rewrites such a response on its way out into
`{"type": "error", "error": {"type", "message"}}` with Anthropic's status codes: an overloaded
or unavailable server is 529 overloaded_error (Retry-After kept), any other 5xx is 500 api_error,
4xx keep their status. Streams report errors in-band with `anthropic_error` (api/messages_stream.py).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError

PREFIX = "/v1/messages"

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

KEY_HINT = "Invalid API key. Send it as 'x-api-key: <key>' (or 'Authorization: Bearer <key>')."


def status_and_type(status: int) -> tuple[int, str]:
    if status == 503:
        status = 529
    elif status >= 500 and status not in TYPES:
        status = 500
    return status, TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def anthropic_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": status_and_type(status)[1], "message": message}}


def anthropic_error(e: APIError) -> dict[str, Any]:
    """An APIError as the `data` of a stream's `error` event."""
    return anthropic_body(e.status, e.message)


def _rewrite(status: int, body: bytes) -> tuple[int, bytes] | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict) or data.get("type") == "error":
        return None
    message = str(err.get("message") or "error")
    if status == 401:
        message = KEY_HINT
    new_status, _ = status_and_type(status)
    return new_status, json.dumps(anthropic_body(status, message), ensure_ascii=False).encode()


class AnthropicErrors:
    """Pure ASGI (streams pass through untouched): buffers only JSON error responses."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def reshaping_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                json_body = headers.get(b"content-type", b"").startswith(b"application/json")
                if message["status"] >= 400 and json_body:
                    start = message  # held until the body is complete
                    return
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                status, body = start["status"], b"".join(chunks)
                new = _rewrite(status, body)
                if new is not None:
                    status, body = new
                headers = [(k, v) for k, v in start.get("headers") or [] if k != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**start, "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            await send(message)

        await self.app(scope, receive, reshaping_send)
