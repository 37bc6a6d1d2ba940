"""Three `headserve serve` processes on one PostgreSQL: the scenario of several replicas behind a Service.

Real processes (started like `make serve` with HEADSERVE_STORE_URL), a real PostgreSQL 15 cluster
(tests/postgres.py), real channels. Each replica trains in a thread here (one backbone load per replica on
a 2-core machine); worker processes are covered by the session server of conftest.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import HELD_OUT, TOPICS, Client, text_examples, unique_id

from adapters.errors import NotFound
from service.gen import headserve_pb2 as pb
from service.store import Store, task_key
from service.tenants import TenantAdmin

pytestmark = pytest.mark.slow

LEASE = 3.0  # job_lease_seconds of the replicas: a dead replica's job is taken over after this
SYNC = 0.5  # sync_interval_seconds (the poll; PostgreSQL's NOTIFY is the fast path)
WITHIN = 1.0  # every replica agrees within this, after a change commits
# Two clear inputs, and two neutral ones whose scores are far from 0 and 1, so that two versions' scores
# tell apart (a response mixed from two versions would show).
PROBE = [HELD_OUT["sports"][0], HELD_OUT["cooking"][0], "It happened on a Tuesday.", "Nothing much to report."]


class Replica:
    """`python -m service serve` on port 0 against the store URL, its log read all along."""

    def __init__(self, name: str, data_dir, store_url: str) -> None:
        self.name = name
        env = {**os.environ, "HEADSERVE_STORE_URL": store_url, "HEADSERVE_BUILTIN_BACKBONES": '["minilm-l6"]',
               "HEADSERVE_DEVICE": "cpu", "HEADSERVE_AUTH": "api_key", "HEADSERVE_TRAINING_ISOLATION": "thread",
               "HEADSERVE_JOB_LEASE_SECONDS": str(LEASE), "HEADSERVE_SYNC_INTERVAL_SECONDS": str(SYNC),
               "HEADSERVE_INTRA_OP_THREADS": "1", "HEADSERVE_AUTO_FINE_TUNE_MIN_EXAMPLES": "0",
               "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--address", "127.0.0.1:0", "--data-dir", str(data_dir),
             "--log-level", "INFO"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        self.log: list[str] = []
        self.address = ""
        self._port = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def wait_started(self) -> None:
        if not self._port.wait(240) or not self.address:
            self.kill()
            raise RuntimeError(f"replica {self.name} did not start:\n" + "".join(self.log)[-3000:])

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            match = re.search(r"listening on \S+ \(port (\d+)\)", line)
            if match and not self.address:
                self.address = f"127.0.0.1:{match.group(1)}"
                self._port.set()
        self._port.set()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


class Cluster:
    def __init__(self, url: str, replicas: list[Replica], key: str, admin_key: str) -> None:
        self.url = url
        self.replicas = replicas
        self.key = key
        self.admin_key = admin_key
        self.store = Store(url)
        self.clients = {r.name: Client(r.address, key) for r in replicas}

    def client(self, name: str) -> Client:
        return self.clients[name]


@pytest.fixture(scope="module")
def cluster(postgres, tmp_path_factory):
    url = postgres.create_database("replicas")
    # The schema comes from the CLI, as the prod overlay's migration Job runs it; a server would refuse
    # an empty database.
    done = subprocess.run([sys.executable, "-m", "service", "db", "upgrade", "--store-url", url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    admin_store = Store(url)
    tenant, _, key = TenantAdmin(admin_store).create_tenant(unique_id("team"), ["predict", "train"])
    ops, _, admin_key = TenantAdmin(admin_store).create_tenant(unique_id("ops"), ["admin"])
    admin_store.close()
    replicas = [Replica(name, tmp_path_factory.mktemp(f"replica-{name}"), url) for name in "ABC"]
    try:
        for r in replicas:
            r.wait_started()
        c = Cluster(url, replicas, key, admin_key)
        c.tenant_id = tenant.tenant_id
        yield c
    finally:
        for r in replicas:
            r.stop()
        for r in replicas:
            r.kill()


def create(client: Client, task_id: str, examples=None, **request) -> pb.Task:
    return client.stub.CreateTask(pb.CreateTaskRequest(
        task_id=task_id, backbone="minilm-l6", examples=examples if examples is not None else text_examples(),
        **request), timeout=60)


def predict(client: Client, task_id: str, texts=PROBE) -> pb.PredictResponse:
    return client.stub.Predict(pb.PredictRequest(task_id=task_id, inputs=[pb.Input(text=t) for t in texts]),
                               timeout=30)


def scores(response: pb.PredictResponse) -> np.ndarray:
    return np.array([[s.score for s in sorted(p.top, key=lambda s: s.label)]
                     for p in response.predictions])


def wait_for(condition, timeout: float, step: float = 0.02):
    """Polls `condition()` until it returns a true value; returns (value, seconds taken)."""
    start = time.monotonic()
    while True:
        value = condition()
        if value:
            return value, time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(step)


def test_created_on_one_replica_predicted_identically_on_the_others(cluster):
    a, b, c = (cluster.client(n) for n in "ABC")
    task_id = unique_id("shared")
    create(a, task_id)
    job = b.wait_ready(task_id)  # watched from another replica: progress lives in the store
    assert job.state == pb.Job.SUCCEEDED and job.version == 1
    on_b, on_c = predict(b, task_id), predict(c, task_id)
    assert on_b.version == on_c.version == 1
    np.testing.assert_array_equal(scores(on_b), scores(on_c))
    np.testing.assert_array_equal(scores(predict(a, task_id)), scores(on_b))
    assert on_b.predictions[0].label == "sports" and on_b.predictions[1].label == "cooking"


def test_a_new_version_is_served_everywhere_within_a_second_and_never_mixed(cluster):
    a, b, c = (cluster.client(n) for n in "ABC")
    task_id = unique_id("versions")
    create(a, task_id)
    assert a.wait_ready(task_id).state == pb.Job.SUCCEEDED
    v1 = scores(predict(c, task_id))
    for client in (a, b):
        predict(client, task_id)  # every replica holds version 1 in its cache
    seen: list[tuple[float, int, np.ndarray]] = []
    stop = threading.Event()

    def load() -> None:  # C under load while B trains version 2
        while not stop.is_set():
            response = predict(c, task_id)
            seen.append((time.monotonic(), response.version, scores(response)))
            # Paced: the replicas share this process's cores, and B's training thread (SCHED_IDLE) only gets
            # what serving leaves; a loop without pauses would hold it off for as long as it runs.
            time.sleep(0.005)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        b.stub.AddExamples(iter([pb.AddExamplesRequest(task_id=task_id, examples=[
            pb.Example(input=pb.Input(text=t), label=label) for label, texts in HELD_OUT.items() for t in texts])]),
            timeout=60)
        b.stub.TrainTask(pb.TrainTaskRequest(task_id=task_id), timeout=30)
        job = b.wait_ready(task_id)
        assert job.state == pb.Job.SUCCEEDED and job.version == 2
        done = time.monotonic()  # (the job is SUCCEEDED once its version committed)
        for client in (a, b, c):
            _, took = wait_for(lambda client=client: predict(client, task_id).version == 2, WITHIN + 1)
            assert took <= WITHIN, f"{client.address} served version 1 for {took:.2f}s after version 2 went live"
        time.sleep(0.3)
    finally:
        stop.set()
        loader.join(30)
    v2 = scores(predict(a, task_id))
    assert np.abs(v1 - v2).max() > 1e-3, "the two versions score the probes apart"
    versions = [v for _, v, _ in seen]
    assert 1 in versions and 2 in versions, "the load saw both versions"
    first_v2 = versions.index(2)
    assert all(v == 2 for v in versions[first_v2:]), "a replica went back to version 1"
    for _, version, got in seen:  # every response is wholly one version's scores
        np.testing.assert_allclose(got, v1 if version == 1 else v2, rtol=0, atol=1e-4)
    assert seen[first_v2][0] - done <= WITHIN


def test_a_delete_stops_serving_everywhere_within_a_second(cluster):
    a, b, c = (cluster.client(n) for n in "ABC")
    task_id = unique_id("deleted")
    create(a, task_id)
    a.wait_ready(task_id)
    for client in (a, b):
        predict(client, task_id)  # held in their caches
    c.stub.DeleteTask(pb.DeleteTaskRequest(task_id=task_id), timeout=30)
    deleted = time.monotonic()

    def gone(client: Client) -> bool:
        try:
            predict(client, task_id)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            return True
        return False

    for client in (a, b):
        wait_for(lambda client=client: gone(client), WITHIN + 2)
        assert time.monotonic() - deleted <= WITHIN + 0.2  # (+ the calls that observed it)


def test_the_same_create_sent_to_all_three_at_once_wins_once(cluster):
    task_id = unique_id("race")
    outcomes: list[object] = []
    barrier = threading.Barrier(3)

    def send(name: str) -> None:
        barrier.wait()
        try:
            create(cluster.client(name), task_id)
            outcomes.append("ok")
        except grpc.RpcError as exc:
            outcomes.append(exc.code())

    threads = [threading.Thread(target=send, args=(n,)) for n in "ABC"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(map(str, outcomes)) == sorted(["ok", str(grpc.StatusCode.ALREADY_EXISTS),
                                                 str(grpc.StatusCode.ALREADY_EXISTS)])
    jobs = [j for j in cluster.store.unfinished_jobs() if j.task_key.endswith("/" + task_id)]
    assert len(jobs) <= 1  # one task, one job (or it already finished)
    assert cluster.client("A").wait_ready(task_id).version == 1


def test_a_revoked_key_is_refused_by_every_replica_within_a_second(cluster):
    ops = Client(cluster.replicas[2].address, cluster.admin_key)
    made = ops.admin.CreateKey(pb.CreateKeyRequest(tenant=cluster.tenant_id, scopes=["predict"]), timeout=30)
    users = [Client(r.address, made.api_key) for r in cluster.replicas[:2]]
    try:
        for user in users:  # accepted, and cached by the replica (auth_cache_seconds)
            user.stub.ListBackbones(pb.ListBackbonesRequest(), timeout=30)
        ops.admin.RevokeKey(pb.RevokeKeyRequest(key_id=made.key.key_id), timeout=30)
        revoked = time.monotonic()

        def refused(user: Client) -> bool:
            try:
                user.stub.ListBackbones(pb.ListBackbonesRequest(), timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
                return True
            return False

        for user in users:
            wait_for(lambda user=user: refused(user), WITHIN + 2)
        assert time.monotonic() - revoked <= WITHIN + 0.2
    finally:
        for user in users:
            user.close()
        ops.close()


def test_an_acknowledged_add_examples_survives_its_replica_killed_at_once(cluster):
    c, a = cluster.client("C"), cluster.client("A")
    task_id = unique_id("durable")
    create(a, task_id, examples=[], labels=list(TOPICS))
    texts = [f"{label} note number {i}" for i in range(40) for label in TOPICS]
    added = c.stub.AddExamples(iter([pb.AddExamplesRequest(task_id=task_id, examples=[
        pb.Example(input=pb.Input(text=t), label=t.split()[0]) for t in texts])]), timeout=60)
    cluster.replicas[2].kill()  # right after the acknowledgement
    assert added.added == len(texts)
    task = a.stub.GetTask(pb.GetTaskRequest(task_id=task_id), timeout=30)
    assert sum(task.examples_per_label.values()) == len(texts)


def test_a_killed_replicas_job_is_finished_by_another_once(cluster):
    """(Runs after C was killed: A and B remain.)"""
    a = cluster.client("A")
    alive = [r for r in cluster.replicas if r.proc.poll() is None]
    assert len(alive) == 2
    task_id = unique_id("takeover")
    # LINEAR on 96 sentences: a few seconds of features, long enough to be caught running, short enough
    # that the takeover's own training fits the bound.
    more = {label: [f"{t}{tail}" for t in texts for tail in ("", " Again.", " Really.", " Indeed.")]
            for label, texts in TOPICS.items()}
    create(a, task_id, examples=text_examples(more), config=pb.TrainingConfig(strategy=pb.LINEAR))
    key = task_key(cluster.tenant_id, task_id)
    job, _ = wait_for(lambda: next((j for j in cluster.store.unfinished_jobs()
                                    if j.task_key == key and j.owner), None), 60, step=0.005)
    pid = int(job.owner.split(":")[1])
    victim = next(r for r in alive if r.proc.pid == pid)
    victim.kill()
    killed = time.monotonic()
    survivor = next(r for r in alive if r is not victim)
    finished = Client(survivor.address, cluster.key)
    try:
        last = finished.wait_ready(task_id, timeout=LEASE + 60)
        took = time.monotonic() - killed
    finally:
        finished.close()
    assert last.state == pb.Job.SUCCEEDED and last.version == 1
    assert took <= LEASE + 10, f"took {took:.1f}s after the kill:\n" + "".join(
        line for line in survivor.log if "job" in line)[-3000:]
    ended = cluster.store.get_job(job.job_id)
    assert ended.attempts == 2 and ended.state == "SUCCEEDED"
    assert cluster.store.get_head(key, 1).job_id == job.job_id
    with pytest.raises(NotFound):  # one version published, not two
        cluster.store.get_head(key, 2)
