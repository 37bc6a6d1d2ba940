"""The fuzzer of tests/test_fuzz.py again, against a server whose store is PostgreSQL.

PostgreSQL refuses what SQLite takes (NUL in text, values past a column's type), so a hostile request that
SQLite stores or looks up can fail inside PostgreSQL, as an INTERNAL error, where the suite's shared server
(SQLite) answers it well. Every test of test_fuzz.py runs here as there, with the same checks, on a server of
its own (this module's `server`, `tenant`, `client` and tasks replace the session's).
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from conftest import Client, image_examples, make_settings, make_tenant, ready_task, text_examples
from test_fuzz import *  # noqa: F403  (the tests and their fixtures, collected here too)

from service import migrate
from service.server import build_server


@pytest.fixture(scope="module")
def server(tmp_path_factory, postgres):
    url = postgres.create_database("fuzz")
    migrate.upgrade(sa.create_engine(url), quiet=True)
    running = build_server(make_settings(tmp_path_factory.mktemp("pg-fuzz"), auth="api_key", store_url=url))
    assert running.app.store.engine.dialect.name == "postgresql"
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tenant(server):
    return make_tenant(server, "suite")


@pytest.fixture(scope="module")
def client(server, tenant):
    c = Client(server.address, tenant.api_key)
    yield c
    c.close()


@pytest.fixture(scope="module")
def text_task(client):
    return ready_task(client, "topics", "minilm-l6", text_examples())


@pytest.fixture(scope="module")
def image_task(client):
    return ready_task(client, "colours", "mobilenet_v3_small", image_examples())
