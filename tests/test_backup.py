"""`headserve backup` / `restore`: snapshots taken while a real server serves and a thread keeps writing
restore every task as it was (same versions, the same scores); the commands' exit codes and messages;
a damaged or foreign backup is refused before anything changes."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import sqlite3
import threading
import time

import pytest
from conftest import HELD_OUT, TINY_TEXT, TOPICS, Client, make_settings, text_examples, unique_id

from service import cli
from service.datadir import DataDirLock
from service.gen import headserve_pb2 as pb
from service.server import build_server
from service.store import SCHEMA_VERSION, ExampleIn, Store, TaskRecord

SMALL = {label: texts[:3] for label, texts in TOPICS.items()}
PROBES = [pb.Input(text=texts[0]) for texts in HELD_OUT.values()]
LABELS = list(SMALL)


def settings(data_dir):
    return make_settings(data_dir, builtin_backbones=[])


def answers(client, task_id) -> tuple[int, list[dict[str, float]]]:
    resp = client.stub.Predict(pb.PredictRequest(task_id=task_id, inputs=PROBES), timeout=60)
    return resp.version, [{s.label: s.score for s in p.top} for p in resp.predictions]


def open_ro(path) -> contextlib.closing:
    return contextlib.closing(sqlite3.connect(pathlib.Path(path).resolve().as_uri() + "?mode=ro", uri=True))


class Writer(threading.Thread):
    """Keeps writing: AddExamples of 3 new examples (one per label, batch `i`) to the base tasks, and now
    and then a CreateTask (which queues its training job). Records when each write was acknowledged."""

    def __init__(self, client: Client, tasks: list[str]) -> None:
        super().__init__(daemon=True)
        self.client, self.tasks = client, tasks
        self.stop = threading.Event()
        self.acked: list[tuple[float, str, int | str]] = []  # (time, "add", batch) or (time, "create", task)
        self.created: list[str] = []
        self.errors: list[BaseException] = []

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                if i % 6 == 0 and len(self.created) < 3:
                    task_id = unique_id("load")
                    self.client.stub.CreateTask(pb.CreateTaskRequest(
                        task_id=task_id, backbone=TINY_TEXT, examples=text_examples(SMALL)), timeout=60)
                    self.created.append(task_id)
                    self.acked.append((time.monotonic(), "create", task_id))
                else:
                    examples = [pb.Example(input=pb.Input(text=f"load batch {i} about {label}"), label=label)
                                for label in LABELS]
                    request = pb.AddExamplesRequest(task_id=self.tasks[i % len(self.tasks)], examples=examples)
                    self.client.stub.AddExamples(iter([request]), timeout=60)
                    self.acked.append((time.monotonic(), "add", i))
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(exc)
                return


def test_a_snapshot_taken_under_write_load_restores_every_task(tmp_path, capsys):
    original_dir, restored_dir = tmp_path / "original", tmp_path / "restored"
    running = build_server(settings(original_dir))
    client = Client(running.address)
    backups: list[tuple[pathlib.Path, float, float, dict]] = []  # (file, start, end, BackupInfo fields)
    try:
        base = []
        for _ in range(3):
            task_id = unique_id("base")
            client.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone=TINY_TEXT,
                                                        examples=text_examples(SMALL)))
            assert client.wait_ready(task_id).state == pb.Job.SUCCEEDED
            base.append(task_id)
        client.stub.TrainTask(pb.TrainTaskRequest(task_id=base[0]))  # a task with two versions
        assert client.wait_ready(base[0]).state == pb.Job.SUCCEEDED

        writer = Writer(client, base)
        writer.start()
        while len(writer.acked) < 4 and writer.is_alive():
            time.sleep(0.05)
        for k in range(4):  # in-process (Store.backup) and through the CLI, by turns
            dest = tmp_path / f"snapshot-{k}.sqlite3"
            start = time.monotonic()
            if k % 2 == 0:
                info = dataclasses.asdict(running.app.store.backup(dest))
            else:
                assert cli.main(["backup", str(dest), "--data-dir", str(original_dir), "--json"]) == 0
                info = json.loads(capsys.readouterr().out)
            backups.append((dest, start, time.monotonic(), info))
            time.sleep(0.3)
        writer.stop.set()
        writer.join(60)
        assert not writer.errors, writer.errors
        first, last = backups[0][1], backups[-1][2]
        during = [a for a in writer.acked if first < a[0] < last]
        assert len(during) >= 3, "the writer was not writing while the backups were taken"

        answered = {}  # what the original server answers, once every job has finished
        for task_id in base + writer.created:
            assert client.wait_ready(task_id).state == pb.Job.SUCCEEDED
            answered[task_id] = answers(client, task_id)
    finally:
        client.close()
        running.stop()

    for dest, start, end, info in backups:
        # Whole batches only, and every write acknowledged before the backup began.
        with open_ro(dest) as conn:
            texts = [r[0].decode() for r in conn.execute("SELECT data FROM blobs WHERE kind = 'text'")
                     if r[0].startswith(b"load batch ")]
            tasks = {r[0] for r in conn.execute("SELECT task_id FROM tasks")}
        per_batch: dict[int, int] = {}
        for text in texts:
            per_batch[int(text.split()[2])] = per_batch.get(int(text.split()[2]), 0) + 1
        assert set(per_batch.values()) <= {len(LABELS)}, per_batch
        for when, kind, ref in writer.acked:
            if when < start:
                assert ref in (per_batch if kind == "add" else tasks), (kind, ref)

    snapshot, *_ = backups[2]
    with open_ro(snapshot) as conn:
        expected = {task_id: version for task_id, version in conn.execute("SELECT task_id, live_version FROM tasks")}
    assert cli.main(["restore", str(snapshot), "--data-dir", str(restored_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"restored {restored_dir / 'headserve.sqlite3'}: ") and "integrity ok" in out

    running = build_server(settings(restored_dir))
    client = Client(running.address)
    try:
        listed = client.stub.ListTasks(pb.ListTasksRequest(page_size=1000)).tasks
        assert {t.task_id: t.version for t in listed} == expected  # same tasks, same versions
        compared = 0
        for task_id, version in expected.items():
            if version == 0:
                continue  # its first job was unfinished in the snapshot: it runs again here
            got_version, got = answers(client, task_id)
            want_version, want = answered[task_id]
            assert got_version == version == want_version
            for g, w in zip(got, want):
                assert g.keys() == w.keys()
                assert all(abs(g[label] - w[label]) <= 1e-6 for label in g), (task_id, g, w)
            compared += 1
        assert compared >= len(base)

        # A server uses the directory: restoring into it is refused, and changes nothing.
        capsys.readouterr()
        assert cli.main(["restore", str(snapshot), "--data-dir", str(restored_dir)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: data directory {restored_dir} is in use (pid {os.getpid()} ")
        assert err.endswith("; stop its server first, then restore\n")
        assert {t.task_id for t in client.stub.ListTasks(pb.ListTasksRequest(page_size=1000)).tasks} == set(expected)
    finally:
        client.close()
        running.stop()
    print("\nbackups under write load (bytes, seconds):", [(i["bytes"], round(i["seconds"], 3)) for *_, i in backups])


# --- the commands -------------------------------------------------------------------------------------------


@pytest.fixture
def store_dir(tmp_path) -> pathlib.Path:
    """A data directory with a small store (no server): one task with two examples."""
    data_dir = tmp_path / "data"
    store = Store.open(data_dir)
    store.create_task(TaskRecord.new("default", "kept", "minilm-l6", ["a", "b"], {}),
                      [ExampleIn("text", b"one", "a"), ExampleIn("text", b"two", "b")])
    store.close()
    return data_dir


def run(capsys, *argv) -> tuple[int, str, str]:
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def state_of(data_dir: pathlib.Path) -> dict[str, str]:
    """The directory's files and their contents' digests (the lock file aside)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(data_dir.iterdir())
            if p.name != "headserve.lock"}


