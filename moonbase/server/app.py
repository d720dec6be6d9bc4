"""The FastAPI application: Moondream's skill endpoints under /v1, SSE streaming the way the official
client parses it, and errors that are never HTTP 200.

Handlers are plain `def`s, so FastAPI runs each in its thread pool and concurrent requests meet in the
engine's batch."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import AdapterNotFoundError, ImageError, ModelNotFoundError, MoonbaseError, RequestTimeoutError, SettingsError
from ..finetune.registry import Registry
from ..image import DEFAULT_MAX_PIXELS
from .cancel import ClientGone, cancellable
from .chat import add_chat_route
from .gate import Gate, error_response, errors_as_json
from .images import decode_image_url
from .ops import add_ops_routes
from .registry import ModelRegistry
from .schemas import CaptionRequest, DetectRequest, PointRequest, QueryRequest, SkillRequest


@dataclass(frozen=True)
class ServerConfig:
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_remote_images: bool = False
    allow_file_images: bool = False
    api_key: str | None = None
    max_body_mb: float = 50.0
    max_in_flight: int = 256  # requests admitted at once; more get 429
    timeout_s: float | None = 600.0  # per request, then 504 (and the engine frees it)


def create_app(registry: ModelRegistry, cfg: ServerConfig = ServerConfig(), finetunes: Registry | None = None) -> Gate:
    """The ASGI application: the FastAPI routes behind the Gate (auth, body limit, admission, counters).
    With a finetune registry, the tuning API (/v1/tuning) trains adapters of the default model, and
    `model="<base>/<finetune_id>@<step>"` serves its checkpoints."""
    app = FastAPI(title="moonbase", description="Moondream vision-language models, served locally.")
    gate = Gate(app, cfg.api_key, int(cfg.max_body_mb * 2**20), cfg.max_in_flight)
    add_ops_routes(app, registry, gate)
    for vl in registry.models.values():
        vl.timeout = cfg.timeout_s

    @app.exception_handler(RequestValidationError)
    def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", "invalid_request_error")

    errors_as_json(
        app,
        {
            MoonbaseError: (400, "invalid_request_error"),
            ModelNotFoundError: (404, "not_found_error"),  # the most specific registered class wins
            RequestTimeoutError: (504, "timeout_error"),
        },
    )

    @app.exception_handler(ClientGone)
    def _gone(_: Request, exc: ClientGone) -> JSONResponse:
        return error_response(499, "the client closed the connection; the request was cancelled", "client_closed_request")

    def image_of(url: str | None):
        return None if url is None else decode_image_url(url, cfg.max_pixels, cfg.allow_remote_images, cfg.allow_file_images)

    def settings_of(body: SkillRequest, adapter: str | None) -> dict[str, Any]:
        s = body.merged_settings()
        return s | {"variant": adapter} if adapter else s

    add_chat_route(app, registry, image_of)
    if finetunes is not None:
        from ..finetune.service import TuningService
        from .tuning import add_tuning_routes

        base = registry.models[registry.default]
        add_tuning_routes(app, TuningService(base, finetunes, registry.default, image_of))

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(registry.models)}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "moonbase"} for name in registry.models]}

    @app.post("/v1/caption")
    async def caption(request: Request, body: CaptionRequest):
        sel, stats = registry.select(body.model, body.adapter()), {}

        def run():
            settings = settings_of(body, sel.adapter)
            return sel.vl.caption(image_of(body.image_url), body.length, stream=body.stream, settings=settings, stats=stats)

        out = await cancellable(request, sel.vl, run)
        return _answer("caption", out["caption"], body.stream, stats)

    @app.post("/v1/query")
    async def query(request: Request, body: QueryRequest):
        sel, stats = registry.select(body.model, body.adapter()), {}

        def run():
            image, settings = image_of(body.image_url), settings_of(body, sel.adapter)
            return sel.vl.query(
                image, body.question, body.stream, settings, body.reasoning, spatial_refs=body.spatial_refs, stats=stats
            )

        out = await cancellable(request, sel.vl, run)
        return _answer("answer", out["answer"], body.stream, stats, {"reasoning": out["reasoning"]} if "reasoning" in out else {})

    @app.post("/v1/detect")
    async def detect(request: Request, body: DetectRequest):
        sel, stats = registry.select(body.model, body.adapter()), {}

        def run():
            return sel.vl.detect(image_of(body.image_url), body.object, settings=settings_of(body, sel.adapter), stats=stats)

        out = await cancellable(request, sel.vl, run)
        return {**out, "request_id": _request_id(), "_stats": stats}

    @app.post("/v1/point")
    async def point(request: Request, body: PointRequest):
        sel, stats = registry.select(body.model, body.adapter()), {}

        def run():
            settings = settings_of(body, sel.adapter)
            return sel.vl.point(image_of(body.image_url), body.object, settings, spatial_refs=body.spatial_refs, stats=stats)

        out = await cancellable(request, sel.vl, run)
        return {**out, "count": len(out["points"]), "request_id": _request_id(), "_stats": stats}

    @app.post("/v1/segment")
    def segment(body: DetectRequest):
        registry.select(body.model, body.adapter())
        return error_response(501, "this model has no segmentation head (Moondream 2 does not segment)", "not_implemented_error")

    return gate


def _request_id() -> str:
    return uuid.uuid4().hex


def _answer(key: str, value: str | Iterator[str], stream: bool, stats: dict, extra: dict[str, Any] | None = None):
    """The response; `stats` (token counts and timings) is filled by the time the answer is complete."""
    rid = _request_id()
    if not stream:
        return {key: value, **(extra or {}), "request_id": rid, "_stats": stats}
    body = _sse(value, rid, stats, extra or {})
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(pieces: Iterator[str], rid: str, stats: dict, extra: dict[str, Any]) -> Iterator[str]:
    """`data: {"chunk": ...}` per piece, then a final `completed` event; a failure after the 200 header
    ends the stream with an error event (the status can no longer change)."""
    try:
        for piece in pieces:
            yield _event({"chunk": piece, "completed": False, "request_id": rid})
    except (SettingsError, ImageError, AdapterNotFoundError, RuntimeError, MemoryError) as e:
        yield _event({"chunk": "", "completed": True, "error": {"message": str(e), "type": type(e).__name__}, "request_id": rid})
        return
    yield _event({"chunk": "", "completed": True, "request_id": rid, **extra, "_stats": stats})


def _event(payload: dict[str, Any]) -> str:
    return "data: " + json.dumps(payload, separators=(",", ":")) + "\n\n"
