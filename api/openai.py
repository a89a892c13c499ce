"""OpenAI endpoints: /v1/chat/completions and /v1/completions.

A request becomes n engine requests (`Job`s; choice i gets seed + i). The stream's chunks are the
single source of truth: a non-streaming response is the fold of exactly the chunks a streaming
client would have received, so the two can never disagree.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.constrained.structured import GrammarError

from .errors import APIError, invalid
from .runs import ClientGone, Job, Run, SSEResponse, finite, read_json, until_disconnect
from .schemas import ChatCompletionRequest, CompletionRequest, SamplingFields, parse_body

FINGERPRINT = "fp_llamatron"
SEED_MOD = 2**63


# ---- request -> engine ---------------------------------------------------------------------------

def check_model(ctx: Any, model: str | None) -> None:
    if model is not None and model not in ctx.model_names:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{ctx.model_id}'.",
                       param="model", code="model_not_found", type="invalid_request_error")


def sampling_params(ctx: Any, req: SamplingFields, *, max_tokens: int | None, logprobs: int | None = None,
                    prompt_logprobs: int | None = None, seed: int | None = None) -> Any:
    from engine.core.sampling import SamplingParams

    vocab = ctx.vocab_size
    for tid in req.logit_bias:
        if tid >= vocab:
            raise invalid(f"logit_bias token id {tid} is outside the vocabulary (size {vocab})", "logit_bias")
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0.0:  # only the most likely token survives: that is greedy decoding
        temperature, top_p = 0.0, 1.0
    if max_tokens is not None and req.min_tokens > max_tokens:
        raise invalid("min_tokens must not exceed max_tokens", "min_tokens")
    rp = req.repeat_penalty if req.repeat_penalty is not None else (req.repetition_penalty or 1.0)
    top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
    try:
        return SamplingParams(
            max_tokens=max_tokens, min_tokens=req.min_tokens, temperature=temperature, top_k=min(top_k, vocab),
            top_p=top_p, min_p=req.min_p or 0.0, repetition_penalty=rp, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, logit_bias=dict(req.logit_bias),
            seed=None if seed is None else seed % SEED_MOD, stop=list(req.stop), ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, skip_special_tokens=req.skip_special_tokens)
    except ValueError as e:
        raise invalid(str(e)) from None


def resolve_max_tokens(req: SamplingFields, *extra: int | None, default: int | None) -> int | None:
    """OpenAI's max_completion_tokens/max_tokens, else llama-server's n_predict (-1 = unlimited)."""
    for value in (*extra, req.max_tokens):
        if value is not None:
            return value
    if req.n_predict is not None:
        return None if req.n_predict < 0 else req.n_predict
    return default


def seeds(seed: int | None, n: int) -> list[int | None]:
    return [None if seed is None else seed + i for i in range(n)]


def render_chat(ctx: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                kwargs: dict[str, Any] | None, add_generation_prompt: bool = True) -> str:
    """`messages`/`tools` as the template sees them (ChatMessage.to_template(), tool dicts)."""
    from engine.text.chat import TemplateError

    try:
        return ctx.engine.chat_template.render(messages, add_generation_prompt, tools=tools, **(kwargs or {}))
    except TemplateError as e:
        raise invalid(f"The chat template could not render these messages: {e}", "messages") from None
    except TypeError as e:  # e.g. chat_template_kwargs colliding with render()'s own arguments
        raise invalid(f"Invalid chat_template_kwargs: {e}", "chat_template_kwargs") from None


def grammar_spec(req: Any) -> Any:
    """response_format, or llama-server's `grammar` (GBNF) / `json_schema` -> GrammarSpec | None."""
    from engine.constrained import structured

    specs = [structured.response_format(getattr(req, "response_format", None))]
    if getattr(req, "grammar", None):
        specs.append(structured.gbnf(req.grammar, param="grammar"))
    if getattr(req, "json_schema", None) not in (None, {}):  # {}: llama.cpp web UI's neutral value
        specs.append(structured.json_schema(req.json_schema, param="json_schema"))
    specs = [s for s in specs if s is not None]
    if len(specs) > 1:
        raise structured.GrammarError("only one of response_format, grammar and json_schema may be given",
                                      specs[1].param)
    return specs[0] if specs else None


async def compile_grammar(ctx: Any, spec: Any) -> Any:
    """-> CompiledGrammar (off the event loop and the engine thread); a bad grammar is a 400."""
    from engine.constrained.structured import GrammarError, get_structured

    try:
        return await get_structured(ctx.engine.tokenizer).compile_async(spec)
    except GrammarError as e:
        raise invalid(str(e), e.param) from None


