"""The playground page (`GET /`): plain HTML, CSS and JavaScript shipped with the package, no build step and
nothing fetched from elsewhere. It calls the same `/v1` routes as any client, by relative URLs, so it works
behind a reverse proxy's path prefix. Element ids the tests and users' automation rely on are listed in
docs/playground.md; keep them."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse

PAGE = Path(__file__).parent
ASSETS = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}
NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate: a new moonbase version ships a new page


def add_page_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(PAGE / "index.html", headers=NO_CACHE)

    @app.get("/page/{name}", include_in_schema=False)
    def asset(name: str) -> FileResponse:
        if name not in ASSETS:  # only the page's own files: never a path the request chose
            raise HTTPException(404, "no such file")
        return FileResponse(PAGE / name, media_type=ASSETS[name], headers=NO_CACHE)
