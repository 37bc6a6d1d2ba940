"""PostgreSQL stopped and started again under a running server (a restart, a failover): calls that need the
store fail with UNAVAILABLE, which clients retry, and a clear message; heads already loaded keep answering;
nothing refused is stored; and once the database is back the server recovers by itself (pooled connections,
the LISTEN connection of the change feed, the job queue, health), with no restart. A host that takes
connections and never answers is given up after a timeout, not waited on for ever.

Real PostgreSQL 15 (a cluster of this module's own, since it is stopped), a real server and real channels.
"""

from __future__ import annotations

import concurrent.futures
import socket
import time
import urllib.request

import grpc
import pytest
import sqlalchemy as sa
from conftest import TINY_TEXT, TOPICS, Client, make_settings, make_tenant, text_examples
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import conninfo_to_dict

from service import migrate
from service.gen import headserve_pb2 as pb
from service.health import LIVENESS
from service.server import build_server
from service.store import PG_CONNECTION_DEFAULTS, Store, store_outage

pytestmark = pytest.mark.slow

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def outage(own_postgres, tmp_path_factory):
    url = own_postgres.create_database()
    engine = sa.create_engine(url)
    migrate.upgrade(engine, quiet=True)
    engine.dispose()
    running = build_server(make_settings(tmp_path_factory.mktemp("outage"), builtin_backbones=[], store_url=url,
                                         auth="api_key", health_interval_seconds=0.2, sync_interval_seconds=0.5,
                                         job_lease_seconds=3, metrics_address="127.0.0.1:0"))
    tenant = make_tenant(running)
    client = Client(running.address, tenant.api_key)
    yield own_postgres, running, tenant, client
    client.close()
    running.stop()


def health(client: Client, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                            timeout=10).status


def eventually(check, timeout: float = 30.0, what: str = ""):
    end = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except grpc.RpcError:
            pass
        assert time.monotonic() < end, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.1)


def answered(running, method: str, code: str) -> float:
    """How many `method` calls the server answered with `code` (its Prometheus counter)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10) as page:
        text = page.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "headserve_rpcs_total" and sample.labels == {"method": method, "code": code})


def predict(client: Client, task_id: str) -> pb.PredictResponse:
    return client.stub.Predict(pb.PredictRequest(task_id=task_id, inputs=[pb.Input(text="Simmer the soup.")]),
                               timeout=10)


def test_a_database_restart_is_unavailable_while_it_lasts_and_recovered_from_without_a_restart(outage):
    cluster, running, tenant, client = outage
    client.stub.CreateTask(pb.CreateTaskRequest(task_id="kept", backbone=TINY_TEXT, examples=text_examples(TOPICS)))
    assert client.wait_ready("kept").state == pb.Job.SUCCEEDED
    before = predict(client, "kept").predictions[0]
    eventually(lambda: running.feed.listening, what="the change feed listening")
    # A key made now is not in the server's key cache: its first call must read the store. Its channel makes
    # one attempt per call (the retries are counted on GetTask below).
    newcomer = Client(running.address, make_tenant(running).api_key, options=[("grpc.enable_retries", 0)])

    cluster.stop()
    try:
        refused = {}
        for name, call in {
            "GetTask": lambda: client.stub.GetTask(pb.GetTaskRequest(task_id="kept"), timeout=10),
            "CreateTask": lambda: client.stub.CreateTask(pb.CreateTaskRequest(
                task_id="during", backbone=TINY_TEXT, examples=text_examples(TOPICS)), timeout=10),
            "ListTasks (a key not yet cached)": lambda: newcomer.stub.ListTasks(pb.ListTasksRequest(), timeout=10),
        }.items():
            with pytest.raises(grpc.RpcError) as failed:
                call()
            refused[name] = failed.value
        for name, error in refused.items():
            assert error.code() == grpc.StatusCode.UNAVAILABLE, (name, error.code(), error.details())
            assert "store is not answering" in error.details() and "retry" in error.details(), name
            assert str(cluster.socket_dir) not in error.details(), name  # no server internals to callers
        # The project's channel tried the reads again by itself (five attempts), never the write.
        assert answered(running, "GetTask", "UNAVAILABLE") == 5
        assert answered(running, "CreateTask", "UNAVAILABLE") == 1
        # A loaded head needs no store: predictions go on, the same.
        assert predict(client, "kept").predictions[0] == before
        eventually(lambda: health(client) == NOT_SERVING, what="health NOT_SERVING")
        assert health(client, LIVENESS) == SERVING  # out of the Service, but not restarted
        assert not running.feed.listening
    finally:
        cluster.resume()

    eventually(lambda: health(client) == SERVING, what="health SERVING again")
    eventually(lambda: running.feed.listening, what="the change feed listening again")
    # What was refused was not stored; the same create now succeeds, and its job runs on the resumed queue.
    with pytest.raises(grpc.RpcError) as missing:
        client.stub.GetTask(pb.GetTaskRequest(task_id="during"), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    client.stub.CreateTask(pb.CreateTaskRequest(task_id="during", backbone=TINY_TEXT, examples=text_examples(TOPICS)),
                           timeout=10)
    assert client.wait_ready("during", timeout=60).state == pb.Job.SUCCEEDED
    assert predict(client, "during").predictions[0].label in TOPICS
    assert newcomer.stub.ListTasks(pb.ListTasksRequest(), timeout=10) is not None
    assert predict(client, "kept").predictions[0] == before
    newcomer.close()


def test_a_job_training_when_the_database_goes_away_finishes_once_it_is_back(outage):
    """The worker keeps training without the store (progress is not stored meanwhile), waits for it to
    store the head, and goes on claiming jobs: the worker thread does not die of the outage."""
    cluster, running, tenant, client = outage
    client.stub.CreateTask(pb.CreateTaskRequest(
        task_id="tuned", backbone=TINY_TEXT, examples=text_examples(TOPICS),
        config=pb.TrainingConfig(strategy=pb.FINE_TUNE, epochs=30)))
    for job in client.stub.WatchJob(pb.WatchJobRequest(task_id="tuned"), timeout=60):
        if job.state == pb.Job.RUNNING:
            break
    cluster.stop()
    try:
        time.sleep(2.0)  # past a progress update and a lease renewal (3 s leases: the default is 30)
        assert all("training worker" not in p for p in running.monitor.problems)
    finally:
        cluster.resume()
    assert client.wait_ready("tuned", timeout=90).state == pb.Job.SUCCEEDED
    eventually(lambda: health(client) == SERVING, what="health SERVING again (the training thread alive)")
    task = client.stub.GetTask(pb.GetTaskRequest(task_id="tuned"), timeout=10)
    assert task.state == pb.Task.READY and task.version >= 1
    assert predict(client, "tuned").predictions[0].label in TOPICS
    # The worker goes on claiming jobs.
    client.stub.CreateTask(pb.CreateTaskRequest(task_id="after", backbone=TINY_TEXT, examples=text_examples(TOPICS)))
    assert client.wait_ready("after", timeout=60).state == pb.Job.SUCCEEDED


def test_a_postgresql_host_that_accepts_but_never_answers_is_given_up_after_the_connect_timeout():
    """libpq alone would wait for ever on a host that takes the TCP connection and never answers (a frozen
    host, a proxy to a dead one): every call needing the store would hang, and the server's threads with it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # the kernel completes the handshakes; nothing ever answers
    url = f"postgresql+psycopg://headserve@127.0.0.1:{listener.getsockname()[1]}/headserve"
    try:
        store = Store(url, check_schema=False)
        began = time.monotonic()
        with pytest.raises(sa.exc.OperationalError) as failed:
            store.get_task("t")
        waited = time.monotonic() - began
        assert store_outage(failed.value)
        assert PG_CONNECTION_DEFAULTS["connect_timeout"] - 1 < waited < 4 * PG_CONNECTION_DEFAULTS["connect_timeout"]
        # The LISTEN connection is bounded the same way.
        listen = conninfo_to_dict(store.notification_dsn())
        assert {k: int(listen[k]) for k in PG_CONNECTION_DEFAULTS} == PG_CONNECTION_DEFAULTS
        store.close()
        # The URL's own parameters win.
        store = Store(url + "?connect_timeout=1", check_schema=False)
        began = time.monotonic()
        with pytest.raises(sa.exc.OperationalError):
            store.get_task("t")
        assert time.monotonic() - began < PG_CONNECTION_DEFAULTS["connect_timeout"] - 1
        assert conninfo_to_dict(store.notification_dsn())["connect_timeout"] == "1"
        store.close()
    finally:
        listener.close()


