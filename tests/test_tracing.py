"""OpenTelemetry tracing through a real server whose spans go to an in-memory exporter: one trace per RPC,
with spans for preprocessing, queue wait, the batch (linked to every request it serves), its trunk pass
and heads, and store work; off by default, with no OpenTelemetry import then; a clear refusal when it is
asked for and the `otel` extra is missing."""

from __future__ import annotations

import subprocess
import sys
import threading

import grpc
import pytest
from conftest import TINY_TEXT, Client, make_settings, make_tenant, text_examples, unique_id

from service.gen import headserve_pb2 as pb
from service.server import StartupError, build_server

pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402

PREDICT = "/headserve.v1.HeadServe/Predict"
CREATE = "/headserve.v1.HeadServe/CreateTask"


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    exporter = InMemorySpanExporter()
    # Training in a thread of the server: its spans reach this in-memory exporter (a worker process exports
    # its own spans to otel_endpoint, continuing the same traces).
    running = build_server(make_settings(tmp_path_factory.mktemp("tracing"), builtin_backbones=[],
                                         auth="api_key", otel_endpoint="http://collector.invalid:4317",
                                         training_isolation="thread"),
                           span_exporter=exporter)
    yield running, exporter
    running.stop()


@pytest.fixture(scope="module")
def caller(traced):
    running, _ = traced
    who = make_tenant(running)
    client = Client(running.address, who.api_key)
    task_id = unique_id("traced")
    client.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone=TINY_TEXT, examples=text_examples()))
    assert client.wait_ready(task_id).state == pb.Job.SUCCEEDED
    yield client, task_id
    client.close()


def finished(running, exporter) -> list:
    running.tracer.provider.force_flush()
    return list(exporter.get_finished_spans())


def server_spans(spans, method: str) -> list:
    return [s for s in spans if s.name == method and s.kind == SpanKind.SERVER]


def in_trace(spans, root) -> dict[str, list]:
    by_name: dict[str, list] = {}
    for s in spans:
        if s.context.trace_id == root.context.trace_id:
            by_name.setdefault(s.name, []).append(s)
    return by_name


def test_one_predict_is_one_trace_with_preprocessing_queue_wait_batch_trunk_and_head(traced, caller):
    running, exporter = traced
    client, task_id = caller
    exporter.clear()
    client.stub.Predict(pb.PredictRequest(task_id=task_id, inputs=[pb.Input(text="A late goal won the cup.")]))
    spans = finished(running, exporter)

    [rpc] = server_spans(spans, PREDICT)
    assert rpc.parent is None and rpc.attributes["rpc.method"] == "Predict"
    trace = in_trace(spans, rpc)
    for name in ("preprocess", "queue wait", "batch", "trunk pass", "head"):
        assert name in trace, (name, sorted(trace))
    [pre], [wait], [batch], [trunk], [head] = (trace[n] for n in ("preprocess", "queue wait", "batch", "trunk pass",
                                                                  "head"))
    assert pre.parent.span_id == rpc.context.span_id and wait.parent.span_id == rpc.context.span_id
    assert rpc.start_time <= wait.start_time <= wait.end_time <= rpc.end_time
    # The batch serves the request: linked to its span (and, as the batch's first request, its child).
    assert [link.context.span_id for link in batch.links] == [rpc.context.span_id]
    assert batch.parent.span_id == rpc.context.span_id
    assert trunk.parent.span_id == batch.context.span_id and head.parent.span_id == batch.context.span_id
    assert head.attributes["headserve.task"] == task_id and head.attributes["headserve.inputs"] == 1
    assert batch.attributes["headserve.backbone"] == TINY_TEXT and batch.attributes["headserve.requests"] == 1
    assert batch.attributes["headserve.tokenize_ms"] >= 0  # text: tokenized for the whole batch
    assert batch.start_time <= trunk.start_time <= trunk.end_time <= head.start_time <= batch.end_time
    # Every span of the trace ends inside the RPC (the batch settles the answer before it ends).
    assert all(s.start_time >= rpc.start_time for spans_ in trace.values() for s in spans_)


