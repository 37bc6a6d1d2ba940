"""The jobs table as a queue, and the change feed, on both engines: claims, leases, takeover, fencing,
one version per job, and every change seen by another store (another replica)."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from adapters.errors import FailedPrecondition, NotFound
from service import migrate
from service.changes import ChangeFeed
from service.store import (
    DEFAULT_TENANT,
    HeadRecord,
    JobRecord,
    LeaseLost,
    Quotas,
    Store,
    TaskRecord,
    TenantRecord,
    task_key,
)

T = DEFAULT_TENANT


@pytest.fixture
def stores(store_url):
    """Two stores on one database: two replicas."""
    a, b = Store(store_url), Store(store_url)
    yield a, b
    a.close()
    b.close()


def make_task(store: Store, task_id: str = "t1") -> str:
    store.create_task(TaskRecord.new(T, task_id, "minilm-l6", ["a", "b"], {}), [])
    return task_key(T, task_id)


def queue(store: Store, key: str, job_id: str) -> None:
    store.start_job(JobRecord(job_id=job_id, task_key=key, state="QUEUED", config={"strategy": "auto"},
                              status={}))


def head(tag: bytes = b"onnx") -> HeadRecord:
    return HeadRecord(task_key="", version=0, onnx=tag, labels=["a", "b"], evaluation={})


def test_jobs_are_claimed_once_oldest_first(stores):
    a, b = stores
    keys = [make_task(a, f"t{i}") for i in range(3)]
    for i, key in enumerate(keys):
        queue(a, key, f"j{i}")
        time.sleep(0.002)
    first = a.claim_job("w-a", 30_000)
    second = b.claim_job("w-b", 30_000)
    third = a.claim_job("w-a2", 30_000)
    assert [first.job_id, second.job_id, third.job_id] == ["j0", "j1", "j2"]
    assert a.claim_job("w-c", 30_000) is None  # nothing left: every job is held under a live lease
    stored = b.get_job("j1")
    assert (stored.state, stored.owner, stored.attempts) == ("RUNNING", "w-b", 1)


def test_tenants_take_turns_however_many_jobs_one_of_them_queued(stores):
    """Tenant A queues five jobs, then tenant B one: B's is claimed second, not sixth. A tenant that
    arrives later (C) is next, having never been served; then A's, oldest first. Two replicas claim."""
    a, b = stores
    for tenant in ("team-a", "team-b", "team-c"):
        a.create_tenant(TenantRecord(tenant, tenant, Quotas()))

    def queued(tenant: str, task_id: str) -> None:
        a.create_task(TaskRecord.new(tenant, task_id, "minilm-l6", ["a", "b"], {}), [])
        queue(a, task_key(tenant, task_id), f"{tenant}-{task_id}")
        time.sleep(0.002)

    for i in range(5):
        queued("team-a", f"t{i}")
    queued("team-b", "t0")
    claimed = [a.claim_job("w-a", 30_000).job_id, b.claim_job("w-b", 30_000).job_id]
    queued("team-c", "t0")
    while (job := (a if len(claimed) % 2 else b).claim_job("w", 30_000)) is not None:
        claimed.append(job.job_id)
    assert claimed == ["team-a-t0", "team-b-t0", "team-c-t0", "team-a-t1", "team-a-t2", "team-a-t3", "team-a-t4"]
    assert b.get_job("team-b-t0").tenant_id == "team-b" and b.get_job("team-b-t0").claimed_at_ms > 0


