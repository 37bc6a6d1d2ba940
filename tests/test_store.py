"""The task store on real SQLite: atomic writes, dedupe, jobs and versions, deletion, feature cache,
durability (close/reopen and kill -9)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import select
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import sqlalchemy as sa

from adapters.errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from service.cli import main as cli_main
from service.migrate import SchemaError
from service.storage import PROTOCOLS
from service.store import (
    DEFAULT_TENANT,
    ExampleIn,
    HeadRecord,
    JobRecord,
    KeyRecord,
    LeaseLost,
    Quotas,
    Store,
    TaskRecord,
    TenantRecord,
    content_sha,
    heads,
    task_key,
)

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def store(store_url):
    """The store on each engine (tests/postgres.py): this file is the store's own test-suite, run on both."""
    s = Store(store_url)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path):
    s = Store.open(tmp_path)
    yield s
    s.close()


def text(t: str, label: str) -> ExampleIn:
    return ExampleIn("text", t.encode(), label)


T = DEFAULT_TENANT


def K(task_id: str, tenant: str = T) -> str:
    return task_key(tenant, task_id)


def task(task_id: str = "t1", backbone: str = "minilm-l6", labels=("a", "b"), tenant: str = T) -> TaskRecord:
    return TaskRecord.new(tenant, task_id, backbone, list(labels), {"strategy": "auto"})


def job(job_id: str, task_id: str = "t1", tenant: str = T) -> JobRecord:
    return JobRecord(job_id=job_id, task_key=K(task_id, tenant), state="QUEUED", config={"strategy": "auto"},
                     status={})


def head(tag: bytes = b"onnx-bytes") -> HeadRecord:
    return HeadRecord(task_key="", version=0, onnx=tag, labels=["a", "b"],
                      evaluation={"validation_accuracy": 0.9})


def table_counts(s: Store) -> dict[str, int]:
    with s.engine.connect() as conn:
        return {
            name: conn.execute(sa.text(f"SELECT COUNT(*) FROM {name}")).scalar()
            for name in ("tasks", "blobs", "examples", "features", "heads", "jobs", "tenants", "api_keys")
        }


# --- tasks and examples ------------------------------------------------------------------------------


def test_create_task_stores_task_and_examples(store):
    store.create_task(task(labels=["a", "b", "c"]), [text("one", "a"), text("two", "b"), text("three", "b")])
    rec = store.get_task(K("t1"))
    assert rec.backbone == "minilm-l6" and rec.declared_labels == ["a", "b", "c"]
    assert rec.config == {"strategy": "auto"} and rec.state == "PENDING" and rec.live_version == 0
    assert rec.created_at_ms > 0 and rec.updated_at_ms == rec.created_at_ms
    assert store.label_counts(K("t1")) == {"a": 1, "b": 2}
    refs = store.example_refs(K("t1"))
    assert refs == [(content_sha("text", b"one"), "a"), (content_sha("text", b"two"), "b"),
                    (content_sha("text", b"three"), "b")]
    assert store.blobs(T, [refs[0][0]]) == {refs[0][0]: ("text", b"one")}


def test_duplicate_task_id_raises_and_leaves_nothing_new(store):
    store.create_task(task(), [text("one", "a")])
    before = table_counts(store)
    with pytest.raises(AlreadyExists) as err:
        store.create_task(task(backbone="other"), [text("brand new", "a"), text("also new", "c")])
    assert "t1" in err.value.message
    assert table_counts(store) == before
    assert store.get_task(K("t1")).backbone == "minilm-l6"
    assert store.blobs(T, [content_sha("text", b"brand new")]) == {}


