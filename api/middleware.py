"""The middleware every llamatron app wears, outermost first: errors in each endpoint's shape
(Anthropic's on /v1/messages), a JSON 500 for anything unexpected, CORS (before the key check, so
a preflight is answered), and the API-key check. The single-model app and the router share it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from .auth import APIKeyMiddleware, load_keys
from .errors import CatchAllMiddleware
from .messages_errors import AnthropicErrors

if TYPE_CHECKING:
    from .settings import ServerSettings


def edge_middleware(settings: ServerSettings) -> tuple[list[Middleware], bool]:
    """The middleware list, and whether requests need a key."""
    middleware = [Middleware(AnthropicErrors), Middleware(CatchAllMiddleware)]
    if settings.cors_origin:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(settings.cors_origin),
                                     allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["Authorization", "Content-Type", "X-Api-Key",
                                                    "Anthropic-Version", "Anthropic-Beta"],
                                     expose_headers=["Retry-After"], max_age=600))
    keys = load_keys(settings.api_key, settings.api_key_file or None)
    if keys:
        middleware.append(Middleware(APIKeyMiddleware, keys=keys))
    return middleware, bool(keys)
