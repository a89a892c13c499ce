"""The router's routes: its own (health, the model list, load/unload, metrics, props) and the
model endpoints, each forwarded to the worker of the model the request names.

POST endpoints name their model in the JSON body's `model` field (else `?model=`); GET endpoints
with `?model=`. A request for an unloaded model loads it (unless --no-models-autoload, or
`?autoload=false`) and waits for it, bounded; GETs never count as use for the LRU order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..context import BUILD_INFO
from ..errors import APIError
from ..metrics import CONTENT_TYPE
from ..offload import Offloader, Progress
from ..runs import read_json_body
from ..settings import ServerSettings
from .manager import Lease, ManagedModel, ModelManager, Status, load_failed_error
from .metrics import RouterMetrics
from .proxy import forward
from .select import body_model, pick

# the model endpoints of api/app.py, by method
POST_PATHS = ("/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions", "/completion",
              "/infill", "/v1/messages", "/v1/messages/count_tokens", "/v1/responses", "/v1/responses/input_tokens",
              "/v1/embeddings", "/embeddings", "/embedding", "/tokenize", "/detokenize", "/apply-template")
GET_PATHS = ("/slots", "/tokenizer_info")
DEFAULT_BODY_MB = 64  # the worker applies its model's own, tighter limit


@dataclass
class RouterContext:
    """What the router's handlers share; lives on app.state.router."""

    manager: ModelManager
    settings: ServerSettings
    metrics: RouterMetrics
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    offload: Offloader = field(default_factory=lambda: Offloader(budget_s=10.0))  # body scans off the loop

    @property
    def body_limit(self) -> int:
        return int((self.settings.max_body_mb or DEFAULT_BODY_MB) * 2**20)

    def check_admitting(self) -> None:
        if self.draining:
            raise APIError(503, "The server is shutting down.", code="shutting_down", headers={"Retry-After": "5"})

    def autoload(self, request: Request) -> bool:
        value = request.query_params.get("autoload")
        if value is None:
            return self.settings.models_autoload
        return value.strip().lower() in ("1", "true", "yes", "on")


def _ctx(request: Request) -> RouterContext:
    return request.app.state.router


def _named_model(progress: Progress, raw: bytearray) -> str | None:
    progress.param = "model"
    return body_model(raw)


async def _body_and_model(request: Request, ctx: RouterContext, limit: int) -> tuple[bytearray, str | None]:
    """The request's body (size and arrival bounded) and the model it names, found off the event
    loop (a scan of up to the whole body; a decode when it names none)."""
    body = await read_json_body(request, limit, ctx.settings.body_timeout_s)
    return body, await ctx.offload.run(_named_model, body)


class Forwarded(Response):
    """The worker's answer, relayed as it comes (api/router/proxy.py)."""

    def __init__(self, lease: Lease, body: bytes) -> None:
        self.lease, self.body_bytes = lease, body
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await forward(scope, receive, send, self.lease, self.body_bytes)


async def forward_post(request: Request) -> Response:
    ctx = _ctx(request)
    ctx.check_admitting()
    body, name = await _body_and_model(request, ctx, ctx.body_limit)
    m = pick(ctx.manager, name or request.query_params.get("model"))
    lease = await ctx.manager.acquire(m, autoload=ctx.autoload(request))
    return Forwarded(lease, bytes(body))


async def forward_get(request: Request) -> Response:
    ctx = _ctx(request)
    ctx.check_admitting()
    m = pick(ctx.manager, request.query_params.get("model"))
    lease = await ctx.manager.acquire(m, autoload=ctx.autoload(request), touch=False)
    return Forwarded(lease, b"")


# ---- the router's own ----------------------------------------------------------------------------

