"""Store.import_heads on SQLite and PostgreSQL: READY tasks with a head as version 1, written in batches
that are each all or nothing, under the same invariants as CreateTask + a finished job."""

from __future__ import annotations

import hashlib

import pytest
import sqlalchemy as sa

from adapters.errors import AlreadyExists, InvalidInput, NotFound, ResourceExhausted
from service.store import DEFAULT_TENANT, HeadRecord, Quotas, Store, TenantRecord, task_key

T = DEFAULT_TENANT
EVALUATION = {"validation_accuracy": 0.9, "precision": "fp32"}


@pytest.fixture
def store(store_url):
    """The store on each engine (tests/postgres.py)."""
    s = Store(store_url)
    yield s
    s.close()


def items(ids, onnx: bytes = b"head-onnx", labels=("neg", "pos")):
    for task_id in ids:
        yield task_id, "minilm-l6", list(labels), onnx + task_id.encode(), EVALUATION


def counts(s: Store) -> dict[str, int]:
    with s.engine.connect() as conn:
        return {name: conn.execute(sa.text(f"SELECT COUNT(*) FROM {name}")).scalar()
                for name in ("tasks", "jobs", "heads", "changes")}


def test_imported_tasks_are_ready_at_version_1_and_train_on_as_usual(store):
    ids = [f"imp-{i:04d}" for i in range(2500)]
    assert store.import_heads(T, items(ids), config={"strategy": "linear"}, batch_size=1000) == 2500
    assert counts(store) == {"tasks": 2500, "jobs": 2500, "heads": 2500, "changes": 0}
    task = store.get_task(task_key(T, "imp-0042"))
    assert (task.state, task.live_version, task.backbone) == ("READY", 1, "minilm-l6")
    assert task.declared_labels == ["neg", "pos"] and task.config == {"strategy": "linear"}
    head = store.get_head(task.key, 1)  # read back through the digest check
    assert head.onnx == b"head-onnximp-0042" and head.labels == ["neg", "pos"]
    assert head.onnx_sha256 == hashlib.sha256(head.onnx).hexdigest() and head.evaluation == EVALUATION
    job = store.get_job(task.job_id)
    assert (job.state, job.version, job.task_key, job.owner) == ("SUCCEEDED", 1, task.key, "")
    assert head.job_id == job.job_id
    assert [t.task_id for t in store.list_tasks(T, "imp-2497", 10)] == ["imp-2498", "imp-2499"]

    # The normal path goes on from there: version 2 by a job, then delete.
    from adapters.options import TrainingOptions
    from service.jobs import new_job

    nxt = new_job(task.key, TrainingOptions())
    store.start_job(nxt)
    assert store.finish_job(nxt.job_id, {}, head=HeadRecord(task.key, 0, b"v2", ["neg", "pos"], {})) == 2
    assert store.get_task(task.key).live_version == 2
    store.delete_task(task.key)
    assert counts(store)["tasks"] == 2499 and counts(store)["heads"] == 2499


def test_a_taken_task_id_fails_its_batch_only(store):
    store.import_heads(T, items(["b-0001"]))
    before = counts(store)
    ids = [f"a-{i:04d}" for i in range(10)] + [f"b-{i:04d}" for i in range(10)]  # b-0001 is in batch 2
    with pytest.raises(AlreadyExists) as err:
        store.import_heads(T, items(ids), batch_size=10)
    assert "'b-0001'" in err.value.message
    assert counts(store)["tasks"] == before["tasks"] + 10  # batch 1 stayed, batch 2 left nothing
    assert counts(store)["heads"] == before["heads"] + 10 and counts(store)["jobs"] == before["jobs"] + 10
    with pytest.raises(NotFound):
        store.get_task(task_key(T, "b-0000"))
    with pytest.raises(AlreadyExists) as err:  # twice in one batch
        store.import_heads(T, items(["c-1", "c-2", "c-1"]))
    assert "'c-1'" in err.value.message
    with pytest.raises(NotFound):
        store.get_task(task_key(T, "c-2"))


def test_the_same_task_id_in_two_tenants_and_quotas(store):
    store.create_tenant(TenantRecord("tn-small", "small", Quotas(tasks=3)))
    store.import_heads(T, items(["same"]))
    assert store.import_heads("tn-small", items(["same", "other"]), quotas=Quotas(tasks=3)) == 2
    before = counts(store)
    with pytest.raises(ResourceExhausted):
        store.import_heads("tn-small", items(["x", "y"]), quotas=Quotas(tasks=3))
    assert counts(store) == before


def test_bad_input_changes_nothing(store):
    before = counts(store)
    with pytest.raises(InvalidInput):
        store.import_heads(T, [("a/b", "minilm-l6", ["x", "y"], b"onnx", {})])
    with pytest.raises(InvalidInput):
        store.import_heads(T, [("ok", "minilm-l6", ["x", "y"], b"", {})])
    with pytest.raises(NotFound):
        store.import_heads("no-such-tenant", items(["t"]))
    assert counts(store) == before
    assert store.import_heads(T, []) == 0
