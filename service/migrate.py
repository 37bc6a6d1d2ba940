"""The store's schema: Alembic revisions (service/migrations) for SQLite and PostgreSQL alike.

`headserve db upgrade` brings a store to the newest revision. A server refuses to start on an older one
and says which command to run, except on a new, empty SQLite file, which it creates (the zero-config
`make serve`). Stores written before the migrations moved to Alembic have no alembic_version table; they
are recognised by their shape (schema 1: tasks without tenants; schema 2: the `meta` table says so),
brought to revision 0001 in place and stamped, then upgraded like any other.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

log = logging.getLogger(__name__)
logging.getLogger("alembic").setLevel(logging.WARNING)  # its per-step INFO lines are ours to summarise

LEGACY_1, LEGACY_2 = "schema-1", "schema-2"  # what `current` calls stores from before Alembic
UPGRADE_HINT = "run `headserve db upgrade` with the same store_url (or --data-dir) as the server"


class SchemaError(RuntimeError):
    """The store's schema is not the one this headserve runs on: the message says what to do."""


def _config(connection: sa.Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "service:migrations")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The newest revision this headserve knows."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def known() -> set[str]:
    return {rev.revision for rev in ScriptDirectory.from_config(_config()).walk_revisions()}


def current(engine: sa.Engine) -> str | None:
    """The store's revision: an Alembic revision, LEGACY_1 / LEGACY_2, or None for an empty database."""
    with engine.connect() as conn:
        names = set(sa.inspect(conn).get_table_names())
        if "alembic_version" in names:
            return MigrationContext.configure(conn).get_current_revision()
        if "tasks" not in names:
            return None
        columns = {c["name"] for c in sa.inspect(conn).get_columns("tasks")}
        return LEGACY_2 if "tenant_id" in columns else LEGACY_1


def check(engine: sa.Engine, where: str) -> None:
    """Raises SchemaError unless the store is at this headserve's head revision; creates the schema in an
    empty SQLite database."""
    found = current(engine)
    if found is None and engine.dialect.name == "sqlite":
        upgrade(engine, quiet=True)
        return
    newest = head()
    if found == newest:
        return
    if found is None:
        raise SchemaError(f"the store at {where} has no headserve schema yet; {UPGRADE_HINT}")
    if found not in known() and found not in (LEGACY_1, LEGACY_2):
        raise SchemaError(f"the store at {where} has schema revision {found}, which this headserve does not "
                          f"know (it runs {newest}): it was written by a newer headserve; run that one")
    raise SchemaError(f"the store at {where} has schema revision {found}; this headserve needs {newest}: "
                      f"{UPGRADE_HINT}")


def upgrade(engine: sa.Engine, quiet: bool = False) -> tuple[str | None, str]:
    """Brings the store to the head revision (each step in one transaction). Returns (before, after)."""
    before = current(engine)
    if before == LEGACY_1:
        _from_schema_1(engine)
    elif before == LEGACY_2:
        _from_schema_2(engine)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # one migrator at a time (e.g. two Jobs started at once)
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7264091)")
        command.upgrade(_config(conn), "head")
    after = current(engine)
    if before != after:
        (log.debug if quiet else log.info)("store schema upgraded from %s to %s", before or "empty", after)
    return before, after


def _from_schema_2(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        if "onnx_sha256" not in {c["name"] for c in sa.inspect(conn).get_columns("heads")}:
            conn.exec_driver_sql("ALTER TABLE heads ADD COLUMN onnx_sha256 VARCHAR(64) NOT NULL DEFAULT ''")
        command.stamp(_config(conn), "0001")


def _from_schema_1(engine: sa.Engine) -> None:
    """Schema 1 had no tenants: its tasks become the default tenant's, unchanged (SQLite only: schema 1
    predates every other engine)."""
    old = ("tasks", "blobs", "examples", "features", "heads", "jobs", "meta")
    d = "default"
    with engine.connect() as conn:
        raw = conn.connection.driver_connection  # (outside a transaction, or SQLite ignores the pragma)
        raw.execute("PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                names = set(sa.inspect(conn).get_table_names())
                for name in old:
                    if name in names:
                        conn.exec_driver_sql(f"ALTER TABLE {name} RENAME TO v1_{name}")
                conn.exec_driver_sql("DROP INDEX IF EXISTS ix_jobs_task_id")
                command.upgrade(_config(conn), "0001")
                for sql in (
                    "INSERT INTO tasks SELECT :d || '/' || task_id, :d, task_id, backbone, declared_labels, "
                    "config, state, live_version, error, job_id, created_at_ms, updated_at_ms FROM v1_tasks",
                    "INSERT INTO blobs SELECT :d, sha256, kind, length(data), data FROM v1_blobs",
                    "INSERT INTO examples (id, task_key, tenant_id, sha256, label) "
                    "SELECT id, :d || '/' || task_id, :d, sha256, label FROM v1_examples",
                    "INSERT INTO features SELECT :d, trunk, sha256, vector FROM v1_features",
                    "INSERT INTO heads (task_key, version, onnx, size, labels, evaluation, created_at_ms) "
                    "SELECT :d || '/' || task_id, version, onnx, length(onnx), labels, evaluation, created_at_ms "
                    "FROM v1_heads",
                    "INSERT INTO jobs SELECT job_id, :d || '/' || task_id, state, config, status, error, "
                    "version, created_at_ms, updated_at_ms FROM v1_jobs",
                ):
                    conn.execute(sa.text(sql), {"d": d})
                for name in old:
                    conn.exec_driver_sql(f"DROP TABLE IF EXISTS v1_{name}")
        finally:
            raw.execute("PRAGMA foreign_keys=ON")
    log.info("store brought from schema 1 to revision 0001: existing tasks belong to tenant %r", d)
