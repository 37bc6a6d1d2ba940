"""The one table from domain errors to gRPC status codes, and how a call is failed with it.

The pipeline (service/pipeline.py) applies it to every call: domain errors get their status and their
message (cut to `MAX_MESSAGE` characters); anything unexpected gets INTERNAL with a generic message and
the request id (the traceback goes to the log, never to the caller).
"""

from __future__ import annotations

import contextvars
import logging

import grpc

from adapters.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    HeadserveError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger("headserve.errors")

STATUS: dict[type[HeadserveError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}
MAX_MESSAGE = 1000  # characters of a status message; gRPC clients refuse trailers past 8 KiB by default

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Stamps the current request id on every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def status_of(exc: HeadserveError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


def cut(message: str, limit: int = MAX_MESSAGE) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


def abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    """Fails the call with `exc`'s status (INTERNAL, logged with its traceback, if it is not ours)."""
    if isinstance(exc, HeadserveError):
        context.abort(status_of(exc), cut(exc.message))
    if isinstance(exc, grpc.RpcError):  # reading the request stream of a call the client has ended
        context.abort(grpc.StatusCode.CANCELLED, "the call ended before its request stream did")
    if isinstance(exc, NotImplementedError):  # generated servicer bases raise it for methods nobody wrote
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "this method is not implemented by this server")
    log.error("unexpected error", exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error; quote request id {request_id.get()} to the operator")
