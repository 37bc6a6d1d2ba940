"""The request pipeline: one chain of gRPC server interceptors that every call of every service goes
through (HeadServe, Admin, health, reflection, and whatever is registered later).

    request context -> authentication -> stream slots -> rate limit -> error mapping -> servicer

- **Request context** wraps grpc's context in a `CallContext` that carries what the pipeline learns (request
  id, caller, task) down to the servicer, stamps the request id on the call's trailers and on log records,
  writes one access line per call, and an audit line for every mutating call and every denied one.
- **Authentication** turns `authorization: Bearer <key>` metadata into a `Caller` (service/tenants.py) and
  checks the scope the method needs, from `METHOD_SCOPES`: deny by default, so a method nobody listed is
  PERMISSION_DENIED for everyone. Health stays open for probes. With auth = "none" every caller is the
  default tenant with every scope.
- **Stream slots** bound the calls that stream (AddExamples, WatchJob, ExportTask, PredictStream, reflection).
  This server is synchronous: an open stream holds one of the `grpc_workers` threads, idle or not, and when
  every thread is held grpc queues every new call behind them, health checks included. Streams get
  `stream_slots` of the threads, and each tenant `stream_slots_per_tenant` of those; a stream over either is
  refused at once with RESOURCE_EXHAUSTED. The health service's Watch holds no thread (grpc serves it with
  callbacks) and is passed through the pipeline unwrapped.
- **Rate limit** charges Predict requests and inputs to the tenant's token buckets (each message of a
  PredictStream too, as it is read).
- **Error mapping** turns domain errors into their status code (service/errors.py) and anything else into
  INTERNAL with the request id; it also answers a request that does not parse as its protobuf message
  with INVALID_ARGUMENT (grpc would say INTERNAL), as it does a request with a NUL character in any string
  but an input's text (PostgreSQL refuses NUL in text), and caps every status message, since a message that
  quotes a huge input would otherwise exceed the client's metadata limit and hide the real error.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import grpc
from google.protobuf.message import DecodeError

from adapters.errors import HeadserveError, InvalidInput, PermissionDenied, ResourceExhausted
from service.errors import abort, request_id, status_of
from service.errors import task as task_var
from service.errors import tenant as tenant_var
from service.tenants import ADMIN, PREDICT, TRAIN, Authenticator, Caller, RateLimiter, bearer

access_log = logging.getLogger("headserve.access")
audit_log = logging.getLogger("headserve.audit")

HEALTH = "/grpc.health.v1.Health/"
OPEN = "open"  # no key needed
ANY = None  # any valid key

METHOD_SCOPES: dict[str, str | None] = {
    **{f"/headserve.v1.HeadServe/{m}": PREDICT
       for m in ("ListBackbones", "Predict", "PredictStream", "GetTask", "ListTasks")},
    **{f"/headserve.v1.HeadServe/{m}": TRAIN
       for m in ("CreateTask", "AddExamples", "TrainTask", "WatchJob", "DeleteTask", "ExportTask")},
    **{f"/headserve.v1.Admin/{m}": ADMIN
       for m in ("CreateTenant", "ListTenants", "GetTenant", "DeleteTenant", "SetQuotas", "CreateKey", "ListKeys",
                 "RevokeKey", "GetUsage")},
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": ANY,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": ANY,
}
MUTATING = frozenset(
    [f"/headserve.v1.HeadServe/{m}" for m in ("CreateTask", "AddExamples", "TrainTask", "DeleteTask")]
    + [f"/headserve.v1.Admin/{m}" for m in ("CreateTenant", "DeleteTenant", "SetQuotas", "CreateKey", "RevokeKey")]
)
DENIED = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})
RATED = frozenset({"/headserve.v1.HeadServe/Predict", "/headserve.v1.HeadServe/PredictStream"})
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def scope_of(method: str) -> str | None:
    if method.startswith(HEALTH):
        return OPEN
    if method not in METHOD_SCOPES:
        return "(not allowed)"  # deny by default
    return METHOD_SCOPES[method]


class CallContext:
    """grpc's ServicerContext, plus what the pipeline learned about the call. The servicer reads the
    caller from here and passes it on as an argument."""

    def __init__(self, context: grpc.ServicerContext, method: str) -> None:
        self._context = context
        self.method = method
        self.caller: Caller | None = None
        self._task_id = ""

    @property
    def task_id(self) -> str:
        """The task the call is about, where the servicer learns it later than the pipeline (a stream's
        first message); setting it also sets it for the call's log lines."""
        return self._task_id

    @task_id.setter
    def task_id(self, value: str) -> None:
        self._task_id = value
        if value:
            task_var.set(_cap(value))

    def __getattr__(self, name: str):
        return getattr(self._context, name)