def test_concurrent_claims_never_hand_out_a_job_twice(stores):
    a, b = stores
    for i in range(12):
        queue(a, make_task(a, f"t{i}"), f"j{i}")
    got: list[str] = []
    lock = threading.Lock()

    def claim(store: Store, name: str) -> None:
        while (job := store.claim_job(name, 30_000)) is not None:
            with lock:
                got.append(job.job_id)

    threads = [threading.Thread(target=claim, args=(s, f"w{i}")) for i, s in enumerate((a, b, a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == sorted(f"j{i}" for i in range(12))


def test_an_expired_lease_is_taken_over_and_the_old_owner_publishes_nothing(stores):
    a, b = stores
    key = make_task(a)
    queue(a, key, "j1")
    assert a.claim_job("dead", 50).job_id == "j1"
    assert b.claim_job("alive", 30_000) is None  # the lease still holds for 50 ms
    time.sleep(0.1)
    taken = b.claim_job("alive", 30_000)
    assert (taken.job_id, taken.owner, taken.attempts) == ("j1", "alive", 2)
    assert not a.renew_lease("j1", "dead", 30_000)  # the first worker learns it lost the job
    with pytest.raises(LeaseLost):
        a.update_job("j1", "RUNNING", {"phase": "training"}, owner="dead")
    with pytest.raises(LeaseLost):
        a.finish_job("j1", {}, head=head(b"stale"), owner="dead")
    assert b.finish_job("j1", {"phase": "done"}, head=head(b"fresh"), owner="alive") == 1
    with pytest.raises(LeaseLost):  # the job ran twice; it publishes once
        a.finish_job("j1", {}, head=head(b"stale"), owner="dead")
    assert b.get_head(key, 1).onnx == b"fresh" and b.get_task(key).live_version == 1
    with pytest.raises(NotFound):
        b.get_head(key, 2)


def test_a_lease_is_renewed_by_its_owner_only(stores):
    a, b = stores
    queue(a, make_task(a), "j1")
    a.claim_job("w1", 100)
    assert a.renew_lease("j1", "w1", 30_000)
    assert not b.renew_lease("j1", "w2", 30_000)
    time.sleep(0.15)
    assert b.claim_job("w2", 30_000) is None  # renewed: still w1's


def test_a_released_job_is_claimed_again_at_once(stores):
    a, b = stores
    queue(a, make_task(a), "j1")
    a.claim_job("stopping", 30_000)
    assert not b.release_job("j1", "someone-else")
    assert a.release_job("j1", "stopping")
    job = b.claim_job("next", 30_000)
    assert (job.job_id, job.attempts) == ("j1", 2)


def test_a_job_whose_workers_keep_dying_fails_after_max_attempts(stores):
    a, b = stores
    key = make_task(a)
    queue(a, key, "j1")
    for owner in ("w1", "w2"):
        assert a.claim_job(owner, 1, max_attempts=2) is not None
        time.sleep(0.01)
    assert b.claim_job("w3", 30_000, max_attempts=2) is None
    job = b.get_job("j1")
    assert job.state == "FAILED" and "stopped 2 times" in job.error
    assert b.get_task(key).state == "FAILED"
    queue(b, key, "j2")  # the task can be trained again
    assert b.claim_job("w3", 30_000).job_id == "j2"


def test_one_unfinished_job_per_task_across_replicas(stores):
    a, b = stores
    key = make_task(a)
    results: list[str] = []

    def start(store: Store, job_id: str) -> None:
        try:
            queue(store, key, job_id)
            results.append("queued")
        except FailedPrecondition:
            results.append("busy")

    threads = [threading.Thread(target=start, args=(s, f"j{i}")) for i, s in enumerate((a, b, a, b, a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == ["busy"] * 5 + ["queued"]


def test_requeue_running_puts_left_over_jobs_back(stores):
    a, _ = stores
    queue(a, make_task(a), "j1")
    a.claim_job("previous-run", 30_000)
    assert a.requeue_running() == 1
    assert a.get_job("j1").state == "QUEUED"


def test_the_change_feed_carries_versions_deletes_keys_and_tenants_to_another_store(stores):
    a, b = stores
    seen: list[tuple[str, str]] = []
    feed = ChangeFeed(b, {kind: (lambda ref, kind=kind: seen.append((kind, ref))) for kind in ("task", "key", "tenant")},
                      interval=0.05)
    feed.start()
    try:
        key = make_task(a)
        queue(a, key, "j1")
        a.claim_job("w", 30_000)
        a.finish_job("j1", {}, head=head(), owner="w")
        a.delete_task(key)
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ("task", key) in seen
        assert seen.count(("task", key)) >= 2  # the new version, then the delete
    finally:
        feed.close()


def test_the_feed_poll_skips_what_it_has_seen(stores):
    a, b = stores
    applied: list[str] = []
    feed = ChangeFeed(b, {"task": applied.append}, interval=60)
    key = make_task(a)
    queue(a, key, "j1")
    a.claim_job("w", 30_000)
    a.finish_job("j1", {}, head=head(), owner="w")
    assert feed.poll() == 1 and applied == [key]
    assert feed.poll() == 0 and applied == [key]
    a.delete_task(key)
    assert feed.poll() == 1 and applied == [key, key]


def test_postgresql_notifies_listeners_at_commit(pg_url):
    """(SQLite replicas rely on the poll, tested above.)"""
    engine = sa.create_engine(pg_url)
    migrate.upgrade(engine)
    engine.dispose()
    a, b = Store(pg_url), Store(pg_url)
    got = threading.Event()
    feed = ChangeFeed(b, {"task": lambda ref: got.set()}, interval=60)  # the poll would take a minute
    feed.start()
    try:
        deadline = time.monotonic() + 10
        while not feed.listening and time.monotonic() < deadline:
            time.sleep(0.02)
        assert feed.listening
        key = make_task(a)
        started = time.monotonic()
        a.delete_task(key)
        assert got.wait(5)
        assert time.monotonic() - started < 1.0
        assert feed.poll() == 0  # the notification marked it seen: the poll does not apply it again
        assert feed.applied == 1
    finally:
        feed.close()
        a.close()
        b.close()


@pytest.mark.parametrize("skew_s", [120, -120])
def test_leases_keep_the_databases_time_whatever_a_replicas_clock_says(pg_url, monkeypatch, skew_s):
    """Replica b's clock runs two minutes ahead (it would see a's live lease as run out and take the job) or
    behind (renewing, it would grant a lease already run out): leases are reckoned on PostgreSQL's clock."""
    import service.store as store_module

    engine = sa.create_engine(pg_url)
    migrate.upgrade(engine)
    engine.dispose()
    a, b = Store(pg_url), Store(pg_url)
    try:
        queue(a, make_task(a), "j1")
        real = store_module.now_ms

        def on_bs_clock(call, *args):
            monkeypatch.setattr(store_module, "now_ms", lambda: real() + skew_s * 1000)
            try:
                return call(*args)
            finally:
                monkeypatch.setattr(store_module, "now_ms", real)

        if skew_s > 0:
            assert a.claim_job("w1", 30_000).job_id == "j1"
            assert on_bs_clock(b.claim_job, "w2", 30_000) is None  # ahead: a's lease has 30 s to run, not -90
        else:
            assert on_bs_clock(b.claim_job, "w2", 30_000).job_id == "j1"
            assert on_bs_clock(b.renew_lease, "j1", "w2", 30_000)
            assert a.claim_job("w1", 30_000) is None  # behind: b's lease holds 30 s, not -90
    finally:
        a.close()
        b.close()


def test_the_change_feed_keeps_the_databases_time_whatever_a_writers_clock_says(pg_url, monkeypatch):
    """A replica whose clock runs two minutes ahead records a change: the poll of another replica must
    still see the changes recorded after it by replicas whose clocks are right."""
    import service.store as store_module

    engine = sa.create_engine(pg_url)
    migrate.upgrade(engine)
    engine.dispose()
    a, b = Store(pg_url), Store(pg_url)
    seen: list[str] = []
    feed = ChangeFeed(b, {"task": seen.append}, interval=60)  # polled by hand below
    try:
        ahead, right = make_task(a, "ahead"), make_task(a, "right")
        real = store_module.now_ms
        monkeypatch.setattr(store_module, "now_ms", lambda: real() + 120_000)
        a.delete_task(ahead)  # a change recorded by the replica whose clock is ahead
        monkeypatch.setattr(store_module, "now_ms", real)
        feed.poll()
        a.delete_task(right)  # then one by a replica whose clock is right
        feed.poll()
        assert seen == [ahead, right]
    finally:
        a.close()
        b.close()
