"""ModelManager: which models are resident, loading them on demand and unloading them.

Why a process per model (as llama-server's router) rather than one engine thread each in the
router's process:
- memory really returns: a worker's exit gives back everything it held (weights, KV pool, CUDA
  context, allocator caches, glibc arenas), which an in-process unload cannot promise;
- a model that crashes, runs out of memory or is killed by the OOM killer takes only itself down;
- each model has its own GIL and CPU kernel thread pool, so two busy models never share them.
The price is one local hop per request (a Unix socket) and a process start per load.

Sharing the machine: at most `models_max` workers exist (loading or loaded); loads run one at a
time, so each worker measures the memory the others left; each worker's share of the CUDA memory
and of the CPU cores is `1 / min(models_max, number of models)` unless its preset says otherwise.

Lifecycle of a model: unloaded -> loading -> loaded -> unloading -> unloaded, or failed. A request
leases a loaded model (`acquire`) and returns the lease when its response has been sent; a model
with a lease out, or with requests waiting for it, is never unloaded to make room: the least
recently used idle one is, and a request that finds no room waits (bounded by `models_wait_s`).
A load that fails leaves the model failed with the reason; its requests get that error until
POST /models/load tries again or the file changes. A worker that dies after loading is failed too,
and the next request loads it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import APIError
from ..settings import ServerSettings
from .catalog import ModelSpec, worker_settings
from .process import LoadFailed, ModelProcess

log = logging.getLogger("llamatron.router")


class Status(str, enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


RESIDENT = (Status.LOADING, Status.LOADED, Status.UNLOADING)


@dataclass
class ManagedModel:
    spec: ModelSpec
    index: int
    status: Status = Status.UNLOADED
    process: ModelProcess | None = None
    in_flight: int = 0
    waiting: int = 0
    last_used: float = 0.0
    error: str = ""
    load_failed: bool = False  # the last load failed (requests do not retry it): see `file_stamp`
    file_stamp: tuple[float, int] = (0.0, 0)
    info: dict[str, Any] = field(default_factory=dict)  # the worker's ready info
    load_seconds: float = 0.0
    cancel_load: bool = False

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def idle(self) -> bool:
        return self.status is Status.LOADED and self.in_flight == 0 and self.waiting == 0


def _stamp(path: Path) -> tuple[float, int]:
    try:
        st = path.stat()
        return st.st_mtime, st.st_size
    except OSError:
        return 0.0, 0


class Lease:
    """One request's hold on a loaded model; `release()` once its response is done."""

    def __init__(self, manager: ModelManager, model: ManagedModel, touch: bool) -> None:
        self.manager, self.model, self.touch = manager, model, touch
        self._released = False

    @property
    def process(self) -> ModelProcess:
        assert self.model.process is not None
        return self.model.process

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.manager._release(self)