def test_a_failover_that_leaves_pooled_connections_on_a_read_only_server_is_unavailable_once(outage):
    """After a failover, connections opened before it may reach the old primary, now a standby: reads pass,
    writes are refused as read-only. The first refused write is UNAVAILABLE and drops the pool; the next
    one connects anew (here: to a database writable for new sessions) and succeeds."""
    cluster, running, tenant, client = outage
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # a few pooled connections, open at once
        list(pool.map(lambda _: client.stub.ListTasks(pb.ListTasksRequest(), timeout=10), range(8)))
    superuser = sa.create_engine(cluster.url(), isolation_level="AUTOCOMMIT")
    database = running.app.store.url.database
    try:
        with superuser.connect() as conn:
            # Sessions open now become read-only (the reload reaches them); new ones in this database do not.
            conn.exec_driver_sql("ALTER SYSTEM SET default_transaction_read_only = on")
            conn.exec_driver_sql(f'ALTER DATABASE "{database}" SET default_transaction_read_only = off')
            conn.exec_driver_sql("SELECT pg_reload_conf()")
        time.sleep(0.5)
        # The first write on a stale connection (this one, or the job queue's claim) is refused and drops the
        # pool; a write after it reaches a writable session. A write is never INTERNAL, and never refused twice.
        for attempt in range(2):
            try:
                client.stub.CreateTask(pb.CreateTaskRequest(task_id="on-standby", backbone=TINY_TEXT,
                                                            examples=text_examples(TOPICS)), timeout=10)
                break
            except grpc.RpcError as refused:
                assert attempt == 0 and refused.code() == grpc.StatusCode.UNAVAILABLE, refused.details()
        assert client.wait_ready("on-standby", timeout=60).state == pb.Job.SUCCEEDED
    finally:
        with superuser.connect() as conn:
            conn.exec_driver_sql("SET default_transaction_read_only = off")
            conn.exec_driver_sql("ALTER SYSTEM RESET default_transaction_read_only")
            conn.exec_driver_sql(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
            conn.exec_driver_sql("SELECT pg_reload_conf()")
        superuser.dispose()
