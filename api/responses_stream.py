"""Engine output -> Responses API stream events, their fold into a response object, and the SSE
response that carries them.

As for chat, the stream is the single source of truth: a non-streaming response is the `response`
of the last event a streaming client would receive (`response.completed` / `.incomplete` /
`.failed`), so the two agree item for item. Event order, as the openai SDK's stream helper checks
it: response.created, response.in_progress, then per output item output_item.added, for a message
content_part.added, output_text.delta..., output_text.done, content_part.done, for a call
function_call_arguments.delta..., function_call_arguments.done, then output_item.done; last the
terminal event with the full response (the same item ids and call ids). Every event carries a
`sequence_number`; there is no [DONE]. `ResponsesSSE` writes `event:` lines and an SSE comment
while no event is due (a long prefill keeps proxies and clients from timing out).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from .errors import APIError
from .runs import NamedEventSSE, Run, new_id

if TYPE_CHECKING:
    from engine.constrained.tools import ToolPlan

    from .context import AppContext
    from .responses_request import ResponsesRequest

log = logging.getLogger("llamatron.api")

KEEPALIVE_S = 10.0  # an SSE comment when nothing else was sent for this long

def echoed_settings(req: ResponsesRequest) -> dict[str, Any]:
    """The request settings a response object repeats (OpenAI's defaults where not given)."""
    tools = [{"type": "function", "name": t["name"], "description": t.get("description"),
              "parameters": t.get("parameters"), "strict": t.get("strict", True)} for t in req.tools or []]
    fmt = (req.text.format if req.text is not None else None) or {"type": "text"}
    return {
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "max_tool_calls": None,
        "parallel_tool_calls": req.parallel_tool_calls is not False, "previous_response_id": None,
        "prompt_cache_key": req.prompt_cache_key, "reasoning": {
            "effort": req.reasoning.effort if req.reasoning else None,
            "summary": req.reasoning.summary if req.reasoning else None},
        "safety_identifier": req.safety_identifier, "service_tier": req.service_tier or "default",
        "store": bool(req.store) if req.store is not None else True,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": {"format": fmt, "verbosity": (req.text.verbosity if req.text else None) or "medium"},
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto", "tools": tools,
        "top_logprobs": 0, "top_p": 1.0 if req.top_p is None else req.top_p,
        "truncation": req.truncation or "disabled", "user": req.user, "metadata": req.metadata or {},
    }


class ResponseState:
    """The response object as it grows, and the events that grow it (numbered in order)."""

    def __init__(self, ctx: AppContext, req: ResponsesRequest, run: Run) -> None:
        self.run, self.seq = run, 0
        self.id, self.created = new_id("resp_", 32), int(time.time())
        self.model, self.settings = ctx.model_id, echoed_settings(req)
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.calls: dict[int, dict[str, Any]] = {}  # parser call index -> function_call item

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def response(self, status: str, error: dict | None = None, incomplete: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "background": False, "error": error,
            "incomplete_details": {"reason": incomplete} if incomplete else None, "model": self.model,
            "output": json.loads(json.dumps(self.output)),  # a snapshot: items keep changing
            "output_text": "".join(p["text"] for it in self.output if it["type"] == "message"
                                   for p in it["content"]),
            **self.settings, "usage": None}
        if status != "in_progress":
            n_in, n_out = self.run.prompt_tokens, self.run.completion_tokens()
            body["usage"] = {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": self.run.cached_tokens()},
                             "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": n_in + n_out}
        return body

    def _add(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        evs = self.close("completed")
        self.open = item
        self.output.append(item)
        evs.append(self.event("response.output_item.added", output_index=len(self.output) - 1, item=dict(item)))
        return evs

    def text(self, delta: str) -> list[dict[str, Any]]:
        evs: list[dict[str, Any]] = []
        if self.open is None or self.open["type"] != "message":
            evs += self._add({"id": new_id("msg_", 32), "type": "message", "status": "in_progress",
                              "role": "assistant", "content": []})
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            self.open["content"].append(part)
            evs.append(self.event("response.content_part.added", item_id=self.open["id"],
                                  output_index=len(self.output) - 1, content_index=0, part=dict(part)))
        if delta:
            self.open["content"][0]["text"] += delta
            evs.append(self.event("response.output_text.delta", item_id=self.open["id"],
                                  output_index=len(self.output) - 1, content_index=0, delta=delta, logprobs=[]))
        return evs

    def call(self, index: int, call_id: str | None, name: str | None, args: str) -> list[dict[str, Any]]:
        evs: list[dict[str, Any]] = []
        if call_id is not None:
            evs += self._add({"id": new_id("fc_", 32), "type": "function_call", "status": "in_progress",
                              "arguments": "", "call_id": call_id, "name": name})
            self.calls[index] = self.open
        item = self.calls[index]
        if args:
            item["arguments"] += args
            evs.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                  output_index=self.output.index(item), delta=args))
        return evs

    def close(self, status: str) -> list[dict[str, Any]]:
        """Closes the open item (its .done events); `status`: completed or incomplete."""
        item, self.open = self.open, None
        if item is None:
            return []
        i, evs = self.output.index(item), []
        if item["type"] == "message":
            part = item["content"][0]
            evs.append(self.event("response.output_text.done", item_id=item["id"], output_index=i, content_index=0,
                                  text=part["text"], logprobs=[]))
            evs.append(self.event("response.content_part.done", item_id=item["id"], output_index=i,
                                  content_index=0, part=dict(part)))
        else:
            evs.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                                  name=item["name"], arguments=item["arguments"]))
        item["status"] = status
        evs.append(self.event("response.output_item.done", output_index=i, item=json.loads(json.dumps(item))))
        return evs