def test_create_task_is_atomic_when_an_example_fails(store):
    # label is NOT NULL in the examples table: that insert fails after the task row and the blobs went in.
    broken = ExampleIn("text", b"payload", None)  # type: ignore[arg-type]
    with pytest.raises(sa.exc.IntegrityError):
        store.create_task(task("t2"), [text("fine", "a"), broken])
    with pytest.raises(NotFound):
        store.get_task(K("t2"))
    assert {n: c for n, c in table_counts(store).items() if n != "tenants"} == dict.fromkeys(
        ("tasks", "blobs", "examples", "features", "heads", "jobs", "api_keys"), 0)
    store.create_task(task("t2"), [text("fine", "a")])  # the store is still usable
    assert store.label_counts(K("t2")) == {"a": 1}


def test_add_examples_dedupes_same_content_and_label(store):
    store.create_task(task(), [text("one", "a")])
    created = store.get_task(K("t1")).updated_at_ms
    batch = [text("one", "a"), text("two", "a"), text("two", "a"), text("one", "b")]
    added, dupes = store.add_examples(K("t1"), batch)
    assert (added, dupes) == (2, 2)  # "one"/a exists; "two"/a twice in the call; "one"/b is new
    assert store.label_counts(K("t1")) == {"a": 2, "b": 1}
    # Same content under two labels: two examples, one blob.
    sha = content_sha("text", b"one")
    assert sorted(label for s, label in store.example_refs(K("t1")) if s == sha) == ["a", "b"]
    assert table_counts(store)["blobs"] == 2
    assert store.add_examples(K("t1"), []) == (0, 0)
    assert store.add_examples(K("t1"), [text("two", "a")]) == (0, 1)
    assert store.get_task(K("t1")).updated_at_ms >= created


def test_same_bytes_as_text_and_image_are_different_content(store):
    store.create_task(task(), [ExampleIn("text", b"abc", "a"), ExampleIn("image", b"abc", "a")])
    assert store.label_counts(K("t1")) == {"a": 2}


def test_blobs_are_shared_between_tasks(store):
    store.create_task(task("t1"), [text("shared", "a")])
    store.create_task(task("t2"), [text("shared", "x"), text("own", "y")])
    assert table_counts(store)["blobs"] == 2
    assert store.label_counts(K("t1")) == {"a": 1} and store.label_counts(K("t2")) == {"x": 1, "y": 1}


def test_unknown_task_is_not_found(store):
    with pytest.raises(NotFound) as err:
        store.get_task(K("ghost"))
    assert "ghost" in err.value.message
    with pytest.raises(NotFound):
        store.add_examples(K("ghost"), [text("one", "a")])
    assert table_counts(store)["blobs"] == 0
    with pytest.raises(NotFound):
        store.delete_task(K("ghost"))
    with pytest.raises(NotFound):
        store.start_job(job("j1", "ghost"))
    with pytest.raises(NotFound):
        store.get_job("nope")
    with pytest.raises(NotFound):
        store.get_head(K("ghost"), 1)


def test_list_tasks_pages_in_id_order(store):
    for task_id in ("c", "a", "b", "d"):
        store.create_task(task(task_id, backbone="img" if task_id in "bd" else "txt"), [])
    assert [t.task_id for t in store.list_tasks(T, "", 2)] == ["a", "b"]
    assert [t.task_id for t in store.list_tasks(T, "b", 10)] == ["c", "d"]
    assert [t.task_id for t in store.list_tasks(T, "", 10, backbone="img")] == ["b", "d"]


# --- jobs and head versions ----------------------------------------------------------------------------


def test_start_job_marks_training_and_refuses_a_second_active_job(store):
    store.create_task(task(), [text("one", "a"), text("two", "b")])
    store.start_job(job("j1"))
    rec = store.get_task(K("t1"))
    assert rec.state == "TRAINING" and rec.job_id == "j1"
    assert store.get_job("j1").state == "QUEUED"
    with pytest.raises(FailedPrecondition) as err:
        store.start_job(job("j2"))
    assert "j1" in err.value.message
    store.update_job("j1", "RUNNING", {"phase": "training", "epoch": 3})
    with pytest.raises(FailedPrecondition):
        store.start_job(job("j2"))
    with pytest.raises(NotFound):
        store.get_job("j2")
    assert [j.job_id for j in store.unfinished_jobs()] == ["j1"]
    running = store.get_job("j1")
    assert running.state == "RUNNING" and not running.finished
    assert running.status == {"phase": "training", "epoch": 3}


