"""Health that means something: per-service gRPC health follows what the server can actually do.

A monitor thread checks, every `health_interval_seconds`:
- the store: a read of the schema version must succeed (a missing, locked-out or corrupted database fails);
- each backbone whose trunk has failed a batch since the last check (or is already marked broken): it runs
  the trunk on the backbone's sample input; a trunk that fails that probe is broken until a probe succeeds.

Any problem turns the overall status ("") and every served service NOT_SERVING, with the problems logged
once per change; all clear turns them back to SERVING. Kubernetes' readiness probe then takes the pod out
of the Service while the problem lasts. The service name `liveness` (LIVENESS) leaves the store out: it is
NOT_SERVING only for what a restart of this process can mend (a failing trunk, training workers that
stopped), so that the liveness probe does not restart every replica while their shared database restarts
or fails over (they recover by themselves once it is back). A server that is still loading does not
listen yet, so probes fail until the trunks are warm.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from grpc_health.v1 import health, health_pb2

from service.predictor import Predictor
from service.registry import BackboneRegistry
from service.store import Store

log = logging.getLogger(__name__)

LIVENESS = "liveness"
STORE_PROBLEM = "store: "  # how a problem of the store starts (check())
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthMonitor:
    def __init__(
        self,
        servicer: health.HealthServicer,
        services: Sequence[str],
        store: Store,
        registry: BackboneRegistry,
        predictor: Predictor,
        interval: float,
        runner=None,
    ) -> None:
        """`runner` (service.jobs.JobRunner), when given, reports training workers that should run and do not."""
        self.servicer = servicer
        self.services = ("", *services)
        self.store = store
        self.registry = registry
        self.predictor = predictor
        self.runner = runner
        self.interval = interval
        self.problems: list[str] = []
        self._failures_seen: dict[str, int] = {}
        self._broken: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="health", daemon=True)

    def start(self) -> None:
        self._publish([])
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def check(self) -> list[str]:
        """What is wrong now (empty when all is well)."""
        problems = []
        try:
            self.store.ping()
        except Exception as exc:  # whatever the engine raises: the store cannot serve
            problems.append(f"{STORE_PROBLEM}{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        for name, failures in self.predictor.batch_failures().items():
            if failures > self._failures_seen.get(name, 0) or name in self._broken:
                self._failures_seen[name] = failures
                self._probe(name)
        problems += [f"backbone {name}: its trunk fails" for name in sorted(self._broken)]
        if self.runner is not None:
            problems += self.runner.problems()
        return problems

    def _probe(self, name: str) -> None:
        entry = self.registry.entries[name]
        try:
            entry.trunk.features(entry.backbone.sample_batch())
        except Exception:
            if name not in self._broken:
                log.exception("trunk of backbone %s fails its health probe", name)
            self._broken.add(name)
        else:
            self._broken.discard(name)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._publish(self.check())
            except Exception:  # the monitor must outlive whatever it watches
                log.exception("health check failed")

    def _publish(self, problems: list[str]) -> None:
        if problems != self.problems:
            if problems:
                log.error("NOT_SERVING: %s", "; ".join(problems))
            else:
                log.info("SERVING again" if self.problems else "SERVING")
        self.problems = problems
        status = NOT_SERVING if problems else SERVING
        for name in self.services:
            self.servicer.set(name, status)
        own = [p for p in problems if not p.startswith(STORE_PROBLEM)]
        self.servicer.set(LIVENESS, NOT_SERVING if own else SERVING)
