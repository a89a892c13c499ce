"""Anthropic Messages API: POST /v1/messages and /v1/messages/count_tokens.

A Messages body is validated in its own terms (api/messages_schema.py), translated into a chat
request and planned by the chat path (api/plans.py plan_chat: same template, tool formats,
tool_choice grammars, limits and engine), then answered as Anthropic events (api/messages_stream.py)
or their fold. Errors leave in Anthropic's shape (api/messages_errors.py).

`max_tokens` is a ceiling, as Anthropic treats it: clients such as Claude Code ask for 32000
tokens whatever the model, so it is lowered to what the context leaves after the prompt (the
answer then ends with stop_reason "max_tokens"); only a prompt that fills the context is a 400.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .context import AppContext
from .json_body import decode_json
from .messages_schema import CountTokensRequest, MessagesRequest, to_chat
from .messages_stream import MessagesSSE, fold_message, message_events, new_id
from .offload import Progress
from .openai import respond
from .plans import ChatPlan, cap_to_context, count_prompt_tokens, plan_chat
from .runs import Run, read_body


def _parse(cls: type, raw: bytearray) -> Any:
    from .errors import invalid

    data = decode_json(raw)
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object.")
    return cls.model_validate(data)


@dataclass
class MessagesPlan:
    req: MessagesRequest
    chat: ChatPlan


def prepare_messages(progress: Progress, ctx: AppContext, raw: bytearray) -> MessagesPlan:
    req = _parse(MessagesRequest, raw)
    plan = plan_chat(progress, ctx, to_chat(req))
    cap_to_context(ctx, plan)
    return MessagesPlan(req, plan)


def count_tokens_of(progress: Progress, ctx: AppContext, raw: bytearray) -> int:
    """The prompt the same request would generate from: system, tools and tool instructions included."""

    return count_prompt_tokens(progress, ctx, to_chat(_parse(CountTokensRequest, raw)))


async def messages(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    ctx.check_admitting()
    plan = await ctx.offload.run(prepare_messages, ctx, await read_body(request, ctx))
    run = Run(ctx, plan.chat.jobs, param="messages")
    events = message_events(ctx, run, plan.chat.tools, new_id("msg_"))
    return await respond(request, run, events, plan.req.stream, fold_message, sse=MessagesSSE)


async def count_tokens(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    ctx.check_admitting()
    n = await ctx.offload.run(count_tokens_of, ctx, await read_body(request, ctx))
    return JSONResponse({"input_tokens": n})
