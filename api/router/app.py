"""The router's Starlette app and `serve_router`, the many-model counterpart of api/server.py's
`serve_async`: same middleware (errors in each endpoint's shape, CORS, API keys), same web UI,
same drain on SIGTERM (new requests 503, in-flight ones finish), and then every worker stopped.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
from typing import Any

from starlette.applications import Starlette

from ..errors import EXCEPTION_HANDLERS
from ..middleware import edge_middleware
from ..server import uvicorn_config
from ..settings import ServerSettings, SettingsError
from ..webui import webui_routes
from .catalog import ModelSpec, build_catalog
from .manager import ModelManager
from .metrics import RouterMetrics
from .process import runtime_dir
from .routes import ROUTES, RouterContext

log = logging.getLogger("llamatron.router")


def create_router_app(ctx: RouterContext) -> Starlette:
    s = ctx.settings
    middleware, _ = edge_middleware(s)
    routes = ROUTES + ([] if s.no_webui else webui_routes())
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=EXCEPTION_HANDLERS)
    app.state.router = ctx
    return app


def check_startup(specs: list[ModelSpec], settings: ServerSettings) -> None:
    eager = [s.id for s in specs if s.load_on_startup]
    if settings.models_max and len(eager) > settings.models_max:
        raise SettingsError(f"{len(eager)} models are to load at start-up ({', '.join(eager)}), "
                            f"more than --models-max {settings.models_max}")


def _server(app: Starlette, ctx: RouterContext, settings: ServerSettings) -> Any:
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            ctx.draining = True  # new requests 503; uvicorn lets in-flight ones finish
            super().handle_exit(sig, frame)

    return _Server(uvicorn_config(app, settings))


async def serve_router(settings: ServerSettings, sock: socket.socket | None = None) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded request otherwise
    specs = await asyncio.to_thread(build_catalog, settings)
    check_startup(specs, settings)
    runtime = runtime_dir()
    metrics = RouterMetrics()
    manager = ModelManager(specs, settings, runtime, metrics.on_event)
    ctx = RouterContext(manager, settings, metrics)
    app = create_router_app(ctx)
    server = _server(app, ctx, settings)
    await manager.start()
    names = ", ".join(s.id for s in specs) or "none (pull one with `llamatron pull NAME`, or give --models-dir)"
    print(f"llamatron: serving {len(specs)} models ({names}); at most {settings.models_max or 'any number of'} "
          f"resident; listening on http://{settings.host}:{settings.port}", flush=True)
    try:
        await server.serve(sockets=[sock] if sock is not None else None)
    finally:
        await manager.shutdown()
        ctx.offload.shutdown()
        shutil.rmtree(runtime, ignore_errors=True)
    return 0
