"""Training outside the serving process.

- `WorkerProcesses`: a serving replica's `training_workers` worker processes (training_isolation =
  "process"). Each loads the backbones itself and runs one `service.jobs.Worker` loop against the same
  store. They die with the server (PR_SET_PDEATHSIG on Linux, and a check of the parent's pid), and one
  that dies is started again. Finished jobs are reported to the server over a pipe, for its metrics and
  so that it installs a new version at once (other replicas learn of it from the store's change feed).
- `run_worker`: `headserve worker`, a training-only replica: `training_workers` Worker loops and the
  Prometheus metrics, no gRPC server. Serving and training then scale apart (deploy/k8s overlays/prod).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable

from service.config import Settings

log = logging.getLogger(__name__)

RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # seconds before a dead worker process is started again
# A serving replica's training runs below its serving in the CPU scheduler: where they share cores, serving gets
# the CPU first and training takes what is left. Linux's SCHED_IDLE policy (idle_priority) where it is
# offered, and nice WORKER_NICE for worker processes in any case. (`headserve worker` replicas only train, and
# keep their priority.)
WORKER_NICE = 10
PR_SET_PDEATHSIG = 1


def idle_priority() -> bool:
    """Moves the calling thread, and the threads it starts from now on (torch's and onnxruntime's pools among
    them), to Linux's SCHED_IDLE policy: it runs on CPU time no normal thread wants, and a serving thread that
    wakes takes the core from it at once, where nice 10 still leaves it a tenth of a busy core and the
    scheduler's time slice. Measured: Predict p99 while FINE_TUNE trains 1.04-1.12x idle with the worker
    process at SCHED_IDLE, 1.44x at nice 10 (docs/design.md, "Training out of the serving process"). False
    where the platform has no SCHED_IDLE."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError) as exc:  # not Linux, or refused
        log.debug("SCHED_IDLE not set for training (%s); it keeps its priority", exc)
        return False
    return True


def _die_with_parent() -> None:
    """Asks Linux to SIGKILL this process when the process that started it dies (even by kill -9)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent-pid check below still ends the worker
        pass


def _build_worker(settings: Settings, index: int, on_success=None, on_finished=None, on_progress=None):
    import torch

    from service.jobs import Worker, worker_name
    from service.registry import BackboneRegistry
    from service.store import Store
    from service.training import warm_up

    if settings.intra_op_threads:
        torch.set_num_threads(settings.intra_op_threads)
    store = Store(store_url(settings), versions_kept=settings.head_versions_kept)
    if settings.otel_endpoint:  # the worker exports its own spans; jobs continue the traces they were queued in
        from service import tracing
        from service.server import STORE_OPERATIONS, _version

        tracer = tracing.setup(settings.otel_endpoint, version=_version(), sample_ratio=settings.otel_sample_ratio,
                               service_name="headserve-worker")
        tracer.instrument(store, STORE_OPERATIONS)
    registry = BackboneRegistry.load(settings)
    warm_up(registry, settings.auto_fine_tune_min_examples)
    return Worker(store, registry, worker_name(index), lease_seconds=settings.job_lease_seconds,
                  max_attempts=settings.job_max_attempts,
                  auto_fine_tune_min_examples=settings.auto_fine_tune_min_examples,
                  auto_fine_tune_max_examples=settings.auto_fine_tune_max_examples,
                  on_success=on_success, on_finished=on_finished, on_progress=on_progress)


def store_url(settings: Settings) -> str:
    """The store's SQLAlchemy URL: `store_url`, else SQLite in the data directory."""
    if settings.store_url:
        return settings.store_url
    from service.store import STORE_FILE

    return f"sqlite:///{settings.data_dir / STORE_FILE}"


def _process_main(settings_json: str, index: int, parent: int, conn, stop, wake) -> None:
    """A worker process: one Worker loop, until `stop` is set or the parent is gone."""
    _die_with_parent()
    os.nice(WORKER_NICE)
    idle_priority()  # first, so that every thread of this process inherits it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server stops us
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    settings = Settings.model_validate_json(settings_json)
    from service.server import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    lock = threading.Lock()

    def send(message) -> None:
        with lock:
            try:
                conn.send(message)
            except (OSError, ValueError):
                pass

    worker = _build_worker(
        settings, index,
        on_success=lambda key, runtime: send(("published", key, runtime.version)),
        on_finished=lambda *finished: send(("finished", *finished)),
        on_progress=lambda: send(("progress",)),
    )

    def watch_parent() -> None:
        while not worker.stop.is_set():
            if os.getppid() != parent or stop.is_set():
                worker.stop.set()
                return
            time.sleep(0.5)

    threading.Thread(target=watch_parent, daemon=True, name="parent-watch").start()

    def wait(timeout: float) -> None:
        if wake.wait(timeout):
            wake.clear()

    send(("ready", index))
    worker.run(wait)
    worker.store.close()