def test_concurrent_predicts_share_batches_that_link_every_request(traced, caller):
    running, exporter = traced
    client, task_id = caller
    exporter.clear()
    barrier = threading.Barrier(8)
    errors = []

    def call(i: int) -> None:
        try:
            barrier.wait(10)
            for k in range(3):
                client.stub.Predict(pb.PredictRequest(task_id=task_id, inputs=[pb.Input(text=f"sentence {i} {k}")]),
                                    timeout=60)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    spans = finished(running, exporter)
    rpcs = server_spans(spans, PREDICT)
    assert len(rpcs) == 24
    batches = [s for s in spans if s.name == "batch"]
    linked = [link.context.span_id for b in batches for link in b.links]
    # Each request is served by exactly one batch, and has its own queue wait.
    assert sorted(linked) == sorted(r.context.span_id for r in rpcs)
    waits = {s.parent.span_id for s in spans if s.name == "queue wait"}
    assert waits == {r.context.span_id for r in rpcs}
    assert sum(b.attributes["headserve.requests"] for b in batches) == 24
    for b in batches:  # a batch's trunk pass and heads are its children
        children = [s.name for s in spans if s.parent is not None and s.parent.span_id == b.context.span_id]
        assert "trunk pass" in children and "head" in children


def test_create_task_traces_its_store_work_and_the_training_jobs(traced, caller):
    running, exporter = traced
    client, _ = caller
    exporter.clear()
    task_id = unique_id("stored")
    client.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone=TINY_TEXT, examples=text_examples()))
    assert client.wait_ready(task_id).state == pb.Job.SUCCEEDED
    spans = finished(running, exporter)
    [rpc] = server_spans(spans, CREATE)
    trace = in_trace(spans, rpc)
    assert "store.create_task" in trace, sorted(trace)
    [create] = trace["store.create_task"]
    assert create.parent.span_id == rpc.context.span_id
    # The training job runs in the context of the call that started it: its store work is in the same trace.
    assert "store.finish_job" in trace, sorted(trace)
    # Store work outside any trace (the health monitor's checks) makes no spans of its own.
    assert all(s.parent is not None for s in spans if s.name.startswith("store."))


def test_the_callers_trace_context_is_continued_and_health_is_not_traced(traced, caller):
    running, exporter = traced
    client, task_id = caller
    exporter.clear()
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    client.stub.Predict(pb.PredictRequest(task_id=task_id, inputs=[pb.Input(text="Simmer the sauce.")]),
                        metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),))
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(service=""))
    spans = finished(running, exporter)
    [rpc] = server_spans(spans, PREDICT)
    assert f"{rpc.context.trace_id:032x}" == trace_id and f"{rpc.parent.span_id:016x}" == parent_id
    assert not [s for s in spans if "Health" in s.name]


def test_a_failed_predict_records_its_status_code(traced, caller):
    running, exporter = traced
    client, _ = caller
    exporter.clear()
    with pytest.raises(grpc.RpcError) as info:
        client.stub.Predict(pb.PredictRequest(task_id=unique_id("ghost"), inputs=[pb.Input(text="x")]))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    [rpc] = server_spans(finished(running, exporter), PREDICT)
    # (the span's status stays UNSET: OpenTelemetry's conventions count NOT_FOUND as the caller's error)
    assert rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]


def test_tracing_on_without_the_extra_refuses_to_start_naming_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if opentelemetry-sdk were missing
    with pytest.raises(StartupError) as info:
        build_server(make_settings(tmp_path, otel_endpoint="http://collector:4317"))
    message = str(info.value)
    assert "pip install 'headserve[otel]'" in message and "\n" not in message


def test_tracing_off_imports_no_opentelemetry():
    code = ("import sys; import service.server, service.predictor, service.batcher, service.jobs; "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_without_otel_traces_sampler_a_share_of_new_traces_is_kept(monkeypatch):
    """otel_sample_ratio (default 0.1) applies when OTEL_TRACES_SAMPLER is unset; a caller's sampled trace
    is always continued (parent-based)."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from service import tracing

    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    kept = []
    for ratio in (0.0, 0.1, 1.0):
        exporter = InMemorySpanExporter()
        tracer = tracing.setup("http://127.0.0.1:1", exporter, sample_ratio=ratio)
        otel = tracer.provider.get_tracer("t")
        for _ in range(2000):
            otel.start_span("root").end()
        tracer.provider.force_flush()
        kept.append(len(exporter.get_finished_spans()))
        tracer.provider.shutdown()
    assert kept[0] == 0 and 100 < kept[1] < 300 and kept[2] == 2000
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    exporter = InMemorySpanExporter()
    tracer = tracing.setup("http://127.0.0.1:1", exporter, sample_ratio=0.0)
    tracer.provider.get_tracer("t").start_span("root").end()
    tracer.provider.force_flush()
    assert len(exporter.get_finished_spans()) == 1  # the operator's OpenTelemetry settings win
    tracer.provider.shutdown()
