"""OpenAI endpoints: /v1/chat/completions and /v1/completions.

A request becomes n engine requests (`Job`s; choice i gets seed + i). The stream's chunks are the
single source of truth: a non-streaming response is the fold of exactly the chunks a streaming
client would have received, so the two can never disagree.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .context import AppContext
from .errors import APIError
from .plans import CompletionPlan, prepare_chat
from .runs import ClientGone, Run, SSEResponse, finite, read_body, until_disconnect
from .schemas import ChatCompletionRequest

if TYPE_CHECKING:
    from engine.constrained.tool_parser import ToolCallParser
    from engine.constrained.tools import ToolPlan
    from engine.core.outputs import RequestOutput
    from engine.text.reasoning import ReasoningTags
    from engine.text.tokenizer import Tokenizer

FINGERPRINT = "fp_llamatron"


# ---- engine output -> OpenAI shapes --------------------------------------------------------------

def _token_entry(tok: Tokenizer, tid: int, lp: float) -> dict[str, Any]:
    b = tok.token_bytes(tid)
    return {"token": b.decode("utf-8", "replace"), "logprob": finite(lp), "bytes": list(b)}


def chat_logprobs(ctx: AppContext, out: RequestOutput, top: int) -> list[dict[str, Any]]:
    tok, items = ctx.engine.tokenizer, []
    for tl in out.logprobs or []:
        if tl.token_id in ctx.eog_ids and out.finished and out.finish_reason == "stop" and out.stop_reason is None:
            continue  # the end-of-turn token is not part of the content
        e = _token_entry(tok, tl.token_id, tl.logprob)
        e["top_logprobs"] = [_token_entry(tok, t, lp) for t, lp in tl.top[:top]]
        items.append(e)
    return items


def legacy_logprobs(ctx: AppContext, entries: list[Any], top: int, offset: int) -> tuple[dict[str, Any], int]:
    """/v1/completions' logprobs object for `entries` (TokenLogprob or None), text offsets from `offset`."""
    tok = ctx.engine.tokenizer
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tid, tl in entries:
        text = tok.token_bytes(tid).decode("utf-8", "replace")
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if tl is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(finite(tl.logprob))
        out["top_logprobs"].append({tok.token_bytes(t).decode("utf-8", "replace"): finite(lp)
                                    for t, lp in tl.top[:top]})
    return out, offset


def usage(run: Run, prompt_tokens: int, completion_tokens: int | None = None) -> dict[str, Any]:
    done = run.completion_tokens() if completion_tokens is None else completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done,
            "prompt_tokens_details": {"cached_tokens": run.cached_tokens()}}


def _finish(out: RequestOutput) -> str:
    if out.finish_reason == "error":
        raise APIError(500, f"Generation failed: {out.error}", code="generation_error")
    if out.finish_reason == "abort":
        raise APIError(503, "The request was aborted (server shutting down).", code="aborted")
    return out.finish_reason or "stop"


