"""Alembic's environment for headserve's store (service/migrate.py runs it; no alembic.ini needed).

The caller passes an open connection in `config.attributes["connection"]`: migrations run on it, inside
one transaction (PostgreSQL and SQLite both have transactional DDL)."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
