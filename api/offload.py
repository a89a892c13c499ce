"""Per-request CPU work (JSON decoding, validation, templates, tokenizing, grammars) off the event loop.

A request's preparation runs as one job in a small thread pool, so /health, other streams and
signal handling keep their loop while it runs. The job reports which parameter it is working on
(`Progress.param`); the cooperative budgets inside it (template deadline, grammar deadline, size
caps) end it with a 400 that names that parameter. `budget_s` is the safety net for the parts no
deadline can interrupt (a Rust call, a huge regex): the request is answered with a 400 at the
budget and the job's late result is dropped. A job that cannot even start (every worker busy for
`queue_s`) is a 503.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .errors import APIError, invalid

T = TypeVar("T")
WORKERS = 4  # mostly GIL-bound Python: more threads would not prepare more requests per second


class Progress:
    """What a preparation job is working on, for the error when it runs out of time."""

    def __init__(self) -> None:
        self.param: str | None = None


class Offloader:
    def __init__(self, budget_s: float, queue_s: float = 30.0, workers: int = WORKERS) -> None:
        self.budget_s, self.queue_s = budget_s, queue_s
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="llamatron-prep")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(progress, *args)` in the pool; its exceptions (APIError included) propagate."""
        loop = asyncio.get_running_loop()
        started, progress = asyncio.Event(), Progress()

        def job() -> T:
            loop.call_soon_threadsafe(started.set)
            return fn(progress, *args)

        fut = loop.run_in_executor(self._pool, contextvars.copy_context().run, job)
        fut.add_done_callback(_consume)  # a late failure after a timeout is nobody's to report
        try:
            await asyncio.wait_for(started.wait(), self.queue_s)
        except TimeoutError:
            fut.cancel()
            raise APIError(503, "The server is busy preparing other requests; retry later.", code="overloaded",
                           headers={"Retry-After": "1"}) from None
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.budget_s)
        except TimeoutError:
            raise invalid(f"Preparing this request took longer than {self.budget_s:g} s "
                          f"(working on '{progress.param or 'the request'}').",
                          progress.param, code="timeout") from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _consume(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()