async def chat_events(ctx: AppContext, req: ChatCompletionRequest, run: Run, cid: str, created: int,
                      include_usage: bool, plan: ToolPlan | None = None,
                      reasoning: ReasoningTags | None = None,
                      reasoning_opened: bool = False) -> AsyncIterator[dict[str, Any]]:
    """`plan`: the ToolPlan (None: plain content); `reasoning`: ReasoningTags to split the output on
    (delta.reasoning_content; the tool-call parser sees only the content after the thinking)."""
    from engine.constrained.tool_parser import ContentDelta
    from engine.text.reasoning import ReasoningParser
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": ctx.model_id,
            "system_fingerprint": FINGERPRINT}

    def chunk(i: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

    top = req.top_logprobs or 0
    parsers: dict[int, ToolCallParser | None] = {}  # choice -> its parser (None: plain content)
    thinking: dict[int, ReasoningParser] = {}
    reasoning_tokens = 0
    async for job, out in run.outputs():
        i = job.index
        if i not in parsers:
            parsers[i] = plan.new_parser() if plan is not None else None
            if reasoning is not None:
                thinking[i] = ReasoningParser(reasoning, reasoning_opened)
            yield chunk(i, {"role": "assistant", "content": ""})
        lp = chat_logprobs(ctx, out, top) if req.logprobs else None
        parser = parsers[i]
        text = out.text
        rp = thinking.get(i)
        if rp is not None:
            was = rp.thinking
            thought, text = rp.feed(out.text)
            if out.finished:
                more, rest = rp.finish()
                thought, text = thought + more, text + rest
            if was or rp.thinking or thought:
                reasoning_tokens += len(out.token_ids or ())
            if thought:
                yield chunk(i, {"reasoning_content": thought}, lp={"content": lp} if lp else None)
                lp = [] if req.logprobs else None
        if parser is None:
            if text or lp:
                yield chunk(i, {"content": text}, lp={"content": lp} if req.logprobs else None)
        else:
            for ev in parser.feed(text) + (parser.finish() if out.finished else []):
                delta = {"content": ev.text} if isinstance(ev, ContentDelta) else {"tool_calls": [ev.to_openai()]}
                yield chunk(i, delta, lp={"content": lp} if lp else None)
                lp = None
            if lp:
                yield chunk(i, {}, lp={"content": lp})
        if out.finished:
            reason = _finish(out)
            if parser is not None and parser.tool_calls and reason == "stop":
                reason = "tool_calls"
            yield chunk(i, {}, finish=reason)
    if include_usage:
        u = usage(run, run.prompt_tokens)
        if reasoning is not None:
            u["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
        yield {**base, "choices": [], "usage": u}


async def fold_chat(events: AsyncIterator[dict[str, Any]], want_logprobs: bool) -> dict[str, Any]:
    choices: dict[int, dict[str, Any]] = {}
    head: dict[str, Any] = {}
    async for ev in events:
        head = ev
        for c in ev["choices"]:
            st = choices.setdefault(c["index"], {"text": [], "lp": [], "finish": None, "calls": {}, "thought": []})
            st["text"].append(c["delta"].get("content") or "")
            st["thought"].append(c["delta"].get("reasoning_content") or "")
            for tc in c["delta"].get("tool_calls") or []:  # assembled as the OpenAI SDK does
                call = st["calls"].setdefault(tc["index"], {"id": None, "type": "function",
                                                            "function": {"name": None, "arguments": ""}})
                if "id" in tc:
                    call["id"], call["function"]["name"] = tc["id"], tc["function"]["name"]
                call["function"]["arguments"] += tc["function"].get("arguments", "")
            if c.get("logprobs"):
                st["lp"] += c["logprobs"]["content"]
            st["finish"] = c["finish_reason"] or st["finish"]
    return {
        "id": head["id"], "object": "chat.completion", "created": head["created"], "model": head["model"],
        "system_fingerprint": head["system_fingerprint"],
        "choices": [{"index": i, "message": _message(st),
                     "logprobs": {"content": st["lp"]} if want_logprobs else None, "finish_reason": st["finish"]}
                    for i, st in sorted(choices.items())],
        "usage": head.get("usage"),
    }


def _message(st: dict[str, Any]) -> dict[str, Any]:
    text, calls = "".join(st["text"]), st["calls"]
    msg: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    thought = "".join(st.get("thought", ()))
    if thought:
        msg["reasoning_content"] = thought
    if calls:
        msg["tool_calls"] = [calls[k] for k in sorted(calls)]
    return msg


async def respond(request: Request, run: Run, events: AsyncIterator[dict[str, Any]], stream: bool,
                  fold: Any, done_marker: bool = True, sse: Any = None) -> Response:
    """Starts the run (errors become statuses), then streams (`sse(events, on_close)`, by default
    chat's SSEResponse) or folds the same events."""
    try:
        await until_disconnect(request, run.start())
    except ClientGone:
        return Response(status_code=499)
    if stream:
        if sse is not None:
            return sse(events, run.close)
        return SSEResponse(events, run.close, done_marker)  # type: ignore[return-value]
    try:
        body = await until_disconnect(request, fold(events))
    except ClientGone:
        return Response(status_code=499)
    finally:
        await run.close()
    return JSONResponse(body)


async def chat_completions(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    ctx.check_admitting()
    plan = await ctx.offload.run(prepare_chat, ctx, await read_body(request, ctx))
    req = plan.req
    run = Run(ctx, plan.jobs, param="messages")
    cid, created = f"chatcmpl-{run.base_id}", int(time.time())
    if req.stream:
        include = bool(req.stream_options and req.stream_options.include_usage)
        events = chat_events(ctx, req, run, cid, created, include, plan.tools, plan.reasoning, plan.reasoning_opened)
        return await respond(request, run, events, True, None)
    events = chat_events(ctx, req, run, cid, created, True, plan.tools, plan.reasoning, plan.reasoning_opened)
    return await respond(request, run, events, False, lambda ev: fold_chat(ev, req.logprobs))


# ---- /v1/completions -----------------------------------------------------------------------------

async def completion_events(ctx: AppContext, plan: CompletionPlan, run: Run, cid: str, created: int,
                            include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    req, prompts, drop_generation = plan.req, plan.prompts, plan.drop_generation
    base = {"id": cid, "object": "text_completion", "created": created, "model": ctx.model_id,
            "system_fingerprint": FINGERPRINT}
    top = req.logprobs or 0
    offsets: dict[int, int] = {}
    async for job, out in run.outputs():
        i = job.index
        text, entries = "", []
        if i not in offsets:
            offsets[i] = 0
            if req.echo:
                ptext, pids = prompts[i // req.n]
                text = ptext
                plp = out.prompt_logprobs or [None] * len(pids)
                entries = list(zip(pids, plp, strict=False))
        if not drop_generation:
            text += out.text
            if req.logprobs is not None:
                entries += [(tl.token_id, tl) for tl in out.logprobs or []
                            if not (tl.token_id in ctx.eog_ids and out.finish_reason == "stop"
                                    and out.stop_reason is None)]
        lp = None
        if req.logprobs is not None:
            lp, offsets[i] = legacy_logprobs(ctx, entries, top, offsets[i])
        finish = _finish(out) if out.finished else None
        if text or finish or (lp and lp["tokens"]):
            yield {**base, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]}
    if include_usage:
        n_prompt = sum(len(ids) for _, ids in prompts)
        yield {**base, "choices": [], "usage": usage(run, n_prompt, 0 if drop_generation else None)}


async def fold_completion(events: AsyncIterator[dict[str, Any]], want_logprobs: bool) -> dict[str, Any]:
    choices: dict[int, dict[str, Any]] = {}
    head: dict[str, Any] = {}
    async for ev in events:
        head = ev
        for c in ev["choices"]:
            st = choices.setdefault(c["index"], {"text": [], "lp": None, "finish": None})
            st["text"].append(c["text"])
            if c["logprobs"] is not None:
                if st["lp"] is None:
                    st["lp"] = {k: [] for k in c["logprobs"]}
                for k, v in c["logprobs"].items():
                    st["lp"][k] += v
            st["finish"] = c["finish_reason"] or st["finish"]
    empty = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    return {
        "id": head["id"], "object": "text_completion", "created": head["created"], "model": head["model"],
        "system_fingerprint": head["system_fingerprint"],
        "choices": [{"index": i, "text": "".join(st["text"]),
                     "logprobs": (st["lp"] or empty) if want_logprobs else None, "finish_reason": st["finish"]}
                    for i, st in sorted(choices.items())],
        "usage": head.get("usage"),
    }


async def completions(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    ctx.check_admitting()
    from .infill import prepare_completion_fim  # `suffix`: fill in the middle (api/infill.py imports this module)

    plan = await ctx.offload.run(prepare_completion_fim, ctx, await read_body(request, ctx))
    req = plan.req
    run = Run(ctx, plan.jobs, param="prompt")
    cid, created = f"cmpl-{run.base_id}", int(time.time())
    include = bool(req.stream_options and req.stream_options.include_usage) if req.stream else True
    events = completion_events(ctx, plan, run, cid, created, include)
    fold = None if req.stream else (lambda ev: fold_completion(ev, req.logprobs is not None))
    return await respond(request, run, events, req.stream, fold)