def model_card(ctx: RouterContext, m: ManagedModel) -> dict[str, Any]:
    """llama-server's router shape (`status.value`, `aliases`, `meta`) plus size, path and format."""
    info, spec = m.spec.info, m.spec
    status: dict[str, Any] = {"value": m.status.value}
    if m.status is Status.FAILED:
        status |= {"failed": True, "error": m.error}
    card: dict[str, Any] = {"id": m.id, "object": "model", "created": ctx.created, "owned_by": "llamatron",
                            "aliases": spec.aliases, "status": status, "source": spec.source, "path": str(spec.path),
                            "format": info.format if info else None, "size": info.size if info else None,
                            "in_flight": m.in_flight, "waiting": m.waiting}
    configured = int(spec.overrides.get("ctx_size", ctx.settings.ctx_size) or 0)
    meta: dict[str, Any] = {}
    if info is not None:
        n_ctx = configured or info.n_ctx_train
        meta = {"vocab_type": info.vocab_type, "n_vocab": info.n_vocab, "n_ctx": n_ctx, "n_ctx_train": info.n_ctx_train,
                "n_embd": info.n_embd, "n_params": info.n_params, "size": info.tensor_bytes, "ftype": info.ftype,
                "arch": info.arch, "n_layers": info.n_layers}
    if m.status is Status.LOADED and m.process is not None:
        meta |= {k: v for k, v in m.info.items() if k.startswith("n_") or k in ("arch", "format")}
        card |= {"pid": m.process.pid, "device": m.info.get("device"), "load_seconds": round(m.load_seconds, 3),
                 "kv_capacity_tokens": m.info.get("kv_capacity_tokens"), "memory_rss_bytes": m.process.rss_bytes()}
    if meta:
        card["meta"] = meta
        card["context_length"] = meta["n_ctx"]
    return card


async def models(request: Request) -> Response:
    ctx = _ctx(request)
    return JSONResponse({"object": "list", "data": [model_card(ctx, m) for m in ctx.manager.models.values()]})


async def model(request: Request) -> Response:
    ctx = _ctx(request)
    name = request.path_params["model"]
    m = ctx.manager.lookup(name)
    if m is None:
        pick(ctx.manager, name)  # raises the 404 with the known models
    return JSONResponse(model_card(ctx, m))


async def _admin_target(request: Request) -> tuple[RouterContext, ManagedModel]:
    ctx = _ctx(request)
    ctx.check_admitting()
    _, name = await _body_and_model(request, ctx, 2**20)
    if not name:
        raise APIError(400, "Name the model in the body: {\"model\": \"...\"}.", param="model", code="model_required")
    return ctx, pick(ctx.manager, name)


async def load_model(request: Request) -> Response:
    """POST /models/load: loads the model (a failed one is tried again) and answers once it serves."""
    ctx, m = await _admin_target(request)
    await ctx.manager.load(m)
    return JSONResponse({"success": True, "model": m.id, "status": {"value": m.status.value},
                         "load_seconds": round(m.load_seconds, 3)})


async def unload_model(request: Request) -> Response:
    """POST /models/unload: answers once the model's worker is gone (its in-flight requests finish
    first, for up to the grace period)."""
    ctx, m = await _admin_target(request)
    await ctx.manager.unload(m, "admin")
    return JSONResponse({"success": True, "model": m.id, "status": {"value": m.status.value}})


async def health(request: Request) -> Response:
    """200 while the router serves, whatever its models are doing; `?model=` asks about one."""
    ctx = _ctx(request)
    ctx.check_admitting()
    name = request.query_params.get("model")
    if name is None:
        return JSONResponse({"status": "ok"})
    m = pick(ctx.manager, name)
    if m.status is Status.LOADED:
        return JSONResponse({"status": "ok", "model": m.id})
    if m.status is Status.FAILED:
        raise load_failed_error(m)
    if m.status is Status.LOADING:
        raise APIError(503, "Loading model", code="model_loading", headers={"Retry-After": "1"})
    raise APIError(503, f"The model '{m.id}' is not loaded.", code="model_not_loaded")


async def metrics(request: Request) -> Response:
    ctx = _ctx(request)
    name = request.query_params.get("model")
    only = pick(ctx.manager, name) if name else None
    return Response(await ctx.metrics.render(ctx.manager, only), media_type=CONTENT_TYPE)


async def props(request: Request) -> Response:
    """The router's own properties (llama-server's router shape), or with `?model=` that model's."""
    ctx = _ctx(request)
    if request.query_params.get("model"):
        return await forward_get(request)
    s = ctx.settings
    return JSONResponse({"role": "router", "max_instances": s.models_max, "models_autoload": s.models_autoload,
                         "model_alias": "llamatron", "model_path": "none", "build_info": BUILD_INFO,
                         "default_generation_settings": {"params": {}, "n_ctx": 0},
                         "models": [m.id for m in ctx.manager.models.values()]})


ROUTES = [
    Route("/health", health, methods=["GET"]),
    Route("/v1/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/models", models, methods=["GET"]),
    Route("/v1/models/{model:path}", model, methods=["GET"]),
    Route("/models/load", load_model, methods=["POST"]),
    Route("/models/unload", unload_model, methods=["POST"]),
    Route("/props", props, methods=["GET"]),
    *[Route(p, forward_post, methods=["POST"]) for p in POST_PATHS],
    *[Route(p, forward_get, methods=["GET"]) for p in GET_PATHS],
]