class Malformed:
    """Stands for a request message that did not parse; error mapping answers it INVALID_ARGUMENT."""

    def __init__(self, error: Exception) -> None:
        self.error = error


Behavior = Callable  # (request or request iterator, context) -> response or response iterator


class Stage(grpc.ServerInterceptor):
    """One step of the pipeline: wraps each method's behavior with `wrap`."""

    def intercept_service(self, continuation, details):
        """grpc asks every stage for every call. A method's wrapped handler depends only on the method and the
        handler the next stage gives, so it is built once and kept (about 20 us a call for the five stages);
        only registered methods get here (an unknown one has no handler)."""
        handler = continuation(details)
        if handler is None or _non_blocking(handler):
            return handler
        kept = self.__dict__.setdefault("_wrapped", {}).get(details.method)
        if kept is not None and kept[0] is handler:
            return kept[1]
        wrapped = _rewrap(handler, lambda behavior, streaming: self.wrap(behavior, streaming, details.method),
                          self.deserializer(handler.request_deserializer))
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def wrap(self, behavior: Behavior, response_streaming: bool, method: str) -> Behavior:
        raise NotImplementedError

    def deserializer(self, parse):
        return parse


def _non_blocking(handler) -> bool:
    """A streaming behavior that grpc runs with callbacks instead of a thread (grpc_health's Watch, with
    `experimental_non_blocking`). Wrapping it would turn it back into a generator that holds a worker thread
    for as long as its watcher stays connected: a dozen unauthenticated watchers then stalled every call."""
    return bool(getattr(handler.unary_stream, "experimental_non_blocking", False))


def _rewrap(handler, wrap, deserializer) -> grpc.RpcMethodHandler:
    kinds = {
        (False, False): (grpc.unary_unary_rpc_method_handler, handler.unary_unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, handler.unary_stream),
        (True, False): (grpc.stream_unary_rpc_method_handler, handler.stream_unary),
        (True, True): (grpc.stream_stream_rpc_method_handler, handler.stream_stream),
    }
    make, behavior = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(wrap(behavior, handler.response_streaming), request_deserializer=deserializer,
                response_serializer=handler.response_serializer)


