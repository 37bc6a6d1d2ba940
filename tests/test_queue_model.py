"""The jobs queue against a model, driven by Hypothesis: workers claim, heartbeat, report progress, release,
publish and fail jobs while the clock moves past their leases and a replica restarts. After every step the
store agrees with the model: who holds which job, which job a claim hands out (the oldest claimable one),
who may write (a worker whose lease ran out publishes nothing), at most one version per job, and each
task's state and live version.

One SQLite store per example, with its clock (`service.store.now_ms`) moved by the test so that leases
run out without waiting; the same SQL runs on PostgreSQL, whose concurrent claims tests/test_queue.py
covers."""

from __future__ import annotations

import dataclasses
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from service import store as store_module
from service.store import DEFAULT_TENANT, HeadRecord, JobRecord, LeaseLost, Store, TaskRecord, task_key

WORKERS = ("w1", "w2", "w3")
TASKS = ("t1", "t2", "t3")
LEASE_MS = 1_000
MAX_ATTEMPTS = 3


@dataclasses.dataclass
class Job:
    job_id: str
    key: str
    created: int
    state: str = "QUEUED"
    owner: str = ""
    lease_until: int = 0
    attempts: int = 0
    version: int = 0


class QueueModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.TemporaryDirectory(prefix="queue-model-")
        self.clock = 1_000_000
        self.store: Store | None = None
        self.jobs: dict[str, Job] = {}
        self.versions: dict[str, int] = {}  # task key -> versions published
        self.serial = 0

    @initialize()
    def open_store(self) -> None:
        store_module.now_ms = lambda: self.clock
        self.store = Store(f"sqlite:///{self.folder.name}/store.sqlite3")
        for task_id in TASKS:
            self.store.create_task(TaskRecord.new(DEFAULT_TENANT, task_id, "minilm-l6", ["a", "b"], {}), [])
            self.versions[task_key(DEFAULT_TENANT, task_id)] = 0

    def teardown(self) -> None:
        if self.store is not None:
            self.store.close()
        self.folder.cleanup()

    # --- the model ------------------------------------------------------------------------------------

    def active(self, key: str) -> Job | None:
        return next((j for j in self.jobs.values() if j.key == key and j.state in ("QUEUED", "RUNNING")), None)

    def holds(self, owner: str, job: Job) -> bool:
        return job.state == "RUNNING" and job.owner == owner

    def end(self, job: Job, published: bool) -> None:
        job.state, job.owner, job.lease_until = ("SUCCEEDED" if published else "FAILED"), "", 0
        if published:
            self.versions[job.key] += 1
            job.version = self.versions[job.key]

    # --- rules ------------------------------------------------------------------------------------------

    @rule(task=st.sampled_from(TASKS))
    def queue(self, task: str) -> None:
        key = task_key(DEFAULT_TENANT, task)
        self.serial += 1
        job_id = f"j{self.serial:03d}"
        record = JobRecord(job_id=job_id, task_key=key, state="QUEUED", config={"strategy": "auto"}, status={})
        if self.active(key) is not None:
            with pytest.raises(Exception, match="already training"):
                self.store.start_job(record)
            return
        self.store.start_job(record)
        self.jobs[job_id] = Job(job_id, key, self.clock)

    @rule(owner=st.sampled_from(WORKERS))
    def claim(self, owner: str) -> None:
        got = self.store.claim_job(owner, LEASE_MS, MAX_ATTEMPTS)
        while True:  # the model's claim: oldest claimable first; too many attempts fail it on the way
            ready = sorted((j for j in self.jobs.values() if j.state == "QUEUED"
                            or (j.state == "RUNNING" and j.lease_until < self.clock)),
                           key=lambda j: (j.created, j.job_id))
            if not ready:
                assert got is None
                return
            job = ready[0]
            if job.attempts >= MAX_ATTEMPTS:
                self.end(job, published=False)
                continue
            break
        assert got is not None and got.job_id == job.job_id, (got, job)
        job.state, job.owner, job.lease_until, job.attempts = "RUNNING", owner, self.clock + LEASE_MS, job.attempts + 1
        assert (got.owner, got.attempts, got.lease_until_ms) == (owner, job.attempts, job.lease_until)

    @precondition(lambda self: self.jobs)
    @rule(owner=st.sampled_from(WORKERS), data=st.data())
    def heartbeat(self, owner: str, data) -> None:
        job = self.jobs[data.draw(st.sampled_from(sorted(self.jobs)))]
        renewed = self.store.renew_lease(job.job_id, owner, LEASE_MS)
        # The owner renews even after its lease ran out, as long as nobody took the job over.
        assert renewed == self.holds(owner, job)
        if renewed:
            job.lease_until = self.clock + LEASE_MS

    @precondition(lambda self: self.jobs)
    @rule(owner=st.sampled_from(WORKERS), data=st.data())
    def progress(self, owner: str, data) -> None:
        job = self.jobs[data.draw(st.sampled_from(sorted(self.jobs)))]
        if self.holds(owner, job):
            self.store.update_job(job.job_id, "RUNNING", {"phase": "training"}, owner=owner)
        else:
            with pytest.raises(LeaseLost):
                self.store.update_job(job.job_id, "RUNNING", {"phase": "training"}, owner=owner)

    @precondition(lambda self: self.jobs)
    @rule(owner=st.sampled_from(WORKERS), data=st.data())
    def release(self, owner: str, data) -> None:
        job = self.jobs[data.draw(st.sampled_from(sorted(self.jobs)))]
        released = self.store.release_job(job.job_id, owner)
        assert released == self.holds(owner, job)
        if released:
            job.state, job.owner, job.lease_until = "QUEUED", "", 0

    @precondition(lambda self: self.jobs)
    @rule(owner=st.sampled_from(WORKERS), data=st.data(), publish=st.booleans())
    def finish(self, owner: str, data, publish: bool) -> None:
        job = self.jobs[data.draw(st.sampled_from(sorted(self.jobs)))]
        head = HeadRecord(task_key="", version=0, onnx=job.job_id.encode(), labels=["a", "b"], evaluation={})
        args = dict(status={"phase": "done"}, head=head if publish else None, error="" if publish else "failed",
                    owner=owner)
        if not self.holds(owner, job):
            with pytest.raises(LeaseLost):
                self.store.finish_job(job.job_id, **args)
            return
        version = self.store.finish_job(job.job_id, **args)
        self.end(job, published=publish)
        assert version == job.version

    @rule(ms=st.sampled_from([10, 400, 999, 1_001, 5_000]))
    def time_passes(self, ms: int) -> None:
        self.clock += ms

    @rule()
    def restart_single_replica(self) -> None:
        """A SQLite server starting again puts every running job back in the queue."""
        running = [j for j in self.jobs.values() if j.state == "RUNNING"]
        assert self.store.requeue_running() == len(running)
        for job in running:
            job.state, job.owner, job.lease_until = "QUEUED", "", 0

    # --- the store agrees ----------------------------------------------------------------------------------

    @invariant()
    def store_matches_model(self) -> None:
        if self.store is None:
            return
        for job in self.jobs.values():
            stored = self.store.get_job(job.job_id)
            assert (stored.state, stored.owner, stored.attempts, stored.version) == \
                (job.state, job.owner, job.attempts, job.version), (stored, job)
            if job.state == "RUNNING":
                assert stored.lease_until_ms == job.lease_until
        for key, versions in self.versions.items():
            task = self.store.get_task(key)
            assert task.live_version == versions
            active = self.active(key)
            ended = [j for j in self.jobs.values() if j.key == key]
            if active is not None:
                assert task.state == "TRAINING" and task.job_id == active.job_id
            elif ended:
                last = max(ended, key=lambda j: (j.created, j.job_id))
                assert task.state == ("READY" if last.state == "SUCCEEDED" else "FAILED")
            published = sorted(j.version for j in ended if j.version)
            assert published == list(range(1, versions + 1))  # one version per job that published


@pytest.fixture
def real_clock():
    """The state machine moves `service.store.now_ms`; the real one comes back after the test."""
    saved = store_module.now_ms
    yield
    store_module.now_ms = saved


def test_queue_agrees_with_its_model(real_clock):
    QueueModel.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])
    QueueModel.TestCase().runTest()
