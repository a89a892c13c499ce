"""API-key check as a pure ASGI middleware (no BaseHTTPMiddleware: it would buffer streams and
hide client disconnects from the routes).

With keys configured every path but /health and the web UI's page and assets (`/`, `/webui/*`:
static files; the API calls they make carry the key) needs `Authorization: Bearer KEY`; llama-server's
`X-Api-Key: KEY` header is accepted too. Keys are compared in constant time, against every
configured key, so timing reveals neither a key nor which one matched.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError
from .webui import is_webui_path

EXEMPT_PATHS = frozenset({"/health", "/v1/health"})


def load_keys(keys: Iterable[str], key_file: str | None) -> list[str]:
    """Keys from flags plus one key per non-empty, non-comment line of `key_file`."""
    out = [k.strip() for k in keys if k and k.strip()]
    if key_file:
        with open(key_file, encoding="utf-8") as f:
            out += [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    return out


def presented_key(headers: dict[bytes, bytes]) -> bytes | None:
    """The key bytes as sent: header values are bytes, and a key typed in UTF-8 arrives as UTF-8
    (decoding them as latin-1 and re-encoding as UTF-8 made every non-ASCII key fail)."""
    auth = headers.get(b"authorization")
    if auth is not None:
        value = auth.strip()
        scheme, _, rest = value.partition(b" ")
        return rest.strip() if scheme.lower() == b"bearer" else value
    x = headers.get(b"x-api-key")
    return x.strip() if x is not None else None


def key_matches(candidate: bytes | None, keys: list[str]) -> bool:
    if candidate is None:
        return False
    given = candidate
    ok = False
    for k in keys:  # no early exit: every key is compared
        ok |= hmac.compare_digest(given, k.encode("utf-8"))
    return ok


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.keys = list(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in EXEMPT_PATHS \
                or is_webui_path(scope["path"]) or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if key_matches(presented_key(headers), self.keys):
            await self.app(scope, receive, send)
            return
        err = APIError(401, "Invalid API key. Send it as 'Authorization: Bearer <key>'.",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await err.response()(scope, receive, send)
