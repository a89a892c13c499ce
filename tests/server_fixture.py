"""A real uvicorn server on 127.0.0.1 (free port) serving the real smollm2, for API-level tests.

The model is loaded once per test session (`loaded_model`) and each server gets its own
AsyncEngine (own KV pool, own scheduler) built on it, so a module-scoped server starts in about a
second instead of re-reading the GGUF file.

Use from a test module:
    from server_fixture import api_server  # noqa: F401  (module-scoped fixture)
or call `start_server(**settings)` yourself and `.stop()` it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

_LOADED: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loaded_model(name: str = "smollm2-135m-instruct", device: str = "cpu") -> Any:
    """The LoadedModel for `name`, loaded once per process (skips the test when unavailable)."""
    from conftest import model_file
    from engine.config import EngineConfig
    from engine.loading.loader import load_model

    key = (name, device)
    with _LOCK:
        if key not in _LOADED:
            path = model_file(name)
            _LOADED[key] = load_model(EngineConfig(model=str(path), device=device, max_model_len=2048))
        return _LOADED[key]


@dataclass
class RunningServer:
    base_url: str
    engine: Any
    app: Any
    settings: Any
    server: Any
    thread: threading.Thread

    @property
    def ctx(self) -> Any:
        return self.app.state.ctx

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=kw.pop("timeout", 120), **kw)

    def wait_idle(self, timeout: float = 30.0) -> Any:
        """Waits until the engine has no running or waiting request; returns its stats."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.engine.stats()
            if (st.num_running == 0 and st.num_waiting == 0) or time.monotonic() > deadline:
                return st
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        asyncio.run(self.engine.shutdown(grace_s=0))  # joins the engine thread


def start_server(loaded: Any = None, max_waiting: int = 1024, **overrides: Any) -> RunningServer:
    """Starts uvicorn in a thread with an AsyncEngine on `loaded` (smollm2 by default); `overrides`
    are ServerSettings fields."""
    from api.app import create_app
    from api.server import ServerSettings, make_uvicorn_server, uvicorn_config
    from engine.core.async_engine import AsyncEngine

    loaded = loaded if loaded is not None else loaded_model()
    values: dict[str, Any] = dict(model=str(loaded.path), alias="smollm2", device="cpu", port=free_port(),
                                  ctx_size=2048, parallel=8, max_batched_tokens=512, kv_cache_gib=0.25,
                                  grace_period=2.0)
    values.update(overrides)
    settings = ServerSettings(**values)
    engine = AsyncEngine(settings.engine_config(), loaded, max_waiting=max_waiting)
    engine.start()
    app = create_app(engine, settings)
    server = make_uvicorn_server(uvicorn_config(app, settings, log_level="warning"), app)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    base = f"http://{settings.host}:{settings.port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if engine.load_error:
            raise RuntimeError(engine.load_error)
        try:
            if server.started and httpx.get(base + "/health", timeout=2).status_code == 200:
                return RunningServer(base, engine, app, settings, server, thread)
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    server.should_exit = True
    raise RuntimeError("test server did not become ready in 120 s")


@pytest.fixture(scope="module")
def api_server() -> Any:
    if os.environ.get("LLAMATRON_TEST_SKIP_SERVER"):
        pytest.skip("LLAMATRON_TEST_SKIP_SERVER is set")
    srv = start_server()
    yield srv
    srv.stop()


def metric(text: str, name: str) -> float:
    """The value of an unlabelled Prometheus sample in /metrics text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def settle(srv: RunningServer, timeout: float = 30.0) -> None:
    """Waits until nothing runs, nothing waits and the API holds no run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = srv.engine.stats()
        if st.num_running == 0 and st.num_waiting == 0 and not srv.ctx.active:
            return
        time.sleep(0.05)
