"""The store: tenants and their API keys, tasks, labels, content-addressed examples, cached features,
head versions, jobs.

Every row belongs to a tenant. A task is identified inside the service by its *key*, `TENANT/TASK_ID`
(`task_key`), so that two tenants may both own a task called `spam` and nothing keyed by task (the head
cache, the batcher) needs to know about tenants. Examples' contents (blobs) and their cached features
are content-addressed *per tenant*: uploading what another tenant already stored costs the same time and
says nothing about it.

The embedded default is SQLite in WAL mode with synchronous=FULL, so whatever a call acknowledged
survives a kill -9. Access goes through SQLAlchemy Core so another engine (PostgreSQL) can follow.
Every write is one transaction, and quotas are checked inside it: a failed request leaves the store as
it was. Uniqueness (task per tenant, one active job per task, version per task) is the database's job;
its integrity errors become domain errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Sequence

import numpy as np
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql as postgresql_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from adapters.errors import (
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ResourceExhausted,
)

log = logging.getLogger(__name__)

STORE_FILE = "headserve.sqlite3"  # in the data directory (Store.open)

# meta's schema_version: 1 no tenants; 2 every row belongs to a tenant; 3 replicas; 4 jobs claimed fairly
# between tenants (the revisions themselves are Alembic's: service/migrations, service/migrate.py)
SCHEMA_VERSION = 4
CHANGES_CHANNEL = "headserve_changes"  # PostgreSQL NOTIFY channel of the changes table
DEFAULT_TENANT = "default"  # the tenant of every caller when auth = "none", and of tasks made before tenants
ACTIVE_JOB_STATES = ("QUEUED", "RUNNING")

metadata = sa.MetaData()

meta = sa.Table(
    "meta", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
tenants = sa.Table(
    "tenants", metadata,
    sa.Column("tenant_id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("quotas", sa.Text, nullable=False, default="{}"),  # JSON of Quotas fields
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
)
api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.tenant_id", ondelete="CASCADE"), nullable=False,
              index=True),
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    sa.Column("scopes", sa.Text, nullable=False),  # JSON list
    sa.Column("description", sa.Text, nullable=False, default=""),
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    sa.Column("expires_at_ms", sa.BigInteger, nullable=False, default=0),  # 0: never
    sa.Column("revoked_at_ms", sa.BigInteger, nullable=False, default=0),  # 0: not revoked
)
tasks = sa.Table(
    "tasks", metadata,
    sa.Column("key", sa.String(200), primary_key=True),  # TENANT/TASK_ID
    sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.tenant_id", ondelete="CASCADE"), nullable=False),
    sa.Column("task_id", sa.String(128), nullable=False),
    sa.Column("backbone", sa.String(128), nullable=False),
    sa.Column("declared_labels", sa.Text, nullable=False),  # JSON list
    sa.Column("config", sa.Text, nullable=False),  # JSON of TrainingOptions fields
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("live_version", sa.Integer, nullable=False, default=0),
    sa.Column("error", sa.Text, nullable=False, default=""),
    sa.Column("job_id", sa.String(64), nullable=False, default=""),
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    sa.Column("updated_at_ms", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("tenant_id", "task_id", name="uq_tasks_tenant_task"),
)
blobs = sa.Table(
    "blobs", metadata,
    sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.tenant_id", ondelete="CASCADE"), primary_key=True),
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(8), nullable=False),  # text | image
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)
examples = sa.Table(
    "examples", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_key", sa.String(200), sa.ForeignKey("tasks.key", ondelete="CASCADE"), nullable=False),
    sa.Column("tenant_id", sa.String(64), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("label", sa.Text, nullable=False),
    sa.UniqueConstraint("task_key", "sha256", "label"),
    sa.ForeignKeyConstraint(["tenant_id", "sha256"], ["blobs.tenant_id", "blobs.sha256"]),
    sa.Index("ix_examples_tenant_sha", "tenant_id", "sha256"),
)
features = sa.Table(
    "features", metadata,
    sa.Column("tenant_id", sa.String(64), primary_key=True),
    sa.Column("trunk", sa.String(160), primary_key=True),  # backbone name + weights digest + tap
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("vector", sa.LargeBinary, nullable=False),  # float32
)
heads = sa.Table(
    "heads", metadata,
    sa.Column("task_key", sa.String(200), sa.ForeignKey("tasks.key", ondelete="CASCADE"), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("onnx", sa.LargeBinary, nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("labels", sa.Text, nullable=False),  # JSON list, the head's output order
    sa.Column("evaluation", sa.Text, nullable=False),  # JSON
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    # SHA-256 of `onnx`, written with it and checked when it is read ('' for heads stored before the
    # column existed: those are checked by `size` only).
    sa.Column("onnx_sha256", sa.String(64), nullable=False, server_default=""),
    sa.Column("job_id", sa.String(64), nullable=True),  # the job that published it: one version per job
    sa.Index("uq_heads_job", "job_id", unique=True),
)
jobs = sa.Table(
    "jobs", metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("task_key", sa.String(200), sa.ForeignKey("tasks.key", ondelete="CASCADE"), nullable=False,
              index=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False, default="{}"),  # JSON: phase, progress, epoch, loss...
    sa.Column("error", sa.Text, nullable=False, default=""),
    sa.Column("version", sa.Integer, nullable=False, default=0),
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    sa.Column("updated_at_ms", sa.BigInteger, nullable=False),
    # The queue: a worker claims a job by writing its id here and holding a lease it renews; a job whose
    # lease ran out (its worker died) is claimed again. `attempts` counts claims.
    sa.Column("owner", sa.String(128), nullable=False, server_default=""),
    sa.Column("lease_until_ms", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    # Fair claims: workers take the oldest job of the tenant whose last claim is oldest (Store.claim_job).
    sa.Column("tenant_id", sa.String(64), nullable=False, server_default=""),
    sa.Column("claimed_at_ms", sa.BigInteger, nullable=False, server_default="0"),
    sa.Index("ix_jobs_state_created", "state", "created_at_ms"),
    sa.Index("ix_jobs_tenant_claimed", "tenant_id", "claimed_at_ms"),
)
# When a job's tenant was last served: the latest claim of any of its jobs (0: never). Store.claim_job orders by
# it, so tenants take turns.
_served = jobs.alias("served")
_TENANT_LAST_CLAIM = (sa.select(sa.func.coalesce(sa.func.max(_served.c.claimed_at_ms), 0))
                      .where(_served.c.tenant_id == jobs.c.tenant_id).scalar_subquery())
# What changed, for every replica's caches: a task's live version or its deletion ("task", its key), a key
# revoked ("key", its id), a tenant's quotas or deletion ("tenant", its id). PostgreSQL also NOTIFYs each
# row on CHANGES_CHANNEL when it commits; replicas read the table as the fallback, and it is pruned.
changes = sa.Table(
    "changes", metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("ref", sa.String(200), nullable=False),
    sa.Column("at_ms", sa.BigInteger, nullable=False),
    sa.Index("ix_changes_at", "at_ms"),
)
usage = sa.Table(  # Predict traffic per task, summarised (service/usage.py flushes it every few seconds)
    "usage", metadata,
    sa.Column("task_key", sa.String(200), sa.ForeignKey("tasks.key", ondelete="CASCADE"), primary_key=True),
    sa.Column("tenant_id", sa.String(64), nullable=False, index=True),
    sa.Column("requests", sa.BigInteger, nullable=False, default=0),
    sa.Column("inputs", sa.BigInteger, nullable=False, default=0),
    sa.Column("last_used_ms", sa.BigInteger, nullable=False, default=0),
)
# The database, not a check before the insert, keeps one unfinished job per task.
sa.Index("uq_jobs_one_active", jobs.c.task_key, unique=True,
         sqlite_where=jobs.c.state.in_(ACTIVE_JOB_STATES), postgresql_where=jobs.c.state.in_(ACTIVE_JOB_STATES))


# The reads of every GetTask, built once: SQLAlchemy then only looks up their compiled form (building a select
# per call was 60% of task_view's time on SQLite; docs/design.md, "Serving: the fixed cost per request").
# The task's row comes with its live head's evaluation (a scalar subquery): two statements, not three.
_TASK = sa.select(tasks).where(tasks.c.key == sa.bindparam("key"))
_TASK_AND_EVALUATION = sa.select(tasks, sa.select(heads.c.evaluation).where(
    heads.c.task_key == tasks.c.key, heads.c.version == tasks.c.live_version).scalar_subquery().label(
    "live_evaluation")).where(tasks.c.key == sa.bindparam("key"))
_LABEL_COUNTS = (sa.select(examples.c.label, sa.func.count()).where(examples.c.task_key == sa.bindparam("key"))
                 .group_by(examples.c.label))
_EVALUATION = sa.select(heads.c.evaluation).where(heads.c.task_key == sa.bindparam("key"),
                                                  heads.c.version == sa.bindparam("version"))


def now_ms() -> int:
    return int(time.time() * 1000)


def content_sha(kind: str, data: bytes) -> str:
    return hashlib.sha256(kind.encode() + b"\0" + data).hexdigest()


def task_key(tenant_id: str, task_id: str) -> str:
    """The service-wide identity of a tenant's task (task ids have no '/')."""
    return f"{tenant_id}/{task_id}"


