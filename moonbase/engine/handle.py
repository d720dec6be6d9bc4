"""What `Engine.submit` returns: a handle to stream, wait for or cancel one request, and its result. The
engine reports to the handle through `emit` and `finish`; the handle reaches the engine only through the
`Stepper` protocol (no import of the engine module)."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import RequestTimeoutError
from ..skills.program import Output
from .sequence import RolloutRecord, Sequence

_DONE = object()


class CancelledError(RuntimeError):
    """The request was cancelled before it finished (its caller went away, or its deadline passed)."""


@dataclass(frozen=True)
class Result:
    output: Output
    stats: dict[str, Any]
    record: RolloutRecord | None = None  # what a rollout sampled


class Stepper(Protocol):
    """The engine as a handle sees it."""

    background: bool  # a thread steps the engine; else the waiting caller steps it

    def step(self) -> bool: ...
    def wake(self) -> None: ...


class Handle:
    """A submitted request: stream its tokens, wait for its result, or cancel it."""

    def __init__(self, engine: Stepper, seq: Sequence):
        self._engine, self._seq = engine, seq
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._result: Result | None = None
        self._error: Exception | None = None

    # --- the caller's side --------------------------------------------------------------------------

    def tokens(self, deadline: float | None = None):
        """Answer token ids as they are generated (text skills); RequestTimeoutError once `deadline`
        (`time.perf_counter()` seconds) passes."""
        while (item := self._next_event(deadline)) is not _DONE:
            yield item

    def result(self, timeout: float | None = None) -> Result:
        """Wait for the result; TimeoutError after `timeout` seconds (the request keeps running: cancel it)."""
        if self._engine.background:
            self._done.wait(timeout)
        else:
            deadline = None if timeout is None else time.perf_counter() + timeout
            while not self._done.is_set() and (deadline is None or time.perf_counter() < deadline) and self._engine.step():
                pass
        if not self._done.is_set():
            raise TimeoutError("request did not finish in time")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        self._seq.cancelled = True
        self._engine.wake()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # --- the engine's side --------------------------------------------------------------------------

    def emit(self, token: int) -> None:
        self._events.put(token)

    def finish(self, result: Result | None, error: Exception | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()
        self._events.put(_DONE)

    def _next_event(self, deadline: float | None) -> Any:
        while True:
            try:
                return self._events.get(timeout=0.05 if self._engine.background else 0)
            except queue.Empty:
                if deadline is not None and time.perf_counter() > deadline:
                    raise RequestTimeoutError("the request did not finish in time; it was cancelled") from None
                if not self._engine.background and not self._engine.step() and self._events.empty():
                    raise RuntimeError("the engine has nothing to run but this request has not finished") from None
