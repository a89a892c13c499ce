"""AsyncEngine: an LLMEngine served from one background thread, for the asyncio API.

The thread is the only one that touches model, scheduler and KV cache. Callers submit and abort
through a thread-safe inbox (queue.Queue); the thread sends each RequestOutput to its request's
asyncio.Queue with loop.call_soon_threadsafe. Closing or cancelling a generate() iteration (the
client went away) aborts the request; its blocks are freed at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ..config import EngineConfig
from .engine import (
    EngineDeadError,
    EngineOverloadedError,
    EngineStats,
    LLMEngine,
    check_generates,
    validate_embedding,
    validate_request,
)
from .outputs import RequestOutput
from .pooling import PoolingParams
from .sampling import SamplingParams

if TYPE_CHECKING:
    from ..loading.loader import LoadedModel

log = logging.getLogger("llamatron.engine")


class AsyncEngine:
    """Serves an LLMEngine from one background thread (the only one touching model, scheduler, cache).

    Callers submit and abort through a thread-safe inbox; the thread sends each RequestOutput to its
    request's asyncio.Queue with loop.call_soon_threadsafe. A failure in one request ends that
    request with finish_reason "error"; the loop goes on."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None, max_waiting: int = 1024) -> None:
        self.config, self._loaded, self.max_waiting = config, loaded, max_waiting
        self.ready, self.load_error = False, None
        self.tokenizer = loaded.tokenizer if loaded is not None else None
        self.chat_template = loaded.chat_template if loaded is not None else None
        self.model_config = loaded.config if loaded is not None else None
        self.kv_capacity_tokens = 0
        self._engine: LLMEngine | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._accepting, self._dead = True, False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llamatron-engine", daemon=True)
        self._thread.start()

    # ---- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            eng = self._engine = LLMEngine(self.config, self._loaded)
            eng.warm_up_request_paths()
        except ValueError as e:  # a model we cannot read or run: the message names the file and why
            self.load_error, self._dead = str(e), True
            return
        except Exception as e:  # noqa: BLE001 - reported through /health and load_error
            log.exception("model load failed")
            self.load_error, self._dead = f"{type(e).__name__}: {e}", True
            return
        self.tokenizer, self.chat_template, self.model_config = eng.tokenizer, eng.chat_template, eng.model_config
        self.kv_capacity_tokens, self.ready = eng.kv_capacity_tokens, True
        try:
            while self._drain(block=not eng.has_unfinished()):
                if eng.has_unfinished():
                    for out in eng.step():
                        self._send(out.request_id, out)
        except Exception as e:  # noqa: BLE001 - a bug in the loop itself: fail everyone, loudly
            log.exception("engine loop crashed")
            self.load_error = f"engine loop crashed: {e}"
        finally:
            self._dead = True
            with self._lock:
                ids = list(self._streams)
            for rid in ids:
                self._send(rid, EngineDeadError("the engine stopped"))

    def _drain(self, block: bool) -> bool:
        """Applies queued submissions and aborts; returns False when asked to stop."""
        eng = self._engine
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind = item[0]
            if kind == "stop":
                return False
            if kind in ("add", "embed"):  # a generation (SamplingParams) or an embedding (PoolingParams)
                _, rid, ids, params, group = item
                add = eng.add_request if kind == "add" else eng.add_embedding_request
                try:
                    add(rid, ids, params, group)
                except Exception as e:  # noqa: BLE001 - goes back to the caller of generate()/submit_embedding()
                    self._send(rid, e)
            elif kind == "abort":
                eng.abort_request(item[1])
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _send(self, rid: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            target = self._streams.get(rid)
        if target is None:
            return
        loop, q = target
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            self._inbox.put(("abort", rid))

    # ---- the API side ------------------------------------------------------------------------
    def _check_admission(self) -> None:
        if self._dead or not self._accepting:
            raise EngineDeadError(self.load_error or "the engine is shutting down")
        if not self.ready:
            raise EngineOverloadedError("the model is still loading")
        with self._lock:
            if len(self._streams) >= self.max_waiting + self.config.max_num_seqs:
                raise EngineOverloadedError("too many requests are waiting")

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
               group: str | None = None) -> RequestStream:
        """Validates and queues one request now: ContextLengthError, EngineOverloadedError,
        EngineDeadError and ValueError are raised here, before any output. `group` ties the n
        choices of one client request together for fair scheduling. Must be called on the event
        loop that will read the returned stream."""
        self._check_admission()
        check_generates(self.model_config)
        validate_request(prompt_token_ids, params, self.config.max_model_len, self.model_config.vocab_size)
        return self._enqueue("add", prompt_token_ids, params, request_id, group)

    def submit_embedding(self, prompt_token_ids: list[int], pooling: PoolingParams, request_id: str | None = None,
                         group: str | None = None) -> RequestStream:
        """Queues one prefill-only embedding request (same errors as submit(), raised here); its
        stream yields one finished RequestOutput whose `embedding` holds the vectors."""
        self._check_admission()
        validate_embedding(prompt_token_ids, self.config.max_model_len, self.model_config.vocab_size)
        return self._enqueue("embed", prompt_token_ids, pooling, request_id, group)

    @property
    def default_pooling(self) -> str:
        """Embeddings' pooling: --pooling, else the model's (GGUF pooling_type, else mean)."""
        return self.config.pooling or (self.model_config.pooling if self.model_config is not None else "mean")

    def _enqueue(self, kind: str, prompt_token_ids: list[int], params: SamplingParams | PoolingParams,
                 request_id: str | None, group: str | None) -> RequestStream:
        rid = request_id or f"req-{uuid.uuid4().hex}"
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if rid in self._streams:
                raise ValueError(f"duplicate request id {rid!r}")
            self._streams[rid] = (asyncio.get_running_loop(), q)
        self._inbox.put((kind, rid, list(prompt_token_ids), params, group))
        return RequestStream(self, rid, q)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None, group: str | None = None) -> AsyncIterator[RequestOutput]:
        """submit() and iterate: the outputs of one request as they come."""
        stream = self.submit(prompt_token_ids, params, request_id, group)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def release(self, rid: str, finished: bool) -> None:
        """A stream is done with: forget it, and abort the request unless it finished."""
        with self._lock:
            self._streams.pop(rid, None)
        if not finished:  # cancelled or closed early: the client is gone
            self._inbox.put(("abort", rid))

    @property
    def thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def stats(self) -> EngineStats:
        eng = self._engine
        return eng.stats() if eng is not None and self.ready else EngineStats()

    async def shutdown(self, grace_s: float = 0) -> None:
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self._streams:
            await asyncio.sleep(0.02)
        with self._lock:
            ids = list(self._streams)
        for rid in ids:
            self.abort(rid)
        if ids and self._engine is not None:
            self._engine.interrupt()  # a long prefill step ends at its next layer, not in seconds
        deadline = time.monotonic() + 2.0  # let the aborts reach their streams as "abort" outputs
        while time.monotonic() < deadline and self._streams and not self._dead:
            await asyncio.sleep(0.02)
        self._inbox.put(("stop",))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)


class RequestStream:
    """The outputs of one submitted request; close() (or leaving it unfinished) aborts it."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue) -> None:
        self.engine, self.request_id, self._q = engine, request_id, queue
        self.finished = self._closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self._closed:
            raise StopAsyncIteration
        item = await self._q.get()
        if isinstance(item, BaseException):
            self.finished = True
            self.close()
            raise item
        self.finished = item.finished
        if self.finished:
            self.close()
        return item

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine.release(self.request_id, self.finished)
