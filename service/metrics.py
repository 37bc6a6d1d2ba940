"""Prometheus metrics: what operators alert on, with bounded labels only.

Labels are method, code, backbone, strategy, state, phase and store operation: a fixed set, whatever the
number of tasks or tenants (per-task and per-tenant usage belongs in the store, never in label values).
Latencies are histograms in seconds, which sum across replicas. Counts the service keeps anyway (head
cache, batch queues) are read at scrape time by a collector, so they cost nothing per request; the rest
is observed where it happens.

`Metrics` is per server (its own registry), so several servers in one process (the tests) do not mix.
The HTTP endpoint (`metrics_address`, off by default) serves `/metrics`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
JOB_SECONDS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
BATCH_INPUTS = tuple(float(1 << k) for k in range(13))  # 1 .. 4096


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rpcs = Counter("headserve_rpcs", "RPCs answered, by method and status code", ["method", "code"],
                            registry=r)
        self.rpc_seconds = Histogram("headserve_rpc_duration_seconds", "Time to answer an RPC",
                                     ["method", "code"], buckets=LATENCY, registry=r)
        self.predict_inputs = Counter("headserve_predict_inputs", "Inputs classified, by backbone",
                                      ["backbone"], registry=r)
        self.queue_wait = Histogram("headserve_batch_queue_wait_seconds",
                                    "Time a Predict request waited for its batch", ["backbone"],
                                    buckets=LATENCY, registry=r)
        self.batch_inputs = Histogram("headserve_batch_inputs", "Inputs in a formed batch", ["backbone"],
                                      buckets=BATCH_INPUTS, registry=r)
        self.batch_seconds = Histogram("headserve_batch_duration_seconds",
                                       "Time to run a batch (trunk pass, then heads)", ["backbone"],
                                       buckets=LATENCY, registry=r)
        self.head_load_seconds = Histogram("headserve_head_load_duration_seconds",
                                           "Time to load a head from the store into an onnxruntime session",
                                           buckets=LATENCY, registry=r)
        self.jobs = Counter("headserve_training_jobs", "Training jobs ended, by strategy and final state",
                            ["strategy", "state"], registry=r)
        self.job_seconds = Histogram("headserve_training_job_duration_seconds", "Time from start to end of a job",
                                     ["strategy", "state"], buckets=JOB_SECONDS, registry=r)
        self.phase_seconds = Histogram("headserve_training_phase_duration_seconds",
                                       "Time a job spent in each phase", ["strategy", "phase"],
                                       buckets=JOB_SECONDS, registry=r)
        self.store_seconds = Histogram("headserve_store_operation_duration_seconds",
                                       "Time of a store operation", ["operation"], buckets=LATENCY, registry=r)
        self.build = Info("headserve_build", "Version, backbones and device of this server", registry=r)
        self._http = None

    # --- hooks ---------------------------------------------------------------------------------------------

    def rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpcs.labels(method, code).inc()
        self.rpc_seconds.labels(method, code).observe(seconds)

    def batch(self, backbone: str, inputs: int, seconds: float, waits: list[float]) -> None:
        self.batch_inputs.labels(backbone).observe(inputs)
        self.batch_seconds.labels(backbone).observe(seconds)
        self.predict_inputs.labels(backbone).inc(inputs)
        wait = self.queue_wait.labels(backbone)
        for w in waits:
            wait.observe(w)

    def job(self, strategy: str, state: str, seconds: float, phases: dict[str, float]) -> None:
        self.jobs.labels(strategy, state).inc()
        self.job_seconds.labels(strategy, state).observe(seconds)
        for phase, spent in phases.items():
            self.phase_seconds.labels(strategy, phase).observe(spent)

    def watch(self, collector: Collector) -> None:
        self.registry.register(collector)

    def instrument(self, store, operations: list[str]) -> None:
        """Times each named method of `store` (bound on the instance: its class stays as it is)."""
        for name in operations:
            setattr(store, name, self._timed(getattr(store, name), self.store_seconds.labels(name)))

    @staticmethod
    def _timed(method: Callable, histogram) -> Callable:
        @functools.wraps(method)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                histogram.observe(time.perf_counter() - start)
        return timed

    # --- endpoint --------------------------------------------------------------------------------------

    def serve(self, address: str) -> int:
        """Serves /metrics on HOST:PORT (port 0 picks one); returns the port."""
        host, _, port = address.rpartition(":")
        self._http, _ = start_http_server(int(port), host.strip("[]") or "0.0.0.0", registry=self.registry)
        bound = self._http.server_port
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class ServerCollector(Collector):
    """Reads, at scrape time, what the server counts anyway: head cache and batch queues."""

    def __init__(self, predictor) -> None:
        self.predictor = predictor

    def collect(self) -> Iterator:
        stats = self.predictor.heads.stats
        yield GaugeMetricFamily("headserve_head_cache_heads", "Heads loaded in memory", value=stats.heads)
        yield GaugeMetricFamily("headserve_head_cache_bytes", "Estimated memory of the loaded heads",
                                value=stats.bytes)
        yield CounterMetricFamily("headserve_head_cache_hits", "Predictions whose head was loaded", value=stats.hits)
        yield CounterMetricFamily("headserve_head_cache_misses", "Heads loaded from the store", value=stats.loads)
        yield CounterMetricFamily("headserve_head_cache_evictions", "Heads unloaded to stay within the budget",
                                  value=stats.evictions)
        depth = GaugeMetricFamily("headserve_batch_queue_inputs", "Inputs waiting for a batch", labels=["backbone"])
        rejected = CounterMetricFamily("headserve_batch_rejected",
                                       "Predict requests refused because the queue was full", labels=["backbone"])
        failed = CounterMetricFamily("headserve_batch_failures", "Batches whose run failed", labels=["backbone"])
        fair = CounterMetricFamily("headserve_batch_fair_lane",
                                   "Batches run beside another tenant's batch (the fair lane)", labels=["backbone"])
        for name, lane in list(self.predictor.lanes.items()):
            depth.add_metric([name], lane.batcher.queued_rows)
            rejected.add_metric([name], lane.batcher.stats.rejected)
            failed.add_metric([name], lane.batcher.stats.failed)
            fair.add_metric([name], lane.batcher.stats.fair)
        yield depth
        yield rejected
        yield failed
        yield fair
        cuts = GaugeMetricFamily("headserve_trunk_cuts",
                                 "Sets of early trunk outputs served by a cut trunk session (trunk_cuts; each holds "
                                 "its own copy of the weights it reads)", labels=["backbone"])
        for name, entry in list(self.predictor.registry.entries.items()):
            if entry.trunk is not None:
                cuts.add_metric([name], len(entry.trunk.cuts_in_use()))
        yield cuts