def task_of(key: str) -> str:
    """The caller's task id in a task key: what error messages and responses show."""
    return key.partition("/")[2] or key


def tenant_of(key: str) -> str:
    return key.partition("/")[0]


@dataclasses.dataclass(frozen=True)
class Quotas:
    """A tenant's limits, set by an admin; 0 means unlimited. Stored bytes are examples' contents and
    heads. The rates are token buckets (a burst of one second's worth), per server replica."""

    tasks: int = 0
    examples: int = 0
    stored_bytes: int = 0
    training_jobs: int = 0  # unfinished (queued or running) at once
    predict_requests_per_second: float = 0.0
    predict_inputs_per_second: float = 0.0

    @classmethod
    def from_json(cls, text: str) -> Quotas:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text or "{}").items() if k in fields})


@dataclasses.dataclass
class Usage:
    tasks: int = 0
    examples: int = 0
    stored_bytes: int = 0
    training_jobs: int = 0


@dataclasses.dataclass
class TenantRecord:
    tenant_id: str
    name: str
    quotas: Quotas
    created_at_ms: int = 0


@dataclasses.dataclass
class KeyRecord:
    key_id: str
    tenant_id: str
    secret_sha256: str
    scopes: list[str]
    description: str = ""
    created_at_ms: int = 0
    expires_at_ms: int = 0
    revoked_at_ms: int = 0


@dataclasses.dataclass(frozen=True)
class ExampleIn:
    kind: str  # text | image
    data: bytes  # utf-8 text or encoded image
    label: str

    @property
    def sha256(self) -> str:
        return content_sha(self.kind, self.data)


@dataclasses.dataclass
class TaskRecord:
    key: str
    tenant_id: str
    task_id: str
    backbone: str
    declared_labels: list[str]
    config: dict
    state: str = "PENDING"
    live_version: int = 0
    error: str = ""
    job_id: str = ""
    created_at_ms: int = 0
    updated_at_ms: int = 0

    @classmethod
    def new(cls, tenant_id: str, task_id: str, backbone: str, declared_labels: list[str], config: dict) -> TaskRecord:
        return cls(task_key(tenant_id, task_id), tenant_id, task_id, backbone, declared_labels, config)


@dataclasses.dataclass
class JobRecord:
    job_id: str
    task_key: str
    state: str
    config: dict
    status: dict
    error: str = ""
    version: int = 0
    created_at_ms: int = 0
    updated_at_ms: int = 0
    owner: str = ""  # the worker holding the job ('' while queued or once ended)
    lease_until_ms: int = 0
    attempts: int = 0  # times a worker claimed it
    claimed_at_ms: int = 0  # when a worker last claimed it (tenants take turns: Store.claim_job)

    @property
    def finished(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED")

    @property
    def task_id(self) -> str:
        return task_of(self.task_key)

    @property
    def tenant_id(self) -> str:
        return tenant_of(self.task_key)


@dataclasses.dataclass
class HeadRecord:
    task_key: str
    version: int
    onnx: bytes
    labels: list[str]
    evaluation: dict
    created_at_ms: int = 0
    onnx_sha256: str = ""  # as stored; Store.get_head has checked `onnx` against it
    job_id: str | None = None  # the job that published it


class StorageFull(ResourceExhausted):
    """The database could not grow (disk full, or SQLite's max_page_count): the transaction was rolled back."""


# Database errors that say the store is not answering now, not that a request is wrong: the driver's
# OperationalError (connection refused or dropped, the server shutting down or failing over, lock and
# statement timeouts), InterfaceError (a connection already closed) and the pool's TimeoutError (every
# connection in use). Callers get UNAVAILABLE (service/errors.py); training waits for the store to be back
# (service/jobs.py).
STORE_OUTAGES = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)


def store_outage(exc: BaseException) -> bool:
    """Whether `exc` says the store is unreachable or saturated for now (retrying later may succeed)."""
    return isinstance(exc, STORE_OUTAGES) or (isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated)


# libpq waits for ever by default: a replica whose PostgreSQL host stops answering (a failover to a new
# address, a network partition, a frozen host) would hang every call that needs the store, and with them
# the server's threads. These bound the wait: 5 s to connect, a dead peer noticed by TCP keepalives after
# about 25 s idle, and unacknowledged data given up after 15 s (both ignored on a Unix socket). The store
# URL's own query parameters (e.g. `?connect_timeout=10`) win over them.
PG_CONNECTION_DEFAULTS = {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                          "keepalives_count": 3, "tcp_user_timeout": 15000}


def _standby_is_a_disconnect(context) -> None:
    """A write refused as read-only (SQLSTATE 25006, read_only_sql_transaction) says the connection reaches a
    standby: after a failover, the old primary. Taken as a disconnect, SQLAlchemy drops the pool's
    connections and the next checkout connects anew, where the URL now leads (the new primary); the call
    is UNAVAILABLE (store_outage: the connection was invalidated). Without it, pooled connections to the
    standby would pass the pre-ping (a SELECT) and refuse every write for up to pool_recycle (30 min)."""
    if getattr(context.original_exception, "sqlstate", None) == "25006":
        context.is_disconnect = True


_DATABASE_NOW_MS_SQL = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
_DATABASE_NOW_MS = sa.text(f"SELECT {_DATABASE_NOW_MS_SQL}")


class CorruptHead(FailedPrecondition):
    """A stored head's bytes no longer match the size and SHA-256 written with them."""


_FULL_MESSAGE = ("the server's storage is full: the write was rolled back and nothing of it was stored; "
                 "retry once the operator has freed space")


def _disk_full(exc: BaseException) -> bool:
    """Whether a database error (SQLAlchemy's wrapper or the driver's own) says the disk is full."""
    orig = getattr(exc, "orig", None) or exc
    if isinstance(orig, sqlite3.Error):
        code = getattr(orig, "sqlite_errorcode", None)
        return (code is not None and code & 0xFF == 13) or "database or disk is full" in str(orig)  # SQLITE_FULL
    return getattr(orig, "sqlstate", None) == "53100" or getattr(orig, "pgcode", None) == "53100"  # disk_full


def _evaluation(text: str) -> dict:
    """A head's evaluation from its JSON. A version's evaluation never changes and GetTask reads the same text
    again and again, so small ones (a few dozen labels: the confusion matrix grows with their square) are
    decoded once and kept; callers get a shallow copy, the values inside are shared and read-only."""
    return _small_evaluation(text) if len(text) <= 16384 else json.loads(text)


@functools.lru_cache(maxsize=256)  # at most about 256 x 16 KB of JSON, decoded
def _small_evaluation(text: str) -> dict:
    return json.loads(text)


def _task(row) -> TaskRecord:
    d = dict(row if isinstance(row, dict) else row._mapping)
    d["declared_labels"] = json.loads(d["declared_labels"])
    d["config"] = json.loads(d["config"])
    return TaskRecord(**d)


def _job(row) -> JobRecord:
    d = dict(row._mapping)
    d.pop("tenant_id", None)  # a property of the record (its task key's), a column for fair claims
    d["config"] = json.loads(d["config"])
    d["status"] = json.loads(d["status"])
    return JobRecord(**d)


def _tenant(row) -> TenantRecord:
    return TenantRecord(row.tenant_id, row.name, Quotas.from_json(row.quotas), row.created_at_ms)


def _key(row) -> KeyRecord:
    d = dict(row._mapping)
    d["scopes"] = json.loads(d["scopes"])
    return KeyRecord(**d)


class LeaseLost(FailedPrecondition):
    """The worker no longer holds the job: its lease ran out and another worker claimed it, or the job (with
    its task) was deleted. Nothing of this run is stored."""


