"""Prometheus metrics through a real server: scraped over HTTP after real RPCs, counts that move by exactly
what was sent, and series whose number does not grow with tasks or tenants."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from conftest import TINY_TEXT, Client, make_settings, make_tenant, text_examples, unique_id
from prometheus_client.parser import text_string_to_metric_families

from service.gen import headserve_pb2 as pb
from service.server import build_server

TOPICS = {"sports": ["A late goal won the match.", "The team trained in the rain."],
          "cooking": ["Simmer the sauce slowly.", "Knead the dough for ten minutes."]}


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    running = build_server(make_settings(tmp_path_factory.mktemp("metrics"), builtin_backbones=[],
                                         auth="api_key", metrics_address="127.0.0.1:0"))
    yield running
    running.stop()


def scrape(running) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counts_move_by_exactly_what_was_sent(metered):
    who = make_tenant(metered)
    client = Client(metered.address, who.api_key)
    try:
        before = scrape(metered)
        client.stub.CreateTask(pb.CreateTaskRequest(task_id="m", backbone=TINY_TEXT, examples=text_examples(TOPICS)))
        assert client.wait_ready("m").state == pb.Job.SUCCEEDED
        for _ in range(5):
            client.stub.Predict(pb.PredictRequest(task_id="m", inputs=[pb.Input(text=t) for t in ("a", "b", "c")]))
        for _ in range(2):
            with pytest.raises(grpc.RpcError):
                client.stub.Predict(pb.PredictRequest(task_id="ghost", inputs=[pb.Input(text="x")]))
        client.stub.GetTask(pb.GetTaskRequest(task_id="m"))
        after = scrape(metered)
    finally:
        client.close()

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("headserve_rpcs_total", method="Predict", code="OK") == 5
    assert moved("headserve_rpcs_total", method="Predict", code="NOT_FOUND") == 2
    assert moved("headserve_rpcs_total", method="GetTask", code="OK") == 1
    assert moved("headserve_rpcs_total", method="CreateTask", code="OK") == 1
    assert moved("headserve_rpc_duration_seconds_count", method="Predict", code="OK") == 5
    assert moved("headserve_predict_inputs_total", backbone=TINY_TEXT) == 15
    assert moved("headserve_batch_inputs_sum", backbone=TINY_TEXT) == 15
    assert moved("headserve_batch_queue_wait_seconds_count", backbone=TINY_TEXT) == 5
    assert moved("headserve_batch_duration_seconds_count", backbone=TINY_TEXT) >= 1
    assert moved("headserve_training_jobs_total", strategy="auto", state="SUCCEEDED") == 1
    assert moved("headserve_training_job_duration_seconds_count", strategy="auto", state="SUCCEEDED") == 1
    for phase in ("features", "validating", "exporting"):
        assert moved("headserve_training_phase_duration_seconds_count", strategy="auto", phase=phase) == 1, phase
    assert moved("headserve_head_cache_hits_total") >= 4
    assert value(after, "headserve_head_cache_heads") >= 1 and value(after, "headserve_head_cache_bytes") > 0
    assert moved("headserve_store_operation_duration_seconds_count", operation="create_task") == 1
    assert value(after, "headserve_batch_queue_inputs", backbone=TINY_TEXT) == 0
    info = [labels for (name, labels) in after if name == "headserve_build_info"]
    assert info and dict(info[0])["backbones"] == TINY_TEXT and dict(info[0])["device"] == "cpu"


def series(samples) -> set[tuple[str, tuple]]:
    return set(samples)


def test_series_do_not_grow_with_tasks_or_tenants(metered):
    """Bounded labels: the same kinds of calls on 1 task, then on 200 tasks of 2 tenants, make the same
    series (no task id, no tenant id in any label)."""
    a, b = make_tenant(metered), make_tenant(metered)
    ca, cb = Client(metered.address, a.api_key), Client(metered.address, b.api_key)

    def use(client: Client, task_id: str, trained: str) -> None:
        client.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone=TINY_TEXT))
        client.stub.GetTask(pb.GetTaskRequest(task_id=task_id))
        with pytest.raises(grpc.RpcError):  # FAILED_PRECONDITION: not trained
            client.stub.Predict(pb.PredictRequest(task_id=task_id, inputs=[pb.Input(text="x")]))
        client.stub.Predict(pb.PredictRequest(task_id=trained, inputs=[pb.Input(text="x")]))

    try:
        for client in (ca, cb):
            client.stub.CreateTask(pb.CreateTaskRequest(task_id="trained", backbone=TINY_TEXT,
                                                        examples=text_examples(TOPICS)))
            assert client.wait_ready("trained").state == pb.Job.SUCCEEDED
        use(ca, "one", "trained")
        first = series(scrape(metered))
        for i in range(100):
            use(ca, f"a-{i}", "trained")
            use(cb, f"b-{i}", "trained")
        assert series(scrape(metered)) == first
    finally:
        ca.close()
        cb.close()
    text = urllib.request.urlopen(f"http://127.0.0.1:{metered.metrics_port}/metrics", timeout=10).read().decode()
    assert a.tenant_id not in text and "a-99" not in text and unique_id() not in text


def test_trunk_cuts_in_use_are_a_gauge_per_backbone(metered):
    trunk = metered.app.registry.get(TINY_TEXT).trunk
    before = value(scrape(metered), "headserve_trunk_cuts", backbone=TINY_TEXT)
    assert before == len(trunk.cuts_in_use())
    new = frozenset(["blocks_5"]) not in trunk.cuts_in_use()
    assert trunk.cut(["blocks_5"])  # one embedding pass and one block of six
    assert value(scrape(metered), "headserve_trunk_cuts", backbone=TINY_TEXT) == before + new
