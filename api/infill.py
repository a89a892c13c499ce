"""Fill in the middle: llama-server's POST /infill, and OpenAI's `suffix` on /v1/completions.

The prompt is llama-server's FIM layout (engine/text/fim.py: repo-level with input_extra, prefix
kept from the right, suffix from the left, extra context from its end) built from the model's own
FIM tokens; generation stops at the end-of-generation set, which holds fim_pad/rep/sep. A model
without prefix/suffix/middle tokens answers 400 `infill_not_supported` naming the missing ones.
/infill answers in /completion's shapes (api/native.py), streamed or not.

Budget (llama-server's n_batch, n_predict, n_ctx): n_ctx is the server's context; n_predict, as
llama-server's -n, is one server-wide value and never the request's, so the same file gives the
same prompt whatever a request asks for (editors warm the prefix cache with n_predict 0 and then
ask for tokens): an eighth of the context, at most 512. n_batch is llama-server's default 2048,
lowered to half the context and to what the context leaves after n_predict (so a small context
still keeps some extra context, and prefix + suffix always fit). A request's own n_predict is a
ceiling, lowered to what the context leaves after the prompt. With those three the prompt is
token for token llama-server's; for contexts of 4096 and more n_batch is 2048.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator
from starlette.requests import Request
from starlette.responses import Response

from engine.text.fim import ExtraChunk, FimPrompt, FimTokens, FimUnsupported, fim_layout, find_fim_tokens

from .context import AppContext
from .errors import invalid
from .native import NativePlan, native_events, native_params, respond_native
from .offload import Progress
from .plans import (
    CompletionPlan,
    check_model,
    check_sizes,
    compile_grammar,
    decode_json,
    grammar_spec,
    resolve_max_tokens,
    sampling_params,
    seeds,
)
from .runs import Job, Run, read_body
from .schemas import CompletionRequest, NativeCompletionRequest, _Body, parse_body, reject_unsupported

if TYPE_CHECKING:
    from engine.core.sampling import SamplingParams
    from engine.text.tokenizer import Tokenizer

FIM_BATCH = 2048  # llama-server's default -b


# ---- request bodies ------------------------------------------------------------------------------

def _mixed(v: Any) -> Any:
    """A string, or a list of strings and token ids (llama-server's tokenize_mixed)."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in v):
        return list(v)
    raise ValueError("must be a string, or a list of strings and token ids")


class ExtraChunkBody(_Body):
    text: str
    filename: str = "tmp"


class InfillRequest(NativeCompletionRequest):
    """llama-server's POST /infill: /completion's fields plus the FIM inputs."""

    prompt: str = ""  # text after the prefix, before the suffix token (a string, as llama-server)
    input_prefix: Any
    input_suffix: Any
    input_extra: list[ExtraChunkBody] | None = Field(None, max_length=4096)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> str:
        if v is None:
            return ""
        if not isinstance(v, str):
            raise ValueError("must be a string")
        return v

    _pre = field_validator("input_prefix", "input_suffix", mode="before")(lambda v: _mixed(v))


class CompletionSuffixRequest(CompletionRequest):
    """/v1/completions with OpenAI's `suffix`: each prompt is the prefix of one FIM prompt."""

    suffix: str


# ---- FIM tokens of the served model --------------------------------------------------------------

_found: dict[int, tuple[Tokenizer, FimTokens]] = {}
_found_lock = threading.Lock()


def fim_tokens(ctx: AppContext) -> FimTokens:
    """The served vocabulary's FIM tokens, found once (the GGUF header is read again for the
    fim_* keys the tokenizer does not keep)."""
    tok = ctx.engine.tokenizer
    with _found_lock:
        hit = _found.get(id(tok))
        if hit is not None and hit[0] is tok:
            return hit[1]
    meta: dict[str, Any] = {}
    try:
        from engine.loading.gguf import read_metadata
        from engine.loading.registry import resolve

        meta = read_metadata(resolve(str(ctx.engine.config.model), pull_missing=False))
    except Exception:  # no readable file: the vocabulary's spellings still find the tokens
        meta = {}
    found = find_fim_tokens(tok, meta)
    with _found_lock:
        _found[id(tok)] = (tok, found)
    return found


def supported(ctx: AppContext) -> FimTokens:
    try:
        return fim_tokens(ctx).require()
    except FimUnsupported as e:
        raise invalid(str(e), None, code="infill_not_supported") from None


def budget(n_ctx: int) -> dict[str, int]:
    """fim_layout's n_batch, n_predict and n_ctx for a server with this context (module doc)."""
    room = min(n_ctx // 8, 512)
    return {"n_batch": max(4, min(FIM_BATCH, n_ctx // 2, n_ctx - room - 4)), "n_predict": room, "n_ctx": n_ctx}


def layout(ctx: AppContext, fim: FimTokens, prefix: Any, suffix: Any, extra: list[ExtraChunk],
           prompt_ids: list[int]) -> FimPrompt:
    """The FIM prompt under this server's budget (module doc)."""
    return fim_layout(ctx.engine.tokenizer, fim, prefix, suffix, extra, prompt_ids,
                      **budget(ctx.engine.config.max_model_len))


def cap(ctx: AppContext, params: SamplingParams, n_prompt: int) -> None:
    """A request's max tokens as a ceiling: lowered to the room the context leaves."""
    room = ctx.engine.config.max_model_len - n_prompt
    if room >= 1 and params.max_tokens is not None and params.max_tokens > room:
        params.max_tokens = room


def _check_ids(ctx: AppContext, value: Any, param: str) -> None:
    if isinstance(value, list) and any(isinstance(t, int) and not 0 <= t < ctx.vocab_size for t in value):
        raise invalid(f"'{param}' holds a token id outside the vocabulary [0, {ctx.vocab_size})", param)


def _chars(value: Any) -> int:
    return len(value) if isinstance(value, str) else sum(len(p) for p in value if isinstance(p, str))


# ---- /infill -------------------------------------------------------------------------------------

@dataclass
class InfillPlan(NativePlan):
    truncated: bool = False  # the prefix, suffix or extra context was cut to fit
    warm_only: bool = False  # n_predict 0: evaluate the prompt (prefix cache), generate nothing


def prepare_infill(progress: Progress, ctx: AppContext, raw: bytearray) -> InfillPlan:
    req = parse_body(InfillRequest, decode_json(raw))
    extra = [ExtraChunk(c.text, c.filename) for c in req.input_extra or []]
    sizes = [("input_prefix", _chars(req.input_prefix)), ("input_suffix", _chars(req.input_suffix)),
             ("prompt", len(req.prompt))]
    sizes += [(f"input_extra[{i}].text", len(c.text) + len(c.filename)) for i, c in enumerate(extra)]
    check_sizes(ctx, sizes, "input_prefix", prompt=False)  # trimmed to fit, so not a context error
    _check_ids(ctx, req.input_prefix, "input_prefix")
    _check_ids(ctx, req.input_suffix, "input_suffix")
    n_predict = req.max_tokens if req.max_tokens is not None else req.n_predict
    warm_only = n_predict == 0  # llama.vim / llama.vscode warm the cache with n_predict 0
    params = native_params(ctx, req.model_copy(update={"n_predict": 1, "max_tokens": None}) if warm_only else req)
    spec = grammar_spec(ctx, req, progress)
    if spec is not None:
        params.grammar = compile_grammar(ctx, spec, progress, time.monotonic()).new_state()
    fim = supported(ctx)
    progress.param = "input_prefix"
    tok = ctx.engine.tokenizer
    prompt_ids = tok.encode(req.prompt, add_special=False, parse_special=True) if req.prompt else []
    fp = layout(ctx, fim, req.input_prefix, req.input_suffix, extra, prompt_ids)
    cap(ctx, params, len(fp.token_ids))
    cut = fp.n_prefix < fp.n_prefix_total or fp.n_suffix < fp.n_suffix_total or (
        bool(extra) and fp.n_extra < fp.n_extra_total)  # the repo header alone is not the client's text
    return InfillPlan(req, fp.token_ids, params, tok.decode(fp.token_ids), cut, warm_only)


async def _finish_events(events: AsyncIterator[dict[str, Any]], plan: InfillPlan) -> AsyncIterator[dict[str, Any]]:
    """/completion's events with `truncated` set; for n_predict 0 the one token the engine had to
    sample is dropped (llama-server answers such a request with no content, stop_type limit)."""
    async for ev in events:
        if ev.get("stop"):
            ev["truncated"] = plan.truncated
            if plan.warm_only:
                ev.update(tokens_predicted=0, stop_type="limit", stopping_word="", has_new_line=False,
                          tokens_cached=ev["tokens_evaluated"])
                ev["generation_settings"].update(n_predict=0, max_tokens=0)
        elif plan.warm_only:
            continue
        yield ev


async def infill(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    ctx.check_admitting()
    plan = await ctx.offload.run(prepare_infill, ctx, await read_body(request, ctx))
    req = plan.req
    run = Run(ctx, [Job(plan.ids, plan.params, 0)], param="input_prefix")
    return await respond_native(request, run, _finish_events(native_events(ctx, req, run, plan.prompt_text, plan.ids),
                                                              plan), req)


# ---- /v1/completions with suffix -----------------------------------------------------------------

def wants_suffix(raw: bytes | bytearray) -> bool:
    """Cheap pre-check on the raw body: only a body naming `suffix` can be a FIM completion (one
    that spells the key with escapes gets prepare_completion's 'unsupported suffix' 400)."""
    return b'"suffix"' in raw


def prepare_completion_fim(progress: Progress, ctx: AppContext, raw: bytearray) -> CompletionPlan:
    """prepare_completion for a body that may carry `suffix`: without one (or an empty one) it is
    an ordinary completion; with one, each prompt becomes the prefix of a FIM prompt."""
    from .plans import prepare_completion

    if not wants_suffix(raw):
        return prepare_completion(progress, ctx, raw)
    data = decode_json(raw)
    if not isinstance(data, dict) or data.get("suffix") in (None, ""):
        return prepare_completion(progress, ctx, raw)
    reject_unsupported(data, allowed=("suffix",))
    req = CompletionSuffixRequest.model_validate(data)
    check_model(ctx, req.model)
    if req.echo:
        raise invalid("echo cannot be combined with suffix", "echo")
    max_tokens = resolve_max_tokens(req, default=16)
    if max_tokens == 0:
        raise invalid("max_tokens must be at least 1", "max_tokens")
    progress.param = "prompt"
    check_sizes(ctx, [(f"prompt[{i}]", _chars(p)) for i, p in enumerate(req.prompt)]
                + [("suffix", len(req.suffix))], "prompt", prompt=False)
    for i, p in enumerate(req.prompt):
        _check_ids(ctx, p, f"prompt[{i}]" if len(req.prompt) > 1 else "prompt")
    started = time.monotonic()
    spec = grammar_spec(ctx, req, progress)
    grammar = compile_grammar(ctx, spec, progress, started) if spec is not None else None
    fim = supported(ctx)
    progress.param = "prompt"
    prompts, jobs = [], []
    for p, prompt in enumerate(req.prompt):
        fp = layout(ctx, fim, prompt, req.suffix, [], [])
        text = prompt if isinstance(prompt, str) else ctx.engine.tokenizer.decode(prompt)
        prompts.append((text, fp.token_ids))
        for i, s in enumerate(seeds(req.seed, req.n)):
            params = sampling_params(ctx, req, max_tokens=max_tokens, logprobs=req.logprobs, seed=s)
            params.grammar = grammar.new_state() if grammar is not None else None
            cap(ctx, params, len(fp.token_ids))
            jobs.append(Job(fp.token_ids, params, p * req.n + i))
    return CompletionPlan(req, prompts, jobs, False)