class Store:
    """The store over SQLAlchemy Core, on SQLite (embedded default) or PostgreSQL (several replicas).

    Thread-safe. On SQLite, writes are serialised within the process and begin IMMEDIATE (so a read-then-
    write transaction cannot be overtaken by another process, such as a training worker); reads run
    concurrently (WAL). On PostgreSQL, each write is a transaction at READ COMMITTED with row locks where
    a check must hold until commit (the tenant row for quotas, a job row for its lease).
    """

    def __init__(self, url: str, pool_size: int = 5, check_schema: bool = True, versions_kept: int = 0) -> None:
        """versions_kept: head versions kept per task (setting `head_versions_kept`); publishing a new one
        deletes those older than the last `versions_kept`, in the same transaction. 0 keeps every version."""
        self.url = sa.engine.make_url(url)
        self.versions_kept = versions_kept
        self.dialect = self.url.get_backend_name()
        if self.dialect == "sqlite":
            self.engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(self.engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
        elif self.dialect == "postgresql":
            self.engine = sa.create_engine(url, pool_size=pool_size, max_overflow=2 * pool_size,
                                           pool_pre_ping=True, pool_recycle=1800,
                                           connect_args=self._connection_defaults())
            event.listen(self.engine, "handle_error", _standby_is_a_disconnect)
        else:
            raise ValueError(f"store_url {str(self.url)[:80]!r}: headserve stores in SQLite (sqlite:///PATH) or "
                             "PostgreSQL (postgresql+psycopg://USER:PASSWORD@HOST/DB)")
        # SQLite serialises writers anyway; within the process they queue here instead of spinning on busy.
        self._write = threading.Lock() if self.dialect == "sqlite" else contextlib.nullcontext()
        self._reported: set[tuple[str, int]] = set()  # corrupt heads already logged
        self._full_logged = 0.0
        if check_schema:
            from service import migrate

            try:
                migrate.check(self.engine, self.where)
            except BaseException:
                self.engine.dispose()
                raise

    @property
    def where(self) -> str:
        """The store's location for messages, without its password."""
        return self.url.render_as_string(hide_password=True)

    @classmethod
    def open(cls, data_dir: pathlib.Path) -> Store:
        data_dir.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{data_dir / STORE_FILE}")

    def close(self) -> None:
        self.engine.dispose()

    def _tx(self):
        class _Tx:
            def __enter__(tx):
                self._write.__enter__()
                try:
                    tx.conn = self.engine.connect().execution_options(headserve_write=True)
                    tx.cm = tx.conn.begin()
                    tx.cm.__enter__()
                    return tx.conn
                except BaseException as exc:
                    if getattr(tx, "conn", None) is not None:
                        tx.conn.close()
                    self._write.__exit__(None, None, None)
                    if isinstance(exc, sa.exc.OperationalError) and _disk_full(exc):
                        raise self._storage_full(exc) from exc
                    raise

            def __exit__(tx, exc_type, exc, tb):
                # A full disk (SQLITE_FULL, PostgreSQL's disk_full) is StorageFull, whichever statement or
                # the commit hit it; the transaction is rolled back first, so nothing of it is stored.
                try:
                    try:
                        done = tx.cm.__exit__(exc_type, exc, tb)
                    except sa.exc.OperationalError as failed:
                        if _disk_full(failed):
                            raise self._storage_full(failed) from failed
                        raise
                    if isinstance(exc, sa.exc.OperationalError) and _disk_full(exc):
                        raise self._storage_full(exc) from exc
                    return done
                finally:
                    tx.conn.close()
                    self._write.__exit__(None, None, None)

        return _Tx()

    def _storage_full(self, exc: BaseException) -> StorageFull:
        now = time.monotonic()
        if now - self._full_logged > 10:  # the operator's line, not one per refused request
            self._full_logged = now
            log.error("the store cannot grow (%s): writes are refused until space is freed", getattr(exc, "orig", exc))
        return StorageFull(_FULL_MESSAGE)

    def _insert_new(self, conn, table: sa.Table, rows: list[dict]) -> None:
        """Inserts rows, skipping those whose key is already there (another replica may have just written
        the same content-addressed row): INSERT ... ON CONFLICT DO NOTHING on both engines."""
        if not rows:
            return
        insert = (sqlite_dialect.insert if self.dialect == "sqlite" else postgresql_dialect.insert)(table)
        conn.execute(insert.on_conflict_do_nothing(), rows)

    def _changed(self, conn, kind: str, ref: str) -> None:
        """(in the writing transaction) Records a change every replica must see; on PostgreSQL, also
        notifies the listening replicas when the transaction commits."""
        if self.dialect == "postgresql":  # the notification carries the row's sequence number and time
            seq, at = conn.execute(changes.insert().values(
                kind=kind, ref=ref, at_ms=sa.literal_column(_DATABASE_NOW_MS_SQL)).returning(
                changes.c.seq, changes.c.at_ms)).one()
            conn.execute(sa.select(sa.func.pg_notify(CHANGES_CHANNEL, f"{seq}:{at}:{kind}:{ref}")))
        else:
            conn.execute(changes.insert().values(kind=kind, ref=ref, at_ms=self._clock(conn)))

    def _connection_defaults(self) -> dict[str, int]:
        """PG_CONNECTION_DEFAULTS less those the store URL sets itself."""
        return {k: v for k, v in PG_CONNECTION_DEFAULTS.items() if k not in self.url.query}

    def notification_dsn(self) -> str | None:
        """The libpq connection string a LISTEN connection uses (PostgreSQL); None where there is none."""
        if self.dialect != "postgresql":
            return None
        url = self.url.set(drivername="postgresql").update_query_dict(
            {k: str(v) for k, v in self._connection_defaults().items()})
        return url.render_as_string(hide_password=False)

    def changes_since(self, since_ms: int) -> list[tuple[int, str, str, int]]:
        """(seq, kind, ref, at_ms) of the changes recorded at or after `since_ms`, oldest first."""
        q = (sa.select(changes.c.seq, changes.c.kind, changes.c.ref, changes.c.at_ms)
             .where(changes.c.at_ms >= since_ms).order_by(changes.c.seq))
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(q)]

    def prune_changes(self, before_ms: int) -> int:
        with self._tx() as conn:
            return conn.execute(changes.delete().where(changes.c.at_ms < before_ms)).rowcount

    def ping(self) -> None:
        """Raises unless the store answers a read of its schema version (the health check)."""
        with self.engine.connect() as conn:
            if conn.execute(sa.select(meta.c.value).where(meta.c.name == "schema_version")).scalar() is None:
                raise RuntimeError("the store has no schema version: not a headserve store")

    # --- tenants and keys ------------------------------------------------------------------------------

    def create_tenant(self, tenant: TenantRecord, key: KeyRecord | None = None) -> None:
        """Stores a tenant (and its first key) in one transaction; a taken id or name is AlreadyExists."""
        tenant.created_at_ms = now_ms()
        with self._tx() as conn:
            try:
                conn.execute(tenants.insert().values(
                    tenant_id=tenant.tenant_id, name=tenant.name, created_at_ms=tenant.created_at_ms,
                    quotas=json.dumps(dataclasses.asdict(tenant.quotas))))
            except sa.exc.IntegrityError:
                raise AlreadyExists(f"tenant {tenant.name[:64]!r} already exists") from None
            if key is not None:
                self._insert_key(conn, key)

    def get_tenant(self, ref: str) -> TenantRecord:
        """A tenant by id or by name."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(tenants).where(
                sa.or_(tenants.c.tenant_id == ref, tenants.c.name == ref))).first()
        if row is None:
            raise NotFound(f"tenant {ref[:64]!r} does not exist")
        return _tenant(row)

    def list_tenants(self, after: str = "", limit: int | None = None) -> list[TenantRecord]:
        """Tenants in name order, those named after `after`, at most `limit` of them."""
        q = sa.select(tenants).where(tenants.c.name > after).order_by(tenants.c.name).limit(limit)
        with self.engine.connect() as conn:
            return [_tenant(r) for r in conn.execute(q)]

    def set_quotas(self, tenant_id: str, quotas: Quotas) -> None:
        with self._tx() as conn:
            done = conn.execute(tenants.update().where(tenants.c.tenant_id == tenant_id).values(
                quotas=json.dumps(dataclasses.asdict(quotas)))).rowcount
            if done:
                self._changed(conn, "tenant", tenant_id)
        if not done:
            raise NotFound(f"tenant {tenant_id[:64]!r} does not exist")

    def delete_tenant(self, tenant_id: str) -> list[str]:
        """Deletes a tenant with its keys, tasks, examples, features, heads and jobs; returns the task keys."""
        if tenant_id == DEFAULT_TENANT:
            raise FailedPrecondition("the default tenant cannot be deleted (it serves auth = 'none')")
        with self._tx() as conn:
            keys = [r[0] for r in conn.execute(sa.select(tasks.c.key).where(tasks.c.tenant_id == tenant_id))]
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                for table in (examples, heads, jobs):
                    conn.execute(table.delete().where(table.c.task_key.in_(chunk)))
            for table in (usage, tasks, features, blobs, api_keys):
                conn.execute(table.delete().where(table.c.tenant_id == tenant_id))
            if not conn.execute(tenants.delete().where(tenants.c.tenant_id == tenant_id)).rowcount:
                raise NotFound(f"tenant {tenant_id[:64]!r} does not exist")
            self._changed(conn, "tenant", tenant_id)
        return keys

    def add_usage(self, counts: dict[str, tuple[int, int, int]]) -> None:
        """Adds Predict traffic per task key: (requests, inputs, last used ms). Tasks deleted meanwhile are
        skipped."""
        if not counts:
            return
        with self._tx() as conn:
            live = set()
            keys = list(counts)
            for start in range(0, len(keys), 500):
                live |= {r[0] for r in conn.execute(sa.select(tasks.c.key).where(
                    tasks.c.key.in_(keys[start : start + 500])))}
            insert = (sqlite_dialect.insert if self.dialect == "sqlite" else postgresql_dialect.insert)(usage)
            greatest = sa.func.max if self.dialect == "sqlite" else sa.func.greatest
            for key in sorted(live):  # (another replica may add to the same row: an upsert, not a check)
                requests, inputs, last = counts[key]
                conn.execute(insert.values(task_key=key, tenant_id=tenant_of(key), requests=requests, inputs=inputs,
                                           last_used_ms=last).on_conflict_do_update(
                    index_elements=[usage.c.task_key],
                    set_={"requests": usage.c.requests + requests, "inputs": usage.c.inputs + inputs,
                          "last_used_ms": greatest(usage.c.last_used_ms, last)}))

    def task_usage(self, tenant_id: str) -> list[tuple[str, int, int, int]]:
        """(task id, requests, inputs, last used ms) of the tenant's tasks that served any, busiest first."""
        q = (sa.select(usage.c.task_key, usage.c.requests, usage.c.inputs, usage.c.last_used_ms)
             .where(usage.c.tenant_id == tenant_id).order_by(usage.c.inputs.desc(), usage.c.task_key))
        with self.engine.connect() as conn:
            return [(task_of(r.task_key), r.requests, r.inputs, r.last_used_ms) for r in conn.execute(q)]

    def usage(self, tenant_id: str) -> Usage:
        with self.engine.connect() as conn:
            return self._usage(conn, tenant_id, Quotas(1, 1, 1, 1))

    @staticmethod
    def _usage(conn, tenant_id: str, quotas: Quotas) -> Usage:
        """What the tenant holds, counted only where `quotas` sets a limit (the rest stay 0)."""
        usage = Usage()
        if quotas.tasks:
            usage.tasks = conn.execute(
                sa.select(sa.func.count()).where(tasks.c.tenant_id == tenant_id)).scalar()
        if quotas.examples:
            usage.examples = conn.execute(
                sa.select(sa.func.count()).where(examples.c.tenant_id == tenant_id)).scalar()
        if quotas.stored_bytes:
            usage.stored_bytes = (
                conn.execute(sa.select(sa.func.coalesce(sa.func.sum(blobs.c.size), 0)).where(
                    blobs.c.tenant_id == tenant_id)).scalar()
                + conn.execute(sa.select(sa.func.coalesce(sa.func.sum(heads.c.size), 0)).select_from(
                    heads.join(tasks, heads.c.task_key == tasks.c.key)).where(
                    tasks.c.tenant_id == tenant_id)).scalar())
        if quotas.training_jobs:
            usage.training_jobs = conn.execute(sa.select(sa.func.count()).select_from(
                jobs.join(tasks, jobs.c.task_key == tasks.c.key)).where(
                tasks.c.tenant_id == tenant_id, jobs.c.state.in_(ACTIVE_JOB_STATES))).scalar()
        return usage

    def _check_quotas(self, conn, tenant_id: str, quotas: Quotas) -> None:
        """(in the writing transaction, after its writes) Raises ResourceExhausted when the tenant is now
        over a quota, which rolls the transaction back."""
        usage = self._usage(conn, tenant_id, quotas)
        for name, unit in (("tasks", "tasks"), ("examples", "examples"), ("stored_bytes", "bytes"),
                           ("training_jobs", "unfinished training jobs")):
            limit, used = getattr(quotas, name), getattr(usage, name)
            if limit and used > limit:
                hint = ("retry when a job has finished" if name == "training_jobs"
                        else "delete tasks or ask an admin to raise it")
                raise ResourceExhausted(f"over the tenant's {name} quota: this would hold {used} {unit}, "
                                        f"the quota is {limit}; {hint}")

    def _lock_tenant(self, conn, tenant_id: str) -> None:
        """Serialises one tenant's quota-checked writes (a row lock where the engine has them; SQLite's
        writes are serialised already) and fails when the tenant is gone."""
        q = sa.select(tenants.c.tenant_id).where(tenants.c.tenant_id == tenant_id)
        if self.dialect != "sqlite":  # FOR NO KEY UPDATE: other writers of the tenant wait, FK checks do not
            q = q.with_for_update(key_share=True)
        if conn.execute(q).first() is None:
            raise NotFound(f"tenant {tenant_id[:64]!r} does not exist")

    def create_key(self, key: KeyRecord) -> None:
        with self._tx() as conn:
            self._lock_tenant(conn, key.tenant_id)
            self._insert_key(conn, key)

    @staticmethod
    def _insert_key(conn, key: KeyRecord) -> None:
        key.created_at_ms = key.created_at_ms or now_ms()
        try:
            conn.execute(api_keys.insert().values(**{**dataclasses.asdict(key), "scopes": json.dumps(key.scopes)}))
        except sa.exc.IntegrityError:
            raise AlreadyExists(f"API key id {key.key_id!r} is taken; make another key") from None

    def get_key(self, key_id: str) -> KeyRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id)).first()
        return None if row is None else _key(row)

    def list_keys(self, tenant_id: str = "", after: tuple[int, str] = (-1, ""),
                  limit: int | None = None) -> list[KeyRecord]:
        """Keys (of `tenant_id`, when given) in the order they were made, (created ms, key id), those after
        `after`, at most `limit` of them."""
        created, key_id = api_keys.c.created_at_ms, api_keys.c.key_id
        q = (sa.select(api_keys).where((created > after[0]) | ((created == after[0]) & (key_id > after[1])))
             .order_by(created, key_id).limit(limit))
        if tenant_id:
            q = q.where(api_keys.c.tenant_id == tenant_id)
        with self.engine.connect() as conn:
            return [_key(r) for r in conn.execute(q)]

    def revoke_key(self, key_id: str, tenant_id: str = "") -> KeyRecord:
        """Revokes a key (of `tenant_id`, when given) from now on; revoking twice keeps the first time."""
        with self._tx() as conn:
            q = sa.select(api_keys).where(api_keys.c.key_id == key_id)
            if tenant_id:
                q = q.where(api_keys.c.tenant_id == tenant_id)
            row = conn.execute(q).first()
            if row is None:
                raise NotFound(f"API key {key_id[:64]!r} does not exist")
            key = _key(row)
            if not key.revoked_at_ms:
                key.revoked_at_ms = now_ms()
                conn.execute(api_keys.update().where(api_keys.c.key_id == key_id).values(
                    revoked_at_ms=key.revoked_at_ms))
                self._changed(conn, "key", key_id)
            return key

    # --- tasks and examples ---------------------------------------------------------------------

    def create_task(self, task: TaskRecord, new_examples: Sequence[ExampleIn], quotas: Quotas = Quotas(),
                    job: JobRecord | None = None, head: HeadRecord | None = None) -> None:
        """Stores a task with its first examples and, when given, its first training job, all or nothing.
        With `head` too, the job is recorded as done with it: the task is READY at version 1 at once (a
        head built without training, such as a zero-shot one), and no worker ever sees the job queued."""
        with self._tx() as conn:
            self._lock_tenant(conn, task.tenant_id)
            ts = now_ms()
            task.created_at_ms = task.updated_at_ms = ts
            try:
                conn.execute(tasks.insert().values(
                    **{**dataclasses.asdict(task), "declared_labels": json.dumps(task.declared_labels),
                       "config": json.dumps(task.config)}
                ))
            except sa.exc.IntegrityError:
                raise AlreadyExists(
                    f"task {task.task_id!r} already exists; pick another id or delete it first") from None
            self._insert_examples(conn, task.key, new_examples)
            if job is not None:
                self._insert_job(conn, job)
                if head is not None:
                    self._end_job(conn, job.job_id, task.key, job.status, head, "", ts)
            self._check_quotas(conn, task.tenant_id, quotas)

    def add_examples(
        self, key: str, new_examples: Sequence[ExampleIn], quotas: Quotas = Quotas(), still_wanted=None
    ) -> tuple[int, int]:
        """Stores examples; returns (added, duplicates). Same content with the same label is stored once.

        `still_wanted()`, when given, is asked last, inside the transaction: false rolls it back
        (Cancelled), so an upload its caller gave up on while it waited to be written is not stored."""
        with self._tx() as conn:
            if not conn.execute(sa.select(tasks.c.key).where(tasks.c.key == key)).first():
                raise NotFound(f"task {task_of(key)!r} does not exist")
            self._lock_tenant(conn, tenant_of(key))
            added = self._insert_examples(conn, key, new_examples)
            conn.execute(tasks.update().where(tasks.c.key == key).values(updated_at_ms=now_ms()))
            self._check_quotas(conn, tenant_of(key), quotas)
            if still_wanted is not None and not still_wanted():
                raise Cancelled("the upload was cancelled before it was stored; nothing was added")
            return added, len(new_examples) - added

    def _insert_examples(self, conn, key: str, new_examples: Sequence[ExampleIn]) -> int:
        if not new_examples:
            return 0
        tenant = tenant_of(key)
        unique = {(ex.sha256, ex.label): ex for ex in new_examples}
        blob_rows = {ex.sha256: {"tenant_id": tenant, "sha256": ex.sha256, "kind": ex.kind, "size": len(ex.data),
                                 "data": ex.data} for ex in unique.values()}
        existing_blobs = {r[0] for r in conn.execute(sa.select(blobs.c.sha256).where(
            blobs.c.tenant_id == tenant, blobs.c.sha256.in_(list(blob_rows))))}
        self._insert_new(conn, blobs, [row for sha, row in blob_rows.items() if sha not in existing_blobs])
        existing = {
            (r.sha256, r.label)
            for r in conn.execute(sa.select(examples.c.sha256, examples.c.label).where(
                examples.c.task_key == key, examples.c.sha256.in_(list(blob_rows))))
        }
        rows = [{"task_key": key, "tenant_id": tenant, "sha256": sha, "label": label}
                for (sha, label) in unique if (sha, label) not in existing]
        self._insert_new(conn, examples, rows)
        return len(rows)

    def get_task(self, key: str) -> TaskRecord:
        with self.engine.connect() as conn:
            row = conn.execute(_TASK, {"key": key}).first()
        if row is None:
            raise NotFound(f"task {task_of(key)!r} does not exist")
        return _task(row)

    def task_view(self, key: str) -> tuple[TaskRecord, dict[str, int], dict]:
        """A task, its examples per label and its live head's evaluation, in one read transaction."""
        with self.engine.connect() as conn:
            row = conn.execute(_TASK_AND_EVALUATION, {"key": key}).first()
            if row is None:
                raise NotFound(f"task {task_of(key)!r} does not exist")
            counts = dict(conn.execute(_LABEL_COUNTS, {"key": key}).all())
        d = row._asdict()
        value = d.pop("live_evaluation")
        return _task(d), counts, dict(_evaluation(value)) if value else {}

    def list_tasks(self, tenant_id: str, after: str, limit: int, backbone: str = "") -> list[TaskRecord]:
        """The tenant's tasks in task id order, after the task id `after`."""
        q = (sa.select(tasks).where(tasks.c.tenant_id == tenant_id, tasks.c.task_id > after)
             .order_by(tasks.c.task_id).limit(limit))
        if backbone:
            q = q.where(tasks.c.backbone == backbone)
        with self.engine.connect() as conn:
            return [_task(r) for r in conn.execute(q)]

    def delete_task(self, key: str) -> None:
        tenant = tenant_of(key)
        with self._tx() as conn:
            shas = [r[0] for r in conn.execute(sa.select(examples.c.sha256).where(examples.c.task_key == key))]
            for table in (examples, heads, jobs, usage):
                conn.execute(table.delete().where(table.c.task_key == key))
            if conn.execute(tasks.delete().where(tasks.c.key == key)).rowcount == 0:
                raise NotFound(f"task {task_of(key)!r} does not exist")
            self._changed(conn, "task", key)
            # Blobs (and their cached features) that no other task of the tenant uses go too.
            for start in range(0, len(shas), 500):
                chunk = shas[start : start + 500]
                used = {r[0] for r in conn.execute(sa.select(examples.c.sha256).where(
                    examples.c.tenant_id == tenant, examples.c.sha256.in_(chunk)))}
                orphans = [s for s in chunk if s not in used]
                if orphans:
                    conn.execute(features.delete().where(features.c.tenant_id == tenant,
                                                         features.c.sha256.in_(orphans)))
                    conn.execute(blobs.delete().where(blobs.c.tenant_id == tenant, blobs.c.sha256.in_(orphans)))

    def label_counts(self, key: str) -> dict[str, int]:
        with self.engine.connect() as conn:
            return dict(conn.execute(_LABEL_COUNTS, {"key": key}).all())

    def example_refs(self, key: str) -> list[tuple[str, str]]:
        """(sha256, label) of every example of the task, in insertion order."""
        q = sa.select(examples.c.sha256, examples.c.label).where(examples.c.task_key == key).order_by(examples.c.id)
        with self.engine.connect() as conn:
            return [(r.sha256, r.label) for r in conn.execute(q)]

    def blobs(self, tenant_id: str, shas: Iterable[str]) -> dict[str, tuple[str, bytes]]:
        shas = list(shas)
        out: dict[str, tuple[str, bytes]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(shas), 500):
                q = sa.select(blobs).where(blobs.c.tenant_id == tenant_id, blobs.c.sha256.in_(shas[start : start + 500]))
                out.update({r.sha256: (r.kind, r.data) for r in conn.execute(q)})
        return out

    def import_heads(self, tenant_id: str, items: Iterable[tuple[str, str, Sequence[str], bytes, dict]],
                     config: dict | None = None, quotas: Quotas = Quotas(), batch_size: int = 2000) -> int:
        """Registers READY tasks whose version 1 is a head trained elsewhere: for operators importing tasks
        (and benchmarks that need 100,000 of them). `items` yields (task_id, backbone, labels, ONNX bytes,
        evaluation); `config` is the TrainingOptions fields every task keeps for its next training.

        Each task gets what CreateTask and a finished job leave: its row (declared labels = the head's),
        a SUCCEEDED job that published version 1, and the head with its SHA-256. No change is recorded:
        no replica has anything cached for a task that did not exist. `batch_size` tasks are written per
        transaction, each all or nothing and checked against `quotas`: a task id the tenant already has
        fails its batch (AlreadyExists) and leaves the batches before it imported. Returns the count."""
        config_json = json.dumps(config or {})

        def write(batch: list[tuple[str, str, Sequence[str], bytes, dict]]) -> int:
            for task_id, _, _, onnx, _ in batch:
                if not task_id or "/" in task_id or not onnx:
                    raise InvalidInput(f"task {task_id[:128]!r}: an imported task needs an id without '/' and "
                                       "the head's ONNX bytes")
            ts = now_ms()
            rows = [(task_key(tenant_id, t), f"job-{uuid.uuid4().hex[:12]}", t, b, list(labels), onnx, ev)
                    for t, b, labels, onnx, ev in batch]
            with self._tx() as conn:
                self._lock_tenant(conn, tenant_id)
                try:
                    with conn.begin_nested():  # (a savepoint: PostgreSQL's transaction survives the failure)
                        conn.execute(tasks.insert(), [
                            {"key": key, "tenant_id": tenant_id, "task_id": t, "backbone": b,
                             "declared_labels": json.dumps(labels), "config": config_json, "state": "READY",
                             "live_version": 1, "error": "", "job_id": job_id, "created_at_ms": ts,
                             "updated_at_ms": ts} for key, job_id, t, b, labels, _, _ in rows])
                except sa.exc.IntegrityError:
                    ids = [r[2] for r in rows]
                    taken = sorted({t for t in ids if ids.count(t) > 1} | set(conn.execute(
                        sa.select(tasks.c.task_id).where(tasks.c.tenant_id == tenant_id,
                                                         tasks.c.task_id.in_(ids))).scalars()))
                    raise AlreadyExists(f"task(s) {', '.join(map(repr, taken[:5]))} already exist (or come twice); "
                                        "nothing of this batch was imported") from None
                conn.execute(jobs.insert(), [
                    {"job_id": job_id, "task_key": key, "tenant_id": tenant_id, "state": "SUCCEEDED",
                     "config": config_json,
                     "status": json.dumps({"phase": "done", "progress": 1.0, "message": "imported"}),
                     "error": "", "version": 1, "created_at_ms": ts, "updated_at_ms": ts}
                    for key, job_id, *_ in rows])
                conn.execute(heads.insert(), [
                    {"task_key": key, "version": 1, "onnx": onnx, "size": len(onnx), "labels": json.dumps(labels),
                     "evaluation": json.dumps(ev), "created_at_ms": ts,
                     "onnx_sha256": hashlib.sha256(onnx).hexdigest(), "job_id": job_id}
                    for key, job_id, _, _, labels, onnx, ev in rows])
                self._check_quotas(conn, tenant_id, quotas)
            return len(rows)

        imported, batch = 0, []
        for item in items:
            batch.append(item)
            if len(batch) >= batch_size:
                imported += write(batch)
                batch = []
        return imported + (write(batch) if batch else 0)

    # --- feature cache (per tenant, like the blobs it caches) -----------------------------------------

    def cached_features(self, tenant_id: str, trunk: str, shas: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(shas), 500):
                q = sa.select(features.c.sha256, features.c.vector).where(
                    features.c.tenant_id == tenant_id, features.c.trunk == trunk,
                    features.c.sha256.in_(list(shas[start : start + 500])))
                # (a row cut to a length that is not whole float32s reads as the whole ones: callers that
                # know the trunk's dimension see it is short)
                out.update({sha: np.frombuffer(vec, dtype=np.float32, count=len(vec) // 4)
                            for sha, vec in conn.execute(q)})
        return out

    def drop_features(self, tenant_id: str, trunk: str, shas: Sequence[str]) -> None:
        """Deletes cached feature rows (found damaged), so that they are computed and stored afresh."""
        with self._tx() as conn:
            for start in range(0, len(shas), 500):
                conn.execute(features.delete().where(
                    features.c.tenant_id == tenant_id, features.c.trunk == trunk,
                    features.c.sha256.in_(list(shas[start : start + 500]))))

    def put_features(self, tenant_id: str, trunk: str, vectors: dict[str, np.ndarray]) -> None:
        if not vectors:
            return
        rows = [{"tenant_id": tenant_id, "trunk": trunk, "sha256": sha, "vector": np.asarray(v, np.float32).tobytes()}
                for sha, v in vectors.items()]
        with self._tx() as conn:
            self._insert_new(conn, features, rows)

    # --- jobs and heads -----------------------------------------------------------------------------

    def start_job(self, job: JobRecord, quotas: Quotas = Quotas()) -> None:
        """Queues a job and marks its task TRAINING, unless the task has an unfinished job."""
        with self._tx() as conn:
            task = conn.execute(sa.select(tasks).where(tasks.c.key == job.task_key)).first()
            if task is None:
                raise NotFound(f"task {job.task_id!r} does not exist")
            self._lock_tenant(conn, task.tenant_id)
            self._insert_job(conn, job)
            self._check_quotas(conn, task.tenant_id, quotas)

    def _insert_job(self, conn, job: JobRecord) -> None:
        job.created_at_ms = job.updated_at_ms = now_ms()
        row = {**dataclasses.asdict(job), "config": json.dumps(job.config), "status": json.dumps(job.status),
               "tenant_id": job.tenant_id}
        try:
            with conn.begin_nested():  # (a savepoint: PostgreSQL's transaction survives the failed insert)
                conn.execute(jobs.insert().values(**row))
        except sa.exc.IntegrityError:  # uq_jobs_one_active: the database keeps one unfinished job per task
            active = conn.execute(sa.select(jobs.c.job_id).where(
                jobs.c.task_key == job.task_key, jobs.c.state.in_(ACTIVE_JOB_STATES))).scalar()
            raise FailedPrecondition(f"task {job.task_id!r} is already training (job {active}); "
                                     "watch that job and train again after it") from None
        conn.execute(tasks.update().where(tasks.c.key == job.task_key).values(
            state="TRAINING", job_id=job.job_id, error="", updated_at_ms=job.created_at_ms))

    def get_job(self, job_id: str) -> JobRecord:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.job_id == job_id)).first()
        if row is None:
            raise NotFound(f"job {job_id[:64]!r} does not exist")
        return _job(row)

    def unfinished_jobs(self) -> list[JobRecord]:
        with self.engine.connect() as conn:
            q = sa.select(jobs).where(jobs.c.state.in_(ACTIVE_JOB_STATES)).order_by(jobs.c.created_at_ms)
            return [_job(r) for r in conn.execute(q)]

    # --- the queue: claims, leases, heartbeats ------------------------------------------------------------

    def _clock(self, conn) -> int:
        """Now in ms for what replicas compare (leases, the change feed's times): the database's clock on
        PostgreSQL, where replicas' clocks may disagree (one running ahead would take over live leases, one
        behind would grant leases already run out, and either would move the feed's times out of the poll's
        window); this machine's on SQLite, which one machine serves."""
        if self.dialect == "postgresql":
            return int(conn.execute(_DATABASE_NOW_MS).scalar_one())
        return now_ms()

    def clock_ms(self) -> int:
        """Now in ms on the store's clock (see _clock)."""
        if self.dialect != "postgresql":
            return now_ms()
        with self.engine.connect() as conn:
            return self._clock(conn)

    def claim_job(self, owner: str, lease_ms: int, max_attempts: int = 0) -> JobRecord | None:
        """Claims a job that is queued, or running under a lease that ran out (its worker stopped
        heartbeating), for `owner` until now + `lease_ms`. None when there is none. The job is the oldest of
        the tenant whose last claim is the oldest (a tenant never served first): tenants take turns, so one
        that queued hundreds of jobs does not hold another's one behind them all.

        On PostgreSQL, FOR UPDATE SKIP LOCKED lets replicas claim at once without waiting on each other;
        on SQLite the write transaction is exclusive. A job claimed `max_attempts` times already (its
        workers keep dying on it) ends FAILED instead of being claimed again."""
        while True:
            with self._tx() as conn:
                ts = self._clock(conn)
                q = (sa.select(jobs).where(sa.or_(
                        jobs.c.state == "QUEUED",
                        sa.and_(jobs.c.state == "RUNNING", jobs.c.lease_until_ms < ts)))
                     .order_by(_TENANT_LAST_CLAIM, jobs.c.created_at_ms, jobs.c.job_id).limit(1))
                if self.dialect != "sqlite":
                    q = q.with_for_update(skip_locked=True)
                row = conn.execute(q).first()
                if row is None:
                    return None
                job = _job(row)
                if max_attempts and job.attempts >= max_attempts:
                    error = (f"training stopped {job.attempts} times without finishing (its worker died or was "
                             f"stopped each time); see the workers' logs for job {job.job_id}")
                    status = {**job.status, "phase": "failed", "message": error}
                    self._end_job(conn, job.job_id, job.task_key, status, None, error, ts)
                    log.error("job %s failed: %s", job.job_id, error)
                    continue
                if job.state == "RUNNING":
                    log.warning("job %s: the lease of %s ran out %.1fs ago; %s takes the job over",
                                job.job_id, job.owner or "?", (ts - job.lease_until_ms) / 1000, owner)
                job.state, job.owner, job.lease_until_ms, job.attempts = "RUNNING", owner, ts + lease_ms, job.attempts + 1
                job.claimed_at_ms = ts
                conn.execute(jobs.update().where(jobs.c.job_id == job.job_id).values(
                    state="RUNNING", owner=owner, lease_until_ms=job.lease_until_ms, attempts=job.attempts,
                    claimed_at_ms=ts, updated_at_ms=ts))
                return job

    def renew_lease(self, job_id: str, owner: str, lease_ms: int) -> bool:
        """Extends `owner`'s lease on the job; false when it no longer holds it (LeaseLost for the worker)."""
        with self._tx() as conn:
            ts = self._clock(conn)
            return conn.execute(jobs.update().where(
                jobs.c.job_id == job_id, jobs.c.owner == owner, jobs.c.state == "RUNNING").values(
                lease_until_ms=ts + lease_ms)).rowcount == 1

    def release_job(self, job_id: str, owner: str) -> bool:
        """Puts a job its owner stops working on (the worker is shutting down) back in the queue at once,
        for another worker; false when `owner` did not hold it."""
        with self._tx() as conn:
            return conn.execute(jobs.update().where(
                jobs.c.job_id == job_id, jobs.c.owner == owner, jobs.c.state == "RUNNING").values(
                state="QUEUED", owner="", lease_until_ms=0, updated_at_ms=now_ms())).rowcount == 1

    def requeue_running(self) -> int:
        """Puts every running job back in the queue: for a store only this process (and its workers) use,
        at start-up, where a job still RUNNING was left by a run of the server that stopped."""
        with self._tx() as conn:
            return conn.execute(jobs.update().where(jobs.c.state == "RUNNING").values(
                state="QUEUED", owner="", lease_until_ms=0, updated_at_ms=now_ms())).rowcount

    def update_job(self, job_id: str, state: str, status: dict, owner: str | None = None) -> None:
        """Records a job's progress (by its owner, when given: LeaseLost if it no longer holds the job)."""
        with self._tx() as conn:
            q = jobs.update().where(jobs.c.job_id == job_id)
            if owner is not None:
                q = q.where(jobs.c.owner == owner, jobs.c.state == "RUNNING")
            if not conn.execute(q.values(state=state, status=json.dumps(status), updated_at_ms=now_ms())).rowcount \
                    and owner is not None:
                raise LeaseLost(f"job {job_id} is no longer held by {owner}")

    def finish_job(self, job_id: str, status: dict, head: HeadRecord | None = None, error: str = "",
                   owner: str | None = None) -> int:
        """Ends a job. With a head: stores it as the next version and makes it live, atomically.

        With `owner`, only while that worker still holds the job (LeaseLost otherwise: a worker whose lease
        ran out publishes nothing, and a job publishes at most one version). Returns the new version (0 on
        failure). A task deleted meanwhile raises NotFound.
        """
        with self._tx() as conn:
            job = self._held_job(conn, job_id, owner)
            interim = int(json.loads(job.status or "{}").get("interim_version") or 0)
            return self._end_job(conn, job_id, job.task_key, status, head, error, now_ms(), interim)

    def _held_job(self, conn, job_id: str, owner: str | None):
        """The job's row, locked for the transaction: NotFound when its task was deleted; with `owner`,
        LeaseLost unless that worker still holds it."""
        q = sa.select(jobs).where(jobs.c.job_id == job_id)
        if self.dialect != "sqlite":
            q = q.with_for_update()
        job = conn.execute(q).first()
        task = job and conn.execute(sa.select(tasks.c.key).where(tasks.c.key == job.task_key)).first()
        if not task:
            raise NotFound(f"task of job {job_id!r} was deleted")
        if owner is not None and (job.owner != owner or job.state != "RUNNING"):
            raise LeaseLost(f"job {job_id} is no longer held by {owner} (now {job.state}"
                            + (f", held by {job.owner}" if job.owner else "") + ")")
        return job

    def publish_interim(self, job_id: str, head: HeadRecord, owner: str, status: dict | None = None) -> int:
        """Makes `head` the task's live version while its job goes on training (AUTO serves its feature head
        while it fine-tunes). Only while `owner` holds the job (LeaseLost otherwise); the task stays
        TRAINING, and the job records the version (`version`, and `interim_version` in its status, which
        becomes `status` when given). A job publishes at most one interim version: a later run of the same
        job gets the one stored. Returns the version."""
        with self._tx() as conn:
            job = self._held_job(conn, job_id, owner)
            stored = json.loads(job.status)
            if stored.get("interim_version"):
                return int(stored["interim_version"])
            ts = now_ms()
            version = self._insert_head(conn, None, job.task_key, head, ts)
            conn.execute(tasks.update().where(tasks.c.key == job.task_key).values(
                live_version=version, updated_at_ms=ts))
            self._changed(conn, "task", job.task_key)
            status = {**(stored if status is None else status), "interim_version": version}
            conn.execute(jobs.update().where(jobs.c.job_id == job_id).values(
                version=version, status=json.dumps(status), updated_at_ms=ts))
            return version

    def _insert_head(self, conn, job_id: str | None, key: str, head: HeadRecord, ts: int, interim: int = 0) -> int:
        """Stores `head` as the task's next version; or, when it is the job's `interim` version itself (the
        feature head AUTO kept), gives that version the job and the final evaluation. An interim version
        has no job of its own (heads.job_id is unique: a job publishes one final version)."""
        digest = hashlib.sha256(head.onnx).hexdigest()
        if interim:
            same = conn.execute(sa.select(heads.c.onnx_sha256).where(
                heads.c.task_key == key, heads.c.version == interim)).scalar()
            if same == digest:
                conn.execute(heads.update().where(heads.c.task_key == key, heads.c.version == interim)
                             .values(evaluation=json.dumps(head.evaluation), job_id=job_id))
                return interim
        latest = conn.execute(sa.select(sa.func.max(heads.c.version)).where(heads.c.task_key == key)).scalar()
        version = (latest or 0) + 1
        conn.execute(heads.insert().values(
            task_key=key, version=version, onnx=head.onnx, size=len(head.onnx),
            labels=json.dumps(head.labels), evaluation=json.dumps(head.evaluation), created_at_ms=ts,
            onnx_sha256=digest, job_id=job_id))
        if self.versions_kept:  # the new version is live: older ones past the last `versions_kept` go
            conn.execute(heads.delete().where(heads.c.task_key == key,
                                              heads.c.version <= version - self.versions_kept))
        return version

    def _end_job(self, conn, job_id: str, key: str, status: dict, head: HeadRecord | None, error: str,
                 ts: int, interim: int = 0) -> int:
        version = 0
        if head is not None:
            version = self._insert_head(conn, job_id, key, head, ts, interim)
            conn.execute(tasks.update().where(tasks.c.key == key).values(
                state="READY", live_version=version, error="", updated_at_ms=ts))
            self._changed(conn, "task", key)
        else:
            conn.execute(tasks.update().where(tasks.c.key == key).values(
                state="FAILED", error=error, updated_at_ms=ts))
        ended = dict(state="SUCCEEDED" if head is not None else "FAILED", status=json.dumps(status), error=error,
                     owner="", lease_until_ms=0, updated_at_ms=ts)
        if head is not None:  # a failed job keeps the interim version it published, if any
            ended["version"] = version
        conn.execute(jobs.update().where(jobs.c.job_id == job_id).values(**ended))
        return version

    def get_head(self, key: str, version: int) -> HeadRecord:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(heads).where(heads.c.task_key == key, heads.c.version == version)).first()
        if row is None:
            n = self.versions_kept
            kept = f" (the store keeps each task's last {n} version{'s' if n != 1 else ''})" if n else ""
            raise NotFound(f"task {task_of(key)!r} has no head version {version}{kept}")
        d = dict(row._mapping)
        size = d.pop("size")
        digest = hashlib.sha256(d["onnx"]).hexdigest()
        if len(d["onnx"]) != size or d["onnx_sha256"] not in ("", digest):
            if (key, version) not in self._reported:
                self._reported.add((key, version))
                log.error("the stored head of task %s version %d is corrupted: %d bytes (%d written), SHA-256 %s",
                          key, version, len(d["onnx"]), size,
                          "not recorded (stored before digests)" if not d["onnx_sha256"]
                          else "as written" if d["onnx_sha256"] == digest else "not the one written")
            raise CorruptHead(f"the stored head of task {task_of(key)!r} version {version} is corrupted (its bytes "
                              "no longer match what training wrote); train the task again to replace it")
        return HeadRecord(**{**d, "labels": json.loads(d["labels"]), "evaluation": json.loads(d["evaluation"])})

    def head_evaluation(self, key: str, version: int) -> dict:
        with self.engine.connect() as conn:
            value = conn.execute(_EVALUATION, {"key": key, "version": version}).scalar()
        return dict(_evaluation(value)) if value else {}

    # --- backup ---------------------------------------------------------------------------------------

    def backup(self, dest: str | os.PathLike) -> BackupInfo:
        """A consistent snapshot of the store, taken while it serves, written to `dest` atomically and
        verified (backup_database). SQLite only: for PostgreSQL, back up with pg_dump (e.g.
        `pg_dump --format=custom`) and restore with pg_restore. The trunk ONNX cache (data_dir/trunks) is
        not part of the store: it is rebuilt from the backbones' weights at start-up."""
        if self.engine.dialect.name != "sqlite":
            raise FailedPrecondition(f"headserve backup supports SQLite stores; back up this "
                                     f"{self.engine.dialect.name} database with pg_dump")
        return backup_database(pathlib.Path(self.engine.url.database), dest)


