"""Request body -> what the engine runs: the shared, CPU-bound half of every generating endpoint.

Everything here runs inside an `Offloader` job (api/offload.py), never on the event loop: JSON
decoding, validation, size limits (checked before any work that grows with the input), tool
planning, grammar building and compiling, template rendering and tokenizing. Each step first
names its parameter in `Progress`, so a time-out or a failure is a 400 that says where.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.constrained.grammars import GrammarError, GrammarSpec
from engine.core.sampling import SamplingParams

from .errors import APIError, invalid
from .json_body import decode_json
from .offload import Progress
from .runs import Job
from .schemas import ChatCompletionRequest, CompletionRequest, SamplingFields, parse_body

if TYPE_CHECKING:
    from engine.constrained.structured import CompiledGrammar
    from engine.constrained.tools import ToolPlan
    from engine.text.prompt import ChatPrompt
    from engine.text.reasoning import ReasoningTags

    from .context import AppContext

SEED_MOD = 2**63


def check_model(ctx: AppContext, model: str | None) -> None:
    if model is not None and model not in ctx.model_names:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{ctx.model_id}'.",
                       param="model", code="model_not_found", type="invalid_request_error")


# ---- sizes -----------------------------------------------------------------------------------

def check_sizes(ctx: AppContext, items: list[tuple[str, int]], what: str, prompt: bool = True) -> None:
    """`items`: (param, characters) per message or prompt. All together over the per-request
    limit, or one over the per-message limit, is a 400 before anything is tokenized; for a prompt
    the former is a context-length error, since no such text fits the context."""
    limits = ctx.limits
    total = sum(n for _, n in items)
    if total > limits.max_request_chars:
        if prompt:
            n_ctx = ctx.engine.config.max_model_len
            raise APIError(400, f"This model's maximum context length is {n_ctx} tokens. The {what} "
                           f"have {total} characters, more than any {n_ctx}-token prompt can hold "
                           f"(at most {limits.max_request_chars} characters are accepted).",
                           param=what, code="context_length_exceeded", extra={"n_ctx": n_ctx})
        raise invalid(f"The {what} has {total} characters; at most {limits.max_request_chars} are accepted.",
                      what, code="string_above_max_length")
    for param, n in items:
        if n > limits.max_message_chars:
            raise invalid(f"'{param}' has {n} characters; at most {limits.max_message_chars} are accepted.",
                          param, code="string_above_max_length")


def message_chars(m: Any) -> int:
    n = len(m.text()) + len(m.reasoning_content or "") + len(m.name or "")
    for tc in m.tool_calls or []:
        args = tc.function.arguments
        n += len(tc.function.name) + (len(args) if isinstance(args, str) else len(json.dumps(args)))
    return n


# ---- sampling --------------------------------------------------------------------------------

def sampling_params(ctx: AppContext, req: SamplingFields, *, max_tokens: int | None, logprobs: int | None = None,
                    prompt_logprobs: int | None = None, seed: int | None = None) -> SamplingParams:
    vocab = ctx.vocab_size
    for tid in req.logit_bias:
        if tid >= vocab:
            raise invalid(f"logit_bias token id {tid} is outside the vocabulary (size {vocab})", "logit_bias")
    d = ctx.sampling_defaults  # the server's (or model preset's) defaults for fields left out
    temperature = d.get("temperature", 1.0) if req.temperature is None else req.temperature
    top_p = d.get("top_p", 1.0) if req.top_p is None else req.top_p
    if top_p == 0.0:  # only the most likely token survives: that is greedy decoding
        temperature, top_p = 0.0, 1.0
    if max_tokens is not None and req.min_tokens > max_tokens:
        raise invalid("min_tokens must not exceed max_tokens", "min_tokens")
    rp = req.repeat_penalty if req.repeat_penalty is not None else (req.repetition_penalty or d.get("repeat_penalty", 1.0))
    top_k = req.top_k if req.top_k is not None else d.get("top_k", 0)
    top_k = top_k if top_k > 0 else 0
    min_p = req.min_p if req.min_p is not None else d.get("min_p", 0.0)
    try:
        return SamplingParams(
            max_tokens=max_tokens, min_tokens=req.min_tokens, temperature=temperature, top_k=min(top_k, vocab),
            top_p=top_p, min_p=min_p, repetition_penalty=rp, presence_penalty=req.presence_penalty,
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


# ---- grammars --------------------------------------------------------------------------------

def grammar_spec(ctx: AppContext, req: Any, progress: Progress) -> GrammarSpec | None:
    """response_format, or llama-server's `grammar` (GBNF) / `json_schema` -> GrammarSpec | None."""
    from engine.constrained import structured

    limits = ctx.limits.grammar
    try:
        progress.param = "response_format"
        specs = [structured.response_format(getattr(req, "response_format", None), limits=limits)]
        if getattr(req, "grammar", None):
            progress.param = "grammar"
            specs.append(structured.gbnf(req.grammar, param="grammar", limits=limits))
        if getattr(req, "json_schema", None) not in (None, {}):  # {}: llama.cpp web UI's neutral value
            progress.param = "json_schema"
            specs.append(structured.json_schema(req.json_schema, param="json_schema", limits=limits))
    except GrammarError as e:
        raise invalid(str(e), e.param) from None
    specs = [s for s in specs if s is not None]
    if len(specs) > 1:
        raise invalid("only one of response_format, grammar and json_schema may be given", specs[1].param)
    return specs[0] if specs else None


