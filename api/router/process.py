"""ModelProcess: the router's handle on one worker (api/router/worker.py): start it, learn when it
serves or why it could not, forward to it, stop it, and read its memory.

The worker runs in its own session (a Ctrl-C in the router's terminal reaches only the router,
which then stops its workers in order) and listens on a Unix socket inside the router's private
0700 runtime folder, so nothing but the router reaches it; its stderr is relayed to the router's
log line by line, and the last lines are kept as the reason when it fails.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from ..settings import ServerSettings

log = logging.getLogger("llamatron.router")
TAIL_LINES = 30


class LoadFailed(Exception):
    """The worker reported that its model cannot load, or exited before serving."""


class ModelProcess:
    def __init__(self, model_id: str, settings: ServerSettings, socket_path: Path) -> None:
        self.model_id, self.settings, self.socket_path = model_id, settings, socket_path
        self.proc: asyncio.subprocess.Process | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._tasks: list[asyncio.Task] = []
        self.client: httpx.AsyncClient | None = None

    # ---- start ---------------------------------------------------------------------------------
    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._ready = asyncio.get_running_loop().create_future()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "api.router.worker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
            limit=1 << 20)
        request = {"settings": dataclasses.asdict(self.settings), "socket": str(self.socket_path)}
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        await self.proc.stdin.drain()  # the pipe stays open: its EOF tells the worker we are gone
        self._tasks = [asyncio.create_task(self._read_events()), asyncio.create_task(self._relay_log())]
        transport = httpx.AsyncHTTPTransport(uds=str(self.socket_path), retries=0)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://model",
                                        timeout=httpx.Timeout(5.0, read=None, write=60.0, pool=None),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    async def wait_ready(self, timeout: float) -> dict[str, Any]:
        """The worker's ready info; LoadFailed with the reason otherwise (also past `timeout`)."""
        assert self._ready is not None
        try:
            return await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            raise LoadFailed(f"the model did not finish loading within {timeout:g} s") from None

    async def _read_events(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None and self._ready is not None
        async for raw in self.proc.stdout:
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            if self._ready.done():
                continue
            if ev.get("event") == "ready":
                self._ready.set_result(dict(ev.get("info") or {}))
            elif ev.get("event") == "failed":
                self._ready.set_exception(LoadFailed(str(ev.get("error") or "the model failed to load")))
        rc = await self.proc.wait()
        if not self._ready.done():
            self._ready.set_exception(LoadFailed(self.exit_reason(rc)))

    async def _relay_log(self) -> None:
        """The worker's log lines into the router's stderr, marked with the model: `[id] line`, or
        with a "model" key when logs are JSON lines."""
        assert self.proc is not None and self.proc.stderr is not None
        json_logs = self.settings.log_format == "json"
        async for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self.tail.append(line)
            if json_logs:
                try:
                    line = json.dumps({**json.loads(line), "model": self.model_id})
                except (ValueError, TypeError):
                    line = json.dumps({"model": self.model_id, "msg": line})
            else:
                line = f"[{self.model_id}] {line}"
            sys.stderr.write(line + "\n")

    def exit_reason(self, rc: int | None) -> str:
        how = f"was killed by signal {-rc}" if rc is not None and rc < 0 else f"exited with code {rc}"
        last = next((ln for ln in reversed(self.tail) if ln.strip()), "")
        return f"the model's process {how}" + (f": {last[-500:]}" if last else "")

    # ---- state ---------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def wait_exit(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    def rss_bytes(self) -> int:
        """Resident memory of the worker (0 once it is gone)."""
        if not self.alive:
            return 0
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    # ---- stop ----------------------------------------------------------------------------------
    async def stop(self, grace_s: float) -> int | None:
        """SIGTERM (the worker drains in-flight requests for its grace period), SIGKILL after
        `grace_s` plus a margin; returns the exit code."""
        if self.client is not None:
            await self.client.aclose()
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace_s + 10.0)
            except TimeoutError:
                log.warning("[%s] did not stop within %.0f s: killing it", self.model_id, grace_s + 10.0)
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(t, 2.0)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        return self.proc.returncode


def runtime_dir() -> Path:
    """A private folder for the workers' sockets (0700: no other user can connect to a worker)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or None
    return Path(tempfile.mkdtemp(prefix="llamatron-router-", dir=base))
