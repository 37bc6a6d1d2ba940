"""Builds and runs the gRPC server: the wiring of config, store, backbones, jobs and predictor."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import pathlib
import signal
import sys
import threading
import time
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.app import HeadServeApp
from service.datadir import DataDirInUse, DataDirLock
from service.health import LIVENESS, HealthMonitor
from service.metrics import Metrics, ServerCollector
from service.usage import UsageRecorder
from service.config import Settings
from service.errors import LOG_CONTEXT, RequestIdFilter
from service.gen import headserve_pb2 as pb
from service.jobs import JobRunner
from service.predictor import Predictor
from service.registry import BackboneRegistry
from service import pipeline, tls
from service.servicer import add_to_server
from adapters.errors import NotFound
from adapters.onnx_utils import onnxruntime_clash
from service.changes import ChangeFeed
from service.migrate import SchemaError
from service.store import Store
from service.worker import WorkerProcesses, store_url
from service.tenants import Authenticator, RateLimiter, TenantAdmin

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["HeadServe"].full_name
ADMIN_NAME = pb.DESCRIPTOR.services_by_name["Admin"].full_name


@dataclasses.dataclass
class Running:
    """A started server and what it owns; `stop()` shuts it all down gracefully."""

    server: grpc.Server
    port: int
    app: HeadServeApp
    health: health.HealthServicer
    admin: TenantAdmin
    tls: bool = False
    lock: DataDirLock | None = None
    monitor: HealthMonitor | None = None
    metrics: Metrics | None = None
    metrics_port: int = 0
    tracer: Any = None  # service.tracing.Tracer when tracing is on
    feed: ChangeFeed | None = None
    slots: pipeline.StreamSlots | None = None

    @property
    def address(self) -> str:
        return f"{'localhost' if self.tls else '127.0.0.1'}:{self.port}"

    def stop(self, grace: float = 5.0, wait_for_jobs: bool = True) -> bool:
        """New calls are refused (UNAVAILABLE) at once; calls in flight get up to `grace` seconds to finish
        (then grpc cancels them). Queued training jobs stay queued in the store, and the next start runs them.
        A running job is waited for; with wait_for_jobs=False only until `grace` seconds after stop began.
        One still running then is left as it is: the store keeps it RUNNING (the next start runs it again),
        the store is not closed under it, and stop returns False; the caller should then end the process."""
        began = time.monotonic()
        if self.monitor is not None:
            self.monitor.stop()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.app.predictor.close()
        if self.feed is not None:
            self.feed.close()
        closing = threading.Thread(target=self.app.runner.close, name="close-jobs", daemon=True)
        closing.start()
        closing.join(None if wait_for_jobs else max(0.0, grace - (time.monotonic() - began)))
        finished = not closing.is_alive()
        if not finished:
            log.warning("a training job is still running after the grace period; it is left unfinished and runs "
                        "again (at the next start, or on another replica when its lease runs out)")
        if self.app.usage is not None:
            self.app.usage.close()
        if finished:
            self.app.store.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.tracer is not None:
            self.tracer.shutdown()
        if finished and self.lock is not None:
            self.lock.release()
        return finished


def check_exposure(settings: Settings) -> None:
    """Refuses to serve without authentication on an address other than loopback, unless the operator
    said so with allow_insecure (then says so in the log at every start)."""
    if settings.auth != "none":
        return
    host = settings.address.rpartition(":")[0].strip("[]")
    if host == "localhost" or _is_loopback(host):
        return
    if not settings.allow_insecure:
        raise ValueError(
            f"auth = 'none' on {settings.address}, which is not a loopback address: anyone who reaches it could "
            "read, change and delete every task. Set auth = 'api_key' (and TLS; README \"Security\"), listen on "
            "127.0.0.1, or set allow_insecure = true to accept the risk")
    log.warning("auth = 'none' on %s with allow_insecure: every caller who reaches this address has every "
                "right on every task", settings.address)


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StartupError(Exception):
    """The server cannot start, for a reason its message gives in one line."""


def build_server(settings: Settings, span_exporter=None) -> Running:
    """Loads everything, binds `settings.address` (port 0 picks one) and starts serving. Refusals that
    the operator can fix (settings, files, a port or data directory in use) raise StartupError.

    Tracing is on when `settings.otel_endpoint` is set, or when `span_exporter` (an OpenTelemetry
    SpanExporter, e.g. the SDK's InMemorySpanExporter in tests) is given; it then receives the spans."""
    try:
        check_exposure(settings)
        credentials = tls.server_credentials(settings)  # bad certificate files fail here, before models load
        lock = DataDirLock(pathlib.Path(settings.data_dir))
    except (ValueError, DataDirInUse, OSError) as exc:
        raise StartupError(str(exc)) from exc
    tracer = None
    try:
        tracer = _start_tracing(settings, span_exporter)
        return _build(settings, credentials, lock, tracer)
    except BaseException:
        if tracer is not None:
            tracer.shutdown()
        lock.release()
        raise


def _start_tracing(settings: Settings, span_exporter=None):
    """The tracer (service/tracing.py), or None when tracing is off: then OpenTelemetry is not imported."""
    if not settings.otel_endpoint and span_exporter is None:
        return None
    from service import tracing

    try:
        return tracing.setup(settings.otel_endpoint, span_exporter, version=_version(),
                             sample_ratio=1.0 if span_exporter is not None else settings.otel_sample_ratio)
    except tracing.TracingUnavailable as exc:
        raise StartupError(str(exc)) from exc


def stream_slots(settings: Settings) -> pipeline.StreamSlots:
    """The stream limits (pipeline.StreamSlots): half of the worker threads for streams, and a quarter for one
    tenant's, unless the settings say otherwise; without auth every caller is the one tenant."""
    limit = settings.stream_slots or max(1, settings.grpc_workers // 2)
    auth = settings.auth == "api_key"
    return pipeline.StreamSlots(limit, settings.stream_slots_per_tenant or (max(1, settings.grpc_workers // 4)
                                                                            if auth else limit))


def _build(settings: Settings, credentials, lock: DataDirLock, tracer=None) -> Running:
    # Process-wide, like torch's thread count below: a thread that comes back from onnxruntime or a decoder
    # waits at most this long for the GIL (docs/design.md, "Threads back from C code wait for the GIL").
    sys.setswitchinterval(settings.switch_interval_ms / 1e3)
    if settings.intra_op_threads:
        import torch

        torch.set_num_threads(settings.intra_op_threads)
    pathlib.Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    try:
        store = Store(store_url(settings), versions_kept=settings.head_versions_kept)
    except SchemaError as exc:
        raise StartupError(str(exc)) from exc
    processes = None
    if settings.training_workers and settings.training_isolation == "process":
        # Started first: they load their backbones while this process loads its own, so the first job
        # does not wait for a worker that only began once the server was up.
        processes = WorkerProcesses(settings, settings.training_workers)
        processes.start()
    try:
        return _assemble(settings, credentials, lock, tracer, store, processes)
    except BaseException:
        if processes is not None:
            processes.close(0)
        store.close()
        raise


def _assemble(settings: Settings, credentials, lock: DataDirLock, tracer, store: Store,
              processes: WorkerProcesses | None) -> Running:
    metrics = Metrics() if settings.metrics_address else None
    if metrics is not None:
        metrics.instrument(store, STORE_OPERATIONS)
    if tracer is not None:
        tracer.instrument(store, STORE_OPERATIONS)
    registry = BackboneRegistry.load(settings)
    predictor = Predictor(store, registry, settings, metrics, tracer)
    if processes is not None:
        processes.on_published = lambda key, version: predictor.refresh(key)
        processes.on_finished = metrics.job if metrics else None
    runner = JobRunner(store, registry, predictor.install, settings.training_workers,
                       settings.auto_fine_tune_min_examples, metrics.job if metrics else None,
                       settings.job_lease_seconds, settings.job_max_attempts, processes,
                       settings.auto_fine_tune_max_examples)
    app = HeadServeApp(settings, store, registry, runner, predictor,
                       UsageRecorder(store, settings.usage_flush_seconds))
    authenticator = Authenticator(store, settings.auth_cache_seconds, settings.auth_stale_seconds)
    admin = TenantAdmin(store, authenticator)

    def tenant_changed(tenant_id: str) -> None:  # new quotas, or deleted
        authenticator.forget(tenant_id=tenant_id)
        try:
            store.get_tenant(tenant_id)
        except NotFound:
            predictor.forget_tenant(tenant_id)

    feed = ChangeFeed(store, {"task": predictor.refresh, "key": lambda key_id: authenticator.forget(key_id=key_id),
                              "tenant": tenant_changed}, settings.sync_interval_seconds)
    if settings.training_workers and settings.training_isolation == "thread":
        from service.training import warm_up

        # Readies this process's training threads in the background (worker processes ready themselves).
        threading.Thread(target=warm_up, args=(registry, settings.auto_fine_tune_min_examples), daemon=True,
                         name="training-warm-up").start()

    limits = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # gRPC turns SO_REUSEPORT on by default: a second server on a port in use would start, and the two
        # would split the requests at random. Off, the second one fails to bind.
        ("grpc.so_reuseport", 0),
    ]
    if settings.max_connection_age_seconds:
        # Clients that balance over a headless Service's pod IPs re-resolve DNS only when a connection
        # closes: a GOAWAY now and then sends their new calls to a new connection (and lets them find
        # replicas added since they connected). No grace limit: calls in flight, long streams included
        # (WatchJob, PredictStream), run to their end on the old connection.
        limits.append(("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)))
    slots = stream_slots(settings)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.grpc_workers),
        options=limits,
        # With tracing on, OpenTelemetry's interceptor is the outermost: the whole pipeline is in the span.
        interceptors=[*([tracer.server_interceptor()] if tracer is not None else []),
                      *pipeline.interceptors(authenticator, RateLimiter(), settings.auth == "api_key",
                                             slots,
                                             metrics.rpc if metrics else None)],
    )
    add_to_server(app, admin, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)  # as "" is, until the monitor starts
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, ADMIN_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                        server)
    try:
        if credentials is None:
            port = server.add_insecure_port(settings.address)
        else:
            port = server.add_secure_port(settings.address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        store.close()
        predictor.close()
        runner.close()
        raise StartupError(f"cannot listen on {settings.address}: the port is in use (another server?) or the "
                           "address is not one of this machine's; pick another --address")
    server.start()
    metrics_port = 0
    if metrics is not None:
        metrics.watch(ServerCollector(predictor))
        metrics.build.info({"version": _version(), "device": str(registry.device),
                            "backbones": ",".join(n for n, e in registry.entries.items() if e.available)})
        try:
            metrics_port = metrics.serve(settings.metrics_address)
        except OSError as exc:
            server.stop(0)
            store.close()
            raise StartupError(f"cannot serve metrics on {settings.metrics_address}: {exc.strerror or exc}") from exc
    feed.start()
    resumed = runner.resume()
    runner.start()
    monitor = HealthMonitor(health_servicer, (SERVICE_NAME, ADMIN_NAME), store, registry, predictor,
                            settings.health_interval_seconds, runner)
    monitor.start()
    loaded = [n for n, e in registry.entries.items() if e.available]
    if clash := onnxruntime_clash():
        log.warning("%s", clash)
    log.info("headserve listening on %s (port %d); %s, auth %s; backbones: %s; device %s; %d job(s) resumed",
             settings.address, port, "TLS" if credentials else "plaintext", settings.auth,
             ", ".join(loaded) or "none", registry.device, resumed)
    return Running(server, port, app, health_servicer, admin, credentials is not None, lock, monitor, metrics,
                   metrics_port, tracer=tracer, feed=feed, slots=slots)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("headserve")
    except metadata.PackageNotFoundError:
        return "unknown"


# Every store operation but opening and closing, timed when metrics are on (bounded: the method names).
STORE_OPERATIONS = sorted(
    name for name, value in vars(Store).items()
    if callable(value) and not name.startswith("_") and name not in ("open", "close")
)


class TextFormatter(logging.Formatter):
    """`time level logger [request_id tenant=.. task=.. job=..] message`; the context parts that are not
    set ("-") are left out."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(context)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        values = _log_context(record)
        parts = [values["request_id"]]
        parts += [f"{name}={values[name]}" for name in ("tenant", "task", "job") if values[name] != "-"]
        record.context = " ".join(parts)
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id, tenant, task,
    job, and exc_info (the formatted traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_log_context(record),
        }
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc_info"] = record.exc_text
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def _log_context(record: logging.LogRecord) -> dict[str, str]:
    """What RequestIdFilter stamped on the record; the context variables themselves if it did not run."""
    return {name: str(getattr(record, name, None) or var.get()) for name, var in LOG_CONTEXT}


def configure_logging(level: str, fmt: str = "text") -> None:
    """Logs to stderr at `level`, as text or, with fmt = "json", one JSON object per line; every line carries
    the request id, tenant, task and job it concerns (service/errors.py)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("transformers", "torch", "onnxscript", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


SHUTDOWN_GRACE = 5.0  # seconds from SIGTERM to exit, for the calls in flight and then a running training job


def run(settings: Settings) -> None:
    """Serves until SIGINT or SIGTERM, then stops gracefully. A server that cannot start raises
    StartupError with a one-line reason (anything unexpected is wrapped too; its traceback is logged at
    debug level)."""
    configure_logging(settings.log_level, settings.log_format)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        running = build_server(settings)
    except StartupError:
        raise
    except Exception as exc:
        log.debug("start-up failed", exc_info=True)
        raise StartupError(f"could not start: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    log.info("shutting down")
    if not running.stop(SHUTDOWN_GRACE, wait_for_jobs=False):
        # A training job is still running (a thread that cannot be interrupted, which the interpreter would
        # wait for): end here. Its store rows are committed or not, never half-written (SQLite, synchronous
        # FULL), and the next start runs the job again; the kernel releases the data directory's lock.
        logging.shutdown()
        os._exit(0)
