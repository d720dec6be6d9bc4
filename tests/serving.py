"""A live uvicorn server in a background thread, for tests that talk HTTP to an in-process app."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from moonbase.server.run import free_port


@contextmanager
def serving(app, first_port: int) -> Iterator[str]:
    """Yields the base URL once the server accepts connections; stops it on exit."""
    port = free_port("127.0.0.1", first_port)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
