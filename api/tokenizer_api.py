"""The tokenizer over HTTP, in llama-server's shapes and vLLM's (evaluation harnesses such as
lm-eval's `local-completions` look for vLLM's): POST /tokenize, POST /detokenize,
GET /tokenizer_info. See docs/clients.md.

/tokenize tells the shapes apart by their keys: `content` is llama-server's ({"tokens": [...]},
pieces with `with_pieces`); `prompt` or `messages` is vLLM's ({"count", "max_model_len",
"tokens", "token_strs"}). A body with neither is a 400: it used to answer `{"tokens": []}`, which
a harness takes for an empty tokenization. /detokenize answers both at once
(`content` for llama-server, `prompt` for vLLM).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .context import AppContext
from .errors import invalid
from .json_body import decode_json
from .offload import Progress
from .plans import chat_prompt, check_sizes, message_chars
from .runs import read_body
from .schemas import DetokenizeRequest, TokenizeRequest, parse_body


def _tokenize(progress: Progress, ctx: AppContext, raw: bytearray) -> dict[str, Any]:
    req = parse_body(TokenizeRequest, decode_json(raw))
    shapes = [k for k in ("content", "prompt", "messages") if getattr(req, k) is not None]
    if len(shapes) != 1:
        raise invalid("/tokenize takes exactly one of `content` (llama-server), `prompt` or `messages` (vLLM)",
                      shapes[1] if len(shapes) > 1 else "content")
    if req.content is not None:
        return _llama_server(progress, ctx, req)
    return _vllm(progress, ctx, req)


def _llama_server(progress: Progress, ctx: AppContext, req: TokenizeRequest) -> dict[str, Any]:
    progress.param = "content"
    check_sizes(ctx, [("content", len(req.content))], "content", prompt=False)
    tok = ctx.engine.tokenizer
    ids = tok.encode(req.content, add_special=req.add_special, parse_special=req.parse_special)
    if req.with_pieces:
        return {"tokens": [{"id": t, "piece": tok.token_piece(t)} for t in ids]}
    return {"tokens": ids}


def _vllm(progress: Progress, ctx: AppContext, req: TokenizeRequest) -> dict[str, Any]:
    tok = ctx.engine.tokenizer
    if req.prompt is not None:
        progress.param = "prompt"
        check_sizes(ctx, [("prompt", len(req.prompt))], "prompt", prompt=False)
        add = True if req.add_special_tokens is None else req.add_special_tokens
        ids = tok.encode(req.prompt, add_special=add, parse_special=True)
    else:  # the ids a chat request with these messages would prefill (template, BOS and all)
        check_sizes(ctx, [(f"messages[{i}].content", message_chars(m)) for i, m in enumerate(req.messages)],
                    "messages")
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        ids = chat_prompt(ctx, [m.to_template() for m in req.messages], tools, req.chat_template_kwargs,
                          req.add_generation_prompt, progress).token_ids
    strs = [tok.id_to_token(t) for t in ids] if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": ctx.engine.config.max_model_len, "tokens": ids, "token_strs": strs}


async def tokenize(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    return JSONResponse(await ctx.offload.run(_tokenize, ctx, await read_body(request, ctx)))


def _detokenize(progress: Progress, ctx: AppContext, raw: bytearray) -> dict[str, Any]:
    req = parse_body(DetokenizeRequest, decode_json(raw))
    progress.param = "tokens"
    bad = [t for t in req.tokens if not 0 <= t < ctx.vocab_size]
    if bad:
        raise invalid(f"token id {bad[0]} is outside the vocabulary (size {ctx.vocab_size})", "tokens")
    text = ctx.engine.tokenizer.decode(req.tokens)
    return {"content": text, "prompt": text}


async def detokenize(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    return JSONResponse(await ctx.offload.run(_detokenize, ctx, await read_body(request, ctx)))


async def tokenizer_info(request: Request) -> Response:
    """vLLM's GET /tokenizer_info: what a client needs to tokenize and template on its side."""
    ctx: AppContext = request.app.state.ctx
    eng = ctx.engine
    tok = eng.tokenizer

    def token(tid: int | None) -> str | None:
        return tok.id_to_token(tid) if tid is not None else None

    pad_id = tok.pad_id
    return JSONResponse({
        "tokenizer_class": "LlamatronGGUFTokenizer", "vocab_size": tok.vocab_size,
        "bos_token": token(tok.bos_id), "bos_token_id": tok.bos_id,
        "eos_token": token(tok.eos_id), "eos_token_id": tok.eos_id,
        "pad_token": token(pad_id), "pad_token_id": pad_id,
        "add_bos_token": tok.add_bos, "add_eos_token": tok.add_eos,
        "chat_template": eng.chat_template.source, "model_max_length": eng.config.max_model_len,
    })
