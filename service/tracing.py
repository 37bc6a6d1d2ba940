"""OpenTelemetry tracing, opt-in (`otel_endpoint`; the `otel` extra: pip install 'headserve[otel]').

One trace per RPC, started by the library's gRPC server interceptor (opentelemetry-instrumentation-grpc),
outermost in the request pipeline (service/server.py). Inside it:

- `preprocess`: a Predict's inputs checked (text) or decoded and resized (images), on the RPC thread
  (service/predictor.py `submit`);
- `queue wait`: from the moment the request was queued to the start of its batch, one per request, a
  child of that request's span with explicit start and end times;
- `batch`: one span per batch, which serves many requests: it is LINKED to the span of every request it
  serves, and is the child of the first one's (so a lone request, the common case on an idle server, has
  the whole story in its trace). Its children: `trunk pass`, and one `head` per head run (attributes: task,
  version, inputs); for text, the batch's tokenization is the time before the trunk pass (and its
  `headserve.tokenize_ms` attribute);
- `store.<operation>`: every store method (service/store.py), wrapped on the instance at wiring time, as
  service/metrics.py does for its timings, and only inside a trace (the health monitor's checks between
  calls make none). Training jobs carry the context of the RPC that started them (service/jobs.py), so
  their store work appears in that RPC's trace.

Health checks are not traced (probes every few seconds would bury the traces that matter).

With tracing off nothing here is imported by the server and the hot path only tests `tracer is None`.
Requests that are not sampled (the SDK's sampler honours OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG,
e.g. `parentbased_traceidratio` and `0.1`) make no spans past the library's own. Spans are started and
ended rather than made current: in the Python SDK, attaching a context costs as much as the span.
Spans go through a `BatchSpanProcessor` to the OTLP/gRPC exporter, or to the `exporter` given (tests pass
an `InMemorySpanExporter`). The provider is the server's own, not the process-global one, so that several
servers in one process (tests, benchmarks) do not share their traces.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

EXTRA = "pip install 'headserve[otel]'"
HEALTH_SERVICE = "grpc.health.v1.Health"


class TracingUnavailable(RuntimeError):
    """otel_endpoint is set but the OpenTelemetry packages are not installed."""


class Tracer:
    """The server's tracer and the few span shapes headserve makes. Created by `setup` only when tracing
    is on; code that traces holds `Tracer | None` and does nothing when it is None.

    Spans are started and ended, not made current (attaching a context costs as much as the span): a span's
    children name it as their parent explicitly (`Span.child`)."""

    def __init__(self, provider, otel_trace) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("headserve")
        self._get_current_span = otel_trace.get_current_span
        self._Link = otel_trace.Link
        self._set_span_in_context = otel_trace.set_span_in_context
        self._NonRecordingSpan = otel_trace.NonRecordingSpan

    # --- the RPC side ---------------------------------------------------------------------------------

    def server_interceptor(self):
        """The library's gRPC server interceptor (one SERVER span per call, the caller's W3C trace
        context continued), for every service but health."""
        from opentelemetry.instrumentation.grpc import filters, server_interceptor

        return server_interceptor(tracer_provider=self.provider,
                                  filter_=filters.negate(filters.service_name(HEALTH_SERVICE)))

    def current(self):
        """The current span's context when it is sampled (what a request carries into its batch), else None:
        then the request makes no spans of its own."""
        context = self._get_current_span().get_span_context()
        return context if context.trace_flags.sampled else None

    def span(self, name: str, attributes: dict[str, Any] | None = None) -> Span:
        """A child of the current span, for a `with` block (an error ends it as ERROR)."""
        return Span(self._tracer.start_span(name, attributes=attributes), self)

    # --- the batch side -------------------------------------------------------------------------------

    def batch(self, requests: Sequence[Any], attributes: dict[str, Any]) -> Span:
        """The span of one batch, linked to each request's span context (None for a request that is not
        traced), a child of the first's; for a `with` block, its children made with `child`."""
        contexts = [c for c in requests if c is not None]
        parent = self._set_span_in_context(self._NonRecordingSpan(contexts[0])) if contexts else None
        return Span(self._tracer.start_span("batch", context=parent, links=[self._Link(c) for c in contexts],
                                            attributes=attributes), self)

    def queue_waits(self, requests: Iterable[tuple[Any, float]], began: float,
                    attributes: dict[str, Any] | None = None) -> None:
        """A `queue wait` span per (request span context, time.monotonic() it was queued), ended at
        `began` (time.monotonic() the batch started), each a child of its request's span."""
        now_ns, now = time.time_ns(), time.monotonic()
        end_ns = now_ns - int((now - began) * 1e9)
        for context, queued_at in requests:
            if context is None:
                continue
            parent = self._set_span_in_context(self._NonRecordingSpan(context))
            span = self._tracer.start_span("queue wait", context=parent, attributes=attributes,
                                           start_time=now_ns - int((now - queued_at) * 1e9))
            span.end(end_time=end_ns)

    # --- the store ------------------------------------------------------------------------------------

    def instrument(self, store, operations: Sequence[str]) -> None:
        """Wraps each named method of `store` (bound on the instance: its class stays as it is) in a
        `store.<name>` span, made only inside a sampled trace."""
        for name in operations:
            setattr(store, name, self._traced(getattr(store, name), f"store.{name}"))

    def _traced(self, method: Callable, name: str) -> Callable:
        get_current_span, start = self._get_current_span, self._tracer.start_span

        @functools.wraps(method)
        def traced(*args, **kwargs):
            if not get_current_span().get_span_context().trace_flags.sampled:
                return method(*args, **kwargs)
            with Span(start(name), self):
                return method(*args, **kwargs)
        return traced

    # --- life cycle -----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Exports what is still buffered, then stops."""
        self.provider.shutdown()


