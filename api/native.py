"""llama-server's own endpoints: /completion, /apply-template, /props, /slots
(/tokenize and /detokenize: api/tokenizer_api.py).

Shapes follow the llama-server transcripts in shared/fixtures (fields we cannot fill meaningfully,
like DRY or mirostat settings, are reported at their neutral values since we reject anything else).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.core.sampling import SamplingParams

from .context import AppContext
from .errors import APIError, invalid
from .json_body import decode_json
from .offload import Progress
from .openai import respond
from .plans import check_sizes, compile_grammar, grammar_spec, message_chars, render_template
from .runs import Job, Run, finite, read_body
from .schemas import ApplyTemplateRequest, NativeCompletionRequest, parse_body

if TYPE_CHECKING:
    from engine.core.outputs import RequestOutput

RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's "pick a random seed"


def with_server_defaults(ctx: AppContext, req: NativeCompletionRequest) -> NativeCompletionRequest:
    """The server's sampling defaults (--temp, a model preset's) in place of llama-server's, for
    the fields the request leaves out."""
    d = {k: v for k, v in ctx.sampling_defaults.items() if k not in req.model_fields_set}
    return req.model_copy(update=d) if d else req


def generation_settings(ctx: AppContext, req: NativeCompletionRequest | None = None) -> dict[str, Any]:
    r = req or with_server_defaults(ctx, NativeCompletionRequest.model_validate({"prompt": ""}))
    n_predict = r.max_tokens if r.max_tokens is not None else r.n_predict
    return {
        "seed": RANDOM_SEED if r.seed in (-1, RANDOM_SEED) else r.seed, "temperature": r.temperature,
        "top_k": r.top_k, "top_p": r.top_p, "min_p": r.min_p, "typical_p": 1.0, "repeat_penalty": r.repeat_penalty,
        "presence_penalty": r.presence_penalty, "frequency_penalty": r.frequency_penalty, "mirostat": 0,
        "dry_multiplier": 0.0, "xtc_probability": 0.0, "stop": list(r.stop or []), "max_tokens": n_predict,
        "n_predict": n_predict, "ignore_eos": r.ignore_eos, "stream": r.stream, "n_probs": r.n_probs,
        "logit_bias": [[k, v] for k, v in (r.logit_bias or {}).items()],
        "samplers": ["penalties", "top_k", "top_p", "min_p", "temperature"],
    }


def native_params(ctx: AppContext, req: NativeCompletionRequest) -> SamplingParams:
    for tid in req.logit_bias:
        if tid >= ctx.vocab_size:
            raise invalid(f"logit_bias token id {tid} is outside the vocabulary", "logit_bias")
    n_predict = req.max_tokens if req.max_tokens is not None else req.n_predict
    if n_predict == 0:
        raise invalid("n_predict must be -1 (unlimited) or at least 1", "n_predict")
    req = with_server_defaults(ctx, req)
    top_p = req.top_p
    temperature = req.temperature if top_p > 0 else 0.0
    try:
        return SamplingParams(
            max_tokens=None if n_predict < 0 else n_predict, temperature=temperature,
            top_k=min(max(req.top_k, 0), ctx.vocab_size), top_p=top_p if top_p > 0 else 1.0, min_p=req.min_p,
            repetition_penalty=req.repeat_penalty, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, logit_bias=dict(req.logit_bias),
            seed=None if req.seed in (-1, RANDOM_SEED) else req.seed % 2**63, stop=list(req.stop),
            ignore_eos=req.ignore_eos, logprobs=req.n_probs if req.n_probs > 0 else None)
    except ValueError as e:
        raise invalid(str(e)) from None


def prompt_ids(ctx: AppContext, parts: list[str | int]) -> list[int]:
    """The client's own prompt: control-token text in it is parsed (llama-server)."""
    check_sizes(ctx, [(f"prompt[{k}]", len(p)) for k, p in enumerate(parts) if isinstance(p, str)], "prompt")
    tok, ids = ctx.engine.tokenizer, []
    for k, p in enumerate(parts):
        if isinstance(p, str):
            ids += tok.encode(p, add_special=k == 0, parse_special=True)
        else:
            if not 0 <= p < ctx.vocab_size:
                raise invalid("Prompt contains invalid tokens", "prompt")
            ids.append(p)
    if not ids:
        raise invalid("The prompt is empty.", "prompt")
    return ids