def test_backup_command_exit_codes_and_messages(capsys, tmp_path, store_dir):
    dest = tmp_path / "backup.sqlite3"
    assert run(capsys, "backup", dest) == (2, "", "error: give the server's store: --data-dir DIR or --config FILE\n")
    status, _, err = run(capsys, "backup", dest, "--data-dir", tmp_path / "nothing")
    assert status == 1 and err.startswith(f"error: there is no headserve store at {tmp_path / 'nothing'}")
    status, _, err = run(capsys, "backup", tmp_path / "no-such-dir" / "b.sqlite3", "--data-dir", store_dir)
    assert status == 1 and err.startswith("error: could not back up")

    status, out, err = run(capsys, "backup", dest, "--data-dir", store_dir)
    assert (status, err) == (0, "")
    assert out.startswith(f"backed up to {dest}: ") and "1 task(s)" in out and "integrity ok" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup.sqlite3", "data"]  # no temporary file left
    assert dest.read_bytes()[18:20] == b"\x01\x01"  # a rollback-journal file: no -wal needed

    folder = tmp_path / "backups"
    folder.mkdir()
    config = tmp_path / "headserve.toml"
    config.write_text(f'data_dir = "{store_dir}"\n')
    status, out, _ = run(capsys, "backup", folder, "--config", config, "--json")
    made = json.loads(out)
    assert status == 0 and pathlib.Path(made["path"]).parent == folder and made["tasks"] == 1
    assert made["schema_version"] == SCHEMA_VERSION and made["bytes"] == pathlib.Path(made["path"]).stat().st_size