async def chat_plan(ctx: Any, req: ChatCompletionRequest) -> tuple[Any, Any]:
    """Tools + response_format -> (ToolPlan, CompiledGrammar | None). Every accepted constraint is
    enforced by the grammar; one that cannot be is a 400 naming its parameter."""
    from engine.constrained.structured import GrammarError
    from engine.constrained.tools import detect_format, plan_tools, special_token_lookup

    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:
        plan = plan_tools(detect_format(ctx.engine.chat_template), [m.to_template() for m in req.messages],
                          tools, req.tool_choice, req.parallel_tool_calls,
                          special_token_lookup(ctx.engine.tokenizer))
        other = grammar_spec(req)
        if plan.grammar is not None and other is not None:
            raise GrammarError(f"{other.param} cannot be combined with tools unless tool_choice is 'none'",
                               other.param)
    except GrammarError as e:
        raise invalid(str(e), e.param) from None
    spec = plan.grammar or other
    return plan, (await compile_grammar(ctx, spec) if spec is not None else None)


# ---- engine output -> OpenAI shapes --------------------------------------------------------------

def _token_entry(tok: Any, tid: int, lp: float) -> dict[str, Any]:
    b = tok.token_bytes(tid)
    return {"token": b.decode("utf-8", "replace"), "logprob": finite(lp), "bytes": list(b)}


def chat_logprobs(ctx: Any, out: Any, top: int) -> list[dict[str, Any]]:
    tok, items = ctx.engine.tokenizer, []
    for tl in out.logprobs or []:
        if tl.token_id in ctx.eog_ids and out.finished and out.finish_reason == "stop" and out.stop_reason is None:
            continue  # the end-of-turn token is not part of the content
        e = _token_entry(tok, tl.token_id, tl.logprob)
        e["top_logprobs"] = [_token_entry(tok, t, lp) for t, lp in tl.top[:top]]
        items.append(e)
    return items


def legacy_logprobs(ctx: Any, entries: list[Any], top: int, offset: int) -> tuple[dict[str, Any], int]:
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


def _finish(out: Any) -> str:
    if out.finish_reason == "error":
        raise APIError(500, f"Generation failed: {out.error}", code="generation_error")
    if out.finish_reason == "abort":
        raise APIError(503, "The request was aborted (server shutting down).", code="aborted")
    return out.finish_reason or "stop"