def _probs(ctx: AppContext, out: RequestOutput) -> list[dict[str, Any]]:
    tok = ctx.engine.tokenizer

    def entry(tid: int, lp: float) -> dict[str, Any]:
        b = tok.token_bytes(tid)
        return {"id": tid, "token": b.decode("utf-8", "replace"), "bytes": list(b), "logprob": finite(lp)}

    return [{**entry(tl.token_id, tl.logprob), "top_logprobs": [entry(t, lp) for t, lp in tl.top]}
            for tl in out.logprobs or []]


def _timings(out: RequestOutput, n_prompt: int) -> dict[str, Any]:
    m = out.metrics
    start = m.first_scheduled_time or m.arrival_time
    first, end = m.first_token_time or start, m.finished_time or m.first_token_time or start
    prompt_ms, gen_ms = max(first - start, 0.0) * 1000, max(end - first, 0.0) * 1000
    prompt_n, gen_n = max(n_prompt - m.cached_prompt_tokens, 0), m.generated_tokens
    return {"cache_n": m.cached_prompt_tokens, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": prompt_n / prompt_ms * 1000 if prompt_ms else 0.0,
            "predicted_n": gen_n, "predicted_ms": gen_ms,
            "predicted_per_token_ms": gen_ms / gen_n if gen_n else 0.0,
            "predicted_per_second": gen_n / gen_ms * 1000 if gen_ms else 0.0}


async def native_events(ctx: AppContext, req: NativeCompletionRequest, run: Run, prompt_text: str,
                        ids: list[int]) -> AsyncIterator[dict[str, Any]]:
    predicted, text_all = 0, []
    async for _, out in run.outputs():
        if out.finish_reason in ("error", "abort"):
            raise APIError(500 if out.finish_reason == "error" else 503, f"Generation failed: {out.error or 'aborted'}")
        predicted += len(out.token_ids)
        text_all.append(out.text)
        ev: dict[str, Any] = {"index": 0, "content": out.text, "tokens": list(out.token_ids),
                              "stop": False, "id_slot": -1, "tokens_predicted": predicted,
                              "tokens_evaluated": len(ids)}
        if req.n_probs > 0:
            ev["completion_probabilities"] = _probs(ctx, out)
        if out.text or out.token_ids:
            yield ev
        if out.finished:
            stop_type = "limit" if out.finish_reason == "length" else (
                "word" if isinstance(out.stop_reason, str) else "eos")
            yield {"index": 0, "content": "", "tokens": [], "id_slot": -1, "stop": True, "model": ctx.model_id,
                   "tokens_predicted": predicted, "tokens_evaluated": len(ids),
                   "generation_settings": generation_settings(ctx, with_server_defaults(ctx, req)), "prompt": prompt_text,
                   "has_new_line": "\n" in "".join(text_all), "truncated": False, "stop_type": stop_type,
                   "stopping_word": out.stop_reason if isinstance(out.stop_reason, str) else "",
                   "tokens_cached": len(ids) + predicted, "timings": _timings(out, len(ids))}


async def fold_native(events: AsyncIterator[dict[str, Any]], return_tokens: bool) -> dict[str, Any]:
    content, tokens, probs, last = [], [], [], {}
    async for ev in events:
        if ev["stop"]:
            last = ev
            continue
        content.append(ev["content"])
        tokens += ev["tokens"]
        probs += ev.get("completion_probabilities", [])
    body = {**last, "content": "".join(content), "tokens": tokens if return_tokens else []}
    if probs:
        body["completion_probabilities"] = probs
    return body


@dataclass
class NativePlan:
    req: NativeCompletionRequest
    ids: list[int]
    params: SamplingParams
    prompt_text: str


