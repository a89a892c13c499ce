"""The plumbing every generating endpoint shares: one HTTP request -> n engine requests.

`Run` submits the engine requests before any response byte is sent (so a context-length error or
an overloaded engine becomes a proper 4xx/503, not a broken stream), then merges their outputs in
arrival order. Closing a Run aborts whatever is unfinished:
that is how a client that goes away frees its KV blocks. `SSEResponse` and `until_disconnect`
watch the connection so that happens promptly, streaming or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import string
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from .errors import APIError, context_length_exceeded, invalid, overloaded

if TYPE_CHECKING:
    from engine.core.async_engine import RequestStream
    from engine.core.outputs import RequestOutput
    from engine.core.sampling import SamplingParams

    from .context import AppContext

log = logging.getLogger("llamatron.api")


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


def engine_error(exc: BaseException, param: str) -> APIError:
    """Maps what engine.generate raises to an HTTP error (client mistakes are 4xx)."""
    from engine.core.engine import ContextLengthError, EngineDeadError, EngineOverloadedError

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return context_length_exceeded(exc.prompt_tokens, exc.max_tokens, exc.context_length, param)
    if isinstance(exc, EngineOverloadedError):
        return overloaded()
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"The engine is not running: {exc}", code="engine_unavailable",
                        headers={"Retry-After": "5"})
    if isinstance(exc, ValueError):
        return invalid(str(exc), param=param)
    log.error("engine request failed", exc_info=exc)
    return APIError(500, f"Generation failed: {type(exc).__name__}", code="internal_error")


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    index: int  # choice index in the response


@dataclass
class ChoiceState:
    job: Job
    request_id: str
    tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    final: RequestOutput | None = None  # the last RequestOutput


@dataclass
class Run:
    ctx: AppContext
    jobs: list[Job]
    param: str = "messages"  # what a context-length error names
    arrival: float = field(default_factory=time.monotonic)
    base_id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])

    def __post_init__(self) -> None:
        self.states = [ChoiceState(j, f"{self.base_id}-{k}") for k, j in enumerate(self.jobs)]
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    async def _pump(self, k: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                self._queue.put_nowait((k, out))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._queue.put_nowait((k, e))
        finally:
            stream.close()

    async def start(self) -> None:
        """Submits every job. What makes a request unservable (too long for the context, engine
        overloaded or stopped) is raised here, before any response byte, as a 4xx/503; outputs
        then flow in the background (choices beyond the free slots may start much later)."""
        self.ctx.active[self.base_id] = self
        streams: list[RequestStream] = []
        try:
            for st in self.states:
                streams.append(self.ctx.engine.submit(st.job.prompt_ids, st.job.params, st.request_id, self.base_id))
        except BaseException as e:
            for s in streams:
                s.close()
            await self.close()
            raise engine_error(e, self.param) from None
        self._tasks = [asyncio.create_task(self._pump(k, s)) for k, s in enumerate(streams)]

    def _account(self, k: int, out: RequestOutput) -> None:
        st, now = self.states[k], time.monotonic()
        n = len(out.token_ids)
        if n:
            if st.first_token_at is None:
                st.first_token_at = now
                if n > 1:
                    self.ctx.metrics.observe_itl(0.0, n - 1)
            else:
                self.ctx.metrics.observe_itl(now - (st.last_token_at or now), n)
            st.last_token_at = now
            st.tokens += n
        if out.finished:
            st.finished, st.finish_reason, st.final = True, out.finish_reason, out
            self._observe(st)

    def _observe(self, st: ChoiceState) -> None:
        ttft = None if st.first_token_at is None else st.first_token_at - self.arrival
        self.ctx.metrics.observe_request(len(st.job.prompt_ids), st.tokens, st.finish_reason or "abort",
                                         ttft, time.monotonic() - self.arrival)

    async def outputs(self) -> AsyncIterator[tuple[Job, Any]]:
        """(job, RequestOutput) pairs in arrival order until every choice has finished."""
        pending = sum(not s.finished for s in self.states)
        while pending:
            k, item = await self._queue.get()
            if isinstance(item, BaseException):
                raise engine_error(item, self.param)
            self._account(k, item)
            if item.finished:
                pending -= 1
            yield self.states[k].job, item

    async def close(self) -> None:
        """Aborts unfinished engine requests; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self.ctx.active.pop(self.base_id, None)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        for st in self.states:
            if not st.finished:
                self.ctx.engine.abort(st.request_id)  # belt and braces: generate() aborts on cancel too
                st.finish_reason = "abort"
                st.finished = True
                self._observe(st)

    @property
    def prompt_tokens(self) -> int:
        return len(self.jobs[0].prompt_ids) if self.jobs else 0

    def completion_tokens(self) -> int:
        return sum(s.tokens for s in self.states)

    def cached_tokens(self) -> int:
        st = self.states[0] if self.states else None
        return st.final.metrics.cached_prompt_tokens if st is not None and st.final is not None else 0


# ---- JSON bodies and connection watching -------------------------------------------------------

JSON_TYPES = ("application/json",)


def _is_json(content_type: str) -> bool:
    """application/json or application/<something>+json, parameters (charset) allowed."""
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime in JSON_TYPES or (mime.startswith("application/") and mime.endswith("+json"))


