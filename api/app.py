"""create_app(engine, settings) -> Starlette: the routes table, middleware and shared context.

Unknown paths get a JSON 404, a known path with the wrong method a JSON 405 with an Allow
header. Until the engine has loaded its model, everything but /health, /metrics and /v1/models
answers 503 (Retry-After) instead of failing on a half-built engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import infill, messages, native, openai, responses, tokenizer_api
from .context import AppContext
from .embeddings import embeddings_native, embeddings_oai
from .errors import EXCEPTION_HANDLERS, APIError, loading
from .metrics import CONTENT_TYPE
from .middleware import edge_middleware
from .webui import is_webui_path, webui_routes

if TYPE_CHECKING:
    from engine.core.async_engine import AsyncEngine

    from .settings import ServerSettings


class _ReadyGate:
    """503 while the model loads (or the server drains), for every route that needs the engine."""

    OPEN = frozenset({"/health", "/v1/health", "/metrics", "/v1/models", "/models"})

    def __init__(self, app: ASGIApp, ctx: AppContext) -> None:
        self.app, self.ctx = app, ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN and scope["method"] != "OPTIONS" \
                and not is_webui_path(scope["path"]):  # the page shows the loading state itself
            try:
                self.ctx.check_admitting()
            except APIError as e:
                await e.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def health(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    if ctx.engine.load_error:
        return APIError(503, f"The model failed to load: {ctx.engine.load_error}", code="model_load_failed").response()
    if not ctx.ready:
        return loading().response()
    return JSONResponse({"status": "ok"})


def model_meta(engine: AsyncEngine) -> dict[str, Any]:
    """A loaded model's `meta` in /v1/models (the router shows its workers' the same way)."""
    mc = engine.model_config
    return {"arch": mc.arch, "format": mc.format, "n_vocab": mc.vocab_size, "n_ctx": engine.config.max_model_len,
            "n_ctx_train": mc.context_length, "n_embd": mc.hidden_size, "n_layers": mc.n_layers}


def _model_card(ctx: AppContext) -> dict[str, Any]:
    card: dict[str, Any] = {"id": ctx.model_id, "object": "model", "created": ctx.created, "owned_by": "llamatron"}
    if ctx.ready:
        card["meta"] = model_meta(ctx.engine)
    return card


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(request.app.state.ctx)]})


async def model(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    name = request.path_params["model"]
    if name not in ctx.model_names:
        raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found",
                       type="invalid_request_error")
    return JSONResponse(_model_card(ctx))


async def metrics(request: Request) -> Response:
    return Response(request.app.state.ctx.metrics.render(), media_type=CONTENT_TYPE)


ROUTES = [
    Route("/health", health, methods=["GET"]),
    Route("/v1/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/models", models, methods=["GET"]),
    Route("/v1/models/{model:path}", model, methods=["GET"]),
    Route("/v1/chat/completions", openai.chat_completions, methods=["POST"]),
    Route("/chat/completions", openai.chat_completions, methods=["POST"]),
    Route("/v1/completions", openai.completions, methods=["POST"]),
    Route("/completions", openai.completions, methods=["POST"]),
    Route("/completion", native.completion, methods=["POST"]),
    Route("/infill", infill.infill, methods=["POST"]),
    Route("/v1/messages", messages.messages, methods=["POST"]),
    Route("/v1/messages/count_tokens", messages.count_tokens, methods=["POST"]),
    Route("/v1/responses", responses.responses, methods=["POST"]),
    Route("/v1/responses/input_tokens", responses.input_tokens, methods=["POST"]),
    Route("/v1/embeddings", embeddings_oai, methods=["POST"]),
    Route("/embeddings", embeddings_native, methods=["POST"]),
    Route("/embedding", embeddings_native, methods=["POST"]),
    Route("/tokenize", tokenizer_api.tokenize, methods=["POST"]),
    Route("/detokenize", tokenizer_api.detokenize, methods=["POST"]),
    Route("/tokenizer_info", tokenizer_api.tokenizer_info, methods=["GET"]),
    Route("/apply-template", native.apply_template, methods=["POST"]),
    Route("/props", native.props, methods=["GET"]),
    Route("/slots", native.slots, methods=["GET"]),
]


def create_app(engine: AsyncEngine, settings: ServerSettings) -> Starlette:
    ctx = AppContext(engine, settings)
    middleware, ctx.auth_required = edge_middleware(settings)
    middleware.append(Middleware(_ReadyGate, ctx=ctx))
    routes = ROUTES + ([] if settings.no_webui else webui_routes())  # the chat page at /, api/webui/
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=EXCEPTION_HANDLERS)
    app.state.ctx = ctx
    return app