def test_finish_job_versions_go_live_and_failure_keeps_the_live_one(store):
    store.create_task(task(), [text("one", "a"), text("two", "b")])
    store.start_job(job("j1"))
    assert store.finish_job("j1", {"phase": "done"}, head=head(b"v1")) == 1
    rec = store.get_task(K("t1"))
    assert (rec.state, rec.live_version) == ("READY", 1)
    assert store.get_job("j1").state == "SUCCEEDED" and store.get_job("j1").version == 1

    store.start_job(job("j2"))  # allowed again once the first finished
    assert store.get_task(K("t1")).state == "TRAINING"
    assert store.finish_job("j2", {}, head=head(b"v2")) == 2
    rec = store.get_task(K("t1"))
    assert (rec.state, rec.live_version) == ("READY", 2)
    assert store.get_head(K("t1"), 1).onnx == b"v1" and store.get_head(K("t1"), 2).onnx == b"v2"
    assert store.get_head(K("t1"), 2).labels == ["a", "b"]
    assert store.head_evaluation(K("t1"), 2) == {"validation_accuracy": 0.9}

    store.start_job(job("j3"))
    assert store.finish_job("j3", {"phase": "failed"}, error="out of memory") == 0
    rec = store.get_task(K("t1"))
    assert (rec.state, rec.live_version, rec.error) == ("FAILED", 2, "out of memory")
    failed = store.get_job("j3")
    assert (failed.state, failed.error, failed.version) == ("FAILED", "out of memory", 0) and failed.finished
    assert store.unfinished_jobs() == []
    with pytest.raises(NotFound):
        store.get_head(K("t1"), 3)

    store.start_job(job("j4"))  # a new job clears the error
    assert store.get_task(K("t1")).error == ""


def test_an_interim_head_serves_while_its_job_runs_and_the_job_publishes_it_once(store):
    """AUTO's feature head goes live while it fine-tunes: only under the job's lease, once per job (a later
    run of the job gets the same version); the task stays TRAINING. The final head is the next version, or,
    when it is the interim head itself, that version with its final evaluation."""
    store.create_task(task(), [text("one", "a"), text("two", "b")])
    store.start_job(job("j1"))
    assert store.claim_job("w1", 60_000).job_id == "j1"
    with pytest.raises(LeaseLost):
        store.publish_interim("j1", head(b"feature"), "w2")
    assert store.get_task(K("t1")).live_version == 0
    assert store.publish_interim("j1", head(b"feature"), "w1") == 1
    rec, running = store.get_task(K("t1")), store.get_job("j1")
    assert (rec.state, rec.live_version) == ("TRAINING", 1)
    assert (running.state, running.version, running.status["interim_version"]) == ("RUNNING", 1, 1)
    assert store.publish_interim("j1", head(b"feature, again"), "w1") == 1
    assert table_counts(store)["heads"] == 1
    final = dataclasses.replace(head(b"tuned"), evaluation={"strategy": "fine_tune"})
    assert store.finish_job("j1", {"phase": "done"}, head=final, owner="w1") == 2
    rec = store.get_task(K("t1"))
    assert (rec.state, rec.live_version) == ("READY", 2) and store.get_job("j1").version == 2
    assert store.get_head(K("t1"), 1).onnx == b"feature" and store.get_head(K("t1"), 2).onnx == b"tuned"

    store.start_job(job("j2"))  # the feature head is kept: its version, with the final evaluation
    store.claim_job("w1", 60_000)
    assert store.publish_interim("j2", head(b"kept"), "w1") == 3
    kept = dataclasses.replace(head(b"kept"), evaluation={"strategy": "linear", "final": True})
    assert store.finish_job("j2", {"phase": "done"}, head=kept, owner="w1") == 3
    assert store.head_evaluation(K("t1"), 3) == {"strategy": "linear", "final": True}
    assert (store.get_task(K("t1")).state, table_counts(store)["heads"]) == ("READY", 3)

    store.start_job(job("j3"))  # a job that fails after its interim head keeps it live and says so
    store.claim_job("w1", 60_000)
    assert store.publish_interim("j3", head(b"interim"), "w1") == 4
    assert store.finish_job("j3", {"phase": "failed"}, error="out of memory", owner="w1") == 0
    rec, failed = store.get_task(K("t1")), store.get_job("j3")
    assert (rec.state, rec.live_version, failed.state, failed.version) == ("FAILED", 4, "FAILED", 4)

    store.start_job(job("j4"))
    store.claim_job("w1", 60_000)
    store.delete_task(K("t1"))
    with pytest.raises(NotFound):
        store.publish_interim("j4", head(b"late"), "w1")