def compile_grammar(ctx: AppContext, spec: GrammarSpec, progress: Progress, started: float) -> CompiledGrammar:
    """Validate + compile within the grammar time budget counted from `started`; a bad grammar is a 400."""
    from engine.constrained.structured import get_structured

    progress.param = spec.param
    try:
        return get_structured(ctx.engine.tokenizer).compile(spec, deadline=started + ctx.limits.grammar.timeout_s)
    except GrammarError as e:
        raise invalid(str(e), e.param) from None


# ---- chat ------------------------------------------------------------------------------------

@contextlib.contextmanager
def template_errors() -> Iterator[None]:
    from engine.text.chat import TemplateError

    try:
        yield
    except TemplateError as e:
        raise invalid(f"The chat template could not render these messages: {e}", "messages") from None
    except TypeError as e:  # e.g. chat_template_kwargs colliding with render()'s own arguments
        raise invalid(f"Invalid chat_template_kwargs: {e}", "chat_template_kwargs") from None
    except ValueError as e:
        raise invalid(str(e), "messages") from None


def chat_prompt(ctx: AppContext, messages: list[dict], tools: list[dict] | None, kwargs: dict | None,
                add_generation_prompt: bool, progress: Progress) -> ChatPrompt:
    """Rendered + tokenized conversation; message content stays data (engine/text/prompt.py)."""
    from engine.text.prompt import encode_chat

    progress.param = "messages"
    limits, eng = ctx.limits, ctx.engine
    with template_errors():
        return encode_chat(eng.chat_template, eng.tokenizer, messages, add_generation_prompt=add_generation_prompt,
                           tools=tools, template_kwargs=kwargs, timeout_s=limits.template_timeout_s,
                           special_in_content=limits.special_in_content)


def render_template(ctx: AppContext, messages: list[dict], tools: list[dict] | None, kwargs: dict | None,
                    add_generation_prompt: bool, progress: Progress) -> str:
    progress.param = "messages"
    with template_errors():
        return ctx.engine.chat_template.render(messages, add_generation_prompt, tools, kwargs,
                                               ctx.limits.template_timeout_s)


def plan_tools(ctx: AppContext, req: ChatCompletionRequest, progress: Progress) -> ToolPlan:
    from engine.constrained.tools import detect_format, plan_tools as plan, special_token_lookup

    progress.param = "tools"
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:
        return plan(detect_format(ctx.engine.chat_template), [m.to_template() for m in req.messages], tools,
                    req.tool_choice, req.parallel_tool_calls, special_token_lookup(ctx.engine.tokenizer),
                    limits=ctx.limits.grammar)
    except GrammarError as e:
        raise invalid(str(e), e.param) from None


@dataclass
class ChatPlan:
    req: ChatCompletionRequest
    tools: ToolPlan
    prompt_ids: list[int]
    jobs: list[Job]
    reasoning: ReasoningTags | None = None  # split the output on these tags (engine/text/reasoning.py)
    reasoning_opened: bool = False  # the prompt ends inside the think block


