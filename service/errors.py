"""The one table from domain errors to gRPC status codes, and how a call is failed with it.

The pipeline (service/pipeline.py) applies it to every call: domain errors get their status and their
message (cut to `MAX_MESSAGE` characters and `MAX_MESSAGE_WIRE_BYTES` bytes as sent); anything unexpected
gets INTERNAL with a generic message and the request id (the traceback goes to the log, never to the caller).
A store that cannot be reached (PostgreSQL restarting or failing over, a connection dropped, the pool
exhausted) is UNAVAILABLE, which clients retry, whatever call met it.
"""

from __future__ import annotations

import contextvars
import logging
import time

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
from service.store import store_outage

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
MAX_MESSAGE_WIRE_BYTES = 3000  # ... and its bytes as sent (percent-encoded UTF-8), well within those 8 KiB

# Who and what a log line is about. The pipeline sets the first three per call (service/pipeline.py); they
# cross into the training threads with the job's context (service/jobs.py), where `job` is set too; a
# batch's log lines name the request ids and tenants of the batch (service/batcher.py).
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="-")
task: contextvars.ContextVar[str] = contextvars.ContextVar("task", default="-")
job: contextvars.ContextVar[str] = contextvars.ContextVar("job", default="-")
LOG_CONTEXT = (("request_id", request_id), ("tenant", tenant), ("task", task), ("job", job))


class RequestIdFilter(logging.Filter):
    """Stamps the current request id, tenant, task and job on every log record ("-" where none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in LOG_CONTEXT:
            setattr(record, name, var.get())
        return True


STORE_UNAVAILABLE = ("the server's store is not answering right now ({kind}); retry with backoff. A write that "
                     "failed this way may or may not have been applied: read it back (GetTask) before "
                     "repeating it; request id {request_id}")
_outage_logged = [0.0]


def status_of(exc: HeadserveError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


def wire_size(text: str) -> int:
    """Bytes `text` takes as a grpc-message trailer: UTF-8, percent-encoded outside printable ASCII (and
    '%' itself), so a non-ASCII character costs 6 to 12 bytes."""
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in text.encode("utf-8", "surrogatepass"))


def cut(message: str, limit: int = MAX_MESSAGE, wire_limit: int = MAX_MESSAGE_WIRE_BYTES) -> str:
    """At most `limit` characters and `wire_limit` bytes on the wire (see wire_size), with an ellipsis
    where it was cut: 1000 characters of emoji would be 12 KB of trailer."""
    if len(message) > limit:
        message = message[: limit - 3] + "..."
    if len(message) * 12 <= wire_limit or wire_size(message) <= wire_limit:
        return message
    size, end = 3, 0  # the ellipsis
    for i, ch in enumerate(message):
        size += wire_size(ch)
        if size > wire_limit:
            break
        end = i + 1
    return message[:end] + "..."


def abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    """Fails the call with `exc`'s status (INTERNAL, logged with its traceback, if it is not ours)."""
    if isinstance(exc, HeadserveError):
        context.abort(status_of(exc), cut(exc.message))
    if isinstance(exc, grpc.RpcError):  # reading the request stream of a call the client has ended
        context.abort(grpc.StatusCode.CANCELLED, "the call ended before its request stream did")
    if isinstance(exc, NotImplementedError):  # generated servicer bases raise it for methods nobody wrote
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "this method is not implemented by this server")
    if store_outage(exc):
        now = time.monotonic()
        if now - _outage_logged[0] > 10:  # one line per outage, not one per refused call
            _outage_logged[0] = now
            log.warning("the store is not answering (%s); calls that need it fail with UNAVAILABLE",
                        getattr(exc, "orig", None) or exc)
        context.abort(grpc.StatusCode.UNAVAILABLE,
                      STORE_UNAVAILABLE.format(kind=type(exc).__name__, request_id=request_id.get()))
    log.error("unexpected error", exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error; quote request id {request_id.get()} to the operator")