def test_publishing_a_version_deletes_those_past_the_last_kept(store):
    """head_versions_kept: each task keeps its last N versions (the live one included); older ones are
    deleted with the publication, and their bytes leave the tenant's usage. Another task keeps its own."""
    pruning = Store(str(store.url), versions_kept=2)
    try:
        pruning.create_task(task("t1"), [text("one", "a"), text("two", "b")])
        pruning.create_task(task("t2"), [text("one", "a"), text("two", "b")])
        pruning.start_job(job("other", "t2"))
        pruning.finish_job("other", {}, head=head(b"t2 only version"))
        for n in range(1, 5):
            pruning.start_job(job(f"j{n}"))
            assert pruning.finish_job(f"j{n}", {}, head=head(b"x" * 1000 * n)) == n
        with pruning.engine.connect() as conn:
            kept = conn.execute(sa.select(heads.c.task_key, heads.c.version).order_by(
                heads.c.task_key, heads.c.version)).all()
        assert [tuple(r) for r in kept] == [(K("t1"), 3), (K("t1"), 4), (K("t2"), 1)]
        assert pruning.get_task(K("t1")).live_version == 4
        assert pruning.get_head(K("t1"), 3).onnx == b"x" * 3000
        with pytest.raises(NotFound, match="has no head version 2 .*keeps each task's last 2 versions"):
            pruning.get_head(K("t1"), 2)
        examples = len(b"one") + len(b"two")  # stored once for the tenant, shared by both tasks
        assert pruning.usage(T).stored_bytes == examples + 3000 + 4000 + len(b"t2 only version")
    finally:
        pruning.close()


def test_finish_job_of_a_deleted_task_is_not_found(store):
    store.create_task(task(), [text("one", "a")])
    store.start_job(job("j1"))
    store.delete_task(K("t1"))
    with pytest.raises(NotFound):
        store.finish_job("j1", {}, head=head())
    assert table_counts(store)["heads"] == 0


# --- deletion ------------------------------------------------------------------------------------------


def test_delete_task_removes_its_rows_and_unshared_blobs_and_features(store):
    store.create_task(task("t1"), [text("shared", "a"), text("only-t1", "b")])
    store.create_task(task("t2"), [text("shared", "z"), text("only-t2", "y")])
    shared, own1, own2 = (content_sha("text", t) for t in (b"shared", b"only-t1", b"only-t2"))
    trunk = "minilm-l6@abc:pooled"
    store.put_features(T, trunk, {shared: np.ones(4), own1: np.full(4, 2.0), own2: np.full(4, 3.0)})
    store.start_job(job("j1", "t1"))
    store.finish_job("j1", {}, head=head())
    store.start_job(job("j2", "t1"))

    store.delete_task(K("t1"))

    with pytest.raises(NotFound):
        store.get_task(K("t1"))
    with pytest.raises(NotFound):
        store.get_job("j1")
    with pytest.raises(NotFound):
        store.get_head(K("t1"), 1)
    assert store.example_refs(K("t1")) == [] and store.label_counts(K("t1")) == {}
    counts = table_counts(store)
    assert counts["heads"] == 0 and counts["jobs"] == 0 and counts["tasks"] == 1
    assert set(store.blobs(T, [shared, own1, own2])) == {shared, own2}
    assert set(store.cached_features(T, trunk, [shared, own1, own2])) == {shared, own2}
    # The other task is untouched.
    assert store.label_counts(K("t2")) == {"z": 1, "y": 1}
    # The id can be reused.
    store.create_task(task("t1"), [text("only-t1", "b")])
    assert store.label_counts(K("t1")) == {"b": 1}


