"""Embeddings: OpenAI's POST /v1/embeddings and llama-server's /embedding and /embeddings.

Each input becomes one prefill-only engine request (engine/core/pooling.py), batched with whatever
else runs; the engine answers plain lists of floats (pooled hidden states of the last layer after
the final norm, normalised as llama-server's `embd_normalize` says, default euclidean). Off unless
the server runs with `--embeddings` or serves an encoder (a BERT embedding model, which does
nothing else): the endpoints then answer 400 `not_supported_error` with llama-server's message
(llama-server itself answers 501).

- /v1/embeddings: `input` (string, list of strings, token ids, list of token-id lists),
  `encoding_format` float | base64 (little-endian float32), `dimensions` (the first n components,
  renormalised), `usage.prompt_tokens`. Pooling `none` has no OpenAI shape: a 400, as in llama-server.
- /embedding, /embeddings: llama-server's shape, `[{"index": i, "embedding": [[...], ...]}]`, one
  row when pooled or one per token for pooling `none` (rows not normalised); `content` or `input`.

An input longer than the context is a 400 naming it (`input[i]`), before any work is queued.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .errors import APIError, invalid
from .json_body import decode_json
from .offload import Progress
from .plans import check_model, check_sizes
from .runs import ClientGone, engine_error, read_body, until_disconnect
from .schemas import parse_body

if TYPE_CHECKING:
    from engine.core.async_engine import RequestStream
    from engine.core.outputs import RequestOutput
    from engine.core.pooling import PoolingParams

    from .context import AppContext

MAX_INPUTS = 2048  # OpenAI's limit on the items of one request
NOT_ENABLED = "This server does not support embeddings. Start it with `--embeddings`"


def _is_ids(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # as every body in api/schemas.py

    model: str | None = None
    input: Any = None
    content: Any = None  # llama-server's name for `input`
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    embd_normalize: int = Field(2, ge=-1)  # llama-server: -1 none, 0 max-abs int16, 1 taxicab, 2 euclidean, p
    user: str | None = None

    @field_validator("input", "content", mode="before")
    @classmethod
    def _inputs(cls, v: Any) -> list[str | list[int]] | None:
        """Normalise to a list of inputs, each a string or a list of token ids."""
        if v is None:
            return None
        if isinstance(v, str):
            return [v]
        if not isinstance(v, list) or not v:
            raise ValueError("must be a string, a list of strings, a list of token ids or a list of such lists"
                             if not isinstance(v, list) else "must not be empty")
        if _is_ids(v):
            return [list(v)]
        if len(v) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs are accepted, got {len(v)}")
        for i, item in enumerate(v):
            if not (isinstance(item, str) or (_is_ids(item) and item)):
                raise ValueError(f"item {i} must be a string or a non-empty list of token ids")
        return [x if isinstance(x, str) else list(x) for x in v]


@dataclass
class EmbeddingPlan:
    req: EmbeddingRequest
    inputs: list[list[int]]  # token ids per input
    pooling: PoolingParams

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.inputs)


def prepare_embeddings(progress: Progress, ctx: AppContext, raw: bytearray, oai: bool) -> EmbeddingPlan:
    """A request body -> token ids per input and the pooling, all checked (runs off the event loop)."""
    from engine.core.pooling import PoolingParams

    req = parse_body(EmbeddingRequest, decode_json(raw))
    check_model(ctx, req.model)
    items = req.input if req.input is not None else req.content
    if items is None:
        raise invalid("'input' is required" if oai else '"input" or "content" must be provided', "input")
    progress.param = "input"
    check_sizes(ctx, [(f"input[{i}]", len(x)) for i, x in enumerate(items) if isinstance(x, str)], "input")
    hidden = ctx.engine.model_config.hidden_size
    if req.dimensions is not None and req.dimensions > hidden:
        raise invalid(f"dimensions must be at most {hidden} for this model, got {req.dimensions}", "dimensions")
    tok, n_ctx, vocab = ctx.engine.tokenizer, ctx.engine.config.max_model_len, ctx.vocab_size
    inputs = []
    for i, x in enumerate(items):
        if isinstance(x, str):
            ids = tok.encode(x, add_special=True, parse_special=True)
        else:
            if any(not 0 <= t < vocab for t in x):
                raise invalid(f"input[{i}]: token ids must be in [0, {vocab})", f"input[{i}]")
            ids = x
        if not ids:
            raise invalid(f"input[{i}] is empty: an input needs at least one token", f"input[{i}]")
        if len(ids) > n_ctx:
            raise APIError(400, f"input[{i}] has {len(ids)} tokens, more than this model's maximum context length "
                           f"of {n_ctx} tokens; shorten it or split it.", param=f"input[{i}]",
                           code="context_length_exceeded", extra={"n_prompt_tokens": len(ids), "n_ctx": n_ctx})
        inputs.append(ids)
    pooling = PoolingParams(ctx.engine.default_pooling, normalize=req.embd_normalize, dimensions=req.dimensions)
    return EmbeddingPlan(req, inputs, pooling)


# ---- running -------------------------------------------------------------------------------------

async def _answer(stream: RequestStream) -> RequestOutput:
    last = None
    try:
        async for out in stream:
            last = out
    except (APIError, asyncio.CancelledError):
        raise
    except Exception as e:  # noqa: BLE001 - what the engine thread sent back (dead engine, bad input)
        raise engine_error(e, "input") from None
    if last is None or last.finish_reason == "abort":
        raise APIError(503, "The request was aborted (server shutting down).", code="aborted")
    if last.finish_reason == "error" or last.embedding is None:
        raise APIError(500, f"Embedding failed: {last.error}", code="embedding_error")
    return last


async def embed(request: Request, ctx: AppContext, plan: EmbeddingPlan) -> list[list[list[float]]]:
    """Queues every input (a context or overload error is raised before any is computed), then waits
    for all; a client that goes away aborts the unfinished ones (their blocks freed)."""
    arrival, base = time.monotonic(), uuid.uuid4().hex[:24]
    streams: list[RequestStream] = []
    outcome = "abort"
    try:
        try:
            for i, ids in enumerate(plan.inputs):
                streams.append(ctx.engine.submit_embedding(ids, plan.pooling, f"emb-{base}-{i}", base))
        except BaseException as e:
            outcome = "error"
            raise engine_error(e, "input") from None
        tasks = [asyncio.ensure_future(_answer(s)) for s in streams]

        async def gather() -> list[RequestOutput]:
            try:
                return await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()

        try:
            outs = await until_disconnect(request, gather())
        except ClientGone:
            raise
        except APIError as e:
            outcome = "abort" if e.status == 503 else "error"
            raise
        outcome = "ok"
        return [o.embedding for o in outs]
    finally:
        for s in streams:
            s.close()  # aborts what did not finish
        ctx.metrics.observe_embeddings(len(plan.inputs), plan.prompt_tokens, outcome, time.monotonic() - arrival)


def _encode(vec: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
    return vec


async def _prepared(request: Request, oai: bool) -> tuple[AppContext, EmbeddingPlan]:
    ctx: AppContext = request.app.state.ctx
    ctx.check_admitting()
    if not (ctx.settings.embeddings or ctx.engine.model_config.encoder):  # an encoder only embeds
        # llama-server answers 501; asking a server for what it was not started with is the client's
        # mistake here (no 5xx for those): 400, the type still says what is missing
        raise APIError(400, NOT_ENABLED, code="not_supported", type="not_supported_error")
    if oai and ctx.engine.default_pooling == "none":
        raise invalid("Pooling type 'none' is not OAI compatible. Please use a different pooling type")
    return ctx, await ctx.offload.run(prepare_embeddings, ctx, await read_body(request, ctx), oai)


def _oai_body(progress: Progress, ctx: AppContext, plan: EmbeddingPlan, vectors: list) -> bytes:
    fmt, n = plan.req.encoding_format, plan.prompt_tokens
    return JSONResponse({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _encode(v[0], fmt)} for i, v in enumerate(vectors)],
        "model": ctx.model_id,
        "usage": {"prompt_tokens": n, "total_tokens": n},
    }).body


def _native_body(progress: Progress, ctx: AppContext, plan: EmbeddingPlan, vectors: list) -> bytes:
    return JSONResponse([{"index": i, "embedding": v} for i, v in enumerate(vectors)]).body


async def _serve(request: Request, oai: bool) -> Response:
    """Prepare, embed, then encode and render the answer off the event loop (up to 2048 vectors,
    or a row per token with pooling none: megabytes of floats)."""
    ctx, plan = await _prepared(request, oai)
    try:
        vectors = await embed(request, ctx, plan)
    except ClientGone:
        return Response(status_code=499)
    body = await ctx.offload.run(_oai_body if oai else _native_body, ctx, plan, vectors)
    return Response(body, media_type="application/json")


async def embeddings_oai(request: Request) -> Response:
    """POST /v1/embeddings in OpenAI's shape."""
    return await _serve(request, oai=True)


async def embeddings_native(request: Request) -> Response:
    """POST /embedding and /embeddings in llama-server's shape."""
    return await _serve(request, oai=False)
