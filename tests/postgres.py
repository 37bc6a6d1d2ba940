"""A throwaway PostgreSQL cluster for the test session (pytest fixtures, loaded by conftest.py).

The cluster listens on a Unix socket only, in a private temporary directory, so nothing else on the
machine can reach it and no TCP port is picked. `initdb` refuses to run as root: as root (CI), the
cluster runs as the `postgres` system user, in a directory that user owns.

Without PostgreSQL's server binaries, tests that need them are skipped with the command that installs
them; with CI=true, a missing PostgreSQL fails the run instead.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pathlib
import pwd
import shutil
import subprocess
import tempfile
import uuid

import pytest

INSTALL_HINT = ("PostgreSQL server binaries not found (looked on PATH and in /usr/lib/postgresql/*/bin); "
                "install them with `apt-get install postgresql-15` (Debian/Ubuntu) or set PG_BIN_DIR "
                "to the folder holding initdb and pg_ctl")


def find_bin() -> pathlib.Path | None:
    """The folder holding initdb and pg_ctl: $PG_BIN_DIR, PATH, or Debian's versioned folders."""
    forced = os.environ.get("PG_BIN_DIR")
    if forced:
        return pathlib.Path(forced)
    on_path = shutil.which("initdb")
    if on_path:
        return pathlib.Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return pathlib.Path(found[-1]).parent if found else None


class Cluster:
    """A running cluster: `url(db)` for SQLAlchemy, `create_database()` for a fresh database."""

    def __init__(self, bin_dir: pathlib.Path, root: pathlib.Path, user: str | None) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.data = root / "data"
        self.socket_dir = root / "socket"
        self.user = user  # the system user the server runs as (None: this process's user)
        self.superuser = "postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)

    def start(self) -> None:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if self.user:
            entry = pwd.getpwnam(self.user)
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", self.superuser, "-A", "trust", "-E", "UTF8",
                  "--no-sync", "--locale=C")
        self.resume()

    def resume(self) -> None:
        """Starts the cluster's server again (after `stop()`), on the same socket and data."""
        options = (f"-c listen_addresses='' -k {self.socket_dir} -c fsync=off -c max_connections=200 "
                   "-c shared_buffers=64MB")
        result = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options,
                           "-w", "-t", "60", "start", check=False)
        if result.returncode != 0:
            log = (self.root / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr.strip()}\n{log}")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.superuser}@/{database}?host={self.socket_dir}"

    def create_database(self, prefix: str = "hs") -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(host=str(self.socket_dir), user=self.superuser, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def running_cluster():
    bin_dir = find_bin()
    if bin_dir is None:
        raise FileNotFoundError(INSTALL_HINT)
    user = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise FileNotFoundError("running as root, and there is no `postgres` system user to run the "
                                    "test cluster as (initdb refuses root)") from None
        user = "postgres"
    root = pathlib.Path(tempfile.mkdtemp(prefix="headserve-pg-"))
    cluster = Cluster(bin_dir, root, user)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _cluster_or_skip():
    try:
        with running_cluster() as cluster:
            yield cluster
    except FileNotFoundError as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true and PostgreSQL is missing: {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def postgres():
    """The session's PostgreSQL cluster (skipped where PostgreSQL is missing, except with CI=true)."""
    yield from _cluster_or_skip()


@pytest.fixture(scope="module")
def own_postgres():
    """A cluster for one module's tests alone, which may stop and resume it."""
    yield from _cluster_or_skip()


@pytest.fixture
def pg_url(postgres) -> str:
    """A fresh, empty database of the session cluster."""
    return postgres.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """The URL of a new store at the head schema revision, on each engine in turn: the store's own suites
    (tests/test_store.py, test_queue.py, test_store_import.py) run against both."""
    import sqlalchemy as sa

    from service import migrate

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'headserve.sqlite3'}"
    else:
        url = request.getfixturevalue("pg_url")
    engine = sa.create_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    return url