# --- feature cache ---------------------------------------------------------------------------------------


def test_features_cache_round_trips_float32(store):
    rng = np.random.default_rng(0)
    vectors = {f"sha{i}": rng.normal(size=384).astype(np.float32) for i in range(3)}
    store.put_features(T, "trunkA", vectors)
    store.put_features(T, "trunkB", {"sha0": np.zeros(384, np.float32)})
    got = store.cached_features(T, "trunkA", ["sha0", "sha1", "sha2", "missing"])
    assert set(got) == {"sha0", "sha1", "sha2"}
    for sha, vec in vectors.items():
        assert got[sha].dtype == np.float32
        np.testing.assert_array_equal(got[sha], vec)
    np.testing.assert_array_equal(store.cached_features(T, "trunkB", ["sha0"])["sha0"], np.zeros(384))
    # float64 in, float32 out; a second put of a known key keeps the first value.
    store.put_features(T, "trunkA", {"sha0": np.full(384, 7.0), "sha9": np.arange(3, dtype=np.float64)})
    again = store.cached_features(T, "trunkA", ["sha0", "sha9"])
    np.testing.assert_array_equal(again["sha0"], vectors["sha0"])
    np.testing.assert_array_equal(again["sha9"], np.array([0, 1, 2], np.float32))
    store.put_features(T, "trunkA", {})
    assert store.cached_features(T, "trunkA", []) == {}


def test_features_cache_handles_many_keys(store):
    vectors = {f"{i:064x}": np.full(2, i, np.float32) for i in range(1200)}  # more than one IN (...) chunk
    store.put_features(T, "t", vectors)
    got = store.cached_features(T, "t", list(vectors))
    assert len(got) == 1200 and got[f"{1199:064x}"][0] == 1199


# --- durability --------------------------------------------------------------------------------------------


def test_data_survives_close_and_reopen(tmp_path):
    s = Store.open(tmp_path)
    s.create_task(task(), [text("one", "a"), text("two", "b")])
    s.start_job(job("j1"))
    s.finish_job("j1", {"phase": "done"}, head=head(b"v1"))
    s.put_features(T, "trunk", {content_sha("text", b"one"): np.arange(4, dtype=np.float32)})
    s.close()

    s = Store.open(tmp_path)
    try:
        rec = s.get_task(K("t1"))
        assert (rec.state, rec.live_version) == ("READY", 1)
        assert s.label_counts(K("t1")) == {"a": 1, "b": 1}
        assert s.get_head(K("t1"), 1).onnx == b"v1"
        assert s.get_job("j1").status == {"phase": "done"}
        sha = content_sha("text", b"one")
        np.testing.assert_array_equal(s.cached_features(T, "trunk", [sha])[sha], np.arange(4))
    finally:
        s.close()


def test_sqlite_runs_in_wal_mode_with_full_sync(sqlite_store):
    sqlite_store.create_task(task(), [])
    with sqlite_store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar().lower() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


WRITER = textwrap.dedent(
    """
    import pathlib, sys, time
    sys.path.insert(0, sys.argv[2])
    from service.store import ExampleIn, Store, TaskRecord
    store = Store.open(pathlib.Path(sys.argv[1]))
    store.create_task(TaskRecord.new("default", "killed", "minilm-l6", ["a", "b"], {}),
                      [ExampleIn("text", b"first", "a")])
    added, _ = store.add_examples("default/killed",
                                  [ExampleIn("text", f"ex{i}".encode(), "b") for i in range(50)])
    print("ok", added, flush=True)
    time.sleep(60)
    """
)


