"""What `Engine.submit` returns: a handle to stream, wait for or cancel one request, and its result."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .sequence import Sequence

if TYPE_CHECKING:
    from .engine import Engine

DONE = object()


@dataclass
class Result:
    skill: str
    run: Any = None  # TextRun: caption / query answer
    trace: Any = None  # TextRun: the reasoning trace
    objects: list | None = None  # detect / point
    stats: dict[str, Any] | None = None
    record: Any = None  # RolloutRecord of a rollout request


class Handle:
    """A submitted request: stream its tokens, wait for its result, or cancel it."""

    def __init__(self, engine: Engine, seq: Sequence):
        self._engine, self._seq = engine, seq
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._result: Result | None = None

    def tokens(self):
        """Answer token ids as they are generated (caption and query)."""
        while True:
            item = self._wait_event()
            if item is DONE:
                return
            yield item

    def result(self, timeout: float | None = None) -> Result:
        self._engine._drive(self._done, timeout)
        if not self._done.is_set():
            raise TimeoutError("request did not finish in time")
        if self._seq.error is not None:
            raise self._seq.error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        self._seq.cancelled = True
        self._engine._wake()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _wait_event(self):
        while True:
            try:
                return self._events.get(timeout=0.05 if self._engine.background else 0)
            except queue.Empty:
                if not self._engine.background and not self._engine.step() and self._events.empty():
                    raise RuntimeError("the engine has nothing to run but this request has not finished") from None


class CancelledError(RuntimeError):
    pass
