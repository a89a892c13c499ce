"""Engine output -> Anthropic stream events, the fold of those events into a message, and the SSE
response that carries them.

As for chat (api/openai.py), the stream is the single source of truth: a non-streaming answer is
the fold of exactly the events a streaming client receives, accumulated the way the anthropic SDK
accumulates them, so `client.messages.stream(...).get_final_message()` equals `create(...)`.
Order: message_start, ping, then per block content_block_start, content_block_delta
(text_delta / input_json_delta)..., content_block_stop, and last message_delta (stop_reason,
stop_sequence, usage) and message_stop. `MessagesSSE` writes `event:` lines, sends `ping` while
no event is due (a long prefill) and reports errors in-band as an `error` event.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from .errors import APIError
from .messages_errors import anthropic_error
from .runs import NamedEventSSE, Run, named_event_bytes, new_id

if TYPE_CHECKING:
    from engine.constrained.tools import ToolPlan
    from engine.core.outputs import RequestOutput

    from .context import AppContext

log = logging.getLogger("llamatron.api")

KEEPALIVE_S = 5.0  # a ping when nothing else was sent for this long

def _usage(input_tokens: int, output_tokens: int, cached: int) -> dict[str, int]:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached}


def _stop_reason(out: RequestOutput, called: bool) -> tuple[str, str | None]:
    if out.finish_reason == "error":
        raise APIError(500, f"Generation failed: {out.error}", code="generation_error")
    if out.finish_reason == "abort":
        raise APIError(503, "The request was aborted (server shutting down).", code="aborted")
    if out.finish_reason == "length":
        return "max_tokens", None
    if called:
        return "tool_use", None
    if isinstance(out.stop_reason, str):
        return "stop_sequence", out.stop_reason
    return "end_turn", None


async def message_events(ctx: AppContext, run: Run, tools: ToolPlan | None,
                         msg_id: str) -> AsyncIterator[dict[str, Any]]:
    """The Anthropic events of one run (a single job); `tools` is the chat plan's ToolPlan."""
    from engine.constrained.tool_parser import ContentDelta

    n_prompt = run.prompt_tokens
    yield {"type": "message_start", "message": {
        "id": msg_id, "type": "message", "role": "assistant", "model": ctx.model_id, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": _usage(n_prompt, 0, 0)}}
    yield {"type": "ping"}
    parser = tools.new_parser() if tools is not None else None
    index, kind = -1, None  # the open block
    blocks: dict[int, int] = {}  # tool call index -> block index

    def close() -> list[dict[str, Any]]:
        nonlocal kind
        if kind is None:
            return []
        kind = None
        return [{"type": "content_block_stop", "index": index}]

    def open_block(block: dict[str, Any]) -> list[dict[str, Any]]:
        nonlocal index, kind
        evs = close()
        index, kind = index + 1, block["type"]
        return evs + [{"type": "content_block_start", "index": index, "content_block": block}]

    async for _, out in run.outputs():
        deltas = [ContentDelta(out.text)] if parser is None else parser.feed(out.text)
        if parser is not None and out.finished:
            deltas += parser.finish()
        for d in deltas:
            evs: list[dict[str, Any]] = []
            if isinstance(d, ContentDelta):
                if not d.text:
                    continue
                if kind != "text":
                    evs += open_block({"type": "text", "text": ""})
                evs.append({"type": "content_block_delta", "index": index,
                            "delta": {"type": "text_delta", "text": d.text}})
            else:
                if d.id is not None:
                    evs += open_block({"type": "tool_use", "id": new_id("toolu_"), "name": d.name, "input": {}})
                    blocks[d.index] = index
                if d.arguments:
                    evs.append({"type": "content_block_delta", "index": blocks[d.index],
                                "delta": {"type": "input_json_delta", "partial_json": d.arguments}})
            for ev in evs:
                yield ev
        if out.finished:
            reason, sequence = _stop_reason(out, bool(blocks))
            for ev in close():
                yield ev
            yield {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                   "usage": _usage(n_prompt, run.completion_tokens(), run.cached_tokens())}
            yield {"type": "message_stop"}


def _tool_input(buf: str) -> dict[str, Any]:
    """A tool_use block's input from its streamed JSON, as the SDK reads it (partial JSON of a
    call cut short by max_tokens gives what was complete)."""
    if not buf:
        return {}
    try:
        value = json.loads(buf)
    except ValueError:
        try:
            from jiter import from_json  # the anthropic SDK's own partial parser, where installed
            value = from_json(buf.encode(), partial_mode=True)
        except Exception:  # noqa: BLE001 - no partial parser, or not even partial JSON
            value = {}
    return value if isinstance(value, dict) else {}


async def fold_message(events: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    msg: dict[str, Any] = {}
    bufs: dict[int, str] = {}
    async for ev in events:
        kind = ev["type"]
        if kind == "message_start":
            msg = {**ev["message"], "content": [], "usage": dict(ev["message"]["usage"])}
        elif kind == "content_block_start":
            msg["content"].append(dict(ev["content_block"]))
        elif kind == "content_block_delta":
            block, delta = msg["content"][ev["index"]], ev["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            else:
                bufs[ev["index"]] = bufs.get(ev["index"], "") + delta["partial_json"]
        elif kind == "content_block_stop" and ev["index"] in bufs:
            msg["content"][ev["index"]]["input"] = _tool_input(bufs[ev["index"]])
        elif kind == "message_delta":
            msg.update(ev["delta"])
            msg["usage"].update(ev["usage"])
    return msg


PING = named_event_bytes({"type": "ping"})


class MessagesSSE(NamedEventSSE):
    """Anthropic's framing: `ping` events as the keep-alive, errors as Anthropic error events."""

    keepalive = PING
    keepalive_s = KEEPALIVE_S

    def error_event(self, e: Exception) -> dict[str, Any]:
        err = e if isinstance(e, APIError) else APIError(500, f"Generation failed: {type(e).__name__}")
        return anthropic_error(err)
