"""uvicorn's h11 protocol with a request-header timeout (uvicorn has none).

Without it a client that opens a connection and trickles header bytes (or sends nothing after a
first byte) holds the connection forever; enough of them exhaust the server's file descriptors.
A connection must deliver a whole request head within `header_timeout_s` of connecting (or of its
previous response ending, after the keep-alive wait); otherwise it gets a 408 and is closed.
Body reads are bounded separately, in api/runs.py:read_body.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                     b"content-length: 24\r\nconnection: close\r\n\r\nrequest headers too slow")


def timed_protocol(header_timeout_s: float) -> type[H11Protocol]:
    class TimedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self, delay: float) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(delay, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self.transport.write(_TIMEOUT_RESPONSE)
                self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(header_timeout_s)

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            super().data_received(data)
            if self.cycle is not before:  # a whole request head arrived: a new cycle started
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():  # the next head: after the keep-alive wait at most
                self._arm(self.timeout_keep_alive + header_timeout_s)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return TimedH11Protocol