def test_acknowledged_writes_survive_sigkill(tmp_path):
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(data), str(REPO)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "the writer printed nothing within 60 s"
        line = proc.stdout.readline()
        assert line.split() == ["ok", "50"], (line, proc.stderr.read() if proc.poll() is not None else "")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()

    s = Store.open(data)
    try:
        assert s.get_task(K("killed")).declared_labels == ["a", "b"]
        assert s.label_counts(K("killed")) == {"a": 1, "b": 50}
        assert len(s.blobs(T, [sha for sha, _ in s.example_refs(K("killed"))])) == 51
    finally:
        s.close()


# --- tenants, keys and quotas ------------------------------------------------------------------------------


def tenant(store: Store, name: str, **quotas) -> str:
    record = TenantRecord(f"tn-{name}", name, Quotas(**quotas))
    store.create_tenant(record)
    return record.tenant_id


def test_two_tenants_own_the_same_task_id_and_content_separately(store):
    a, b = tenant(store, "a"), tenant(store, "b")
    store.create_task(task("spam", tenant=a), [text("same words", "x"), text("a only", "y")])
    store.create_task(task("spam", tenant=b, backbone="other"), [text("same words", "z")])
    assert store.get_task(K("spam", a)).backbone == "minilm-l6"
    assert store.get_task(K("spam", b)).backbone == "other"
    assert [t.task_id for t in store.list_tasks(a, "", 10)] == ["spam"]
    assert store.list_tasks(T, "", 10) == []
    sha = content_sha("text", b"same words")
    # Content is stored and cached per tenant: B's upload of A's text made a blob of B's own.
    assert set(store.blobs(a, [sha])) == set(store.blobs(b, [sha])) == {sha}
    assert store.blobs(b, [content_sha("text", b"a only")]) == {}
    store.put_features(a, "trunk", {sha: np.ones(2)})
    assert store.cached_features(b, "trunk", [sha]) == {}
    store.delete_task(K("spam", a))
    assert store.blobs(a, [sha]) == {} and set(store.blobs(b, [sha])) == {sha}
    assert store.label_counts(K("spam", b)) == {"z": 1}
    with pytest.raises(AlreadyExists):
        store.create_task(task("spam", tenant=b), [])


def test_quotas_are_checked_inside_the_write_and_change_nothing_when_over(store):
    a = tenant(store, "a", tasks=2, examples=3, stored_bytes=40, training_jobs=1)
    store.create_task(task("t1", tenant=a), [text("one", "a"), text("two", "b")])
    before = table_counts(store)
    with pytest.raises(ResourceExhausted, match="examples quota"):
        store.add_examples(K("t1", a), [text("three", "a"), text("four", "b")], store.get_tenant(a).quotas)
    assert table_counts(store) == before
    quotas = store.get_tenant(a).quotas
    store.add_examples(K("t1", a), [text("three", "a")], quotas)  # exactly at the quota is fine
    with pytest.raises(ResourceExhausted, match="stored_bytes quota"):
        store.create_task(task("t2", tenant=a), [text("x" * 40, "a")], Quotas(stored_bytes=40))
    store.create_task(task("t2", tenant=a), [], quotas)
    with pytest.raises(ResourceExhausted, match="tasks quota"):
        store.create_task(task("t3", tenant=a), [], quotas)
    store.start_job(job("j1", "t1", a), quotas)
    with pytest.raises(ResourceExhausted, match="training_jobs quota.*retry when a job has finished"):
        store.start_job(job("j2", "t2", a), quotas)
    assert store.get_task(K("t2", a)).state == "PENDING"
    assert store.usage(a).training_jobs == 1 and store.usage(a).examples == 3
    # Another tenant is not limited by a's quotas or usage.
    store.create_task(task("t3"), [text("four", "a")], Quotas(tasks=1))