def reasoning_tags(ctx: AppContext, req: ChatCompletionRequest) -> ReasoningTags | None:
    """The request's reasoning_format, else the server's --reasoning-format (auto: detected from
    the chat template and the vocabulary)."""
    from engine.text.reasoning import detect_tags

    fmt = req.reasoning_format or getattr(ctx.settings, "reasoning_format", "auto")
    tmpl = ctx.engine.chat_template
    sources = " ".join(t.source or "" for t in (tmpl, getattr(tmpl, "tool_use", None)) if t is not None)
    try:
        return detect_tags(fmt, sources, ctx.engine.tokenizer)
    except ValueError as e:
        raise invalid(str(e), "reasoning_format") from None


def reasoning_kwargs(req: ChatCompletionRequest) -> dict | None:
    """chat_template_kwargs plus reasoning_effort (the client's own kwargs win)."""
    kwargs = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", req.reasoning_effort)
    return kwargs or req.chat_template_kwargs


def thinking_budget(ctx: AppContext, req: ChatCompletionRequest, tags: ReasoningTags, opened: bool) -> Any:
    """A fresh ThinkingBudget for one choice, or None when thinking is unlimited."""
    from engine.text.reasoning import ThinkingBudget

    budget = req.reasoning_budget if req.reasoning_budget is not None else getattr(
        ctx.settings, "reasoning_budget", -1)
    if budget < 0:
        return None
    tok = ctx.engine.tokenizer
    end_ids = tok.encode(tags.end, add_special=False, parse_special=True)
    return ThinkingBudget(tags, budget, end_ids, tok.token_bytes, opened=opened)


def prepare_chat(progress: Progress, ctx: AppContext, raw: bytearray) -> ChatPlan:
    """A /v1/chat/completions body -> the engine jobs (one per choice) and the tool plan."""
    return plan_chat(progress, ctx, parse_body(ChatCompletionRequest, decode_json(raw)), reasoning=True)


def plan_chat(progress: Progress, ctx: AppContext, req: ChatCompletionRequest, reasoning: bool = False) -> ChatPlan:
    """A validated chat request -> its plan (also what /v1/messages translates its bodies into).
    With `reasoning` (the chat completions endpoint) thinking models' output is split on their tags,
    a grammar applies only after the thinking, and the thinking budget is enforced."""
    check_model(ctx, req.model)
    max_tokens = resolve_max_tokens(req, req.max_completion_tokens, default=None)
    if max_tokens == 0:
        raise invalid("max_tokens must be at least 1", "max_tokens")
    sizes = [(f"messages[{i}].content", message_chars(m)) for i, m in enumerate(req.messages)]
    if req.tools:
        sizes.append(("tools", len(json.dumps([t.model_dump(exclude_none=True) for t in req.tools]))))
    check_sizes(ctx, sizes, "messages")
    started = time.monotonic()  # the grammar budget: tool planning, grammar building, compiling
    tools = plan_tools(ctx, req, progress)
    other = grammar_spec(ctx, req, progress)
    if tools.choice == "none" and other is not None:  # the client's format wins over the generic answer wrapper
        tools = dataclasses.replace(tools, grammar=None)
    if tools.grammar is not None and other is not None:
        raise invalid(f"{other.param} cannot be combined with tools unless tool_choice is 'none'", other.param)
    spec = tools.grammar or other
    grammar = compile_grammar(ctx, spec, progress, started) if spec is not None else None
    tags = reasoning_tags(ctx, req) if reasoning else None
    prompt = chat_prompt(ctx, tools.messages, tools.template_tools, reasoning_kwargs(req) if reasoning
                         else req.chat_template_kwargs, req.add_generation_prompt, progress)
    opened = False
    if tags is not None:
        from engine.text.reasoning import compose_grammar, prompt_opens

        opened = prompt_opens(prompt.text, tags)
        if spec is not None:  # free thinking, then the answer under the grammar
            try:
                composed = dataclasses.replace(spec, grammar=compose_grammar(spec.grammar, tags, opened))
            except ValueError as e:
                raise invalid(f"{spec.param} cannot be combined with reasoning: {e}", spec.param) from None
            grammar = compile_grammar(ctx, composed, progress, started)
    lp = (req.top_logprobs or 0) if req.logprobs else None
    jobs = []
    for i, s in enumerate(seeds(req.seed, req.n)):
        params = sampling_params(ctx, req, max_tokens=max_tokens, logprobs=lp, seed=s)
        params.grammar = grammar.new_state() if grammar is not None else None  # one state per choice
        if tools.parses_calls and tools.format.keep_special_tokens:
            params.skip_special_tokens = False  # the call marker is a special token
        if tags is not None:
            params.token_forcer = thinking_budget(ctx, req, tags, opened)
            if _is_special_tag(ctx, tags):
                params.skip_special_tokens = False  # the tags are special tokens (Qwen3): keep their text
        jobs.append(Job(prompt.token_ids, params, i))
    return ChatPlan(req, tools, prompt.token_ids, jobs, tags, opened)


