"""What operators rely on, through real servers: health that follows the store and the trunks, one server
per port and per data directory, start-up errors in one line, and a CLI that says what it tried."""

from __future__ import annotations

import os
import pathlib
import time

import grpc
import pytest
from conftest import TINY_TEXT, Client, make_settings, text_examples, unique_id
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.cli import main
from service.gen import headserve_pb2 as pb
from service.health import LIVENESS
from service.server import StartupError, build_server

SERVICES = ("", "headserve.v1.HeadServe", "headserve.v1.Admin")
TOPICS = {"sports": ["A late goal won the match.", "The team trained in the rain."],
          "cooking": ["Simmer the sauce slowly.", "Knead the dough for ten minutes."]}


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """A server checking its health five times a second, with a trained text task."""
    running = build_server(make_settings(tmp_path_factory.mktemp("health"), builtin_backbones=[],
                                         health_interval_seconds=0.2))
    client = Client(running.address)
    client.stub.CreateTask(pb.CreateTaskRequest(task_id="t", backbone=TINY_TEXT, examples=text_examples(TOPICS)))
    assert client.wait_ready("t").state == pb.Job.SUCCEEDED
    yield running, client
    client.close()
    running.stop()


def statuses(client: Client) -> set[int]:
    stub = health_pb2_grpc.HealthStub(client.channel)
    return {stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=10).status for s in SERVICES}


def liveness(client: Client) -> int:
    """The status the liveness probe reads (service.health.LIVENESS)."""
    return health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(service=LIVENESS),
                                                            timeout=10).status


