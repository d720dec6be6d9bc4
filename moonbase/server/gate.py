"""What every request passes before a handler sees it: the API key (when one is set, compared in
constant time), the body-size limit (413) and the bound on requests in flight (429 with Retry-After)."""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections import Counter

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response, exception_response

access_log = logging.getLogger("moonbase.access")


def route_path(scope: Scope) -> str:
    """The path the routes see: behind `--root-path` servers put the prefix in front of the request's path."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class Gate:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int, max_in_flight: int):
        self.app, self.api_key, self.max_body, self.max_in_flight = app, api_key, max_body, max_in_flight
        self.in_flight = 0
        self.responses: Counter[tuple[str, int]] = Counter()  # (path, status) -> count
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not route_path(scope).startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        started = [False]
        send = self._counted(scope, send, started)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and not self._authorized(headers):
            await _error(
                send, 401, "missing or wrong API key (X-Moondream-Auth or Authorization: Bearer)", "authentication_error"
            )
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _error(send, 413, f"request body over {self.max_body} bytes", "request_too_large")
            return
        with self._lock:
            if not (full := self.in_flight >= self.max_in_flight):
                self.in_flight += 1
        if full:
            await _error(send, 429, "the server is at capacity; retry shortly", "rate_limit_error", {"retry-after": "1"})
            return
        try:
            await self.app(scope, self._limited(receive), send)
        except _TooLarge:
            await _error(send, 413, f"request body over {self.max_body} bytes", "request_too_large")
        except Exception as e:  # the app's catch-all handler has answered with the JSON error, then re-raised it
            if not started[0]:
                await exception_response(e)(scope, _no_body, send)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _counted(self, scope: Scope, send: Send, started: list[bool]) -> Send:
        path, start = route_path(scope), time.perf_counter()
        client = (scope.get("client") or ("-", 0))[0]

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                started[0] = True
                with self._lock:
                    self.responses[(path, message["status"])] += 1
                ms = round((time.perf_counter() - start) * 1000, 1)
                record = {"method": scope["method"], "path": path, "status": message["status"], "ms": ms, "client": client}
                access_log.info(json.dumps(record))  # for a stream: time to the first byte
            await send(message)

        return wrapped

    def _authorized(self, headers: dict[str, str]) -> bool:
        given = headers.get("x-moondream-auth") or headers.get("authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:  # a chunked body with no Content-Length
                raise _TooLarge
            return message

        return wrapped


class _TooLarge(Exception):
    pass


async def _error(send: Send, status: int, message: str, kind: str, extra: dict[str, str] | None = None) -> None:
    await error_response(status, message, kind, extra)({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}
