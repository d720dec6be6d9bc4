"""Start the server: pick the port (2020, or the next free one when the port was not given), serve with
uvicorn, drain in-flight requests on shutdown. Or serve an app from a background thread (tests, benchmarks)."""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from ..api import VL
from .app import ServerConfig, create_app
from .gate import access_log
from .models import ServedModels

DEFAULT_PORT = 2020


def free_port(host: str, start: int, tries: int = 50) -> int:
    for port in range(start, start + tries):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in {start}..{start + tries - 1}")


@contextmanager
def serving(app, first_port: int, host: str = "127.0.0.1") -> Iterator[str]:
    """`app` served from a background thread on the first free port from `first_port`: yields the base URL once
    the server accepts connections, and stops it on exit."""
    port = free_port(host, first_port)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name="moonbase-serving")
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def serve(
    vl: VL,
    name: str,
    host: str = "127.0.0.1",
    port: int | None = None,
    cfg: ServerConfig = ServerConfig(),
    finetunes=None,
    root_path: str = "",
) -> None:
    """`root_path`: the path prefix a reverse proxy serves the app under (and strips before forwarding)."""
    chosen = port if port is not None else free_port(host, DEFAULT_PORT)
    if port is None and chosen != DEFAULT_PORT:
        print(f"port {DEFAULT_PORT} is busy; using {chosen}", file=sys.stderr)
    app = create_app(ServedModels({name: vl}, name), cfg, finetunes)
    print(f"moonbase serving {name} on http://{host}:{chosen}/v1 (playground: http://{host}:{chosen}/)", file=sys.stderr)
    print(f"engine: {json.dumps(vl.engine.effective_config)}", file=sys.stderr)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s access %(message)s"))
    access_log.addHandler(handler)  # one JSON line per request
    access_log.setLevel(logging.INFO)
    access_log.propagate = False
    uvicorn.run(
        app, host=host, port=chosen, root_path=root_path, log_level="info", access_log=False, timeout_graceful_shutdown=30
    )
