"""Storage faults through a real server: a full disk (SQLite's max_page_count) refuses writes whole with
RESOURCE_EXHAUSTED and recovers when space returns; a corrupted or truncated stored head answers
FAILED_PRECONDITION for its task only; damaged cached feature rows are recomputed, not trained on."""

from __future__ import annotations

import contextlib
import sqlite3
import time

import grpc
import numpy as np
import pytest
from conftest import TINY_TEXT, TOPICS, Client, make_settings, text_examples, unique_id
from sqlalchemy import event

from service.gen import headserve_pb2 as pb
from service.server import build_server
from service.store import DEFAULT_TENANT, StorageFull, content_sha, task_key

SMALL = {label: texts[:3] for label, texts in TOPICS.items()}
PROBES = [pb.Input(text=t) for t in ("Grill the fish for four minutes.", "The striker scored a late goal.",
                                     "The compiler reports a type error.")]


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    # Training in a thread of the server: the faults below are made on its store object.
    server = build_server(make_settings(tmp_path_factory.mktemp("faults"), builtin_backbones=[],
                                        training_isolation="thread"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(running):
    c = Client(running.address)
    yield c
    c.close()


class DiskLimit:
    """Caps the store's database at its current size (PRAGMA max_page_count, set on every connection as
    it is checked out), as a full disk would; `free()` lifts the cap."""

    def __init__(self, store) -> None:
        self.store = store
        self.pages = 0
        event.listen(store.engine, "checkout", self._apply)

    def _apply(self, dbapi_conn, _record, _proxy) -> None:
        dbapi_conn.execute(f"PRAGMA max_page_count = {self.pages or 2**32 - 2}")  # (clamped to SQLite's maximum)

    def fill(self) -> None:
        with self.store.engine.connect() as conn:
            self.pages = conn.exec_driver_sql("PRAGMA page_count").scalar()

    def free(self) -> None:
        self.pages = 0

    def close(self) -> None:
        self.free()
        event.remove(self.store.engine, "checkout", self._apply)


@pytest.fixture
def disk(running):
    limit = DiskLimit(running.app.store)
    yield limit
    limit.close()


def db(running) -> contextlib.closing:
    return contextlib.closing(sqlite3.connect(running.app.settings.data_dir / "headserve.sqlite3"))


def counts(running) -> dict[str, int]:
    with db(running) as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("tasks", "blobs", "examples", "features", "heads", "jobs")}


def big_examples(tag: str, per_label: int = 3, chars: int = 15_000) -> list[pb.Example]:
    """Examples whose texts need new database pages (they cannot fit in the free room of existing ones)."""
    rng = np.random.default_rng(abs(hash(tag)) % 2**32)
    words = np.array(["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "lambda", "theta", "zeta"])
    return [pb.Example(input=pb.Input(text=f"{tag} {label} {i} " + " ".join(rng.choice(words, chars // 6))),
                       label=label)
            for label in SMALL for i in range(per_label)]


def trained(client, examples=None) -> str:
    task_id = unique_id()
    client.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone=TINY_TEXT,
                                                examples=examples or text_examples(SMALL)))
    job = client.wait_ready(task_id)
    assert job.state == pb.Job.SUCCEEDED, job.error
    return task_id


def predict(client, task_id) -> tuple[int, list[dict[str, float]]]:
    resp = client.stub.Predict(pb.PredictRequest(task_id=task_id, inputs=PROBES), timeout=60)
    return resp.version, [{s.label: s.score for s in p.top} for p in resp.predictions]


def refused(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    return err.value.details()


# --- a full disk ----------------------------------------------------------------------------------------


def test_full_disk_refuses_writes_whole_and_recovers(running, client, disk):
    task_id = trained(client)
    before, served = counts(running), predict(client, task_id)
    examples = client.stub.GetTask(pb.GetTaskRequest(task_id=task_id)).num_examples
    disk.fill()

    new_id = unique_id()
    create = pb.CreateTaskRequest(task_id=new_id, backbone=TINY_TEXT, examples=big_examples(new_id))
    message = refused(lambda: client.stub.CreateTask(create), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "storage is full" in message and "nothing" in message
    refused(lambda: client.stub.GetTask(pb.GetTaskRequest(task_id=new_id)), grpc.StatusCode.NOT_FOUND)

    add = [pb.AddExamplesRequest(task_id=task_id, examples=big_examples(task_id + "-more"))]
    message = refused(lambda: client.stub.AddExamples(iter(add)), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "storage is full" in message
    assert client.stub.GetTask(pb.GetTaskRequest(task_id=task_id)).num_examples == examples
    assert counts(running) == before  # nothing half-written
    assert predict(client, task_id) == served  # reads go on

    disk.free()
    client.stub.CreateTask(create)
    assert client.wait_ready(new_id).state == pb.Job.SUCCEEDED
    added = client.stub.AddExamples(iter(add))
    assert added.added == len(add[0].examples)
    assert predict(client, task_id) == served


def test_a_head_that_cannot_be_stored_fails_its_job_clearly_and_training_recovers(
        running, client, disk, monkeypatch):
    """The disk fills as the job writes its head: the job ends FAILED saying so, the live version keeps
    serving. Writing the failure is refused too at first (simulated): the job stays RUNNING in the store
    (which every replica's watchers read) under its worker's lease, and ends FAILED once space returns."""
    store = running.app.store
    task_id = trained(client)
    served = predict(client, task_id)
    real_finish = store.finish_job
    refuse_failure = [True]
    refused = []

    def finish_job(job_id, status, head=None, error="", owner=None):
        if head is not None:
            disk.fill()  # the disk is full when the head is written
        elif refuse_failure[0]:
            refused.append(error)
            raise StorageFull("the server's storage is full (simulated)")
        return real_finish(job_id, status, head=head, error=error, owner=owner)

    monkeypatch.setattr(store, "finish_job", finish_job)
    job = client.stub.TrainTask(pb.TrainTaskRequest(task_id=task_id))
    deadline = time.monotonic() + 120
    while not refused:
        assert time.monotonic() < deadline, "the head was never written"
        time.sleep(0.1)
    assert "storage is full" in refused[0] and "nothing of it was stored" in refused[0]
    assert client.stub.GetTask(pb.GetTaskRequest(task_id=task_id)).version == 1
    with db(running) as conn:
        assert conn.execute("SELECT count(*) FROM heads WHERE task_key = ?",
                            (task_key(DEFAULT_TENANT, task_id),)).fetchone()[0] == 1
    assert predict(client, task_id) == served
    assert store.get_job(job.job_id).state == "RUNNING"  # the failure is not stored yet

    refuse_failure[0] = False
    disk.free()
    last = client.wait_ready(task_id, timeout=60)
    assert last.job_id == job.job_id and last.state == pb.Job.FAILED
    assert "storage is full" in last.error and "nothing of it was stored" in last.error
    task = client.stub.GetTask(pb.GetTaskRequest(task_id=task_id))
    assert task.state == pb.Task.FAILED and "storage is full" in task.error and task.version == 1

    monkeypatch.setattr(store, "finish_job", real_finish)
    client.stub.TrainTask(pb.TrainTaskRequest(task_id=task_id))
    assert client.wait_ready(task_id).state == pb.Job.SUCCEEDED
    assert predict(client, task_id)[0] == 2


# --- damaged heads and feature rows ---------------------------------------------------------------------


def test_a_corrupted_or_truncated_head_is_reported_for_its_task_only(running, client):
    flipped, cut, healthy = trained(client), trained(client), trained(client)
    served = predict(client, healthy)
    with db(running) as conn:
        for task_id, damage in ((flipped, lambda b: b[:100] + bytes([b[100] ^ 0x01]) + b[101:]),
                                (cut, lambda b: b[: len(b) // 2])):
            key = task_key(DEFAULT_TENANT, task_id)
            onnx = conn.execute("SELECT onnx FROM heads WHERE task_key = ?", (key,)).fetchone()[0]
            conn.execute("UPDATE heads SET onnx = ? WHERE task_key = ?", (damage(onnx), key))
            running.app.predictor.forget(key)  # the next Predict loads it from the store
        conn.commit()

    for task_id in (flipped, cut):
        message = refused(lambda t=task_id: predict(client, t), grpc.StatusCode.FAILED_PRECONDITION)
        assert message == (f"the stored head of task {task_id!r} version 1 is corrupted (its bytes no longer "
                           "match what training wrote); train the task again to replace it")
        export = pb.ExportTaskRequest(task_id=task_id)
        refused(lambda e=export: list(client.stub.ExportTask(e)), grpc.StatusCode.FAILED_PRECONDITION)
        assert client.stub.GetTask(pb.GetTaskRequest(task_id=task_id)).state == pb.Task.READY
    assert predict(client, healthy) == served  # other tasks keep serving

    client.stub.TrainTask(pb.TrainTaskRequest(task_id=flipped))
    assert client.wait_ready(flipped).state == pb.Job.SUCCEEDED
    assert predict(client, flipped)[0] == 2


def test_damaged_cached_feature_rows_are_recomputed_not_trained_on(running, client):
    examples = text_examples({label: [f"{t} (features)" for t in texts] for label, texts in SMALL.items()})
    task_id = trained(client, examples)
    shas = [content_sha("text", ex.input.text.encode()) for ex in examples[:3]]
    query = f"SELECT trunk, sha256, vector FROM features WHERE tenant_id = ? AND sha256 IN ({','.join('?' * 3)})"
    with db(running) as conn:
        rows = {(trunk, sha): vec for trunk, sha, vec in conn.execute(query, (DEFAULT_TENANT, *shas))}
        assert len(rows) == 3 * 4  # every pooled tap of each
        for (trunk, sha), vec in rows.items():
            damaged = {shas[0]: vec[:-6],  # not whole float32s
                       shas[1]: vec[:-64],  # whole floats, too few
                       shas[2]: np.full(len(vec) // 4, np.nan, np.float32).tobytes()}[sha]
            conn.execute("UPDATE features SET vector = ? WHERE trunk = ? AND sha256 = ?", (damaged, trunk, sha))
        conn.commit()

    client.stub.TrainTask(pb.TrainTaskRequest(task_id=task_id))
    job = client.wait_ready(task_id)
    assert job.state == pb.Job.SUCCEEDED, job.error
    with db(running) as conn:
        again = {(trunk, sha): vec for trunk, sha, vec in conn.execute(query, (DEFAULT_TENANT, *shas))}
    assert again.keys() == rows.keys()
    for key, vec in rows.items():  # recomputed: what the trunk gave the first time
        np.testing.assert_allclose(np.frombuffer(again[key], np.float32), np.frombuffer(vec, np.float32),
                                   rtol=1e-4, atol=1e-4)
    assert predict(client, task_id)[0] == 2


def test_a_store_from_before_head_digests_gains_the_column_and_its_heads_are_checked_by_size(tmp_path):
    import sqlalchemy as sa
    from alembic import command

    from service import migrate
    from service.store import CorruptHead, ExampleIn, HeadRecord, JobRecord, Store, TaskRecord

    store = Store.open(tmp_path)
    store.create_task(TaskRecord.new(DEFAULT_TENANT, "old", "minilm-l6", ["a", "b"], {}),
                      [ExampleIn("text", b"x", "a"), ExampleIn("text", b"y", "b")])
    key = task_key(DEFAULT_TENANT, "old")
    store.start_job(JobRecord("j1", key, "QUEUED", {}, {}))
    store.finish_job("j1", {}, head=HeadRecord(key, 0, b"head bytes", ["a", "b"], {}))
    store.close()
    # Made into a schema 2 store of before head digests (and before Alembic): revision 0001 without its
    # alembic_version table and without the digest column.
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'headserve.sqlite3'}")
    with engine.begin() as conn:
        command.downgrade(migrate._config(conn), "0001")
    engine.dispose()
    with contextlib.closing(sqlite3.connect(tmp_path / "headserve.sqlite3")) as conn:
        conn.execute("ALTER TABLE heads DROP COLUMN onnx_sha256")
        conn.execute("DROP TABLE alembic_version")
        conn.commit()
    with pytest.raises(migrate.SchemaError, match="schema-2; .*headserve db upgrade"):
        Store.open(tmp_path)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'headserve.sqlite3'}")
    assert migrate.upgrade(engine) == (migrate.LEGACY_2, migrate.head())
    engine.dispose()
    store = Store.open(tmp_path)
    try:
        head = store.get_head(key, 1)
        assert (head.onnx, head.onnx_sha256) == (b"head bytes", "")
        store.start_job(JobRecord("j2", key, "QUEUED", {}, {}))
        store.finish_job("j2", {}, head=HeadRecord(key, 0, b"new head", ["a", "b"], {}))
        assert len(store.get_head(key, 2).onnx_sha256) == 64
        with contextlib.closing(sqlite3.connect(tmp_path / "headserve.sqlite3")) as conn:
            conn.execute("UPDATE heads SET onnx = x'00' WHERE version = 1")
            conn.commit()
        with pytest.raises(CorruptHead, match="version 1 is corrupted"):
            store.get_head(key, 1)
    finally:
        store.close()
