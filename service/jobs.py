"""Training jobs: a queue in the store, worked by workers that hold a lease on the job they train.

- `JobRunner` is the serving side: it queues jobs (a row in the store's jobs table), answers GetJob and
  WatchJob from the store (so any replica can watch any job), and runs this replica's workers: threads,
  or worker processes (service/worker.py) so that training never holds the serving process's GIL.
- `Worker` is one training loop: claim the oldest queued job (or one whose worker stopped renewing its
  lease), renew the lease while training, publish progress to the store, and store the head as the next
  version only while it still holds the job. A job that runs twice (its first worker died, another took
  over) therefore publishes one version. A worker that is stopped puts its job back in the queue.

What a job computes is service/training.py's.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from adapters.errors import HeadserveError, NotFound
from adapters.options import TrainingOptions
from adapters.runtime import HeadRuntime
from service import errors
from service.registry import BackboneRegistry
from service.storage import WorkerStore
from service.store import HeadRecord, JobRecord, LeaseLost, Quotas, StorageFull, store_outage, tenant_of

log = logging.getLogger(__name__)

PERSIST_EVERY = 0.25  # seconds between two stored progress updates of one job (phase changes are stored at once)

# on_finished(strategy, final state, seconds, seconds per phase): hears of every job a worker ended.
Finished = Callable[[str, str, float, dict[str, float]], None]


class Stopping(Exception):
    """The worker is being stopped: its job goes back to the queue."""


def worker_name(index: int = 0) -> str:
    """A name unique to this worker among all replicas: host, process, index and a random part."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{index}:{uuid.uuid4().hex[:6]}"


def new_job(key: str, options: TrainingOptions) -> JobRecord:
    """A queued job. It carries the id of the request that queued it and, with tracing on, the current trace
    context (W3C `traceparent`), both kept in its status and never sent to clients: the worker that runs it,
    on any replica, logs with that request id and continues the caller's trace."""
    status = {"phase": "queued", "progress": 0.0, "message": "waiting"}
    if errors.request_id.get() != "-":  # the request that queued it: the job's log lines carry its id
        status["request_id"] = errors.request_id.get()
    carrier = _trace_carrier()
    if carrier:
        status["trace"] = carrier
    return JobRecord(job_id=f"job-{uuid.uuid4().hex[:12]}", task_key=key, state="QUEUED",
                     config=dataclasses.asdict(options), status=status)


def _trace_carrier() -> dict[str, str]:
    if "opentelemetry.propagate" not in sys.modules:  # tracing is off: OpenTelemetry was never imported
        return {}
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


@contextlib.contextmanager
def _continued_trace(job: JobRecord):
    """Runs the block in the trace context the job was queued in (when it has one)."""
    carrier = job.status.get("trace")
    if not carrier or "opentelemetry.propagate" not in sys.modules:
        yield
        return
    from opentelemetry import context, propagate

    token = context.attach(propagate.extract(carrier))
    try:
        yield
    finally:
        context.detach(token)


