"""The FastAPI application: Moondream's skill endpoints under /v1 (one route per registered skill), SSE
streaming the way the official client parses it, and errors that are never HTTP 200.

A skill route is a straight line: the body is parsed into a `SkillRequest` (`skills.parse_request`), the
selected model's `VL.run` prepares it with its skill, the engine runs it, the skill renders the result.
Model calls run in the thread pool (`cancellable`), so concurrent requests meet in the engine's batch and
a client that goes away cancels its request."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from .. import skills
from ..errors import SettingsError
from ..finetune.store import FinetuneStore
from ..image import DEFAULT_MAX_PIXELS
from ..skills import Skill
from . import errors
from .cancel import cancellable
from .chat import add_chat_route
from .gate import Gate
from .images import decode_image_url
from .models import Selection, ServedModels, checked_adapter
from .ops import add_ops_routes
from .page import add_page_routes


@dataclass(frozen=True)
class ServerConfig:
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_remote_images: bool = False
    allow_file_images: bool = False
    allow_adapter_paths: Path | None = None  # requests may load adapter files from inside this directory only
    api_key: str | None = None
    max_body_mb: float = 50.0
    max_in_flight: int = 256  # requests admitted at once; more get 429
    timeout_s: float | None = 600.0  # per request, then 504 (and the engine frees it)


def create_app(served: ServedModels, cfg: ServerConfig = ServerConfig(), finetunes: FinetuneStore | None = None) -> Gate:
    """The ASGI application: the FastAPI routes behind the Gate (auth, body limit, admission, counters).
    With a finetune store, the tuning API (/v1/tuning) trains adapters of the default model, and
    `model="<base>/<finetune_id>@<step>"` serves its checkpoints."""
    app = FastAPI(title="moonbase", description="Moondream vision-language models, served locally.")
    gate = Gate(app, cfg.api_key, int(cfg.max_body_mb * 2**20), cfg.max_in_flight)
    add_ops_routes(app, served, gate)
    errors.install(app)

    @app.exception_handler(RequestValidationError)
    def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return errors.error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", "invalid_request_error")

    def image_of(url: str):
        return decode_image_url(url, cfg.max_pixels, cfg.allow_remote_images, cfg.allow_file_images)

    def select(model: Any, variant: str | None = None) -> Selection:
        sel = served.select(model, variant)
        return dataclasses.replace(sel, adapter=checked_adapter(sel, finetunes is not None, cfg.allow_adapter_paths))

    add_chat_route(app, select, image_of, cfg.timeout_s)
    if finetunes is not None:
        from ..finetune.service import TuningService
        from .tuning import add_tuning_routes

        base = served.models[served.default]
        add_tuning_routes(app, TuningService(base, finetunes, served.default, image_of, timeout=cfg.timeout_s))

    add_page_routes(app)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(served.models)}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        data = [
            {
                "id": name,
                "object": "model",
                "owned_by": "moonbase",
                "skills": [n for n, k in skills.REGISTRY.items() if k.supports(vl.model.cfg)],
            }
            for name, vl in served.models.items()
        ]
        return {"object": "list", "data": data}

    for skill in skills.REGISTRY.values():
        app.post(f"/v1/{skill.name}")(_skill_route(skill, select, image_of, cfg.timeout_s))

    return gate


def _skill_route(skill: Skill, select: Callable[..., Selection], image_of: Callable[[str], Any], timeout: float | None):
    async def route(request: Request, body: dict[str, Any] = Body(...)):
        sel, stats = select(body.get("model"), _variant(body)), {}
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise SettingsError("stream must be a boolean")

        streams_events = stream and skill.event_stream(sel.vl.model.tokenizer) is not None

        def run() -> dict[str, Any] | Iterator[dict[str, Any]]:
            req = skills.parse_request(body, image_of, skill.name, where="body")
            if sel.adapter is not None:
                req = dataclasses.replace(req, settings=req.settings_dict | {"variant": sel.adapter})
            if streams_events:  # validated and submitted here, so bad input still gets its 4xx
                return sel.vl.events(req, stats, timeout)
            return sel.vl.run(req, stream and skill.text_key is not None, stats, timeout)

        out = await cancellable(request, sel.vl, run)
        rid = uuid.uuid4().hex
        if streams_events:
            return StreamingResponse(_typed_sse(out, rid), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        if not (stream and skill.text_key):
            count = {"count": len(out["points"])} if "points" in out else {}  # Station adds it; the client ignores it
            return out | count | {"request_id": rid, "_stats": stats}
        events = _sse(out.pop(skill.text_key), rid, stats, out)  # `out`: what the last event carries besides the text
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    route.__name__ = skill.name
    return route


def _variant(body: dict[str, Any]) -> str | None:
    """The adapter a request names: `variant` (0.1.x clients), or `settings.variant`."""
    settings = body.get("settings")
    variant = body.get("variant") or (settings.get("variant") if isinstance(settings, dict) else None)
    if variant is not None and not isinstance(variant, str):
        raise SettingsError("variant must be a string")
    return variant


def _sse(pieces: Iterator[str], rid: str, stats: dict, extra: dict[str, Any]) -> Iterator[str]:
    """`data: {"chunk": ...}` per piece, then a final `completed` event; a failure after the 200 header
    ends the stream with an error event (the status can no longer change) carrying the error body a
    non-streaming request would have got."""
    try:
        for piece in pieces:
            yield _event({"chunk": piece, "completed": False, "request_id": rid})
    except Exception as e:
        yield _event({"chunk": "", "completed": True, "error": errors.error_body(e), "request_id": rid})
        return
    yield _event({"chunk": "", "completed": True, "request_id": rid, **extra, "_stats": stats})


def _typed_sse(events: Iterator[dict[str, Any]], rid: str) -> Iterator[str]:
    """Typed events (segment's), each with the request id; a failure after the 200 header ends the stream with an
    `error` event carrying the error body a non-streaming request would have got."""
    try:
        for e in events:
            yield _event({**e, "request_id": rid})
    except Exception as e:
        yield _event({"type": "error", "completed": True, "error": errors.error_body(e), "request_id": rid})


def _event(payload: dict[str, Any]) -> str:
    return "data: " + json.dumps(payload, separators=(",", ":")) + "\n\n"
