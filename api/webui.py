"""The chat page at `/` and its assets under `/webui/` (plain files in api/webui/, no build step).

The page and its assets need no API key and are served while the model loads (the page itself
shows the loading state); the API calls it makes carry the key. Every file is read once, at start,
from the installed package, and served with a strict Content-Security-Policy: scripts only from
this origin, no inline script or handler, so even a renderer bug cannot make model output run.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

PREFIX = "/webui/"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}


def is_webui_path(path: str) -> bool:
    """The page and its assets: open without an API key and while the model loads."""
    return path == "/" or path.startswith(PREFIX)


def _load_assets() -> dict[str, tuple[bytes, str]]:
    root = resources.files(__package__ or "api") / "webui"
    out: dict[str, tuple[bytes, str]] = {}
    for item in root.iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1]
        if item.is_file() and suffix in _TYPES:
            out[item.name] = (item.read_bytes(), _TYPES[suffix])
    return out


def webui_routes() -> list[Route]:
    assets = _load_assets()

    def _respond(name: str) -> Response:
        body, media = assets[name]
        return Response(body, media_type=media, headers=HEADERS)

    async def index(request: Request) -> Response:
        return _respond("index.html")

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in assets:
            from .errors import APIError

            raise APIError(404, f"No web UI file '{name}'", code="not_found", type="invalid_request_error")
        return _respond(name)

    return [Route("/", index, methods=["GET"]), Route(PREFIX + "{name}", asset, methods=["GET"])]
