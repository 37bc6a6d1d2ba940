"""Builds and runs the gRPC server: the wiring of config, store, backbones, jobs and predictor."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.app import HeadServeApp
from service.config import Settings
from service.errors import RequestIdFilter
from service.gen import headserve_pb2 as pb
from service.jobs import JobRunner
from service.predictor import Predictor
from service.registry import BackboneRegistry
from service import tls
from service.servicer import add_to_server
from service.store import Store

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["HeadServe"].full_name


@dataclasses.dataclass
class Running:
    """A started server and what it owns; `stop()` shuts it all down gracefully."""

    server: grpc.Server
    port: int
    app: HeadServeApp
    health: health.HealthServicer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float = 5.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.app.predictor.close()
        self.app.runner.close()
        self.app.store.close()


def _warm_up() -> None:
    """Pays torch's and onnxruntime's first-call costs at start-up, not on the first task."""
    import numpy as np

    from adapters.heads import TrainingOptions, export_checked, train_head

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 16)).astype(np.float32)
    trained = train_head(x, ["a", "b"] * 4, TrainingOptions(strategy="auto"))
    export_checked(trained, x, {})


def build_server(settings: Settings) -> Running:
    """Loads everything, binds `settings.address` (port 0 picks one) and starts serving."""
    import torch

    if settings.intra_op_threads:
        torch.set_num_threads(settings.intra_op_threads)
    data_dir = pathlib.Path(settings.data_dir)
    store = Store.open(data_dir)
    registry = BackboneRegistry.load(settings)
    predictor = Predictor(store, registry, settings)
    runner = JobRunner(store, registry, predictor.install, settings.training_workers,
                       settings.auto_fine_tune_min_examples)
    app = HeadServeApp(settings, store, registry, runner, predictor)
    _warm_up()

    limits = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.grpc_workers), options=limits)
    add_to_server(app, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    credentials = tls.server_credentials(settings)
    if credentials is None:
        port = server.add_insecure_port(settings.address)
    else:
        port = server.add_secure_port(settings.address, credentials)
    if port == 0:
        raise RuntimeError(f"could not bind {settings.address}")
    server.start()
    resumed = runner.resume()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    loaded = [n for n, e in registry.entries.items() if e.available]
    log.info("headserve listening on %s (port %d); backbones: %s; device %s; %d job(s) resumed",
             settings.address, port, ", ".join(loaded) or "none", registry.device, resumed)
    return Running(server, port, app, health_servicer)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("transformers", "torch", "onnxscript", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(settings: Settings) -> None:
    """Serves until SIGINT or SIGTERM, then stops gracefully."""
    configure_logging(settings.log_level)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    running = build_server(settings)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    log.info("shutting down")
    running.stop()
