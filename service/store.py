"""The task store: tasks, labels, content-addressed examples, cached features, head versions, jobs.

The embedded default is SQLite in WAL mode with synchronous=FULL, so whatever a call acknowledged
survives a kill -9. Access goes through SQLAlchemy Core so another engine (PostgreSQL) can follow.
Every write is one transaction: a failed request leaves the store as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import threading
import time
from collections.abc import Iterable, Sequence

import numpy as np
import sqlalchemy as sa
from sqlalchemy import event

from adapters.errors import AlreadyExists, NotFound

metadata = sa.MetaData()

tasks = sa.Table(
    "tasks", metadata,
    sa.Column("task_id", sa.String(128), primary_key=True),
    sa.Column("backbone", sa.String(128), nullable=False),
    sa.Column("declared_labels", sa.Text, nullable=False),  # JSON list
    sa.Column("config", sa.Text, nullable=False),  # JSON of TrainingOptions fields
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("live_version", sa.Integer, nullable=False, default=0),
    sa.Column("error", sa.Text, nullable=False, default=""),
    sa.Column("job_id", sa.String(64), nullable=False, default=""),
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    sa.Column("updated_at_ms", sa.BigInteger, nullable=False),
)
blobs = sa.Table(
    "blobs", metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(8), nullable=False),  # text | image
    sa.Column("data", sa.LargeBinary, nullable=False),
)
examples = sa.Table(
    "examples", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.String(128), sa.ForeignKey("tasks.task_id", ondelete="CASCADE"), nullable=False),
    sa.Column("sha256", sa.String(64), sa.ForeignKey("blobs.sha256"), nullable=False),
    sa.Column("label", sa.Text, nullable=False),
    sa.UniqueConstraint("task_id", "sha256", "label"),
)
features = sa.Table(
    "features", metadata,
    sa.Column("trunk", sa.String(160), primary_key=True),  # backbone name + weights digest + tap
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("vector", sa.LargeBinary, nullable=False),  # float32
)
heads = sa.Table(
    "heads", metadata,
    sa.Column("task_id", sa.String(128), sa.ForeignKey("tasks.task_id", ondelete="CASCADE"), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("onnx", sa.LargeBinary, nullable=False),
    sa.Column("labels", sa.Text, nullable=False),  # JSON list, the head's output order
    sa.Column("evaluation", sa.Text, nullable=False),  # JSON
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
)
jobs = sa.Table(
    "jobs", metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("task_id", sa.String(128), sa.ForeignKey("tasks.task_id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False, default="{}"),  # JSON: phase, progress, epoch, loss...
    sa.Column("error", sa.Text, nullable=False, default=""),
    sa.Column("version", sa.Integer, nullable=False, default=0),
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    sa.Column("updated_at_ms", sa.BigInteger, nullable=False),
)


def now_ms() -> int:
    return int(time.time() * 1000)


def content_sha(kind: str, data: bytes) -> str:
    return hashlib.sha256(kind.encode() + b"\0" + data).hexdigest()


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


@dataclasses.dataclass
class JobRecord:
    job_id: str
    task_id: str
    state: str
    config: dict
    status: dict
    error: str = ""
    version: int = 0
    created_at_ms: int = 0
    updated_at_ms: int = 0

    @property
    def finished(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED")


@dataclasses.dataclass
class HeadRecord:
    task_id: str
    version: int
    onnx: bytes
    labels: list[str]
    evaluation: dict
    created_at_ms: int = 0


def _task(row) -> TaskRecord:
    d = dict(row._mapping)
    d["declared_labels"] = json.loads(d["declared_labels"])
    d["config"] = json.loads(d["config"])
    return TaskRecord(**d)


def _job(row) -> JobRecord:
    d = dict(row._mapping)
    d["config"] = json.loads(d["config"])
    d["status"] = json.loads(d["status"])
    return JobRecord(**d)


class Store:
    """SQLite-backed store. Thread-safe: writes are serialised, reads run concurrently (WAL)."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        self._write = threading.Lock()

    @classmethod
    def open(cls, data_dir: pathlib.Path) -> Store:
        data_dir.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{data_dir / 'headserve.sqlite3'}")

    def close(self) -> None:
        self.engine.dispose()

    def _tx(self):
        class _Tx:
            def __enter__(tx):
                self._write.acquire()
                try:
                    tx.cm = self.engine.begin()
                    return tx.cm.__enter__()
                except BaseException:
                    self._write.release()
                    raise

            def __exit__(tx, *exc):
                try:
                    return tx.cm.__exit__(*exc)
                finally:
                    self._write.release()

        return _Tx()

    # --- tasks and examples ---------------------------------------------------------------------

    def create_task(self, task: TaskRecord, new_examples: Sequence[ExampleIn]) -> None:
        with self._tx() as conn:
            if conn.execute(sa.select(tasks.c.task_id).where(tasks.c.task_id == task.task_id)).first():
                raise AlreadyExists(f"task {task.task_id!r} already exists; pick another id or delete it first")
            ts = now_ms()
            task.created_at_ms = task.updated_at_ms = ts
            conn.execute(tasks.insert().values(
                **{**dataclasses.asdict(task), "declared_labels": json.dumps(task.declared_labels),
                   "config": json.dumps(task.config)}
            ))
            self._insert_examples(conn, task.task_id, new_examples)

    def add_examples(self, task_id: str, new_examples: Sequence[ExampleIn]) -> tuple[int, int]:
        """Stores examples; returns (added, duplicates). Same content with the same label is stored once."""
        with self._tx() as conn:
            if not conn.execute(sa.select(tasks.c.task_id).where(tasks.c.task_id == task_id)).first():
                raise NotFound(f"task {task_id!r} does not exist")
            added = self._insert_examples(conn, task_id, new_examples)
            conn.execute(tasks.update().where(tasks.c.task_id == task_id).values(updated_at_ms=now_ms()))
            return added, len(new_examples) - added

    @staticmethod
    def _insert_examples(conn, task_id: str, new_examples: Sequence[ExampleIn]) -> int:
        if not new_examples:
            return 0
        unique = {(ex.sha256, ex.label): ex for ex in new_examples}
        blob_rows = {ex.sha256: {"sha256": ex.sha256, "kind": ex.kind, "data": ex.data} for ex in unique.values()}
        existing_blobs = {r[0] for r in conn.execute(sa.select(blobs.c.sha256).where(blobs.c.sha256.in_(list(blob_rows))))}
        new_blobs = [row for sha, row in blob_rows.items() if sha not in existing_blobs]
        if new_blobs:
            conn.execute(blobs.insert(), new_blobs)
        existing = {
            (r.sha256, r.label)
            for r in conn.execute(sa.select(examples.c.sha256, examples.c.label).where(
                examples.c.task_id == task_id, examples.c.sha256.in_(list(blob_rows))))
        }
        rows = [{"task_id": task_id, "sha256": sha, "label": label} for (sha, label) in unique if (sha, label) not in existing]
        if rows:
            conn.execute(examples.insert(), rows)
        return len(rows)

    def get_task(self, task_id: str) -> TaskRecord:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(tasks).where(tasks.c.task_id == task_id)).first()
        if row is None:
            raise NotFound(f"task {task_id!r} does not exist")
        return _task(row)

    def list_tasks(self, after: str, limit: int, backbone: str = "") -> list[TaskRecord]:
        q = sa.select(tasks).where(tasks.c.task_id > after).order_by(tasks.c.task_id).limit(limit)
        if backbone:
            q = q.where(tasks.c.backbone == backbone)
        with self.engine.connect() as conn:
            return [_task(r) for r in conn.execute(q)]

    def delete_task(self, task_id: str) -> None:
        with self._tx() as conn:
            shas = [r[0] for r in conn.execute(sa.select(examples.c.sha256).where(examples.c.task_id == task_id))]
            for table in (examples, heads, jobs):
                conn.execute(table.delete().where(table.c.task_id == task_id))
            if conn.execute(tasks.delete().where(tasks.c.task_id == task_id)).rowcount == 0:
                raise NotFound(f"task {task_id!r} does not exist")
            # Blobs (and their cached features) that no other task uses go too.
            for start in range(0, len(shas), 500):
                chunk = shas[start : start + 500]
                used = {r[0] for r in conn.execute(sa.select(examples.c.sha256).where(examples.c.sha256.in_(chunk)))}
                orphans = [s for s in chunk if s not in used]
                if orphans:
                    conn.execute(features.delete().where(features.c.sha256.in_(orphans)))
                    conn.execute(blobs.delete().where(blobs.c.sha256.in_(orphans)))

    def label_counts(self, task_id: str) -> dict[str, int]:
        q = sa.select(examples.c.label, sa.func.count()).where(examples.c.task_id == task_id).group_by(examples.c.label)
        with self.engine.connect() as conn:
            return {label: n for label, n in conn.execute(q)}

    def example_refs(self, task_id: str) -> list[tuple[str, str]]:
        """(sha256, label) of every example of the task, in insertion order."""
        q = sa.select(examples.c.sha256, examples.c.label).where(examples.c.task_id == task_id).order_by(examples.c.id)
        with self.engine.connect() as conn:
            return [(r.sha256, r.label) for r in conn.execute(q)]

    def blobs(self, shas: Iterable[str]) -> dict[str, tuple[str, bytes]]:
        shas = list(shas)
        out: dict[str, tuple[str, bytes]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(shas), 500):
                q = sa.select(blobs).where(blobs.c.sha256.in_(shas[start : start + 500]))
                out.update({r.sha256: (r.kind, r.data) for r in conn.execute(q)})
        return out

    # --- feature cache ----------------------------------------------------------------------------

    def cached_features(self, trunk: str, shas: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(shas), 500):
                q = sa.select(features.c.sha256, features.c.vector).where(
                    features.c.trunk == trunk, features.c.sha256.in_(list(shas[start : start + 500])))
                out.update({sha: np.frombuffer(vec, dtype=np.float32) for sha, vec in conn.execute(q)})
        return out

    def put_features(self, trunk: str, vectors: dict[str, np.ndarray]) -> None:
        if not vectors:
            return
        rows = [{"trunk": trunk, "sha256": sha, "vector": np.asarray(v, np.float32).tobytes()} for sha, v in vectors.items()]
        with self._tx() as conn:
            known = {r[0] for r in conn.execute(sa.select(features.c.sha256).where(
                features.c.trunk == trunk, features.c.sha256.in_(list(vectors))))}
            rows = [r for r in rows if r["sha256"] not in known]
            if rows:
                conn.execute(features.insert(), rows)

    # --- jobs and heads -----------------------------------------------------------------------------

    def start_job(self, job: JobRecord) -> None:
        """Records a queued job and marks its task TRAINING, unless the task has an unfinished job."""
        from adapters.errors import FailedPrecondition

        with self._tx() as conn:
            task = conn.execute(sa.select(tasks).where(tasks.c.task_id == job.task_id)).first()
            if task is None:
                raise NotFound(f"task {job.task_id!r} does not exist")
            active = conn.execute(sa.select(jobs.c.job_id).where(
                jobs.c.task_id == job.task_id, jobs.c.state.in_(("QUEUED", "RUNNING")))).first()
            if active:
                raise FailedPrecondition(
                    f"task {job.task_id!r} is already training (job {active[0]}); watch that job and train again after it"
                )
            job.created_at_ms = job.updated_at_ms = now_ms()
            conn.execute(jobs.insert().values(
                **{**dataclasses.asdict(job), "config": json.dumps(job.config), "status": json.dumps(job.status)}))
            conn.execute(tasks.update().where(tasks.c.task_id == job.task_id).values(
                state="TRAINING", job_id=job.job_id, error="", updated_at_ms=job.created_at_ms))

    def update_job(self, job_id: str, state: str, status: dict) -> None:
        with self._tx() as conn:
            conn.execute(jobs.update().where(jobs.c.job_id == job_id).values(
                state=state, status=json.dumps(status), updated_at_ms=now_ms()))

    def get_job(self, job_id: str) -> JobRecord:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.job_id == job_id)).first()
        if row is None:
            raise NotFound(f"job {job_id!r} does not exist")
        return _job(row)

    def unfinished_jobs(self) -> list[JobRecord]:
        with self.engine.connect() as conn:
            q = sa.select(jobs).where(jobs.c.state.in_(("QUEUED", "RUNNING"))).order_by(jobs.c.created_at_ms)
            return [_job(r) for r in conn.execute(q)]

    def finish_job(self, job_id: str, status: dict, head: HeadRecord | None = None, error: str = "") -> int:
        """Ends a job. With a head: stores it as the next version and makes it live, atomically.

        Returns the new version (0 on failure). A task deleted meanwhile raises NotFound.
        """
        with self._tx() as conn:
            job = conn.execute(sa.select(jobs).where(jobs.c.job_id == job_id)).first()
            task = job and conn.execute(sa.select(tasks).where(tasks.c.task_id == job.task_id)).first()
            if not task:
                raise NotFound(f"task of job {job_id!r} was deleted")
            ts = now_ms()
            version = 0
            if head is not None:
                latest = conn.execute(sa.select(sa.func.max(heads.c.version)).where(heads.c.task_id == task.task_id)).scalar()
                version = (latest or 0) + 1
                conn.execute(heads.insert().values(
                    task_id=task.task_id, version=version, onnx=head.onnx, labels=json.dumps(head.labels),
                    evaluation=json.dumps(head.evaluation), created_at_ms=ts))
                conn.execute(tasks.update().where(tasks.c.task_id == task.task_id).values(
                    state="READY", live_version=version, error="", updated_at_ms=ts))
            else:
                conn.execute(tasks.update().where(tasks.c.task_id == task.task_id).values(
                    state="FAILED", error=error, updated_at_ms=ts))
            conn.execute(jobs.update().where(jobs.c.job_id == job_id).values(
                state="SUCCEEDED" if head is not None else "FAILED", status=json.dumps(status), error=error,
                version=version, updated_at_ms=ts))
            return version

    def get_head(self, task_id: str, version: int) -> HeadRecord:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(heads).where(heads.c.task_id == task_id, heads.c.version == version)).first()
        if row is None:
            raise NotFound(f"task {task_id!r} has no head version {version}")
        d = dict(row._mapping)
        return HeadRecord(**{**d, "labels": json.loads(d["labels"]), "evaluation": json.loads(d["evaluation"])})

    def head_evaluation(self, task_id: str, version: int) -> dict:
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(heads.c.evaluation).where(
                heads.c.task_id == task_id, heads.c.version == version)).scalar()
        return json.loads(value) if value else {}


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