class Span:
    """A started span, ended when its `with` block ends; an exception that leaves the block is recorded
    on it (status ERROR)."""

    __slots__ = ("span", "_tracer", "_context")

    def __init__(self, span, tracer: Tracer) -> None:
        self.span = span
        self._tracer = tracer
        self._context = None

    def child(self, name: str, attributes: dict[str, Any] | None = None) -> Span:
        if self._context is None:
            self._context = self._tracer._set_span_in_context(self.span)
        return Span(self._tracer._tracer.start_span(name, context=self._context, attributes=attributes),
                    self._tracer)

    def set(self, key: str, value: Any) -> None:
        self.span.set_attribute(key, value)

    def __enter__(self) -> Span:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is not None:
            from opentelemetry.trace import Status, StatusCode

            self.span.record_exception(exc)
            self.span.set_status(Status(StatusCode.ERROR, f"{kind.__name__}: {exc}"))
        self.span.end()


def setup(
    endpoint: str, exporter=None, service_name: str = "headserve", version: str = "", sample_ratio: float = 1.0
) -> Tracer:
    """A tracer whose spans go to the OTLP/gRPC collector at `endpoint` (e.g. http://collector:4317), or
    to `exporter` when given. Raises TracingUnavailable, naming the extra to install, when the
    OpenTelemetry packages are missing."""
    try:
        from opentelemetry import trace
        from opentelemetry.instrumentation.grpc import server_interceptor  # noqa: F401 (checked here)
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingUnavailable(
            f"otel_endpoint is set but OpenTelemetry is not installed ({exc.name or exc}): {EXTRA}"
        ) from exc
    if exporter is None:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise TracingUnavailable(
                f"otel_endpoint is set but the OTLP exporter is not installed ({exc.name or exc}): {EXTRA}"
            ) from exc
        exporter = OTLPSpanExporter(endpoint=endpoint)  # http://: plaintext, https://: TLS
    attributes = {}
    env = os.environ
    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if not named:  # the operator may name it the OpenTelemetry way
        attributes["service.name"] = service_name
    if version:
        attributes["service.version"] = version
    # The batch processor follows OpenTelemetry's environment variables (OTEL_BSP_*), and so does the sampler
    # when OTEL_TRACES_SAMPLER is set. Otherwise a share `sample_ratio` of new traces is kept (parent-based:
    # a caller's sampled trace is always continued): tracing every request costs 13% of Predict p50 on a CPU
    # (docs/benchmarks.md), tracing 10% costs nothing measurable.
    sampler = None
    if "OTEL_TRACES_SAMPLER" not in env:
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        sampler = ParentBased(TraceIdRatioBased(sample_ratio))
    provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracer(provider, trace)
