"""The one table from domain errors to gRPC status codes, and the wrapper every RPC goes through.

It stamps a request id on the call (from `x-request-id` metadata or a new one), writes one access
line per RPC, maps domain errors to their status, and turns anything unexpected into INTERNAL with
a generic message and the request id (the traceback goes to the log, never to the caller).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import time
import uuid
from collections.abc import Iterator

import grpc

from adapters.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    HeadserveError,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger("headserve.access")

STATUS: dict[type[HeadserveError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
}

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


def _begin(context: grpc.ServicerContext) -> str:
    rid = dict(context.invocation_metadata()).get("x-request-id") or uuid.uuid4().hex[:16]
    request_id.set(rid)
    context.set_trailing_metadata((("x-request-id", rid),))
    return rid


def _fail(context: grpc.ServicerContext, exc: BaseException, rid: str) -> grpc.StatusCode:
    if isinstance(exc, HeadserveError):
        code = status_of(exc)
        context.abort(code, exc.message)
    log.exception("unexpected error")
    context.abort(grpc.StatusCode.INTERNAL, f"internal error; quote request id {rid} to the operator")
    return grpc.StatusCode.INTERNAL  # not reached: abort raises


def _access(method: str, request, code: str, start: float) -> None:
    task = getattr(request, "task_id", "") if request is not None else ""
    log.info("rpc %s task=%s status=%s ms=%.2f", method, task or "-", code, (time.perf_counter() - start) * 1e3)


def rpc(method):
    """Wraps a servicer method (unary or streaming response) with the error table and access log."""
    name = method.__name__

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self, request, context):
            with _handled(name, request, context):
                yield from method(self, request, context)

        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        with _handled(name, request, context):
            return method(self, request, context)

    return unary


@contextlib.contextmanager
def _handled(name: str, request, context: grpc.ServicerContext) -> Iterator[None]:
    """Request id in, access line out; domain errors to their status, anything else to INTERNAL."""
    start, rid, code = time.perf_counter(), _begin(context), "OK"
    try:
        yield
    except Exception as exc:
        code = status_of(exc).name if isinstance(exc, HeadserveError) else _code_of(context, exc)
        if not _aborted(exc):
            _fail(context, exc, rid)
        raise
    finally:
        _access(name, request if hasattr(request, "DESCRIPTOR") else None, code, start)


def _aborted(exc: BaseException) -> bool:
    # context.abort raises a bare Exception after setting the status; let it through untouched.
    return type(exc) is Exception and not exc.args


def _code_of(context, exc: BaseException) -> str:
    if _aborted(exc):
        code = context.code()
        return code.name if code else "ABORTED"
    return "INTERNAL"