_STATUS = {"aborted": 503, "engine_unavailable": 503, "overloaded": 503, "context_length_exceeded": 400}


def _error(e: APIError) -> dict[str, Any]:
    return {"code": e.code or ("server_error" if e.status >= 500 else "invalid_request"), "message": e.message}


async def response_events(ctx: AppContext, req: ResponsesRequest, run: Run,
                          tools: ToolPlan | None) -> AsyncIterator[dict[str, Any]]:
    """The Responses events of one run (a single job); `tools` is the chat plan's ToolPlan."""
    from engine.constrained.tool_parser import ContentDelta

    st = ResponseState(ctx, req, run)
    yield st.event("response.created", response=st.response("in_progress"))
    yield st.event("response.in_progress", response=st.response("in_progress"))
    parser = tools.new_parser() if tools is not None else None
    finish: str | None = None
    try:
        async for _, out in run.outputs():
            deltas = [ContentDelta(out.text)] if parser is None else parser.feed(out.text)
            if parser is not None and out.finished:
                deltas += parser.finish()
            for d in deltas:
                if isinstance(d, ContentDelta):
                    evs = st.text(d.text) if d.text else []
                else:
                    evs = st.call(d.index, d.id, d.name, d.arguments)
                for ev in evs:
                    yield ev
            if out.finished:
                finish = out.finish_reason
                if finish == "error":
                    raise APIError(500, f"Generation failed: {out.error}", code="server_error")
                if finish == "abort":
                    raise APIError(503, "The request was aborted (server shutting down).", code="aborted")
    except Exception as e:  # noqa: BLE001 - reported as response.failed, which every client reads
        if not isinstance(e, APIError):
            log.exception("responses generation failed")
            e = APIError(500, f"Generation failed: {type(e).__name__}", code="server_error")
        for ev in st.close("incomplete"):
            yield ev
        yield st.event("response.failed", response=st.response("failed", error=_error(e)))
        return
    incomplete = "max_output_tokens" if finish == "length" else None
    if not st.output:  # nothing said: an empty message, as OpenAI answers
        for ev in st.text(""):
            yield ev
    for ev in st.close("incomplete" if incomplete else "completed"):
        yield ev
    if incomplete:
        yield st.event("response.incomplete", response=st.response("incomplete", incomplete=incomplete))
    else:
        yield st.event("response.completed", response=st.response("completed"))


async def fold_response(events: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """The non-streaming answer: the terminal event's response (a failed one is an HTTP error)."""
    last: dict[str, Any] = {}
    async for ev in events:
        last = ev
    if last.get("type") == "response.failed":
        err = last["response"]["error"]
        raise APIError(_STATUS.get(err["code"], 500), err["message"], code=err["code"])
    return last["response"]


class ResponsesSSE(NamedEventSSE):
    """OpenAI's Responses framing: SSE comments as the keep-alive, a failure as an `error` event."""

    @property
    def keepalive_s(self) -> float:  # type: ignore[override]
        return KEEPALIVE_S  # read at use: tests shorten it

    def error_event(self, e: Exception) -> dict[str, Any]:
        return {"type": "error", "sequence_number": -1, "code": "server_error",
                "message": f"Generation failed: {type(e).__name__}", "param": None}