def _around(behavior: Behavior, response_streaming: bool, before, after=None) -> Behavior:
    """A behavior that runs `before(request, context)` (it may return replacements for both) and then,
    when given, `after(context, request, error_or_None)` once the response (or its stream) is done."""
    if response_streaming:
        def stream(request, context):
            request, context = before(request, context)
            error = None
            try:
                yield from behavior(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                if after is not None:
                    after(context, request, error)
        return stream

    def unary(request, context):
        request, context = before(request, context)
        error = None
        try:
            return behavior(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if after is not None:
                after(context, request, error)
    return unary


class RequestContext(Stage):
    def __init__(self, observe: Callable[[str, str, float], None] | None = None) -> None:
        self.observe = observe  # (method, code, seconds) of every call: the metrics

    def wrap(self, behavior, response_streaming, method):
        short = method.rsplit("/", 1)[-1]
        quiet = method.startswith(HEALTH)

        def before(request, context):
            call = CallContext(context, short)
            given = dict(context.invocation_metadata()).get("x-request-id", "")
            call.request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
            call.start = time.perf_counter()
            request_id.set(call.request_id)
            tenant_var.set("-")  # until Authentication knows the caller
            task_var.set(_task_of(request))
            context.set_trailing_metadata((("x-request-id", call.request_id),))
            return request, call

        def after(call: CallContext, request, error) -> None:
            if error is None:
                code = "OK"
            elif isinstance(error, HeadserveError):
                code = status_of(error).name
            else:
                found = call._context.code()
                code = found.name if found is not None else "CANCELLED"
            task = call.task_id or getattr(request, "task_id", "") or "-"
            task = task if len(task) <= 64 else task[:64] + "..."
            caller = call.caller
            tenant, key = (caller.tenant_id, caller.key_id or "-") if caller else ("-", "-")
            seconds = time.perf_counter() - call.start
            ms = seconds * 1e3
            if self.observe is not None:
                self.observe(short, code, seconds)
            (access_log.debug if quiet else access_log.info)(
                "rpc %s task=%r tenant=%s key=%s status=%s ms=%.2f", short, task, tenant, key, code, ms)
            if method in MUTATING or code in DENIED:
                audit_log.info("audit method=%s tenant=%s key=%s task=%r outcome=%s", short, tenant, key, task,
                               code)

        return _around(behavior, response_streaming, before, after)


class Authentication(Stage):
    def __init__(self, authenticator: Authenticator, enabled: bool) -> None:
        self.authenticator = authenticator
        self.enabled = enabled

    def wrap(self, behavior, response_streaming, method):
        scope = scope_of(method)
        if scope == OPEN:
            return behavior
        short = method.rsplit("/", 1)[-1]

        def before(request, call: CallContext):
            try:
                if self.enabled:
                    caller = self.authenticator.authenticate(bearer(call.invocation_metadata()))
                else:
                    caller = self.authenticator.anonymous()
                call.caller = caller
                tenant_var.set(caller.tenant_id)
                if method not in METHOD_SCOPES:
                    raise PermissionDenied(f"{short} is not open to API keys")
                caller.require(scope, short)
            except Exception as exc:  # domain errors, and a store that cannot be read (UNAVAILABLE)
                abort(call, exc)
            return request, call

        return _around(behavior, response_streaming, before)


class StreamSlots(Stage):
    """At most `limit` streams (calls that stream requests, responses or both) open at once on this server,
    and `per_tenant` for any one tenant (see the module's docstring). A slot is taken when the stream starts
    and given back when it ends, however it ends (finished, failed, cancelled by the client)."""

    def __init__(self, limit: int, per_tenant: int) -> None:
        self.limit = limit
        self.per_tenant = min(per_tenant, limit)
        self._lock = threading.Lock()
        self._open: collections.Counter[str] = collections.Counter()

    def open_streams(self) -> int:
        with self._lock:
            return sum(self._open.values())

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler  # unary calls: grpc's queue is their bound
        return super().intercept_service(lambda _: handler, details)

    def wrap(self, behavior, response_streaming, method):
        short = method.rsplit("/", 1)[-1]

        def take(call: CallContext) -> str:
            tenant = call.caller.tenant_id if call.caller is not None else "-"
            try:
                self._take(tenant, short)
            except HeadserveError as exc:
                abort(call, exc)
            return tenant

        if response_streaming:  # WatchJob, ExportTask, PredictStream, reflection
            def stream(request, call: CallContext):
                tenant = take(call)
                try:
                    yield from behavior(request, call)
                finally:
                    self._give(tenant)
            return stream

        def upload(requests, call: CallContext):  # AddExamples: a client stream, one answer
            tenant = take(call)
            try:
                return behavior(requests, call)
            finally:
                self._give(tenant)
        return upload

    def _give(self, tenant: str) -> None:
        with self._lock:
            self._open[tenant] -= 1
            if not self._open[tenant]:
                del self._open[tenant]

    def _take(self, tenant: str, method: str) -> None:
        with self._lock:
            total, mine = sum(self._open.values()), self._open[tenant]
            if mine >= self.per_tenant:
                raise ResourceExhausted(
                    f"{method}: this tenant already has {mine} streams open on this server, its limit "
                    "(setting stream_slots_per_tenant); close one (a finished WatchJob, an idle "
                    "PredictStream) or poll GetTask instead of watching")
            if total >= self.limit:
                raise ResourceExhausted(
                    f"{method}: {total} streams are open on this server, its limit (setting stream_slots); "
                    "retry with backoff, or poll GetTask instead of watching")
            self._open[tenant] += 1


class RateLimit(Stage):
    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    def wrap(self, behavior, response_streaming, method):
        if method not in RATED:
            return behavior
        if method.endswith("/PredictStream"):
            def before_stream(requests, call: CallContext):
                return self._charged(requests, call.caller), call
            return _around(behavior, response_streaming, before_stream)

        def before(request, call: CallContext):
            try:
                self.limiter.charge(call.caller, len(getattr(request, "inputs", ())))
            except Exception as exc:
                abort(call, exc)
            return request, call

        return _around(behavior, response_streaming, before)

    def _charged(self, requests: Iterator, caller: Caller) -> Iterator:
        for request in requests:
            self.limiter.charge(caller, len(getattr(request, "inputs", ())))
            yield request


class ErrorMapping(Stage):
    def deserializer(self, parse):
        if parse is None:
            return None

        def safe(data: bytes):
            try:
                return parse(data)
            except (DecodeError, ValueError, TypeError, RuntimeError) as exc:
                return Malformed(exc)
        return safe

    def wrap(self, behavior, response_streaming, method):
        def checked(request):
            if isinstance(request, Malformed):
                raise InvalidInput(f"the request is not a valid {method.rsplit('/', 1)[-1]} message "
                                   f"({type(request.error).__name__}); check the client's protobuf definitions")
            field = _nul_field(request)
            if field:
                raise InvalidInput(f"{field} contains a NUL (0x00) character; only an input's text may")
            return request

        def parsed(requests: Iterator) -> Iterator:
            for request in requests:
                yield checked(request)

        if response_streaming:
            def stream(request, call):
                try:
                    request = parsed(request) if _is_iterator(request) else checked(request)
                    yield from behavior(request, call)
                except Exception as exc:
                    if not _aborted(exc):
                        abort(call, exc)
                    raise
            return stream

        def unary(request, call):
            try:
                request = parsed(request) if _is_iterator(request) else checked(request)
                return behavior(request, call)
            except Exception as exc:
                if not _aborted(exc):
                    abort(call, exc)
                raise
        return unary


# Strings that may hold any character: an input's text is content (stored as bytes, read by the tokenizer).
# Every other string of our messages is an id, a name, a label, a token or a description, and PostgreSQL's
# text columns refuse NUL (psycopg raises DataError, an INTERNAL error, where SQLite would store it).
_CONTENT = frozenset({"headserve.v1.Input.text"})
_CHECKED: dict[str, bool] = {}  # message type -> whether it holds (at any depth) a string that is checked


def _checked(descriptor) -> bool:
    name = descriptor.full_name
    if name not in _CHECKED:
        _CHECKED[name] = False  # a recursive type is decided by its other fields
        _CHECKED[name] = name.startswith("headserve.") and any(
            (f.type == f.TYPE_STRING and f.full_name not in _CONTENT)
            or (f.type == f.TYPE_MESSAGE and _checked(f.message_type)) for f in descriptor.fields)
    return _CHECKED[name]


def _nul_field(message, prefix: str = "") -> str:
    """The path of the first string in `message` (one of ours) that contains NUL, outside _CONTENT; ''
    when there is none. Message types without such strings are not walked (a Predict's inputs)."""
    if not hasattr(message, "ListFields") or not _checked(message.DESCRIPTOR):
        return ""
    for field, value in message.ListFields():
        path = prefix + field.name
        if field.type == field.TYPE_STRING:
            values = value if field.is_repeated else [value]
            if field.full_name not in _CONTENT and any("\x00" in v for v in values):
                return path
        elif field.type == field.TYPE_MESSAGE and _checked(field.message_type):
            if field.message_type.GetOptions().map_entry:  # map<string, string | message>
                items = [(f"{path}[{str(k)[:40]!r}]", k, v) for k, v in value.items()]
            else:
                items = [(f"{path}[{i}]" if field.is_repeated else path, None, v)
                         for i, v in enumerate(value if field.is_repeated else [value])]
            for where, key, item in items:
                if "\x00" in str(key or "") or (isinstance(item, str) and "\x00" in item):
                    return where
                found = "" if isinstance(item, str) else _nul_field(item, where + ".")
                if found:
                    return found
    return ""


def _task_of(request) -> str:
    """The task(s) a request names, for its log lines ("-": none, or not known before the stream is read)."""
    task_id = getattr(request, "task_id", "")
    if not task_id and getattr(request, "task_ids", None):
        task_id = ",".join(request.task_ids)
    return _cap(task_id) if isinstance(task_id, str) and task_id else "-"


def _cap(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _is_iterator(request) -> bool:
    return hasattr(request, "__next__")


def _aborted(exc: BaseException) -> bool:
    # context.abort raises a bare Exception after setting the status; let it through untouched.
    return type(exc) is Exception and not exc.args


def interceptors(
    authenticator: Authenticator, limiter: RateLimiter, auth_enabled: bool, slots: StreamSlots,
    observe: Callable[[str, str, float], None] | None = None,
) -> list[Stage]:
    """The pipeline, outermost first."""
    return [RequestContext(observe), Authentication(authenticator, auth_enabled), slots, RateLimit(limiter),
            ErrorMapping()]