class Worker:
    """Claims jobs from the store and trains them, one at a time, until `stop` is set."""

    def __init__(
        self, store: WorkerStore, registry: BackboneRegistry, name: str, *, lease_seconds: float = 30.0,
        max_attempts: int = 3, poll_seconds: float = 0.25, auto_fine_tune_min_examples: int = 0,
        auto_fine_tune_max_examples: int = 0, on_success: Callable[[str, HeadRuntime], None] | None = None,
        on_finished: Finished | None = None,
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.name = name
        self.lease_ms = int(lease_seconds * 1000)
        self.max_attempts = max_attempts
        self.poll_seconds = poll_seconds
        self.on_success = on_success
        self.on_finished = on_finished
        self.on_progress = on_progress
        from service.training import Trainer  # torch and scikit-learn: loaded where training runs

        self.trainer = Trainer(store, registry, self._publish, auto_fine_tune_min_examples, self._publish_interim,
                               auto_fine_tune_max_examples)
        self.current: JobRecord | None = None
        self._persisted = 0.0
        self._lost = threading.Event()
        self._phases: dict = {}
        self._progress_unstored = False
        self._started = 0.0
        self.stop = threading.Event()

    def run(self, wake: Callable[[float], object] | None = None) -> None:
        """The loop: claims and trains jobs; between claims, waits `poll_seconds` (or until `wake(timeout)`
        returns). Store errors are logged and retried; the loop ends when `stop` is set."""
        wait = wake or self.stop.wait
        failures = 0
        while not self.stop.is_set():
            try:
                job = self.store.claim_job(self.name, self.lease_ms, self.max_attempts)
                failures = 0
            except Exception as exc:  # the store is down or full: try again, more slowly
                failures += 1
                log.error("worker %s cannot claim jobs (%s: %s); retrying", self.name, type(exc).__name__,
                          str(exc).splitlines()[0][:200] if str(exc) else "")
                self.stop.wait(min(30.0, 0.5 * 2 ** min(failures, 6)))
                continue
            if job is None:
                wait(self.poll_seconds)
                continue
            try:
                contextvars.copy_context().run(self._run_in_context, job)
            except Exception:  # never the end of the worker: the job's lease runs out and it is run again
                log.exception("job %s: its run ended unexpectedly; it is run again once its lease runs out",
                              job.job_id)

    def _run_in_context(self, job: JobRecord) -> None:
        errors.job.set(job.job_id)
        errors.request_id.set(job.status.get("request_id", "-"))
        errors.tenant.set(tenant_of(job.task_key) or "-")
        errors.task.set(job.task_id or "-")
        with _continued_trace(job):
            self.run_job(job)

    # --- one job ------------------------------------------------------------------------------------

    def _publish(self, job: JobRecord, persist: bool = False, **status) -> None:
        """A progress update from training: stored (at most every PERSIST_EVERY s, and at once when
        `persist`); raises LeaseLost or Stopping to end training where it stands."""
        self._check_held(job)
        if "phase" in status:
            self._enter_phase(status["phase"])
        job.status.update(status)
        now = time.monotonic()
        if persist or now - self._persisted >= PERSIST_EVERY:
            self._persisted = now
            try:
                self.store.update_job(job.job_id, job.state, job.status, owner=self.name)
            except Exception as exc:
                if not store_outage(exc):
                    raise
                # Progress is for watchers: training goes on, and the result waits for the store.
                if not self._progress_unstored:
                    self._progress_unstored = True
                    log.warning("job %s: progress not stored while the store is not answering (%s); training "
                                "goes on", job.job_id, type(exc).__name__)
                return
            if self.on_progress is not None:
                self.on_progress()

    def _check_held(self, job: JobRecord) -> None:
        """Ends training where it stands when the lease was lost (LeaseLost) or the worker stops (Stopping)."""
        if self._lost.is_set():
            raise LeaseLost(f"job {job.job_id}: the lease of {self.name} was lost")
        if self.stop.is_set():
            raise Stopping()

    def _publish_interim(self, job: JobRecord, head: HeadRecord, backbone: str) -> None:
        """Makes a head the task's live version while the job goes on (service/training.py, `interim`):
        stored under this worker's lease, then installed like a finished job's head."""
        self._check_held(job)
        runtime = HeadRuntime(head.onnx, head.labels, 0, backbone, str(self.registry.device),
                              self.registry.head_threads)
        status = {**job.status, "message": "the feature head is live; fine-tuning"}
        try:
            version = self.store.publish_interim(job.job_id, head, self.name, status)
        except Exception as exc:
            if not store_outage(exc):
                raise
            log.warning("job %s: no interim head, the store is not answering (%s); fine-tuning goes on",
                        job.job_id, type(exc).__name__)
            return
        job.version = runtime.version = version
        job.status = {**status, "interim_version": version}
        if self.on_success is not None:
            self.on_success(job.task_key, runtime)
        if self.on_progress is not None:
            self.on_progress()
        log.info("job %s: task %s version %d (interim) live after %.2fs", job.job_id, job.task_id, version,
                 time.perf_counter() - self._started)

    def _heartbeat(self, job: JobRecord, done: threading.Event) -> None:
        interval = self.lease_ms / 3000
        while not done.wait(interval):
            try:
                if not self.store.renew_lease(job.job_id, self.name, self.lease_ms):
                    if job.state in ("SUCCEEDED", "FAILED"):
                        return  # stored as this renewal was due (and the new head is still being installed)
                    log.warning("job %s: %s no longer holds it (lease lost, or the job was deleted); stopping it",
                                job.job_id, self.name)
                    self._lost.set()
                    return
            except Exception as exc:  # keep trying until the lease runs out: another worker may take over
                log.warning("job %s: the lease could not be renewed (%s)", job.job_id, type(exc).__name__)

    def run_job(self, job: JobRecord) -> None:
        start = self._started = time.perf_counter()
        self.current, self._lost, self._phases, self._persisted = job, threading.Event(), {}, 0.0
        self._progress_unstored = False  # warned that progress is not being stored (the store is down)
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job, done), daemon=True, name=f"lease-{job.job_id}")
        beat.start()
        log.info("job %s of task %s claimed by %s (attempt %d)", job.job_id, job.task_id, self.name, job.attempts)
        try:
            self._train(job, start)
        finally:
            done.set()
            self.current = None
            self._enter_phase("")
            if self.on_finished is not None and job.state in ("SUCCEEDED", "FAILED"):
                self.on_finished(job.config.get("strategy", "auto"), job.state, time.perf_counter() - start,
                                 self._phases)
            if self.on_progress is not None:
                self.on_progress()

    def _train(self, job: JobRecord, start: float) -> None:
        try:
            head, backbone = self.trainer.run(job)
            status = {**job.status, "phase": "done", "progress": 1.0, "message": "ready",
                      "seconds": time.perf_counter() - start, "evaluation": head.evaluation}
            runtime = HeadRuntime(head.onnx, head.labels, 0, backbone, str(self.registry.device),
                                  self.registry.head_threads)
            version = self._stored(job, "its head", self.store.finish_job, job.job_id, status, head=head,
                                   owner=self.name)
            job.state, job.version, job.status = "SUCCEEDED", version, status
            runtime.version = version
            if self.on_success is not None:
                self.on_success(job.task_key, runtime)
            log.info("job %s: task %s version %d live in %.2fs", job.job_id, job.task_id, version, status["seconds"])
        except Stopping:
            released = self._quietly(self.store.release_job, job.job_id, self.name)
            job.state = "QUEUED"
            log.info("job %s %s (the worker is stopping)", job.job_id,
                     "is back in the queue for another worker" if released else "is left to its lease")
        except LeaseLost as exc:
            job.state = "LOST"
            log.warning("job %s: %s; nothing of this run is stored", job.job_id, exc.message)
        except NotFound:
            job.state = "LOST"
            log.info("job %s ended: its task was deleted while it trained", job.job_id)
        except Exception as exc:
            if store_outage(exc):  # not the job's fault: it runs again (here or elsewhere) once the store is back
                released = self._quietly(self.store.release_job, job.job_id, self.name)
                job.state = "QUEUED"
                log.warning("job %s: the store stopped answering while it trained (%s); %s", job.job_id,
                            type(exc).__name__, "it is back in the queue" if released else "it is left to its lease")
                return
            if isinstance(exc, HeadserveError):
                error = exc.message
            else:
                log.exception("job %s failed", job.job_id)
                error = f"internal error during training ({type(exc).__name__}); see the server log for job {job.job_id}"
            job.state, job.error = "FAILED", error
            job.status = {**job.status, "phase": "failed", "message": error}
            self._record_failure(job)

    @staticmethod
    def _quietly(call, *args) -> bool:
        try:
            return call(*args)
        except Exception as exc:
            log.warning("%s failed: %s", getattr(call, "__name__", "call"), type(exc).__name__)
            return False

    def _stored(self, job: JobRecord, what: str, call, *args, while_full: bool = False, **kwargs):
        """`call(*args, **kwargs)`, a write of the job's result, tried again while the store does not answer
        (PostgreSQL restarting, a connection dropped), and with `while_full` while it is full, with backoff
        up to 10 s. Raises Stopping when the worker stops first (the job then stays RUNNING under a lease
        nobody renews, and is run again), and LeaseLost once the store is back if another worker took the
        job meanwhile."""
        delay = 0.5
        while True:
            try:
                return call(*args, **kwargs)
            except StorageFull:
                if not while_full:
                    raise
                log.error("job %s: %s cannot be stored yet, the store is full; retrying", job.job_id, what)
            except Exception as exc:
                if not store_outage(exc):
                    raise
                log.warning("job %s: %s cannot be stored yet, the store is not answering (%s); retrying",
                            job.job_id, what, type(exc).__name__)
            if self.stop.wait(delay):
                raise Stopping()
            delay = min(2 * delay, 10.0)

    def _record_failure(self, job: JobRecord) -> None:
        """Stores the job's failure, retrying while the store is full or not answering. If the worker stops
        first, the job stays RUNNING under a lease nobody renews, and another worker runs it again."""
        try:
            self._stored(job, f"its failure ({job.error})", self.store.finish_job, job.job_id, job.status,
                         error=job.error, owner=self.name, while_full=True)
        except (NotFound, LeaseLost, Stopping):
            return  # the task was deleted, another worker holds the job now, or this worker is stopping

    def _enter_phase(self, phase: str) -> None:
        """Books the time since the last phase change to that phase ('' ends the last one)."""
        now = time.perf_counter()
        spent = self._phases
        current, since = spent.pop("@", ("", now))
        if current and current != phase:
            spent[current] = spent.get(current, 0.0) + now - since
        if phase:
            spent["@"] = (phase, since if current == phase else now)