# --- backup and restore (SQLite) --------------------------------------------------------------------------

LOCK_FILE = "headserve.lock"  # in the data directory: flock'ed by a serving server


@dataclasses.dataclass
class BackupInfo:
    """A verified store file: what it holds and, for a backup, how long it took."""

    path: str
    bytes: int
    schema_version: int
    tenants: int
    tasks: int
    heads: int
    examples: int
    seconds: float = 0.0
    previous: str = ""  # restore: where the store it replaced was moved ('' when there was none)


def backup_database(source: pathlib.Path, dest: str | os.PathLike) -> BackupInfo:
    """Copies the SQLite store `source` to `dest` (a file, or a directory to put a timestamped file in)
    while servers keep reading and writing it.

    sqlite3's backup API copies in one step (`pages=-1`), inside one read transaction: the copy is the
    store as of one commit, and in WAL mode writers are not blocked meanwhile. (Copying a few pages per
    step would restart whenever another connection writes, and might never finish under load.) The copy
    is made as a temporary file beside `dest`, switched to a self-contained rollback journal (no -wal
    beside it), fsynced, checked (PRAGMA integrity_check, schema version; verify_store_file), then renamed
    onto `dest`: a failed or interrupted backup leaves `dest` as it was. The trunk ONNX cache
    (data_dir/trunks) is not included: it is rebuildable."""
    source = pathlib.Path(source)
    dest = pathlib.Path(dest)
    if dest.is_dir():
        dest = dest / f"headserve-{time.strftime('%Y%m%dT%H%M%S')}.sqlite3"
    if not source.is_file():
        raise NotFound(f"there is no headserve store at {source} (is the data directory right?)")
    if dest.exists() and dest.resolve() == source.resolve():
        raise InvalidInput(f"{dest} is the store itself; back it up to another file")
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    start = time.perf_counter()
    try:
        src = sqlite3.connect(source, timeout=30)
        try:
            src.execute("PRAGMA query_only=1")
            out = sqlite3.connect(tmp)
            try:
                src.backup(out)  # pages=-1: one step, one read transaction
                out.execute("PRAGMA journal_mode=DELETE")
            finally:
                out.close()
        finally:
            src.close()
        _fsync(tmp)
        info = verify_store_file(tmp)
        os.replace(tmp, dest)
        _fsync(dest.parent)
    except sqlite3.Error as exc:
        raise FailedPrecondition(f"could not back up {source}: {exc}") from exc
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            leftover.unlink(missing_ok=True)
    return dataclasses.replace(info, path=str(dest), seconds=time.perf_counter() - start)


