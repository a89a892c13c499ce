"""OpenAI Responses API, stateless: POST /v1/responses and /v1/responses/input_tokens.

A Responses body is validated in its own terms and translated into a chat request
(api/responses_request.py), planned by the chat path (api/plans.py plan_chat: same template, tool
formats, tool_choice and text.format grammars, limits, engine), then answered as Responses events
(api/responses_stream.py) or their fold. Nothing is stored: `store: true` is accepted and stores
nothing, and `previous_response_id` / `conversation` are a 400 `previous_response_not_found`.
Errors are OpenAI's shape, with params named in the Responses request's terms.

`max_output_tokens` is a ceiling, as OpenAI treats it: agents send one value whatever the model,
so it is lowered to what the context leaves after the prompt (the response is then `incomplete`
with reason max_output_tokens); only a prompt that fills the context is a 400.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .context import AppContext
from .errors import APIError, from_validation_error, invalid
from .offload import Progress
from .plans import ChatPlan, chat_prompt, check_model, check_sizes, decode_json, message_chars, plan_chat, plan_tools
from .responses_request import InputTokensRequest, ResponsesRequest, rename_param, to_chat
from .responses_stream import ResponsesSSE, fold_response, response_events
from .runs import ClientGone, Run, read_body, until_disconnect


@dataclass
class ResponsesPlan:
    req: ResponsesRequest
    chat: ChatPlan


def _parse(cls: type[ResponsesRequest], raw: bytearray) -> ResponsesRequest:
    data = decode_json(raw)
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object.")
    return cls.model_validate(data)


def _translated(fn: Any) -> Any:
    """Runs `fn`, reporting the chat path's errors in the Responses request's terms."""
    try:
        return fn()
    except ValidationError as e:
        raise rename_param(from_validation_error(e)) from None
    except APIError as e:
        raise rename_param(e) from None


def prepare_responses(progress: Progress, ctx: AppContext, raw: bytearray) -> ResponsesPlan:
    req = _parse(ResponsesRequest, raw)
    plan = _translated(lambda: plan_chat(progress, ctx, to_chat(req)))
    room = ctx.engine.config.max_model_len - len(plan.prompt_ids)
    for job in plan.jobs:
        if room >= 1 and job.params.max_tokens is not None and job.params.max_tokens > room:
            job.params.max_tokens = room  # a ceiling; a prompt with no room left fails in Run.start
    return ResponsesPlan(req, plan)


def input_tokens_of(progress: Progress, ctx: AppContext, raw: bytearray) -> int:
    """The prompt the same request would generate from: instructions, tools and tool prompt included."""
    req = _parse(InputTokensRequest, raw)

    def count() -> int:
        chat = to_chat(req, count_only=True)
        check_model(ctx, chat.model)
        sizes = [(f"messages[{i}].content", message_chars(m)) for i, m in enumerate(chat.messages)]
        if chat.tools:
            sizes.append(("tools", len(json.dumps([t.model_dump(exclude_none=True) for t in chat.tools]))))
        check_sizes(ctx, sizes, "messages")
        tools = plan_tools(ctx, chat, progress)
        prompt = chat_prompt(ctx, tools.messages, tools.template_tools, chat.chat_template_kwargs, True, progress)
        return len(prompt.token_ids)

    return _translated(count)


async def responses(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    ctx.check_admitting()
    plan = await ctx.offload.run(prepare_responses, ctx, await read_body(request, ctx))
    run = Run(ctx, plan.chat.jobs, param="input")
    events = response_events(ctx, plan.req, run, plan.chat.tools)
    try:
        await until_disconnect(request, run.start())
    except ClientGone:
        return Response(status_code=499)
    if plan.req.stream:
        return ResponsesSSE(events, run.close)  # type: ignore[return-value]
    try:
        body = await until_disconnect(request, fold_response(events))
    except ClientGone:
        return Response(status_code=499)
    finally:
        await run.close()
    return JSONResponse(body)


async def input_tokens(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    ctx.check_admitting()
    n = await ctx.offload.run(input_tokens_of, ctx, await read_body(request, ctx))
    return JSONResponse({"object": "response.input_tokens", "input_tokens": n})