async def read_body(request: Request, ctx: AppContext) -> bytearray:
    """The raw body of a JSON request (decoded later, off the event loop). 415 unless it says it
    is JSON: the content types a web page may send cross-site without a CORS preflight
    (text/plain, forms) never reach a handler. 413 past the size limit, checked while reading;
    408 when the body does not arrive within the body timeout (a slow client holds no slot)."""
    return await read_json_body(request, ctx.body_limit, ctx.settings.body_timeout_s)


async def read_json_body(request: Request, limit: int, timeout_s: float) -> bytearray:
    kind = request.headers.get("content-type", "")
    if not _is_json(kind):
        raise APIError(415, f"Content-Type must be application/json, not {kind or 'missing'!r}.",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")
    body = bytearray()  # grown chunk by chunk: one join of a large body would block the loop
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise APIError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")
    except TimeoutError:
        raise APIError(408, f"The request body did not arrive within {timeout_s:g} s.",
                       code="request_timeout", headers={"Connection": "close"}) from None
    return body


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, aw: Awaitable[Any]) -> Any:
    """Awaits `aw` unless the client disconnects first, in which case `aw` is cancelled."""
    task = asyncio.ensure_future(aw)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientGone()


def finite(x: float) -> float:
    """JSON has no infinities: a masked token's logprob is reported as a very small number."""
    return x if math.isfinite(x) else -9999.0


def sse_bytes(event: dict[str, Any] | str) -> bytes:
    data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class SSEResponse:
    """text/event-stream of `events`; stops (and calls `on_close`) as soon as the client is gone."""

    def __init__(self, events: AsyncIterator[dict[str, Any]], on_close: Callable[[], Awaitable[None]],
                 done_marker: bool = True) -> None:
        self.events, self.on_close, self.done_marker = events, on_close, done_marker

    async def _pump(self, send: Send) -> None:
        try:
            async for ev in self.events:
                await send({"type": "http.response.body", "body": sse_bytes(ev), "more_body": True})
        except APIError as e:
            await send({"type": "http.response.body", "body": sse_bytes(e.body()), "more_body": True})
        except Exception as e:  # noqa: BLE001 - headers are out: report in-band, log, end cleanly
            log.exception("stream failed")
            body = APIError(500, f"Generation failed: {type(e).__name__}", code="internal_error").body()
            await send({"type": "http.response.body", "body": sse_bytes(body), "more_body": True})
        if self.done_marker:
            await send({"type": "http.response.body", "body": sse_bytes("[DONE]"), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]
        pump = watcher = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            pump = asyncio.ensure_future(self._pump(send))
            watcher = asyncio.ensure_future(_wait_disconnect(receive))
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if pump.done():
                with contextlib.suppress(OSError):
                    pump.result()
        except OSError:
            pass  # the client went away while we were sending
        finally:
            for t in (pump, watcher):
                if t is not None and not t.done():
                    t.cancel()
                    with contextlib.suppress(BaseException):
                        await t
            with contextlib.suppress(BaseException):
                await self.events.aclose()  # type: ignore[attr-defined]
            await self.on_close()


_ALNUM = string.ascii_letters + string.digits


def new_id(prefix: str, n: int = 24) -> str:
    """prefix + n random letters and digits (resp_..., msg_..., toolu_...)."""
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(n))


def named_event_bytes(ev: dict[str, Any]) -> bytes:
    """An SSE event named by its `type` (`event:` line + `data:` JSON), as Responses and Messages send."""
    data = json.dumps(ev, ensure_ascii=False, separators=(",", ":"))
    return f"event: {ev['type']}\ndata: {data}\n\n".encode()


class NamedEventSSE(SSEResponse):
    """SSEResponse with `event:` lines, no [DONE], and `keepalive` bytes whenever nothing was sent for
    `keepalive_s` (a long prefill); a failure after the headers is one in-band `error_event`."""

    keepalive: bytes = b": keep-alive\n\n"
    keepalive_s: float = 10.0

    def __init__(self, events: AsyncIterator[dict[str, Any]], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(events, on_close, done_marker=False)

    def error_event(self, e: Exception) -> dict[str, Any]:
        raise NotImplementedError

    async def _pump(self, send: Send) -> None:
        async def body(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        it = self.events.__aiter__()
        nxt: asyncio.Future | None = None
        try:
            while True:
                nxt = nxt or asyncio.ensure_future(it.__anext__())
                done, _ = await asyncio.wait({nxt}, timeout=self.keepalive_s)
                if not done:
                    await body(self.keepalive)
                    continue
                fut, nxt = nxt, None
                try:
                    ev = fut.result()
                except StopAsyncIteration:
                    break
                await body(named_event_bytes(ev))
        except Exception as e:  # noqa: BLE001 - headers are out: report in-band, log, end cleanly
            if not isinstance(e, APIError):
                log.exception("stream failed")
            await body(named_event_bytes(self.error_event(e)))
        finally:
            if nxt is not None and not nxt.done():
                nxt.cancel()
                with contextlib.suppress(BaseException):
                    await nxt
        await send({"type": "http.response.body", "body": b"", "more_body": False})