class WorkerProcesses:
    """`count` worker processes, restarted when they die, stopped with the server."""

    def __init__(self, settings: Settings, count: int, on_published: Callable[[str, int], None] | None = None,
                 on_finished=None) -> None:
        self.settings = settings
        self.count = count
        self.on_published = on_published
        self.on_finished = on_finished
        self._ctx = multiprocessing.get_context("spawn")
        self._stop = self._ctx.Event()
        self._wake = self._ctx.Event()
        self._procs: list = [None] * count
        self._conns: list = [None] * count
        self._restarts = [0] * count
        self._ready = [False] * count
        self._busy = 0
        self._notify: Callable[[], None] = lambda: None
        self._closing = threading.Event()
        self._supervisor: threading.Thread | None = None

    def start(self, notify: Callable[[], None] | None = None) -> None:
        """Starts the processes (once; a later call only sets `notify`, which hears of every report)."""
        if notify is not None:
            self._notify = notify
        if self._supervisor is not None:
            return
        for i in range(self.count):
            self._spawn(i)
        # PR_SET_PDEATHSIG fires when the *thread* that started a worker ends: restarts happen on this
        # thread, which lives as long as the server.
        self._supervisor = threading.Thread(target=self._supervise, daemon=True, name="train-processes")
        self._supervisor.start()

    def _spawn(self, i: int) -> None:
        ours, theirs = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=_process_main, name=f"headserve-train-{i}", daemon=True,
            args=(self.settings.model_dump_json(), i, os.getpid(), theirs, self._stop, self._wake))
        proc.start()
        theirs.close()
        self._procs[i], self._conns[i], self._ready[i] = proc, ours, False
        log.debug("training worker process %d started (pid %d)", i, proc.pid)

    def _supervise(self) -> None:
        from multiprocessing.connection import wait

        due: dict[int, float] = {}
        while not self._closing.is_set():
            conns = [c for c in self._conns if c is not None]
            for conn in wait(conns, timeout=0.5) if conns else []:
                i = self._conns.index(conn)
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    conn.close()
                    self._conns[i] = None
                    continue
                self._handle(i, message)
            for i, proc in enumerate(self._procs):
                if proc is not None and not proc.is_alive() and i not in due and not self._closing.is_set():
                    delay = RESTART_DELAYS[min(self._restarts[i], len(RESTART_DELAYS) - 1)]
                    log.error("training worker process %d (pid %d) died with exit code %s; starting another in "
                              "%.0fs (its job, if any, is taken over when its lease runs out)",
                              i, proc.pid, proc.exitcode, delay)
                    self._ready[i] = False
                    due[i] = time.monotonic() + delay
            for i, when in list(due.items()):
                if time.monotonic() >= when and not self._closing.is_set():
                    del due[i]
                    self._restarts[i] += 1
                    if self._conns[i] is not None:
                        self._conns[i].close()
                    self._spawn(i)

    def _handle(self, i: int, message: tuple) -> None:
        kind = message[0]
        if kind == "ready":
            self._ready[i] = True
        elif kind == "published" and self.on_published is not None:
            try:
                self.on_published(message[1], message[2])
            except Exception:
                log.exception("installing a new version reported by worker process %d failed", i)
        elif kind == "finished" and self.on_finished is not None:
            self.on_finished(*message[1:])
        self._notify()

    def wake(self) -> None:
        self._wake.set()

    def alive(self) -> int:
        return sum(1 for p in self._procs if p is not None and p.is_alive())

    def problems(self) -> list[str]:
        if self.count and self.alive() == 0 and sum(self._restarts) > 0:
            return [f"no training worker process is running ({sum(self._restarts)} restart(s) so far)"]
        return []

    def close(self, timeout: float | None = None) -> bool:
        """Asks the workers to stop (a job in training goes back to the queue), then waits up to `timeout`
        seconds and kills what is left."""
        self._closing.set()
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + (10.0 if timeout is None else timeout)
        for proc in self._procs:
            if proc is not None:
                proc.join(max(0.0, deadline - time.monotonic()))
        stopped = True
        for proc in self._procs:
            if proc is not None and proc.is_alive():
                stopped = False
                proc.kill()
                proc.join(5)
        if self._supervisor is not None:
            self._supervisor.join(2)
        for conn in self._conns:
            if conn is not None:
                conn.close()
        return stopped


def run_worker(settings: Settings, ready: Callable[[], None] | None = None,
               stop: threading.Event | None = None) -> int:
    """`headserve worker`: trains jobs from the store with `training_workers` loops until SIGTERM/SIGINT
    (or `stop`). Serves Prometheus metrics on `metrics_address` when set (its liveness probe)."""
    from service.metrics import Metrics

    count = max(1, settings.training_workers)
    metrics = Metrics() if settings.metrics_address else None
    workers = [_build_worker(settings, i, on_finished=metrics.job if metrics else None) for i in range(count)]
    stop = stop or threading.Event()
    if metrics is not None:
        port = metrics.serve(settings.metrics_address)
        log.info("worker metrics on %s (port %d)", settings.metrics_address, port)
    threads = [threading.Thread(target=w.run, name=f"train-{i}", daemon=True) for i, w in enumerate(workers)]
    for t in threads:
        t.start()
    log.info("headserve worker: %d training loop(s) on %s", count, workers[0].store.where)
    if ready is not None:
        ready()
    stop.wait()
    log.info("stopping: jobs in training go back to the queue")
    for w in workers:
        w.stop.set()
    for t in threads:
        t.join(30)
    for w in workers:
        w.store.close()
    if metrics is not None:
        metrics.close()
    return 0
