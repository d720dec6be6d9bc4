"""The one error table of the server: every exception a request can end in, mapped to an HTTP status and
an error type, with the same JSON body on every route (`{"error": {"message", "type", "code"}}`) and the
same payload in the error event that ends a failed stream."""

from __future__ import annotations

import logging
from typing import Any

from starlette.responses import JSONResponse

from ..engine.handle import CancelledError
from ..errors import (
    CapacityError,
    FinetuneConflictError,
    IdempotencyKeyReusedError,
    ModelNotFoundError,
    MoonbaseError,
    RequestTimeoutError,
    SkillNotSupportedError,
)

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


# The first class an exception is an instance of wins: specific before general.
ERRORS: tuple[tuple[type[BaseException], int, str], ...] = (
    (FinetuneConflictError, 409, "conflict_error"),
    (IdempotencyKeyReusedError, 422, "idempotency_error"),
    (ModelNotFoundError, 404, "not_found_error"),  # models, adapters, finetunes, checkpoints
    (RequestTimeoutError, 504, "timeout_error"),
    (CapacityError, 413, "capacity_error"),  # cannot fit the KV pool even alone: not worth retrying as is
    (SkillNotSupportedError, 501, "not_implemented_error"),  # a skill this model's weights do not have
    (MoonbaseError, 400, "invalid_request_error"),
    (ClientGone, 499, "client_closed_request"),
    (CancelledError, 499, "client_closed_request"),
    (MemoryError, 503, "overloaded_error"),  # out of host memory: retrying later may work
)


def describe(exc: BaseException) -> tuple[int, str, str]:
    """(status, message, error type) for any exception; unexpected ones (a failed forward) are 500s."""
    for cls, status, kind in ERRORS:
        if isinstance(exc, cls):
            return status, str(exc) or cls.__name__, kind
    if type(exc).__name__ == "OutOfMemoryError":  # torch's CUDA OOM, a RuntimeError: transient
        return 503, f"the device ran out of memory: {exc}", "overloaded_error"
    log.error("request failed", exc_info=exc)
    return 500, f"the model failed on this request ({type(exc).__name__}: {exc})", "internal_error"


def error_body(exc: BaseException) -> dict[str, Any]:
    status, message, kind = describe(exc)
    return {"message": message, "type": kind, "code": status}


def error_response(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status, headers=headers)


def exception_response(exc: BaseException) -> JSONResponse:
    return error_response(*describe(exc))


def install(app: Any) -> None:
    """Every class of the table, and anything else, answers with its JSON error."""
    for cls in {cls for cls, _, _ in ERRORS} | {Exception}:
        app.add_exception_handler(cls, lambda _request, exc: exception_response(exc))