class JobRunner:
    """The serving side of training: queues jobs, reads them back, and runs this replica's workers
    (`workers` threads; or none, when worker processes or another replica train)."""

    def __init__(
        self, store: WorkerStore, registry: BackboneRegistry, on_success: Callable[[str, HeadRuntime], None],
        workers: int = 1, auto_fine_tune_min_examples: int = 0, on_finished: Finished | None = None,
        lease_seconds: float = 30.0, max_attempts: int = 3, processes=None, auto_fine_tune_max_examples: int = 0,
    ) -> None:
        """`processes` (service.worker.WorkerProcesses), when given, trains instead of threads."""
        self.store = store
        self.registry = registry
        self.processes = processes
        self._changed = threading.Condition()
        self._wake = threading.Event()
        self._workers = [
            Worker(store, registry, worker_name(i), lease_seconds=lease_seconds, max_attempts=max_attempts,
                   auto_fine_tune_min_examples=auto_fine_tune_min_examples,
                   auto_fine_tune_max_examples=auto_fine_tune_max_examples, on_success=on_success,
                   on_finished=on_finished, on_progress=self.notify)
            for i in range(0 if processes is not None else workers)
        ]
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for worker in self._workers:
            thread = threading.Thread(target=self._train, args=(worker,), daemon=True,
                                      name=f"train-{worker.name.rsplit(':', 2)[1]}")
            thread.start()
            self._threads.append(thread)
        if self.processes is not None:
            self.processes.start(self.notify)

    def _train(self, worker: Worker) -> None:
        """A training thread of the server: below serving in the CPU scheduler (SCHED_IDLE), then the loop."""
        from service.worker import idle_priority

        idle_priority()
        worker.run(self._wait_for_work)

    def _wait_for_work(self, timeout: float) -> None:
        if self._wake.wait(timeout):
            self._wake.clear()

    def notify(self) -> None:
        """Something changed: wake watchers (and idle workers)."""
        with self._changed:
            self._changed.notify_all()

    def submit(self, key: str, options: TrainingOptions, quotas: Quotas = Quotas()) -> JobRecord:
        """Queues a job for the task with store key `key` (within the tenant's training_jobs quota)."""
        job = new_job(key, options)
        self.store.start_job(job, quotas)
        self.queued()
        return job

    def queued(self) -> None:
        """A job was queued (here, or in the same transaction as its task): wake a worker."""
        self._wake.set()
        if self.processes is not None:
            self.processes.wake()

    def resume(self) -> int:
        """At start-up, on a store only this server uses (SQLite), jobs a previous run left RUNNING go back
        to the queue at once; on a shared store, their leases run out and any worker takes them over."""
        if self.store.dialect == "sqlite":
            requeued = self.store.requeue_running()
            if requeued:
                log.info("%d job(s) left running by the previous run are queued again", requeued)
        pending = len(self.store.unfinished_jobs())
        if pending:
            self.queued()
        return pending

    def get(self, job_id: str) -> JobRecord:
        return self.store.get_job(job_id)

    def watch(self, job_id: str, keep_going: Callable[[], bool], interval: float = 0.2) -> Iterator[JobRecord]:
        """Yields the job's state now and at each change, until it ends or `keep_going()` is false. Any
        replica can watch any job: progress is read from the store (every `interval` s, or sooner when a
        worker of this replica reports)."""
        last = None
        while True:
            job = self.get(job_id)
            key = (job.state, tuple(sorted((k, str(v)) for k, v in job.status.items())))
            if key != last:
                last = key
                yield job
            if job.finished or not keep_going():
                return
            with self._changed:
                self._changed.wait(interval)

    def problems(self) -> list[str]:
        """For the health check: this replica's training workers that should run and do not."""
        if self.processes is not None:
            return self.processes.problems()
        dead = [t.name for t in self._threads if not t.is_alive()]
        return [f"training worker thread {name} has stopped" for name in dead]

    def close(self, timeout: float | None = None) -> bool:
        """Stops the workers: a job in training goes back to the queue at its next progress report. Returns
        whether every worker stopped within `timeout` seconds (None: waits)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            worker.stop.set()
        self._wake.set()
        stopped = True
        if self.processes is not None:
            stopped = self.processes.close(timeout)
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            stopped = stopped and not thread.is_alive()
        return stopped