def test_the_database_keeps_one_unfinished_job_per_task(store):
    store.create_task(task(), [text("one", "a")])
    store.start_job(job("j1"))
    with store.engine.begin() as conn, pytest.raises(sa.exc.IntegrityError):
        conn.execute(sa.text("INSERT INTO jobs (job_id, task_key, state, config, status, error, version, "
                             "created_at_ms, updated_at_ms) VALUES ('j2', 'default/t1', 'RUNNING', '{}', '{}', "
                             "'', 0, 0, 0)"))


def test_keys_are_stored_by_hash_and_revoked_once(store):
    a = tenant(store, "a")
    store.create_key(KeyRecord("k1", a, "f" * 64, ["predict"], "ci"))
    with pytest.raises(AlreadyExists):
        store.create_key(KeyRecord("k1", a, "e" * 64, ["train"]))
    with pytest.raises(NotFound):
        store.create_key(KeyRecord("k2", "tn-ghost", "e" * 64, ["train"]))
    key = store.get_key("k1")
    assert (key.tenant_id, key.secret_sha256, key.scopes, key.revoked_at_ms) == (a, "f" * 64, ["predict"], 0)
    with pytest.raises(NotFound):
        store.revoke_key("k1", tenant_id=T)  # not the default tenant's key
    first = store.revoke_key("k1").revoked_at_ms
    assert first > 0 and store.revoke_key("k1").revoked_at_ms == first
    assert [k.key_id for k in store.list_keys(a)] == ["k1"] and store.list_keys(T) == []


def test_delete_tenant_removes_everything_it_owns(store):
    a = tenant(store, "a")
    store.create_key(KeyRecord("k1", a, "f" * 64, ["predict"]))
    store.create_task(task("t1", tenant=a), [text("one", "a")])
    store.create_task(task("t1"), [text("one", "a")])
    store.put_features(a, "trunk", {content_sha("text", b"one"): np.ones(2)})
    store.start_job(job("j1", "t1", a))
    store.finish_job("j1", {}, head=head())
    assert store.delete_tenant(a) == [K("t1", a)]
    counts = table_counts(store)
    assert (counts["tasks"], counts["blobs"], counts["examples"], counts["features"], counts["heads"],
            counts["jobs"], counts["api_keys"], counts["tenants"]) == (1, 1, 1, 0, 0, 0, 0, 1)
    assert store.get_key("k1") is None
    with pytest.raises(NotFound):
        store.get_tenant("a")
    with pytest.raises(FailedPrecondition):
        store.delete_tenant(T)