def prepare_native(progress: Progress, ctx: AppContext, raw: bytearray) -> NativePlan:
    req = parse_body(NativeCompletionRequest, decode_json(raw))
    progress.param = "prompt"
    ids = prompt_ids(ctx, req.prompt)
    params = native_params(ctx, req)
    started = time.monotonic()
    spec = grammar_spec(ctx, req, progress)
    if spec is not None:
        params.grammar = compile_grammar(ctx, spec, progress, started).new_state()
    text = "".join(p if isinstance(p, str) else ctx.engine.tokenizer.decode([p]) for p in req.prompt)
    return NativePlan(req, ids, params, text)


async def completion(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    ctx.check_admitting()
    plan = await ctx.offload.run(prepare_native, ctx, await read_body(request, ctx))
    req = plan.req
    run = Run(ctx, [Job(plan.ids, plan.params, 0)], param="prompt")
    return await respond_native(request, run, native_events(ctx, req, run, plan.prompt_text, plan.ids), req)


async def respond_native(request: Request, run: Run, events: Any, req: Any) -> Response:
    """Stream (llama-server's native stream has no [DONE] marker) or fold into /completion's shape."""
    return await respond(request, run, events, req.stream, lambda ev: fold_native(ev, req.return_tokens),
                         done_marker=False)


def _apply_template(progress: Progress, ctx: AppContext, raw: bytearray) -> dict[str, Any]:
    req = parse_body(ApplyTemplateRequest, decode_json(raw))
    check_sizes(ctx, [(f"messages[{i}].content", message_chars(m)) for i, m in enumerate(req.messages)],
                "messages")
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    return {"prompt": render_template(ctx, [m.to_template() for m in req.messages], tools, req.chat_template_kwargs,
                                      req.add_generation_prompt, progress)}


async def apply_template(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    return JSONResponse(await ctx.offload.run(_apply_template, ctx, await read_body(request, ctx)))


async def props(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    eng, tmpl = ctx.engine, ctx.engine.chat_template
    return JSONResponse({
        "default_generation_settings": {"params": generation_settings(ctx), "n_ctx": eng.config.max_model_len},
        "total_slots": eng.config.max_num_seqs, "model_alias": ctx.model_id, "model_path": str(ctx.model_path),
        "modalities": {"vision": False, "video": False, "audio": False},
        "chat_template": tmpl.source, "chat_template_caps": {
            k: getattr(tmpl, k, False) for k in ("supports_system_role", "supports_tools", "supports_tool_calls",
                                                 "supports_string_content", "supports_typed_content")},
        "bos_token": eng.tokenizer.bos_token, "eos_token": eng.tokenizer.eos_token,
        "build_info": ctx.build_info, "endpoint_slots": True, "endpoint_props": False, "endpoint_metrics": True,
        "is_sleeping": False,
    })


async def slots(request: Request) -> Response:
    """One entry per decoding slot (-np); busy slots show the engine requests in flight."""
    ctx: AppContext = request.app.state.ctx
    eng = ctx.engine
    busy = [(run, st) for run in list(ctx.active.values()) for st in run.states if not st.finished]
    n_slots = eng.config.max_num_seqs
    stats = eng.stats()
    if request.query_params.get("fail_on_no_slot") and stats.num_running >= n_slots:
        raise APIError(503, "no slot available", code="no_slot_available", headers={"Retry-After": "1"})
    out = []
    for i in range(max(n_slots, len(busy))):
        entry: dict[str, Any] = {"id": i, "n_ctx": eng.config.max_model_len, "is_processing": i < len(busy),
                                 "id_task": -1, "n_prompt_tokens": 0, "next_token": [{"n_decoded": 0}]}
        if i < len(busy):
            run, st = busy[i]
            # request ids are other clients' business: shown only behind an API key
            entry.update({"id_task": st.request_id if ctx.auth_required else -1,
                          "n_prompt_tokens": len(st.job.prompt_ids), "next_token": [{"n_decoded": st.tokens}]})
        out.append(entry)
    return JSONResponse(out)
