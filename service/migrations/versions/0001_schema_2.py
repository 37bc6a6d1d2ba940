"""Schema 2: tenants, API keys, tasks, content-addressed blobs and examples, cached features, head
versions, jobs and usage - the store as it was before migrations moved to Alembic.

Stores written before then (no alembic_version table) are recognised by service/migrate.py and stamped
with this revision after being brought to it.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ACTIVE = ("QUEUED", "RUNNING")


def upgrade() -> None:
    op.create_table(
        "meta",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "tenants",
        sa.Column("tenant_id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("quotas", sa.Text, nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.tenant_id", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("scopes", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.Column("expires_at_ms", sa.BigInteger, nullable=False),
        sa.Column("revoked_at_ms", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "tasks",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.tenant_id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("task_id", sa.String(128), nullable=False),
        sa.Column("backbone", sa.String(128), nullable=False),
        sa.Column("declared_labels", sa.Text, nullable=False),
        sa.Column("config", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("live_version", sa.Integer, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("tenant_id", "task_id", name="uq_tasks_tenant_task"),
    )
    op.create_table(
        "blobs",
        sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.tenant_id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "examples",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("task_key", sa.String(200), sa.ForeignKey("tasks.key", ondelete="CASCADE"), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("label", sa.Text, nullable=False),
        sa.UniqueConstraint("task_key", "sha256", "label"),
        sa.ForeignKeyConstraint(["tenant_id", "sha256"], ["blobs.tenant_id", "blobs.sha256"]),
    )
    op.create_index("ix_examples_tenant_sha", "examples", ["tenant_id", "sha256"])
    op.create_table(
        "features",
        sa.Column("tenant_id", sa.String(64), primary_key=True),
        sa.Column("trunk", sa.String(160), primary_key=True),
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("vector", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "heads",
        sa.Column("task_key", sa.String(200), sa.ForeignKey("tasks.key", ondelete="CASCADE"), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("onnx", sa.LargeBinary, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("evaluation", sa.Text, nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.Column("onnx_sha256", sa.String(64), nullable=False, server_default=""),
    )
    op.create_table(
        "jobs",
        sa.Column("job_id", sa.String(64), primary_key=True),
        sa.Column("task_key", sa.String(200), sa.ForeignKey("tasks.key", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("config", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "usage",
        sa.Column("task_key", sa.String(200), sa.ForeignKey("tasks.key", ondelete="CASCADE"), primary_key=True),
        sa.Column("tenant_id", sa.String(64), nullable=False, index=True),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("inputs", sa.BigInteger, nullable=False),
        sa.Column("last_used_ms", sa.BigInteger, nullable=False),
    )
    state = sa.column("state")
    op.create_index("uq_jobs_one_active", "jobs", ["task_key"], unique=True,
                    sqlite_where=state.in_(ACTIVE), postgresql_where=state.in_(ACTIVE))
    op.execute("INSERT INTO meta (name, value) VALUES ('schema_version', '2')")
    op.execute("INSERT INTO tenants (tenant_id, name, quotas, created_at_ms) "
               "VALUES ('default', 'default', '{}', 0)")


def downgrade() -> None:
    raise NotImplementedError("schema 2 is the first revision; restore a backup instead")
