"""Log lines carry the request id, tenant, task and job they concern, across the threads that do the work
(the batcher's, the training pool's), and `log_format = "json"` writes one parseable JSON object a line."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import time

import pytest
from conftest import make_settings, make_tenant, text_examples, unique_id

from service import errors
from service.batcher import Batcher
from service.client import open_channel
from service.errors import RequestIdFilter
from service.gen import headserve_pb2 as pb
from service.gen import headserve_pb2_grpc as pb_grpc
from service.server import JsonFormatter, TextFormatter, build_server, configure_logging

TOPICS = {"sports": ["A late goal won the match.", "The team trained in the rain."],
          "cooking": ["Simmer the sauce slowly.", "Knead the dough for ten minutes."]}


class Records(logging.Handler):
    """Keeps the records that reach the root logger, stamped by RequestIdFilter as the server's handler is."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(RequestIdFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:  # (called with self.lock held)
        self.records.append(record)

    def where(self, predicate) -> list[logging.LogRecord]:
        with self.lock:
            return [r for r in self.records if predicate(r)]


@pytest.fixture
def records():
    handler = Records()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for name in ("transformers", "torch", "onnxscript", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture(scope="module")
def threaded(tmp_path_factory):
    """A server that trains in a thread: its job lines reach this process's log records."""
    running = build_server(make_settings(tmp_path_factory.mktemp("logs"), auth="api_key",
                                         builtin_backbones=["minilm-l6"], training_isolation="thread"))
    yield running
    running.stop()


def test_rpc_and_training_job_lines_carry_request_tenant_task_and_job(threaded, records):
    server = threaded
    who = make_tenant(server)
    channel = open_channel(server.address, api_key=who.api_key)
    stub = pb_grpc.HeadServeStub(channel)
    task_id = unique_id("logged")
    try:
        stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="minilm-l6", examples=text_examples(TOPICS)),
                        metadata=(("x-request-id", "create-1"),))
        last = None
        for job in stub.WatchJob(pb.WatchJobRequest(task_id=task_id), timeout=120):
            last = job
        assert last.state == pb.Job.SUCCEEDED
        stub.Predict(pb.PredictRequest(task_id=task_id, inputs=[pb.Input(text="A goal!")]),
                     metadata=(("x-request-id", "predict-1"),))
    finally:
        channel.close()

    # The training thread's lines: the job id, the tenant and task, and the request that started it.
    deadline = time.monotonic() + 10
    while not (done := records.where(lambda r: r.name == "service.jobs" and "live" in r.getMessage()
                                     and task_id in r.getMessage())) and time.monotonic() < deadline:
        time.sleep(0.05)
    [line] = done
    assert line.threadName.startswith("train")
    assert (line.job, line.tenant, line.task, line.request_id) == (last.job_id, who.tenant_id, task_id, "create-1")
    # The RPC lines (access and audit): request id, tenant and task.
    for request_id, method in (("create-1", "CreateTask"), ("predict-1", "Predict")):
        [access] = records.where(lambda r: r.name == "headserve.access" and r.request_id == request_id)
        assert f"rpc {method}" in access.getMessage()
        assert (access.tenant, access.task, access.job) == (who.tenant_id, task_id, "-")
    [audit] = records.where(lambda r: r.name == "headserve.audit" and r.request_id == "create-1")
    assert (audit.tenant, audit.task) == (who.tenant_id, task_id)


def test_json_lines_parse_and_carry_the_context(server, records):
    who = make_tenant(server)
    channel = open_channel(server.address, api_key=who.api_key)
    try:
        with pytest.raises(Exception):
            pb_grpc.HeadServeStub(channel).GetTask(pb.GetTaskRequest(task_id="no-such-task"),
                                                   metadata=(("x-request-id", "json-1"),))
    finally:
        channel.close()
    [access] = records.where(lambda r: r.name == "headserve.access" and r.request_id == "json-1")
    line = json.loads(JsonFormatter().format(access))
    assert set(line) == {"time", "level", "logger", "message", "request_id", "tenant", "task", "job"}
    assert (line["level"], line["logger"], line["request_id"], line["tenant"], line["task"], line["job"]) == (
        "INFO", "headserve.access", "json-1", who.tenant_id, "no-such-task", "-")
    assert "status=NOT_FOUND" in line["message"] and line["time"].endswith("Z")


def test_json_format_has_exc_info_and_configure_logging_takes_the_format():
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        configure_logging("INFO", "json")
        [handler] = root.handlers
        assert isinstance(handler.formatter, JsonFormatter)
        stream = io.StringIO()
        handler.setStream(stream)
        context = contextvars.copy_context()  # set there, not in the test's own context

        def fail() -> None:
            for var, value in ((errors.request_id, "r-9"), (errors.tenant, "acme"), (errors.task, "t1"),
                               (errors.job, "job-1")):
                var.set(value)
            try:
                raise ValueError("boom \u00e9")
            except ValueError:
                logging.getLogger("headserve.test").exception("it failed: %s", "badly")

        context.run(fail)
        [text] = stream.getvalue().splitlines()
        line = json.loads(text)
        assert line["message"] == "it failed: badly" and line["level"] == "ERROR"
        assert (line["request_id"], line["tenant"], line["task"], line["job"]) == ("r-9", "acme", "t1", "job-1")
        assert "ValueError: boom \u00e9" in line["exc_info"] and "Traceback" in line["exc_info"]

        configure_logging("INFO", "text")
        assert isinstance(root.handlers[0].formatter, TextFormatter)
        stream = io.StringIO()
        root.handlers[0].setStream(stream)
        token = errors.tenant.set("acme")
        try:
            logging.getLogger("headserve.test").info("hello")
        finally:
            errors.tenant.reset(token)
        assert stream.getvalue().rstrip().endswith("INFO headserve.test [- tenant=acme] hello")
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def test_a_failed_batch_logs_the_request_ids_it_served(records):
    def run(batch):
        raise RuntimeError("the trunk fell over")

    batcher = Batcher("logs-test", run, max_size=8, max_delay=0.05, max_queue=64)
    try:
        pendings = []
        for request_id, tenant in (("req-a", "t1"), ("req-b", "t2")):
            token = errors.request_id.set(request_id)
            try:
                pendings.append(batcher.submit(object(), 1, group=tenant))
            finally:
                errors.request_id.reset(token)
        for p in pendings:
            with pytest.raises(RuntimeError):
                p.future.result(10)
    finally:
        batcher.close()
    failed = records.where(lambda r: r.name == "service.batcher" and "failed" in r.getMessage())
    ids = {i for r in failed for i in r.request_id.split(",")}
    assert ids == {"req-a", "req-b"}
    assert all(r.request_id in r.getMessage().replace(", ", ",") for r in failed)
    assert {t for r in failed for t in r.tenant.split(",")} == {"t1", "t2"}
