"""Restarts on the same data directory lose nothing acknowledged: a graceful stop, and a kill -9."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import HELD_OUT, Client, image_examples, make_settings, text_examples, unique_id

from service.gen import headserve_pb2 as pb
from service.server import build_server

TEXTS = [t for texts in HELD_OUT.values() for t in texts]


def scores(stub, task_id, inputs):
    resp = stub.Predict(pb.PredictRequest(task_id=task_id, inputs=inputs))
    return resp.version, [[(s.label, round(s.score, 6)) for s in p.top] for p in resp.predictions]


def test_graceful_restart_serves_the_same_predictions(tmp_path):
    running = build_server(make_settings(tmp_path))
    client = Client(running.address)
    text_id, image_id = unique_id(), unique_id()
    client.stub.CreateTask(pb.CreateTaskRequest(task_id=text_id, backbone="minilm-l6", examples=text_examples()))
    client.stub.CreateTask(pb.CreateTaskRequest(task_id=image_id, backbone="mobilenet_v3_small",
                                                examples=image_examples()))
    client.wait_ready(text_id), client.wait_ready(image_id)
    text_inputs = [pb.Input(text=t) for t in TEXTS]
    image_inputs = [ex.input for ex in image_examples(2)]
    before = scores(client.stub, text_id, text_inputs), scores(client.stub, image_id, image_inputs)
    client.close()
    running.stop()

    running = build_server(make_settings(tmp_path))
    client = Client(running.address)
    try:
        after = scores(client.stub, text_id, text_inputs), scores(client.stub, image_id, image_inputs)
        assert after == before
        assert client.stub.GetTask(pb.GetTaskRequest(task_id=text_id)).state == pb.Task.READY
    finally:
        client.close()
        running.stop()


class ServeProcess:
    """`python -m service serve` in a child process, on port 0; the bound port is read from its log."""

    def __init__(self, data_dir) -> None:
        env = {**os.environ, "HEADSERVE_BUILTIN_BACKBONES": '["minilm-l6"]', "PYTHONUNBUFFERED": "1",
               "HEADSERVE_AUTO_FINE_TUNE_MIN_EXAMPLES": "0"}  # as make_settings: no tuning under AUTO
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--address", "127.0.0.1:0", "--data-dir", str(data_dir),
             "--log-level", "INFO"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        deadline = time.monotonic() + 180
        self.log = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("server exited:\n" + "".join(self.log))
            self.log.append(line)
            match = re.search(r"listening on \S+ \(port (\d+)\)", line)
            if match:
                self.address = f"127.0.0.1:{match.group(1)}"
                return
        raise RuntimeError("server did not start:\n" + "".join(self.log))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc.stdout.close()

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self.proc.stdout.close()
        return code


@pytest.mark.slow
def test_kill_9_loses_nothing_acknowledged(tmp_path):
    first = ServeProcess(tmp_path)
    client = Client(first.address)
    ready_id, pending_id = unique_id("ready"), unique_id("pending")
    stub = client.stub
    stub.CreateTask(pb.CreateTaskRequest(task_id=ready_id, backbone="minilm-l6", examples=text_examples()))
    assert client.wait_ready(ready_id).state == pb.Job.SUCCEEDED
    inputs = [pb.Input(text=t) for t in TEXTS]
    before = scores(stub, ready_id, inputs)
    stub.CreateTask(pb.CreateTaskRequest(task_id=pending_id, backbone="minilm-l6"))
    added = stub.AddExamples(iter([pb.AddExamplesRequest(task_id=pending_id, examples=text_examples())]))
    assert added.added == 24
    # Acknowledged, but the kill comes before (or while) the job runs: it must run after the restart.
    job = stub.TrainTask(pb.TrainTaskRequest(task_id=pending_id))
    client.close()
    first.kill()

    second = ServeProcess(tmp_path)
    client = Client(second.address)
    try:
        stub = client.stub
        assert scores(stub, ready_id, inputs) == before
        assert stub.GetTask(pb.GetTaskRequest(task_id=pending_id)).num_examples == 24
        final = client.wait_ready(pending_id)
        assert final.job_id == job.job_id and final.state == pb.Job.SUCCEEDED
        version, _ = scores(stub, pending_id, inputs)
        assert version == 1
    finally:
        client.close()
        assert second.terminate() == 0
