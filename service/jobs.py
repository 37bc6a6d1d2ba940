"""Training jobs: queued durably, run in the background, progress published to watchers.

A job computes (or reuses cached) trunk features for the task's examples, trains a head, exports
and checks its ONNX, then stores it as the next version and makes it live in one transaction.
Jobs still queued or running when the server stopped are run again at start-up.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor


from adapters.errors import HeadserveError, NotFound
from adapters.heads import TrainingOptions
from adapters.runtime import HeadRuntime
from service import errors
from service.registry import BackboneRegistry
from service.store import JobRecord, Quotas, StorageFull, Store, tenant_of
from service.training import Trainer

log = logging.getLogger(__name__)

class JobRunner:
    def __init__(
        self,
        store: Store,
        registry: BackboneRegistry,
        on_success: Callable[[str, HeadRuntime], None],
        workers: int = 1,
        auto_fine_tune_min_examples: int = 0,
        on_finished: Callable[[str, str, float, dict[str, float]], None] | None = None,
    ) -> None:
        """`on_finished(strategy, state, seconds, seconds per phase)` hears of every job that ended."""
        self.store = store
        self.registry = registry
        self.trainer = Trainer(store, registry, self._publish, auto_fine_tune_min_examples)
        self.on_success = on_success
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="train")
        self.on_finished = on_finished
        self._live: dict[str, JobRecord] = {}  # unfinished jobs, with fine-grained status
        self._phases: dict[str, dict] = {}  # job id -> seconds per phase so far, "@": (phase now, since)
        self._changed = threading.Condition()
        self._closing = threading.Event()

    def submit(self, key: str, options: TrainingOptions, quotas: Quotas = Quotas()) -> JobRecord:
        """Queues a job for the task with store key `key` (within the tenant's training_jobs quota)."""
        job = JobRecord(
            job_id=f"job-{uuid.uuid4().hex[:12]}", task_key=key, state="QUEUED",
            config=dataclasses.asdict(options), status={"phase": "queued", "progress": 0.0, "message": "waiting"},
        )
        self.store.start_job(job, quotas)
        self._enqueue(job)
        return job

    def resume(self) -> int:
        """Re-queues the jobs a previous run of the server left unfinished."""
        pending = self.store.unfinished_jobs()
        for job in pending:
            log.info("resuming job %s of task %s", job.job_id, job.task_id)
            self._enqueue(job)
        return len(pending)

    def _enqueue(self, job: JobRecord) -> None:
        with self._changed:
            self._live[job.job_id] = job
            self._changed.notify_all()
        # The job runs in a copy of the submitting call's context (its request id, and its trace when tracing
        # is on), with the job's id, tenant and task set, so every log line of the job carries them.
        try:
            self._pool.submit(contextvars.copy_context().run, self._run_in_context, job)
        except RuntimeError:  # the server is stopping: the job is queued in the store and runs at the next start
            with self._changed:
                self._live.pop(job.job_id, None)
                self._changed.notify_all()
            log.info("job %s stays queued for the next start (the server is stopping)", job.job_id)

    def _run_in_context(self, job: JobRecord) -> None:
        errors.job.set(job.job_id)
        errors.tenant.set(tenant_of(job.task_key) or "-")
        errors.task.set(job.task_id or "-")
        self._run(job)

    def get(self, job_id: str) -> JobRecord:
        with self._changed:
            live = self._live.get(job_id)
            if live is not None:
                return dataclasses.replace(live, status=dict(live.status))
        return self.store.get_job(job_id)

    def watch(self, job_id: str, keep_going: Callable[[], bool], interval: float = 1.0) -> Iterator[JobRecord]:
        """Yields the job's state now and at each change, until it ends or `keep_going()` is false."""
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

    def _publish(self, job: JobRecord, persist: bool = False, **status) -> None:
        if "phase" in status:
            self._enter_phase(job.job_id, status["phase"])
        with self._changed:
            job.status.update(status)
            self._changed.notify_all()
        if persist:
            self.store.update_job(job.job_id, job.state, job.status)

    def _run(self, job: JobRecord) -> None:
        start = time.perf_counter()
        job.state = "RUNNING"
        deferred = False
        try:
            head, backbone = self.trainer.run(job)
            status = {**job.status, "phase": "done", "progress": 1.0, "message": "ready",
                      "seconds": time.perf_counter() - start, "evaluation": head.evaluation}
            runtime = HeadRuntime(head.onnx, head.labels, 0, backbone, str(self.registry.device))
            version = self.store.finish_job(job.job_id, status, head=head)
            runtime.version = version
            self.on_success(job.task_key, runtime)
            job.state, job.version, job.status = "SUCCEEDED", version, status
            log.info("job %s: task %s version %d live in %.2fs", job.job_id, job.task_id, version, status["seconds"])
        except Exception as exc:
            if isinstance(exc, HeadserveError):
                error = exc.message
            else:
                log.exception("job %s failed", job.job_id)
                error = f"internal error during training ({type(exc).__name__}); see the server log for job {job.job_id}"
            status = {**job.status, "phase": "failed", "message": error}
            job.state, job.error, job.status = "FAILED", error, status
            if not self._record_failure(job):
                # Even the failure cannot be written (the disk is full): watchers see FAILED from here
                # (the job stays in _live) while a thread retries the write until space returns.
                log.error("job %s failed (%s); its failure cannot be stored yet, retrying", job.job_id, error)
                deferred = True
                threading.Thread(target=contextvars.copy_context().run,  # in the job's context, as it runs
                                 args=(self._record_failure_later, job), daemon=True,
                                 name=f"finish-{job.job_id}").start()
        finally:
            self._enter_phase(job.job_id, "")
            if self.on_finished is not None:
                self.on_finished(job.config.get("strategy", "auto"), job.state, time.perf_counter() - start,
                                 self._phases.pop(job.job_id, {}))
            self._phases.pop(job.job_id, None)
            if not deferred:
                with self._changed:
                    self._live.pop(job.job_id, None)
                    self._changed.notify_all()

    def _enter_phase(self, job_id: str, phase: str) -> None:
        """Books the time since the last phase change to that phase ('' ends the last one)."""
        now = time.perf_counter()
        spent = self._phases.setdefault(job_id, {})
        current, since = spent.pop("@", ("", now))
        if current and current != phase:
            spent[current] = spent.get(current, 0.0) + now - since
        if phase:
            spent["@"] = (phase, since if current == phase else now)

    def _record_failure(self, job: JobRecord) -> bool:
        """Stores the job's failure; false when the store is full (nothing was written)."""
        try:
            self.store.finish_job(job.job_id, job.status, error=job.error)
        except NotFound:
            pass  # the task was deleted while training
        except StorageFull:
            return False
        return True

    def _record_failure_later(self, job: JobRecord, first_delay: float = 0.5, max_delay: float = 10.0) -> None:
        """Retries storing a failure until it is stored. If the server stops first, the store still says
        RUNNING, and the job runs again at the next start."""
        delay = first_delay
        while not self._closing.wait(delay):
            if self._record_failure(job):
                log.info("job %s: its failure is stored", job.job_id)
                with self._changed:
                    self._live.pop(job.job_id, None)
                    self._changed.notify_all()
                return
            delay = min(2 * delay, max_delay)

    def close(self) -> None:
        self._closing.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