def verify_store_file(path: pathlib.Path) -> BackupInfo:
    """Checks that `path` is a whole headserve SQLite store that this headserve can open: SQLite's
    integrity check passes and its schema version is known. Raises InvalidInput saying what is wrong."""
    path = pathlib.Path(path)
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise InvalidInput(f"{path} cannot be opened as SQLite ({exc})") from None
    try:
        problems = [r[0] for r in conn.execute("PRAGMA integrity_check(5)")]
        if problems != ["ok"]:
            raise InvalidInput(f"{path} is damaged: SQLite's integrity check says {'; '.join(problems)[:300]}")
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"meta", "tasks", "heads"} <= names:
            raise InvalidInput(f"{path} is an SQLite database but not a headserve store (no meta, tasks, heads)")
        found = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        version = int(found[0]) if found and str(found[0]).isdigit() else 0
        if not 1 <= version <= SCHEMA_VERSION:
            raise InvalidInput(f"{path} has store schema {found[0] if found else 'none'}; this headserve reads "
                               f"schemas 1 to {SCHEMA_VERSION} (use the headserve that wrote it)")
        count = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] if t in names else 0
                 for t in ("tenants", "tasks", "heads", "examples")}
    except sqlite3.DatabaseError as exc:  # not a database, or damaged past reading
        raise InvalidInput(f"{path} is not a readable headserve store ({exc})") from None
    finally:
        conn.close()
    return BackupInfo(str(path), path.stat().st_size, version, **count)


