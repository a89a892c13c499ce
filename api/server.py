"""`run_server`: one model (api/app.py) or the many-model router (api/router/), with uvicorn.

Settings live in api/settings.py (re-exported here). `run_server` starts the AsyncEngine (the model loads on the engine thread while /health answers
503), serves the app with uvicorn, prints one start-up line once the model is ready, and on
SIGTERM/SIGINT stops admitting, gives in-flight requests `grace_period` seconds, aborts the rest,
and returns 0.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

from .settings import (  # noqa: F401  (re-exported: the settings' old home)
    ServerSettings,
    SettingsError,
    coerce_setting,
    default_config_path,
    load_settings,
    validate_settings,
)

if TYPE_CHECKING:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.types import ASGIApp

    from engine.core.async_engine import AsyncEngine

log = logging.getLogger("llamatron.server")
MAX_CONNECTIONS = 4096  # beyond this uvicorn answers 503 instead of running out of file descriptors


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def uvicorn_config(app: ASGIApp, settings: ServerSettings, **extra: Any) -> uvicorn.Config:
    import uvicorn

    from .protocol import timed_protocol

    return uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                          timeout_keep_alive=settings.keep_alive_s, http=timed_protocol(settings.header_timeout_s),
                          limit_concurrency=MAX_CONNECTIONS,
                          # uvicorn must outwait our own drain (grace, then aborts delivered as final
                          # events), or it cancels response tasks mid-stream and cuts connections.
                          timeout_graceful_shutdown=max(0, int(round(settings.grace_period))) + 5, **extra)


def make_uvicorn_server(config: uvicorn.Config, app: Starlette, grace_s: float | None = None) -> uvicorn.Server:
    """A uvicorn Server whose exit signal marks the app draining (new requests get 503) and, when
    `grace_s` is given, drains the engine: in-flight requests get grace_s seconds to finish, the rest
    are aborted so their streams end with a final error event before uvicorn closes connections."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            ctx = app.state.ctx
            if grace_s is not None and not ctx.draining:
                loop = asyncio.get_event_loop()
                loop.call_soon_threadsafe(lambda: loop.create_task(ctx.engine.shutdown(grace_s=grace_s)))
            ctx.draining = True
            super().handle_exit(sig, frame)

    return _Server(config)


async def _announce(engine: AsyncEngine, settings: ServerSettings, server: uvicorn.Server) -> bool:
    """Prints the start-up line once the model is loaded; stops the server if loading failed."""
    while not engine.ready and engine.load_error is None:
        await asyncio.sleep(0.05)
    if engine.load_error is not None:
        log.error("model failed to load: %s", engine.load_error)
        server.should_exit = True
        return False
    while not server.started and not server.should_exit:
        await asyncio.sleep(0.05)
    cfg = engine.config
    print(f"llamatron: model {settings.model_id()} ({engine.model_config.arch}, {cfg.model}) on {cfg.device}; "
          f"context {cfg.max_model_len} tokens; KV cache {engine.kv_capacity_tokens} tokens; "
          f"listening on http://{settings.host}:{settings.port}", flush=True)
    return True


def bind_listener(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything else happens: a busy port must fail in
    milliseconds, not after the model has been read (uvicorn would bind only once serving)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=2048)


async def serve_async(settings: ServerSettings, sock: socket.socket | None = None) -> int:
    from engine.core.async_engine import AsyncEngine

    from .app import create_app

    engine = AsyncEngine(settings.engine_config())
    engine.start()
    app = create_app(engine, settings)
    server = make_uvicorn_server(uvicorn_config(app, settings), app, grace_s=settings.grace_period)
    announce = asyncio.create_task(_announce(engine, settings, server))
    try:
        await server.serve(sockets=[sock] if sock is not None else None)
    finally:
        # uvicorn already waited up to grace_period for in-flight requests; abort what is left
        await engine.shutdown(grace_s=0)
        app.state.ctx.offload.shutdown()
    loaded_ok = announce.done() and not announce.cancelled() and announce.result()
    announce.cancel()
    rc = 0 if loaded_ok or engine.load_error is None else 1
    if engine.thread_alive:  # stuck inside one native call: exiting normally would abort in C++
        log.error("engine thread did not stop within its join timeout; exiting without cleanup")
        logging.shutdown()
        os._exit(rc)
    return rc


def run_server(settings: ServerSettings) -> int:
    setup_logging(settings.log_format, settings.log_level)
    try:
        sock = bind_listener(settings.host, settings.port)
    except OSError as e:
        why = (f"port {settings.port} is already in use" if e.errno == errno.EADDRINUSE
               else f"{e.strerror or e} (port {settings.port})")
        print(f"llamatron serve: cannot listen on {settings.host}:{settings.port}: {why}", file=sys.stderr)
        return 1
    # uvicorn re-raises the exit signal after its graceful shutdown; with these no-op handlers in
    # place that re-raise is harmless and the process exits 0 instead of dying by the signal.
    saved = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if not settings.router_mode:
            return asyncio.run(serve_async(settings, sock))
        from .router.app import serve_router

        return asyncio.run(serve_router(settings, sock))
    except SettingsError as e:  # a bad presets file or models folder, found before anything loads
        print(f"llamatron serve: {e}", file=sys.stderr)
        return 2
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        logging.shutdown()
