"""Forwarding one request to a model's worker and its answer back, unchanged.

The body the router has read is sent as it came; the answer streams back chunk by chunk as the
worker writes it (SSE included) with the worker's status and headers, less the hop-by-hop ones.
The lease on the model is held until the last byte is out. A client that goes away closes the
connection to the worker, which aborts the request there and frees its KV blocks, exactly as a
client of the single-model server would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx
from starlette.types import Receive, Scope, Send

from ..errors import APIError
from .manager import Lease
from .process import ModelProcess

log = logging.getLogger("llamatron.router")

# not forwarded either way: hop-by-hop (RFC 9110 7.6.1), recomputed, or the router's own business
DROP_REQUEST = frozenset({b"host", b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding",
                          b"upgrade", b"proxy-authorization", b"content-length", b"authorization", b"x-api-key"})
DROP_RESPONSE = frozenset({"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
                           "date", "server"})


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def forward(scope: Scope, receive: Receive, send: Send, lease: Lease, body: bytes) -> None:
    """Sends the request to the leased model's worker and relays the answer; releases the lease."""
    try:
        await _forward(scope, receive, send, lease, body)
    finally:
        lease.release()


async def _forward(scope: Scope, receive: Receive, send: Send, lease: Lease, body: bytes) -> None:
    client = lease.process.client
    assert client is not None
    path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string", b"")
    url = path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
    headers = [(k, v) for k, v in scope.get("headers") or [] if k.lower() not in DROP_REQUEST]
    request = client.build_request(scope["method"], url, headers=headers, content=body)
    try:
        upstream = await client.send(request, stream=True)
    except httpx.TransportError as e:
        raise APIError(503, f"The model '{lease.model.id}' is not answering ({type(e).__name__}); retry later.",
                       code="model_unavailable", headers={"Retry-After": "2"}) from None
    try:
        out_headers = [(k, v) for k, v in upstream.headers.raw if k.decode("latin-1").lower() not in DROP_RESPONSE]
        await send({"type": "http.response.start", "status": upstream.status_code, "headers": out_headers})
        pump = asyncio.ensure_future(_pump(upstream, send, lease.model.id))
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        done, _ = await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        # a client that left first cancels the pump, whose connection to the worker closes: that
        # aborts the request there
        for t in (pump, gone):
            if t not in done:
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
        if pump in done:
            pump.result()
    finally:
        with contextlib.suppress(BaseException):
            await upstream.aclose()


async def _pump(upstream: httpx.Response, send: Send, model_id: str) -> None:
    """The worker's answer, chunk by chunk as it arrives (one task per request, not per chunk)."""
    try:
        async for chunk in upstream.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except httpx.HTTPError as e:  # the worker went away mid-answer: end what was sent
        log.warning("model %s: answer cut off: %s", model_id, e)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def fetch(process: ModelProcess, path: str, timeout: float = 5.0) -> httpx.Response | None:
    """A GET of the router's own (the worker's /metrics); None when the worker does not answer."""
    client = process.client
    if client is None:
        return None
    try:
        return await client.get(path, timeout=timeout)
    except httpx.HTTPError:
        return None
