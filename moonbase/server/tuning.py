"""The tuning API under /v1/tuning, wire-compatible with the official client's `md.ft` (api-compat.md §9).
HTTP only: every route calls the `TuningService`; errors map through `server/errors.py` like every route's.
Handlers are plain `def`s (FastAPI runs them in its thread pool): rollouts go through the shared engine,
train steps run in the handler's thread.

Checkpoint downloads: `.../checkpoints/{step}/download` returns a short-lived URL outside /v1 that needs
no API key (the way the official stack hands out presigned URLs); it serves the `torch.save` file whose
`lora_state_dict` holds the adapter in the Moondream variant layout."""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

from fastapi import Body, FastAPI, Header, Request
from fastapi.responses import FileResponse

from ..errors import FinetuneNotFoundError, TuningError
from ..finetune.service import TuningService
from .errors import error_response

DOWNLOAD_TTL_S = 600


def add_tuning_routes(app: FastAPI, service: TuningService) -> None:
    links: dict[str, tuple[Any, float]] = {}  # download token -> (path, expiry)
    links_lock = threading.Lock()

    @app.post("/v1/tuning/finetunes")
    def create(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        return service.create(body.get("name"), body.get("rank"), body)

    @app.get("/v1/tuning/finetunes")
    def list_finetunes(limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
        return service.list(_limit(limit), cursor)

    @app.get("/v1/tuning/finetunes/{fid}")
    def get(fid: str) -> dict[str, Any]:
        return service.get(fid)

    @app.delete("/v1/tuning/finetunes/{fid}")
    def delete(fid: str) -> dict[str, Any]:
        service.delete(fid)
        return {"ok": True}

    @app.post("/v1/tuning/rollouts")
    def rollouts(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        return service.rollouts(body)

    @app.post("/v1/tuning/train_step")
    def train_step(body: dict[str, Any] = Body(...), idempotency_key: str | None = Header(None)) -> dict[str, Any]:
        return service.train_step(body, idempotency_key)

    @app.post("/v1/tuning/finetunes/{fid}/metrics")
    def log_metrics(fid: str, body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        return service.log_metrics(fid, body)

    @app.get("/v1/tuning/finetunes/{fid}/metrics")
    def metrics(fid: str) -> dict[str, Any]:
        service.store.get(fid)
        return {"finetune_id": fid, "metrics": service.store.metrics(fid)}

    @app.get("/v1/tuning/finetunes/{fid}/checkpoints")
    def checkpoints(fid: str, limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
        return service.list_checkpoints(fid, _limit(limit), cursor)

    @app.post("/v1/tuning/finetunes/{fid}/checkpoints/save")
    def save(fid: str) -> dict[str, Any]:  # the client sends no body and no Content-Type
        return service.save_checkpoint(fid)

    @app.delete("/v1/tuning/finetunes/{fid}/checkpoints/{step}")
    def delete_checkpoint(fid: str, step: int) -> dict[str, Any]:
        service.delete_checkpoint(fid, step)
        return {"ok": True}

    @app.get("/v1/tuning/finetunes/{fid}/checkpoints/{step}/download")
    def download(request: Request, fid: str, step: int) -> dict[str, Any]:
        path = service.store.checkpoint_path(fid, step)
        token, now = secrets.token_urlsafe(24), time.time()
        with links_lock:
            for t in [t for t, (_, expiry) in links.items() if expiry < now]:
                del links[t]
            links[token] = (path, now + DOWNLOAD_TTL_S)
        url = str(request.base_url).rstrip("/") + f"/tuning-files/{token}"
        return {"url": url, "expires_at_ms": int((now + DOWNLOAD_TTL_S) * 1000)}

    @app.get("/tuning-files/{token}")
    def file(token: str):
        with links_lock:
            path, expiry = links.get(token, (None, 0.0))
        if path is None or expiry < time.time():
            return error_response(403, "download link unknown or expired", "permission_error")
        if not path.is_file():
            raise FinetuneNotFoundError("that checkpoint was deleted")
        return FileResponse(path, media_type="application/octet-stream", filename=f"{path.parent.parent.name}-{path.stem}.pt")


def _limit(limit: int) -> int:
    if not 1 <= limit <= 100:
        raise TuningError(f"limit must be in 1..100, got {limit}")
    return limit