def test_restore_refuses_damaged_or_foreign_files_and_changes_nothing(capsys, tmp_path, store_dir):
    good = tmp_path / "good.sqlite3"
    assert run(capsys, "backup", good, "--data-dir", store_dir)[0] == 0
    data = good.read_bytes()
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"not a database at all " * 300)
    truncated = tmp_path / "truncated.sqlite3"
    truncated.write_bytes(data[: len(data) // 2])
    flipped = tmp_path / "flipped.sqlite3"  # a b-tree page's header scribbled over
    flipped.write_bytes(data[:4096 * 2] + b"\xff" * 64 + data[4096 * 2 + 64:])
    foreign = tmp_path / "foreign.sqlite3"
    with contextlib.closing(sqlite3.connect(foreign)) as conn:
        conn.execute("CREATE TABLE t (x)")
    newer = tmp_path / "newer.sqlite3"
    newer.write_bytes(data)
    with contextlib.closing(sqlite3.connect(newer)) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE name = 'schema_version'")
        conn.commit()

    before = state_of(store_dir)
    for path, says in ((garbage, "is not a readable headserve store"), (truncated, "damaged"),
                       (flipped, "damaged"), (foreign, "not a headserve store"), (newer, "has store schema 99"),
                       (tmp_path / "missing.sqlite3", "is not a file")):
        status, out, err = run(capsys, "restore", path, "--data-dir", store_dir)
        assert status == 1 and out == "" and err.startswith("error: ") and says in err, (path.name, err)
        assert state_of(store_dir) == before, path.name
    assert sorted(p.name for p in store_dir.iterdir()) == ["headserve.lock", "headserve.sqlite3"]


def test_restore_replaces_a_stopped_store_and_keeps_the_old_one(capsys, tmp_path, store_dir):
    snapshot = tmp_path / "snapshot.sqlite3"
    assert run(capsys, "backup", snapshot, "--data-dir", store_dir)[0] == 0
    store = Store.open(store_dir)
    store.delete_task("default/kept")  # a change after the backup, which the restore undoes
    assert store.list_tasks("default", "", 10) == []

    # Refused while the store is open elsewhere (a server, or a local admin command), or locked by a server.
    status, _, err = run(capsys, "restore", snapshot, "--data-dir", store_dir)
    assert status == 1 and "is in use by another process" in err
    store.close()
    lock = DataDirLock(store_dir)
    status, _, err = run(capsys, "restore", snapshot, "--data-dir", store_dir)
    lock.release()
    assert status == 1 and f"data directory {store_dir} is in use (pid" in err

    status, out, err = run(capsys, "restore", snapshot, "--data-dir", store_dir)
    assert (status, err) == (0, "")
    kept = [p for p in store_dir.iterdir() if ".pre-restore-" in p.name]
    assert len(kept) == 1 and f"kept as {kept[0]}" in out
    assert not (store_dir / "headserve.sqlite3-wal").exists()
    store = Store.open(store_dir)
    assert [t.task_id for t in store.list_tasks("default", "", 10)] == ["kept"]
    store.close()
    old = Store(f"sqlite:///{kept[0]}")  # the replaced store is whole
    assert old.list_tasks("default", "", 10) == []
    old.close()
