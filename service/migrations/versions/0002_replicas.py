"""Replicas on one database: jobs are a queue (owner, lease, attempts), a head remembers the job that
published it (a job that runs twice publishes one version), and a feed of changes tells every replica
what became live, was deleted or was revoked.

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("owner", sa.String(128), nullable=False, server_default=""))
        batch.add_column(sa.Column("lease_until_ms", sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
    op.create_index("ix_jobs_state_created", "jobs", ["state", "created_at_ms"])
    with op.batch_alter_table("heads") as batch:
        batch.add_column(sa.Column("job_id", sa.String(64), nullable=True))
    op.create_index("uq_heads_job", "heads", ["job_id"], unique=True)
    op.create_table(
        "changes",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),  # task | key | tenant
        sa.Column("ref", sa.String(200), nullable=False),
        sa.Column("at_ms", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_changes_at", "changes", ["at_ms"])
    op.execute("UPDATE meta SET value = '3' WHERE name = 'schema_version'")


def downgrade() -> None:
    op.drop_table("changes")
    op.drop_index("uq_heads_job", "heads")
    with op.batch_alter_table("heads") as batch:
        batch.drop_column("job_id")
    op.drop_index("ix_jobs_state_created", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("attempts")
        batch.drop_column("lease_until_ms")
        batch.drop_column("owner")
    op.execute("UPDATE meta SET value = '2' WHERE name = 'schema_version'")