def _is_special_tag(ctx: AppContext, tags: ReasoningTags) -> bool:
    tok = ctx.engine.tokenizer
    ids = tok.encode(tags.end, add_special=False, parse_special=True)
    return len(ids) == 1 and tok.is_special(ids[0])


# ---- completions -----------------------------------------------------------------------------

@dataclass
class CompletionPlan:
    req: CompletionRequest
    prompts: list[tuple[str, list[int]]]  # (text, ids) per prompt
    jobs: list[Job]
    drop_generation: bool  # max_tokens 0 with echo: score the prompt only


def completion_prompts(ctx: AppContext, req: CompletionRequest, progress: Progress) -> list[tuple[str, list[int]]]:
    """Raw prompts are the client's own: control-token text in them is parsed (llama-server)."""
    progress.param = "prompt"
    check_sizes(ctx, [(f"prompt[{i}]", len(p)) for i, p in enumerate(req.prompt) if isinstance(p, str)], "prompt")
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


def prepare_completion(progress: Progress, ctx: AppContext, raw: bytearray) -> CompletionPlan:
    """A /v1/completions body -> one engine job per (prompt, choice)."""
    req = parse_body(CompletionRequest, decode_json(raw))
    check_model(ctx, req.model)
    max_tokens = resolve_max_tokens(req, default=16)
    drop = max_tokens == 0
    if drop and not req.echo:
        raise invalid("max_tokens must be at least 1 (0 is allowed only with echo)", "max_tokens")
    prompts = completion_prompts(ctx, req, progress)
    plp = req.logprobs if req.echo and req.logprobs is not None else None
    started = time.monotonic()
    spec = grammar_spec(ctx, req, progress)
    grammar = compile_grammar(ctx, spec, progress, started) if spec is not None else None
    jobs = []
    for p, (_, ids) in enumerate(prompts):
        for i, s in enumerate(seeds(req.seed, req.n)):
            params = sampling_params(ctx, req, max_tokens=1 if drop else max_tokens, logprobs=req.logprobs,
                                     prompt_logprobs=plp, seed=s)
            params.grammar = grammar.new_state() if grammar is not None else None
            jobs.append(Job(ids, params, p * req.n + i))
    return CompletionPlan(req, prompts, jobs, drop)


def cap_to_context(ctx: AppContext, plan: ChatPlan) -> None:
    """max tokens as a ceiling (agent APIs send one value whatever the model): lowered to the room the
    context leaves after the prompt; a prompt with no room left still fails in Run.start."""
    room = ctx.engine.config.max_model_len - len(plan.prompt_ids)
    for job in plan.jobs:
        if room >= 1 and job.params.max_tokens is not None and job.params.max_tokens > room:
            job.params.max_tokens = room


def count_prompt_tokens(progress: Progress, ctx: AppContext, chat: ChatCompletionRequest) -> int:
    """Tokens of the prompt a chat request would generate from (system, tools and tool instructions
    included), under the same size checks, without compiling any grammar."""
    check_model(ctx, chat.model)
    sizes = [(f"messages[{i}].content", message_chars(m)) for i, m in enumerate(chat.messages)]
    if chat.tools:
        sizes.append(("tools", len(json.dumps([t.model_dump(exclude_none=True) for t in chat.tools]))))
    check_sizes(ctx, sizes, "messages")
    tools = plan_tools(ctx, chat, progress)
    prompt = chat_prompt(ctx, tools.messages, tools.template_tools, chat.chat_template_kwargs, True, progress)
    return len(prompt.token_ids)
