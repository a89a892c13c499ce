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

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .context import AppContext
from .errors import APIError, from_validation_error, invalid
from .json_body import decode_json
from .offload import Progress
from .openai import respond
from .plans import ChatPlan, cap_to_context, count_prompt_tokens, plan_chat
from .responses_request import InputTokensRequest, ResponsesRequest, rename_param, to_chat
from .responses_stream import ResponsesSSE, fold_response, response_events
from .runs import Run, read_body


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
    cap_to_context(ctx, plan)
    return ResponsesPlan(req, plan)


def input_tokens_of(progress: Progress, ctx: AppContext, raw: bytearray) -> int:
    """The prompt the same request would generate from: instructions, tools and tool prompt included."""
    req = _parse(InputTokensRequest, raw)

    def count() -> int:
        return count_prompt_tokens(progress, ctx, to_chat(req, count_only=True))

    return _translated(count)


async def responses(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    ctx.check_admitting()
    plan = await ctx.offload.run(prepare_responses, ctx, await read_body(request, ctx))
    run = Run(ctx, plan.chat.jobs, param="input")
    events = response_events(ctx, plan.req, run, plan.chat.tools)
    return await respond(request, run, events, plan.req.stream, fold_response, sse=ResponsesSSE)


async def input_tokens(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    ctx.check_admitting()
    n = await ctx.offload.run(input_tokens_of, ctx, await read_body(request, ctx))
    return JSONResponse({"object": "response.input_tokens", "input_tokens": n})
