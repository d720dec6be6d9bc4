"""Blocking model calls from async handlers, cancelled in the engine when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ..api import VL, CancelScope
from .errors import ClientGone

T = TypeVar("T")


async def cancellable(request: Request, vl: VL, fn: Callable[[], T]) -> T:
    """Run a blocking model call in the thread pool; if the client goes away first, cancel the engine
    requests it submitted, so their sequences are freed at the next step."""
    scope = CancelScope()

    def call() -> T:
        with vl.cancel_scope(scope):
            return fn()

    task = asyncio.ensure_future(run_in_threadpool(call))
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.2)
        if done:
            return task.result()
        if await request.is_disconnected():
            scope.cancel()
            with contextlib.suppress(Exception):
                await task
            raise ClientGone