SCHEMA_1 = [  # the store as written before tenants (headserve 0.1)
    "CREATE TABLE tasks (task_id VARCHAR(128) PRIMARY KEY, backbone VARCHAR(128) NOT NULL, declared_labels TEXT "
    "NOT NULL, config TEXT NOT NULL, state VARCHAR(16) NOT NULL, live_version INTEGER NOT NULL, error TEXT NOT "
    "NULL, job_id VARCHAR(64) NOT NULL, created_at_ms BIGINT NOT NULL, updated_at_ms BIGINT NOT NULL)",
    "CREATE TABLE blobs (sha256 VARCHAR(64) PRIMARY KEY, kind VARCHAR(8) NOT NULL, data BLOB NOT NULL)",
    "CREATE TABLE examples (id INTEGER PRIMARY KEY, task_id VARCHAR(128) NOT NULL REFERENCES tasks (task_id) "
    "ON DELETE CASCADE, sha256 VARCHAR(64) NOT NULL REFERENCES blobs (sha256), label TEXT NOT NULL, "
    "UNIQUE (task_id, sha256, label))",
    "CREATE TABLE features (trunk VARCHAR(160), sha256 VARCHAR(64), vector BLOB NOT NULL, "
    "PRIMARY KEY (trunk, sha256))",
    "CREATE TABLE heads (task_id VARCHAR(128) REFERENCES tasks (task_id) ON DELETE CASCADE, version INTEGER, "
    "onnx BLOB NOT NULL, labels TEXT NOT NULL, evaluation TEXT NOT NULL, created_at_ms BIGINT NOT NULL, "
    "PRIMARY KEY (task_id, version))",
    "CREATE TABLE jobs (job_id VARCHAR(64) PRIMARY KEY, task_id VARCHAR(128) NOT NULL REFERENCES tasks "
    "(task_id) ON DELETE CASCADE, state VARCHAR(16) NOT NULL, config TEXT NOT NULL, status TEXT NOT NULL, "
    "error TEXT NOT NULL, version INTEGER NOT NULL, created_at_ms BIGINT NOT NULL, updated_at_ms BIGINT NOT NULL)",
    "CREATE INDEX ix_jobs_task_id ON jobs (task_id)",
    "INSERT INTO tasks VALUES ('old', 'minilm-l6', '[\"a\", \"b\"]', '{}', 'READY', 1, '', 'j1', 1, 2)",
    "INSERT INTO blobs VALUES ('s1', 'text', x'6f6e65')",
    "INSERT INTO examples VALUES (1, 'old', 's1', 'a')",
    "INSERT INTO features VALUES ('trunk', 's1', x'0000803f')",
    "INSERT INTO heads VALUES ('old', 1, x'01020304', '[\"a\", \"b\"]', '{\"validation_accuracy\": 0.5}', 3)",
    "INSERT INTO jobs VALUES ('j1', 'old', 'SUCCEEDED', '{}', '{}', '', 1, 1, 2)",
]


def test_a_store_from_before_tenants_is_upgraded_into_the_default_tenant(tmp_path):
    import sqlite3

    with sqlite3.connect(tmp_path / "headserve.sqlite3") as db:
        for sql in SCHEMA_1:
            db.execute(sql)
    with pytest.raises(SchemaError, match=r"schema revision schema-1; .*run `headserve db upgrade`"):
        Store.open(tmp_path)  # a server refuses it, and says what to run
    assert cli_main(["db", "upgrade", "--data-dir", str(tmp_path)]) == 0
    assert cli_main(["db", "current", "--data-dir", str(tmp_path)]) == 0
    s = Store.open(tmp_path)
    try:
        rec = s.get_task(K("old"))
        assert (rec.tenant_id, rec.task_id, rec.live_version, rec.declared_labels) == (T, "old", 1, ["a", "b"])
        assert s.example_refs(K("old")) == [("s1", "a")]
        assert s.blobs(T, ["s1"]) == {"s1": ("text", b"one")}
        np.testing.assert_array_equal(s.cached_features(T, "trunk", ["s1"])["s1"], [1.0])
        assert s.get_head(K("old"), 1).onnx == b"\x01\x02\x03\x04"
        assert s.get_job("j1").task_key == K("old") and s.usage(T).stored_bytes == 3 + 4
        s.delete_task(K("old"))  # foreign keys hold in the new tables
        assert table_counts(s)["blobs"] == 0
    finally:
        s.close()
    Store.open(tmp_path).close()  # opening again changes nothing


# --- the schema and the protocols ----------------------------------------------------------------------------


def test_the_migrations_make_exactly_the_schema_the_code_reads(store):
    """Alembic's revisions (service/migrations) and the tables service/store.py declares agree, on each engine:
    no table, column, index or constraint missing or extra."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from service.store import metadata

    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    assert diff == []


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.__name__)
def test_the_store_implements_each_narrow_protocol_with_its_signatures(protocol):
    import inspect

    members = {n for klass in protocol.__mro__ if klass.__module__ == "service.storage"
               for n, v in vars(klass).items() if callable(v) and not n.startswith("_")}
    assert members
    for name in sorted(members):
        want = list(inspect.signature(getattr(protocol, name)).parameters)
        got = list(inspect.signature(getattr(Store, name)).parameters)
        assert got == want, f"Store.{name}{got} does not match {protocol.__name__}.{name}{want}"