def restore_database(source: str | os.PathLike, data_dir: str | os.PathLike) -> BackupInfo:
    """Makes the backup `source` the store of `data_dir`. No server may be using `data_dir`.

    In order, with nothing changed before the last two steps: takes the data directory's lock (the one a
    serving server holds, so no server starts meanwhile; held by one, the restore is refused); copies
    `source` beside the store and verifies the copy (verify_store_file); checks with SQLite that no
    other process has the store open (a server, or a local admin command); moves the current store and
    its -wal/-shm aside to `headserve.sqlite3.pre-restore-TIME` (kept: delete it when satisfied; a
    stale -wal must never meet another database file); renames the copy into place. The trunk cache
    (data_dir/trunks) stays: it does not depend on the store. Jobs that were unfinished in the backup
    run again when a server starts on the restored store."""
    source, data_dir = pathlib.Path(source), pathlib.Path(data_dir)
    if not source.is_file():
        raise NotFound(f"{source} is not a file")
    wal = source.with_name(source.name + "-wal")
    if wal.exists() and wal.stat().st_size:
        raise InvalidInput(f"{source} has a write-ahead log beside it ({wal.name}): it is a live database, not a "
                           "backup; make a backup of it with `headserve backup`")
    data_dir.mkdir(parents=True, exist_ok=True)
    db = data_dir / STORE_FILE
    if db.exists() and db.resolve() == source.resolve():
        raise InvalidInput(f"{source} is the store of {data_dir} itself")
    with _data_dir_lock(data_dir):
        tmp = data_dir / f".restore-{os.getpid()}-{uuid.uuid4().hex[:8]}.sqlite3"
        try:
            shutil.copyfile(source, tmp)
            _fsync(tmp)
            info = verify_store_file(tmp)
            _refuse_if_open(db)
            previous = data_dir / f"{STORE_FILE}.pre-restore-{time.strftime('%Y%m%dT%H%M%S')}"
            moved = False
            for suffix in ("-wal", "-shm", ""):  # the log first: a database never meets another's -wal
                old = data_dir / (STORE_FILE + suffix)
                if old.exists():
                    os.replace(old, previous.with_name(previous.name + suffix))
                    moved = True
            os.replace(tmp, db)
            _fsync(data_dir)
        finally:
            tmp.unlink(missing_ok=True)
    return dataclasses.replace(info, path=str(db), previous=str(previous) if moved else "")