class ModelManager:
    def __init__(self, specs: list[ModelSpec], settings: ServerSettings, runtime: Path,
                 on_event: Callable[[str, str], None] | None = None) -> None:
        self.settings, self.runtime = settings, runtime
        self.models = {s.id: ManagedModel(s, i) for i, s in enumerate(specs)}
        for m in self.models.values():
            if m.spec.error:  # its header could not even be read: failed before any attempt
                m.status, m.error, m.load_failed, m.file_stamp = (Status.FAILED, m.spec.error, True,
                                                                  _stamp(m.spec.path))
        self._names: dict[str, str] = {}
        owners: dict[str, set[str]] = {}
        for s in specs:
            for n in s.names[len(s.aliases) + 1:]:  # file names: only where they name one model
                owners.setdefault(n, set()).add(s.id)
        self._names |= {n: next(iter(ids)) for n, ids in owners.items() if len(ids) == 1}
        for s in specs:  # ids and aliases (unique: the catalogue checks) always win
            self._names |= dict.fromkeys([s.id, *s.aliases], s.id)
        n = len(specs)
        self.slots = min(settings.models_max or n, n) or 1
        self._changed = asyncio.Event()
        self._load_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._on_event = on_event or (lambda model, event: None)
        self.closing = False

    # ---- lookups -------------------------------------------------------------------------------
    def lookup(self, name: str) -> ManagedModel | None:
        mid = self._names.get(name)
        return self.models[mid] if mid is not None else None

    def resident(self) -> list[ManagedModel]:
        return [m for m in self.models.values() if m.status in RESIDENT]

    # ---- requests ------------------------------------------------------------------------------
    async def acquire(self, m: ManagedModel, *, autoload: bool, touch: bool = True) -> Lease:
        """A lease on `m` once it serves: loads it (making room) when allowed, waits while it loads."""
        deadline = time.monotonic() + self.settings.models_wait_s
        m.waiting += 1
        try:
            while True:
                changed = self._changed  # taken before looking: a change after this wakes us
                if self.closing:
                    raise APIError(503, "The server is shutting down.", code="shutting_down",
                                   headers={"Retry-After": "5"})
                if m.status is Status.LOADED:
                    m.in_flight += 1
                    if touch:
                        m.last_used = time.monotonic()
                    return Lease(self, m, touch)
                if m.status is Status.FAILED and m.load_failed and _stamp(m.spec.path) == m.file_stamp:
                    raise load_failed_error(m)
                if m.status in (Status.UNLOADED, Status.FAILED):
                    if not autoload:
                        raise APIError(400, f"The model '{m.id}' is not loaded; load it with POST /models/load.",
                                       param="model", code="model_not_loaded")
                    if self._begin_load(m):
                        continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise wait_timeout_error(m, self.settings.models_wait_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), left)
        finally:
            m.waiting -= 1

    def _release(self, lease: Lease) -> None:
        m = lease.model
        m.in_flight -= 1
        if lease.touch:
            m.last_used = time.monotonic()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _until(self, done: Callable[[], bool], deadline: float | None = None) -> bool:
        """Waits until `done()` holds, looking again at every change, or until `deadline`."""
        while not done():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            changed = self._changed  # taken right after looking: a change from here on wakes us
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)
        return True

    # ---- loading -------------------------------------------------------------------------------
    def _has_room(self) -> bool:
        return not self.settings.models_max or len(self.resident()) < self.settings.models_max

    def _begin_load(self, m: ManagedModel) -> bool:
        """Starts loading `m` if there is room (asking the least recently used idle model to make
        some first); False when the caller has to wait."""
        if not self._has_room():
            idle = [x for x in self.models.values() if x.idle]
            if idle:
                self.begin_unload(min(idle, key=lambda x: x.last_used), "lru")
            return False
        m.status, m.error, m.cancel_load = Status.LOADING, "", False
        self._notify()
        self._spawn(self._load(m))
        return True

    async def _load(self, m: ManagedModel) -> None:
        async with self._load_lock:  # one at a time: each worker sizes its KV pool from what is free
            if m.cancel_load or self.closing:
                m.status = Status.UNLOADED
                self._notify()
                return
            t0 = time.monotonic()
            settings = worker_settings(self.settings, m.spec, self.slots)
            proc = m.process = ModelProcess(m.id, settings, self.runtime / f"model-{m.index}.sock")
            log.info("loading %s from %s", m.id, m.spec.path)
            try:
                await proc.start()
                m.info = await proc.wait_ready(self.settings.models_load_timeout_s)
            except (LoadFailed, OSError) as e:
                await proc.stop(0)
                m.process, m.info = None, {}
                if m.cancel_load:
                    m.status = Status.UNLOADED
                else:
                    m.status, m.error, m.load_failed = Status.FAILED, str(e), True
                    m.file_stamp = _stamp(m.spec.path)
                    log.error("model %s failed to load: %s", m.id, e)
                    self._on_event(m.id, "load_failed")
                self._notify()
                return
            m.status, m.load_failed = Status.LOADED, False
            m.load_seconds, m.last_used = time.monotonic() - t0, time.monotonic()
            log.info("model %s loaded in %.1f s (pid %s)", m.id, m.load_seconds, proc.pid)
            self._on_event(m.id, "loaded")
            self._notify()
        self._spawn(self._watch(m, proc))

    async def _watch(self, m: ManagedModel, proc: ModelProcess) -> None:
        """A worker that exits while it should serve: the model is failed, reloadable."""
        rc = await proc.wait_exit()
        if m.process is proc and m.status is Status.LOADED:
            m.status, m.error, m.load_failed = Status.FAILED, proc.exit_reason(rc), False
            log.error("model %s stopped unexpectedly: %s", m.id, m.error)
            await proc.stop(0)
            m.process = None
            self._on_event(m.id, "crashed")
            self._notify()

    async def load(self, m: ManagedModel) -> None:
        """POST /models/load: loads `m` (a failed one is tried again) and waits for the outcome."""
        if m.status is Status.FAILED:
            m.load_failed = False
        lease = await self.acquire(m, autoload=True, touch=True)
        lease.release()

    # ---- unloading -----------------------------------------------------------------------------
    def begin_unload(self, m: ManagedModel, reason: str) -> asyncio.Task | None:
        """Marks `m` unloading at once (no new request leases it) and stops its worker once its
        in-flight requests are done, waiting at most the grace period for them (an eviction only
        ever picks a model with none). Returns the task that finishes the unload."""
        if m.status is Status.LOADING:
            m.cancel_load = True
            if m.process is not None and m.process.proc is not None and m.process.alive:
                m.process.proc.kill()
            return None
        if m.status is not Status.LOADED:
            return None
        m.status = Status.UNLOADING
        self._notify()
        return self._spawn(self._finish_unload(m, reason))

    async def _finish_unload(self, m: ManagedModel, reason: str) -> None:
        await self._until(lambda: m.in_flight == 0, time.monotonic() + self.settings.grace_period)
        proc, m.process = m.process, None
        if proc is not None:
            await proc.stop(self.settings.grace_period)
        m.status, m.info = Status.UNLOADED, {}
        log.info("model %s unloaded (%s)", m.id, reason)
        self._on_event(m.id, f"unloaded_{reason}")
        self._notify()

    async def unload(self, m: ManagedModel, reason: str = "admin") -> None:
        """POST /models/unload: returns once the worker is gone."""
        task = self.begin_unload(m, reason)
        if task is not None:
            await asyncio.shield(task)
        await self._until(lambda: m.status not in (Status.LOADING, Status.UNLOADING))  # a cancelled load too

    async def _sleep_idle(self) -> None:
        idle_s = self.settings.sleep_idle_seconds
        while True:
            await asyncio.sleep(min(1.0, idle_s / 4))
            now = time.monotonic()
            for m in list(self.models.values()):
                if m.idle and now - m.last_used >= idle_s:
                    self.begin_unload(m, "idle")

    # ---- start and stop ------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> asyncio.Task:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def start(self) -> None:
        """Loads the models marked load_on_startup (--model, presets)."""
        if self.settings.sleep_idle_seconds > 0:
            self._spawn(self._sleep_idle())
        for m in self.models.values():
            if m.spec.load_on_startup:
                self._begin_load(m)

    async def shutdown(self) -> None:
        self.closing = True
        self._notify()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*[self._stop(m) for m in self.models.values()], return_exceptions=True)

    async def _stop(self, m: ManagedModel) -> None:
        proc, m.process = m.process, None
        if proc is not None:
            await proc.stop(self.settings.grace_period)
        m.status = Status.UNLOADED


def load_failed_error(m: ManagedModel) -> APIError:
    return APIError(503, f"The model '{m.id}' failed to load: {m.error}", param="model", code="model_load_failed")


def wait_timeout_error(m: ManagedModel, waited: float) -> APIError:
    what = "to load" if m.status is Status.LOADING else "for room to load (every resident model is busy)"
    return APIError(503, f"The model '{m.id}' is not ready: waited {waited:g} s {what}.", param="model",
                    code="model_loading", headers={"Retry-After": "5"})