def wait_status(client: Client, status: int, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while statuses(client) != {status}:
        assert time.monotonic() < end, f"health did not become {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
        time.sleep(0.05)


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_turns_not_serving_while_the_store_is_gone_and_comes_back(watched):
    running, client = watched
    wait_status(client, SERVING)
    store = running.app.store
    db = pathlib.Path(running.app.settings.data_dir) / "headserve.sqlite3"
    moved = db.with_name("moved.sqlite3")
    store.engine.dispose()
    for suffix in ("", "-wal", "-shm"):
        if db.with_name(db.name + suffix).exists():
            os.rename(db.with_name(db.name + suffix), moved.with_name(moved.name + suffix))
    try:
        wait_status(client, NOT_SERVING)
        assert any(p.startswith("store:") for p in running.monitor.problems)
        assert liveness(client) == SERVING  # not ready, but no restart: the store is not this process's to mend
    finally:
        store.engine.dispose()
        for suffix in ("", "-wal", "-shm"):
            stray = db.with_name(db.name + suffix)
            if stray.exists():
                stray.unlink()  # the empty database a connection made meanwhile
            if moved.with_name(moved.name + suffix).exists():
                os.rename(moved.with_name(moved.name + suffix), stray)
        store.engine.dispose()
    wait_status(client, SERVING)
    assert client.stub.Predict(pb.PredictRequest(task_id="t", inputs=[pb.Input(text="Bake a pie.")])).predictions


def test_health_turns_not_serving_while_a_trunk_fails_and_comes_back(watched):
    running, client = watched
    wait_status(client, SERVING)
    trunk = running.app.registry.get(TINY_TEXT).trunk
    label = client.stub.Predict(pb.PredictRequest(task_id="t", inputs=[pb.Input(text="Score a goal.")])).predictions[0].label

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    trunk.outputs = trunk.features = broken  # what a failed device does to every run
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.stub.Predict(pb.PredictRequest(task_id="t", inputs=[pb.Input(text="Score a goal.")]))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        wait_status(client, NOT_SERVING)
        assert running.monitor.problems == [f"backbone {TINY_TEXT}: its trunk fails"]
        assert liveness(client) == NOT_SERVING  # a restart may mend it (a lost device): liveness fails too
    finally:
        del trunk.outputs, trunk.features
    wait_status(client, SERVING)
    answer = client.stub.Predict(pb.PredictRequest(task_id="t", inputs=[pb.Input(text="Score a goal.")]))
    assert answer.predictions[0].label == label  # the same head answers as before the failure


def test_a_second_server_on_the_same_data_directory_is_refused_naming_the_first(watched, tmp_path):
    running, _ = watched
    with pytest.raises(StartupError, match=rf"data directory .* is in use by another headserve server \(pid {os.getpid()}"):
        build_server(make_settings(running.app.settings.data_dir, builtin_backbones=[]))


def test_a_second_server_on_a_port_in_use_fails_at_once(watched, tmp_path):
    running, _ = watched
    with pytest.raises(StartupError, match="cannot listen on 127.0.0.1:.*the port is in use"):
        build_server(make_settings(tmp_path, builtin_backbones=[], address=f"127.0.0.1:{running.port}"))
    # Its data directory is free again: the refused server let go of its lock.
    again = build_server(make_settings(tmp_path, builtin_backbones=[]))
    again.stop()


def test_serve_start_up_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HEADSERVE_DEVICE", "cuda")
    monkeypatch.setenv("HEADSERVE_BUILTIN_BACKBONES", '["minilm-l6"]')
    assert main(["serve", "--address", "127.0.0.1:0", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not start:") and "cuda" in err.lower()
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_client_flags_go_before_or_after_the_command(watched, capsys):
    running, _ = watched
    assert main(["tasks", "--address", running.address]) == 0
    after = capsys.readouterr().out
    assert main(["--address", running.address, "tasks"]) == 0
    assert capsys.readouterr().out == after and " t " in after
    assert main(["get", "t", "--address", running.address]) == 0


def test_an_address_without_a_port_is_refused(capsys):
    assert main(["--address", "localhost", "tasks"]) == 2
    assert "needs a port" in capsys.readouterr().err


def test_an_unreachable_server_is_named_with_how_to_start_one(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["tasks", "--address", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert f"no headserve server answers at 127.0.0.1:{port} (connection refused)" in err
    assert "headserve serve" in err and "UNAVAILABLE" not in err


def test_a_job_submitted_while_the_server_stops_stays_queued_for_the_next_start(tmp_path):
    running = build_server(make_settings(tmp_path, builtin_backbones=[]))
    client = Client(running.address)
    try:
        client.stub.CreateTask(pb.CreateTaskRequest(task_id="late", backbone=TINY_TEXT,
                                                    examples=text_examples(TOPICS)))
        assert client.wait_ready("late").state == pb.Job.SUCCEEDED
        running.app.runner.close()  # what stop() does first; a TrainTask still in flight then arrives
        job = client.stub.TrainTask(pb.TrainTaskRequest(task_id="late"))
        assert job.state == pb.Job.QUEUED
    finally:
        client.close()
        running.stop()
    again = build_server(make_settings(tmp_path, builtin_backbones=[]))
    client = Client(again.address)
    try:
        final = client.wait_ready("late")
        assert final.job_id == job.job_id and final.state == pb.Job.SUCCEEDED and final.version == 2
    finally:
        client.close()
        again.stop()


def test_a_misspelt_setting_in_the_environment_is_refused(tmp_path, capsys, monkeypatch):
    from service.config import Settings

    monkeypatch.setenv("HEADSERVE_TLS_CERT_FLE", "/etc/tls/tls.crt")
    with pytest.raises(ValueError, match="HEADSERVE_TLS_CERT_FLE names no setting .*HEADSERVE_TLS_CERT_FILE"):
        Settings.load()
    assert main(["serve", "--address", "127.0.0.1:0", "--data-dir", str(tmp_path)]) == 2
    assert "did you mean HEADSERVE_TLS_CERT_FILE" in capsys.readouterr().err
    monkeypatch.delenv("HEADSERVE_TLS_CERT_FLE")
    for allowed in ("HEADSERVE_API_KEY", "HEADSERVE_SERVICE_HOST", "HEADSERVE_PORT", "HEADSERVE_PORT_50051_TCP"):
        monkeypatch.setenv(allowed, "x")
    Settings.load(data_dir=tmp_path)
