"""Training shared fairly between tenants: a job records its tenant and when a worker last claimed it, so
that workers claim the oldest job of the tenant served least recently instead of the oldest job of all.

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("tenant_id", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("claimed_at_ms", sa.BigInteger, nullable=False, server_default="0"))
    op.execute("UPDATE jobs SET tenant_id = (SELECT tasks.tenant_id FROM tasks WHERE tasks.key = jobs.task_key)")
    op.create_index("ix_jobs_tenant_claimed", "jobs", ["tenant_id", "claimed_at_ms"])
    op.execute("UPDATE meta SET value = '4' WHERE name = 'schema_version'")


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_claimed", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("claimed_at_ms")
        batch.drop_column("tenant_id")
    op.execute("UPDATE meta SET value = '3' WHERE name = 'schema_version'")