async def chat_events(ctx: Any, req: ChatCompletionRequest, run: Run, cid: str, created: int,
                      include_usage: bool, plan: Any = None) -> AsyncIterator[dict[str, Any]]:
    from engine.constrained.tool_parser import ContentDelta
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": ctx.model_id,
            "system_fingerprint": FINGERPRINT}

    def chunk(i: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

    top = req.top_logprobs or 0
    parsers: dict[int, Any] = {}  # choice -> ToolCallParser (None: plain content)
    async for job, out in run.outputs():
        i = job.index
        if i not in parsers:
            parsers[i] = plan.new_parser() if plan is not None else None
            yield chunk(i, {"role": "assistant", "content": ""})
        lp = chat_logprobs(ctx, out, top) if req.logprobs else None
        parser = parsers[i]
        if parser is None:
            if out.text or lp:
                yield chunk(i, {"content": out.text}, lp={"content": lp} if req.logprobs else None)
        else:
            for ev in parser.feed(out.text) + (parser.finish() if out.finished else []):
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
        yield {**base, "choices": [], "usage": usage(run, run.prompt_tokens)}


async def fold_chat(events: AsyncIterator[dict[str, Any]], want_logprobs: bool) -> dict[str, Any]:
    choices: dict[int, dict[str, Any]] = {}
    head: dict[str, Any] = {}
    async for ev in events:
        head = ev
        for c in ev["choices"]:
            st = choices.setdefault(c["index"], {"text": [], "lp": [], "finish": None, "calls": {}})
            st["text"].append(c["delta"].get("content") or "")
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
    if calls:
        msg["tool_calls"] = [calls[k] for k in sorted(calls)]
    return msg


async def respond(request: Request, run: Run, events: AsyncIterator[dict[str, Any]], stream: bool,
                  fold: Any, done_marker: bool = True) -> Response:
    """Starts the run (errors become statuses), then streams or folds the same events."""
    try:
        await until_disconnect(request, run.start())
    except ClientGone:
        return Response(status_code=499)
    if stream:
        return SSEResponse(events, run.close, done_marker)  # type: ignore[return-value]
    try:
        body = await until_disconnect(request, fold(events))
    except ClientGone:
        return Response(status_code=499)
    finally:
        await run.close()
    return JSONResponse(body)


async def chat_completions(request: Request) -> Response:
    ctx = request.app.state.ctx
    ctx.check_admitting()
    req = parse_body(ChatCompletionRequest, await read_json(request, ctx.body_limit))
    check_model(ctx, req.model)
    max_tokens = resolve_max_tokens(req, req.max_completion_tokens, default=None)
    if max_tokens == 0:
        raise invalid("max_tokens must be at least 1", "max_tokens")
    plan, grammar = await chat_plan(ctx, req)
    prompt = render_chat(ctx, plan.messages, plan.template_tools, req.chat_template_kwargs, req.add_generation_prompt)
    ids = ctx.engine.tokenizer.encode(prompt, add_special=True, parse_special=True)
    lp = (req.top_logprobs or 0) if req.logprobs else None
    jobs = []
    for i, s in enumerate(seeds(req.seed, req.n)):
        params = sampling_params(ctx, req, max_tokens=max_tokens, logprobs=lp, seed=s)
        params.grammar = grammar.new_state() if grammar is not None else None  # one state per choice
        if plan.parses_calls and plan.format.keep_special_tokens:
            params.skip_special_tokens = False  # the call marker is a special token
        jobs.append(Job(ids, params, i))
    run = Run(ctx, jobs, param="messages")
    cid, created = f"chatcmpl-{run.base_id}", int(time.time())
    if req.stream:
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await respond(request, run, chat_events(ctx, req, run, cid, created, include, plan), True, None)
    events = chat_events(ctx, req, run, cid, created, True, plan)
    return await respond(request, run, events, False, lambda ev: fold_chat(ev, req.logprobs))


# ---- /v1/completions -----------------------------------------------------------------------------

def completion_prompts(ctx: Any, req: CompletionRequest) -> list[tuple[str, list[int]]]:
    tok, out = ctx.engine.tokenizer, []
    for p in req.prompt:
        if isinstance(p, str):
            ids = tok.encode(p, add_special=True, parse_special=True)
            text = p
        else:
            if any(not 0 <= t < ctx.vocab_size for t in p):
                raise invalid(f"prompt token ids must be in [0, {ctx.vocab_size})", "prompt")
            ids, text = list(p), tok.decode(p)
        if not ids:
            raise invalid("The prompt is empty.", "prompt")
        out.append((text, ids))
    return out


async def completion_events(ctx: Any, req: CompletionRequest, run: Run, prompts: list[tuple[str, list[int]]],
                            cid: str, created: int, include_usage: bool,
                            drop_generation: bool) -> AsyncIterator[dict[str, Any]]:
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
                entries = list(zip(pids, plp))
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
    ctx = request.app.state.ctx
    ctx.check_admitting()
    req = parse_body(CompletionRequest, await read_json(request, ctx.body_limit))
    check_model(ctx, req.model)
    max_tokens = resolve_max_tokens(req, default=16)
    # max_tokens 0 with echo scores the prompt only (evaluation harnesses): generate one token, drop it
    drop = max_tokens == 0
    if drop and not req.echo:
        raise invalid("max_tokens must be at least 1 (0 is allowed only with echo)", "max_tokens")
    prompts = completion_prompts(ctx, req)
    plp = req.logprobs if req.echo and req.logprobs is not None else None
    try:
        spec = grammar_spec(req)
    except GrammarError as e:
        raise invalid(str(e), e.param) from None
    grammar = await compile_grammar(ctx, spec) if spec is not None else None
    jobs = []
    for p, (_, ids) in enumerate(prompts):
        for i, s in enumerate(seeds(req.seed, req.n)):
            params = sampling_params(ctx, req, max_tokens=1 if drop else max_tokens, logprobs=req.logprobs,
                                     prompt_logprobs=plp, seed=s)
            params.grammar = grammar.new_state() if grammar is not None else None
            jobs.append(Job(ids, params, p * req.n + i))
    run = Run(ctx, jobs, param="prompt")
    cid, created = f"cmpl-{run.base_id}", int(time.time())
    include = bool(req.stream_options and req.stream_options.include_usage) if req.stream else True
    events = completion_events(ctx, req, run, prompts, cid, created, include, drop)
    fold = None if req.stream else (lambda ev: fold_completion(ev, req.logprobs is not None))
    return await respond(request, run, events, req.stream, fold)
