"""One model's server under the router: `python -m api.router.worker`.

The router writes `{"settings": {...}, "socket": PATH}` as one JSON line on this process's stdin
and keeps the pipe open. The worker serves the single-model app (api/app.py, exactly what
`llamatron serve -m MODEL` serves) on that Unix socket, and reports on stdout, one JSON line each:
`{"event": "ready", "info": {...}}` once it serves, or `{"event": "failed", "error": "..."}` when
the model cannot load. Logs go to stderr, which the router relays. SIGTERM drains in-flight
requests for `grace_period` seconds, as the server does; EOF on stdin means the router is gone,
and the worker exits rather than hold memory (or a GPU) for nobody.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import threading
from typing import IO, TYPE_CHECKING, Any

from ..server import make_uvicorn_server, setup_logging, uvicorn_config
from ..settings import ServerSettings

if TYPE_CHECKING:
    import uvicorn

    from engine.core.async_engine import AsyncEngine

log = logging.getLogger("llamatron.worker")


def _emit(control: IO[str], event: dict[str, Any]) -> None:
    control.write(json.dumps(event) + "\n")
    control.flush()


def ready_info(engine: AsyncEngine, settings: ServerSettings) -> dict[str, Any]:
    """What the router shows of a loaded model: its `meta` as the single-model server gives it,
    and the worker's own facts."""
    from ..app import model_meta

    cfg = engine.config
    return {**model_meta(engine), "pid": os.getpid(), "device": cfg.device,
            "kv_capacity_tokens": engine.kv_capacity_tokens, "parallel": cfg.max_num_seqs,
            "embeddings": settings.embeddings}


async def _report(engine: AsyncEngine, settings: ServerSettings, server: uvicorn.Server, control: IO[str]) -> None:
    while not engine.ready and engine.load_error is None:
        await asyncio.sleep(0.05)
    if engine.load_error is not None:
        _emit(control, {"event": "failed", "error": engine.load_error})
        server.should_exit = True
        return
    while not server.started and not server.should_exit:
        await asyncio.sleep(0.05)
    if server.started:
        _emit(control, {"event": "ready", "info": ready_info(engine, settings)})


def _watch_stdin(loop: asyncio.AbstractEventLoop, server: uvicorn.Server) -> None:
    """The router holds our stdin open; EOF means it exited (or was killed)."""
    sys.stdin.read()
    log.warning("the router is gone: shutting down")
    loop.call_soon_threadsafe(server.handle_exit, signal.SIGTERM, None)


async def serve(settings: ServerSettings, sock: socket.socket, control: IO[str]) -> int:
    from engine.core.async_engine import AsyncEngine

    from ..app import create_app

    engine = AsyncEngine(settings.engine_config())
    engine.start()
    app = create_app(engine, settings)
    server = make_uvicorn_server(uvicorn_config(app, settings), app, grace_s=settings.grace_period)
    report = asyncio.create_task(_report(engine, settings, server, control))
    threading.Thread(target=_watch_stdin, args=(asyncio.get_running_loop(), server), daemon=True).start()
    try:
        await server.serve(sockets=[sock])
    finally:
        await engine.shutdown(grace_s=0)
        app.state.ctx.offload.shutdown()
        report.cancel()
    if engine.thread_alive:  # stuck inside one native call: exiting normally would abort in C++
        logging.shutdown()
        os._exit(1)
    return 1 if engine.load_error else 0


def main() -> int:
    control = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever else prints (the model's libraries, warnings) goes to the log, not the channel
    sys.stdout = sys.stderr
    try:
        request = json.loads(sys.stdin.readline())
        settings = ServerSettings(**request["settings"])
        path = str(request["socket"])
    except (ValueError, KeyError, TypeError) as e:
        _emit(control, {"event": "failed", "error": f"bad worker request: {e}"})
        return 2
    setup_logging(settings.log_format, settings.log_level)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # the router logs each request once
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(2048)
    # uvicorn re-raises the exit signal after its graceful shutdown; with these handlers in place
    # that re-raise is harmless (as in api/server.py run_server)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: None)
    try:
        return asyncio.run(serve(settings, sock, control))
    finally:
        logging.shutdown()


if __name__ == "__main__":
    sys.exit(main())