@contextlib.contextmanager
def _data_dir_lock(data_dir: pathlib.Path):
    """Holds DATA_DIR/headserve.lock (flock, exclusive), as a serving server does; refuses when held."""
    import fcntl
    import socket

    with open(data_dir / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            raise FailedPrecondition(f"data directory {data_dir} is in use ({owner}); stop its server "
                                     "first, then restore") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} (headserve restore)\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _refuse_if_open(db: pathlib.Path) -> None:
    """Raises FailedPrecondition when another connection has the store open. Leaving WAL mode needs every
    other connection closed, so SQLite answers SQLITE_BUSY if there is one (and otherwise checkpoints the
    log into the file, which makes the store about to be moved aside self-contained). A store too damaged
    to open cannot be asked: the data directory's lock is then the only check."""
    if not db.exists():
        return
    try:
        conn = sqlite3.connect(db, timeout=1)
    except sqlite3.Error:
        return
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF in (5, 6):  # SQLITE_BUSY, SQLITE_LOCKED
            raise FailedPrecondition(f"the store {db} is in use by another process (a server, or a "
                                     "headserve command on it); stop it first, then restore") from None
    except sqlite3.DatabaseError:
        pass  # damaged: nothing to ask
    finally:
        conn.close()


def _fsync(path: pathlib.Path) -> None:
    """Flushes a file, or a directory's entries (after a rename), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sqlite_connect(dbapi_conn, _record) -> None:
    # The driver's own transaction handling is off: SQLAlchemy's "begin" event (_sqlite_begin) emits BEGIN.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin(conn) -> None:
    """Writes begin IMMEDIATE (the write lock first, so no other process's write can come between this
    transaction's reads and its writes); reads begin DEFERRED (a snapshot, WAL readers never wait)."""
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("headserve_write") else "BEGIN")
