"""Each bad input gets its status code and an actionable message, changes nothing, and the server
keeps serving."""

from __future__ import annotations

import grpc
import pytest
from conftest import Client, make_settings, png, text_examples, unique_id

from service.gen import headserve_pb2 as pb
from service.server import build_server


def ex(text=None, label="a", image=None):
    inp = pb.Input(text=text) if image is None else pb.Input(image=image)
    return pb.Example(input=inp, label=label)


def two_labels(**kw):
    return [ex("first example sentence", "a"), ex("second example sentence", "b")]


def expect(code, call, *fragments):
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    for fragment in fragments:
        assert fragment in err.value.details()
    return err.value.details()


@pytest.fixture()
def task_count(stub):
    def count():
        return len(stub.ListTasks(pb.ListTasksRequest(page_size=1000)).tasks)

    before = count()
    yield count
    assert count() >= before


def create(stub, **kw):
    kw.setdefault("task_id", unique_id())
    kw.setdefault("backbone", "minilm-l6")
    return lambda: stub.CreateTask(pb.CreateTaskRequest(**kw))


def assert_absent(stub, task_id):
    expect(grpc.StatusCode.NOT_FOUND, lambda: stub.GetTask(pb.GetTaskRequest(task_id=task_id)))


def test_unknown_backbone_is_not_found(stub):
    task_id = unique_id()
    expect(grpc.StatusCode.NOT_FOUND, create(stub, task_id=task_id, backbone="resnet9000"), "resnet9000", "known:")
    assert_absent(stub, task_id)


def test_unknown_task_is_not_found_for_every_rpc(stub):
    missing = unique_id("missing")
    code = grpc.StatusCode.NOT_FOUND
    expect(code, lambda: stub.GetTask(pb.GetTaskRequest(task_id=missing)), missing)
    expect(code, lambda: stub.DeleteTask(pb.DeleteTaskRequest(task_id=missing)))
    expect(code, lambda: stub.TrainTask(pb.TrainTaskRequest(task_id=missing)))
    expect(code, lambda: stub.Predict(pb.PredictRequest(task_id=missing, inputs=[pb.Input(text="x")])))
    expect(code, lambda: list(stub.WatchJob(pb.WatchJobRequest(task_id=missing))))
    expect(code, lambda: list(stub.WatchJob(pb.WatchJobRequest(job_id="job-nope"))))
    expect(code, lambda: list(stub.ExportTask(pb.ExportTaskRequest(task_id=missing))))
    expect(code, lambda: stub.AddExamples(iter([pb.AddExamplesRequest(task_id=missing, examples=two_labels())])))


def test_existing_task_is_already_exists_and_unchanged(stub, text_task):
    before = stub.GetTask(pb.GetTaskRequest(task_id=text_task))
    expect(grpc.StatusCode.ALREADY_EXISTS, create(stub, task_id=text_task, examples=two_labels()), text_task)
    after = stub.GetTask(pb.GetTaskRequest(task_id=text_task))
    assert after == before


def test_image_input_to_text_backbone(stub, text_task):
    task_id = unique_id()
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           create(stub, task_id=task_id, examples=[ex(image=png((1, 2, 3)), label="a"), ex("b text", "b")]),
           "text inputs")
    assert_absent(stub, task_id)
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           lambda: stub.Predict(pb.PredictRequest(task_id=text_task, inputs=[pb.Input(image=png((1, 2, 3)))])),
           "input 0", "text inputs")


def test_text_input_to_image_backbone(stub, image_task):
    task_id = unique_id()
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           create(stub, task_id=task_id, backbone="mobilenet_v3_small", examples=two_labels()), "image inputs")
    assert_absent(stub, task_id)
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           lambda: stub.Predict(pb.PredictRequest(task_id=image_task, inputs=[pb.Input(text="a red square")])),
           "image inputs")


@pytest.mark.parametrize("data", [b"not an image at all", png((9, 9, 9))[:60], b""], ids=["garbage", "truncated", "empty"])
def test_undecodable_image(stub, image_task, data):
    task_id = unique_id()
    examples = [ex(image=png((200, 0, 0)), label="red"), ex(image=data, label="blue")]
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           create(stub, task_id=task_id, backbone="mobilenet_v3_small", examples=examples), "input 1")
    assert_absent(stub, task_id)
    good = pb.Input(image=png((200, 0, 0)))
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           lambda: stub.Predict(pb.PredictRequest(task_id=image_task, inputs=[good, pb.Input(image=data)])), "input 1")


@pytest.mark.parametrize("text", ["", "   \n\t"], ids=["empty", "blank"])
def test_empty_text(stub, text_task, text):
    task_id = unique_id()
    expect(grpc.StatusCode.INVALID_ARGUMENT, create(stub, task_id=task_id, examples=[ex("fine", "a"), ex(text, "b")]),
           "empty")
    assert_absent(stub, task_id)
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           lambda: stub.Predict(pb.PredictRequest(task_id=text_task, inputs=[pb.Input(text=text)])), "empty")


def test_input_with_neither_text_nor_image(stub, text_task):
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           lambda: stub.Predict(pb.PredictRequest(task_id=text_task, inputs=[pb.Input()])), "Input.text")


def test_fewer_than_two_labels(stub):
    task_id = unique_id()
    one_label = [ex("one sentence", "a"), ex("another sentence", "a")]
    expect(grpc.StatusCode.INVALID_ARGUMENT, create(stub, task_id=task_id, examples=one_label), "at least 2 labels")
    assert_absent(stub, task_id)
    expect(grpc.StatusCode.INVALID_ARGUMENT, create(stub, task_id=task_id, labels=["only"]), "at least 2 labels")
    # A task with examples for one label cannot train yet; nothing changes.
    stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="minilm-l6"))
    stub.AddExamples(iter([pb.AddExamplesRequest(task_id=task_id, examples=one_label)]))
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.TrainTask(pb.TrainTaskRequest(task_id=task_id)), "at least 2")
    task = stub.GetTask(pb.GetTaskRequest(task_id=task_id))
    assert task.state == pb.Task.PENDING and not task.job_id


def test_declared_label_without_examples(stub):
    task_id = unique_id()
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           create(stub, task_id=task_id, labels=["a", "b", "c"], examples=two_labels()), "'c' has no examples")
    assert_absent(stub, task_id)
    stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="minilm-l6", labels=["a", "b", "c"]))
    stub.AddExamples(iter([pb.AddExamplesRequest(task_id=task_id, examples=two_labels())]))
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.TrainTask(pb.TrainTaskRequest(task_id=task_id)),
           "'c' has no examples")
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           lambda: stub.AddExamples(iter([pb.AddExamplesRequest(task_id=task_id, examples=[ex("x y", "zzz")])])),
           "'zzz' is not one of")
    assert stub.GetTask(pb.GetTaskRequest(task_id=task_id)).num_examples == 2


@pytest.mark.parametrize("label", ["", "   ", "x" * 101, "bad\nlabel"], ids=["empty", "blank", "long", "control"])
def test_bad_label(stub, label):
    task_id = unique_id()
    expect(grpc.StatusCode.INVALID_ARGUMENT, create(stub, task_id=task_id, examples=[ex("one", "a"), ex("two", label)]),
           "label")
    assert_absent(stub, task_id)


def test_bad_task_id(stub):
    expect(grpc.StatusCode.INVALID_ARGUMENT, create(stub, task_id="has space"), "task_id")
    expect(grpc.StatusCode.INVALID_ARGUMENT, create(stub, task_id="x" * 200), "task_id")


def test_predict_before_ready_is_failed_precondition(stub):
    task_id = unique_id()
    stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="minilm-l6"))
    expect(grpc.StatusCode.FAILED_PRECONDITION,
           lambda: stub.Predict(pb.PredictRequest(task_id=task_id, inputs=[pb.Input(text="hello")])),
           "no trained version", "PENDING")
    expect(grpc.StatusCode.FAILED_PRECONDITION, lambda: list(stub.ExportTask(pb.ExportTaskRequest(task_id=task_id))))


def test_training_twice_at_once_is_failed_precondition(client):
    task_id = unique_id()
    client.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="minilm-l6", examples=text_examples()))
    # The first job may already be done on a fast machine; then this one is accepted.
    try:
        client.stub.TrainTask(pb.TrainTaskRequest(task_id=task_id))
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "already training" in err.details()
    assert client.wait_ready(task_id).state == pb.Job.SUCCEEDED


def test_bad_training_config(stub):
    task_id = unique_id()
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           create(stub, task_id=task_id, examples=two_labels(), config=pb.TrainingConfig(epochs=-1)), "epochs")
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           create(stub, task_id=task_id, examples=two_labels(), config=pb.TrainingConfig(strategy=99)), "strategy")
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           create(stub, task_id=task_id, examples=two_labels(),
                  config=pb.TrainingConfig(strategy=pb.FINE_TUNE, unfreeze_blocks=7)), "between 0 (default) and 6")
    assert_absent(stub, task_id)


def test_bad_label_descriptions_change_nothing(stub, client, image_task):
    task_id = unique_id()
    for config, fragment in [
        (pb.TrainingConfig(label_descriptions={"z": "zebras"}), "label_descriptions names 'z'"),
        (pb.TrainingConfig(label_descriptions={"a": " "}), "empty"),
        (pb.TrainingConfig(label_descriptions={"a": "x" * 1001}), "longer than 1000"),
        (pb.TrainingConfig(label_text=pb.LABEL_TEXT_OFF, label_descriptions={"a": "apples"}), "OFF"),
        (pb.TrainingConfig(label_text=9), "label_text"),
    ]:
        expect(grpc.StatusCode.INVALID_ARGUMENT,
               create(stub, task_id=task_id, examples=two_labels(), config=config), fragment)
    expect(grpc.StatusCode.INVALID_ARGUMENT,  # an empty task has no labels to describe yet
           create(stub, task_id=task_id, config=pb.TrainingConfig(label_descriptions={"a": "apples"})),
           "labels (none yet)")
    assert_absent(stub, task_id)
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           lambda: stub.TrainTask(pb.TrainTaskRequest(
               task_id=image_task, config=pb.TrainingConfig(label_descriptions={"red": "the colour red"}))),
           "need a text backbone")
    # On an existing text task: refused before any job starts, and the task keeps serving as it was.
    stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="minilm-l6", examples=two_labels()))
    before = client.wait_ready(task_id)
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           lambda: stub.TrainTask(pb.TrainTaskRequest(
               task_id=task_id, config=pb.TrainingConfig(label_descriptions={"c": "cats"}))),
           "label_descriptions names 'c'", "(a, b)")
    task = stub.GetTask(pb.GetTaskRequest(task_id=task_id))
    assert task.job_id == before.job_id and task.version == 1 and task.state == pb.Task.READY


def test_add_examples_stream_naming_two_tasks(stub, text_task):
    before = stub.GetTask(pb.GetTaskRequest(task_id=text_task)).num_examples
    stream = [pb.AddExamplesRequest(task_id=text_task, examples=[ex("new sentence", "sports")]),
              pb.AddExamplesRequest(task_id="other", examples=[ex("another", "sports")])]
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.AddExamples(iter(stream)), "one task")
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.AddExamples(iter([pb.AddExamplesRequest()])), "task_id")
    assert stub.GetTask(pb.GetTaskRequest(task_id=text_task)).num_examples == before


def test_too_many_inputs_is_resource_exhausted(stub, text_task):
    inputs = [pb.Input(text=f"sentence {i}") for i in range(257)]
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: stub.Predict(pb.PredictRequest(task_id=text_task, inputs=inputs)),
           "257", "256")
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.Predict(pb.PredictRequest(task_id=text_task)), "no inputs")
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           lambda: stub.Predict(pb.PredictRequest(task_id=text_task, inputs=[pb.Input(text="x")], top_k=-1)), "top_k")


def test_over_long_text(stub, text_task):
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           lambda: stub.Predict(pb.PredictRequest(task_id=text_task, inputs=[pb.Input(text="word " * 5000)])),
           "20000")


def test_limits_from_config(tmp_path):
    """Oversized messages and per-task limits come from the settings."""
    running = build_server(make_settings(tmp_path, builtin_backbones=["mobilenet_v3_small"], max_message_bytes=1 << 16,
                                         max_examples_per_task=3, max_image_pixels=100 * 100,
                                         max_image_aspect_ratio=2.0))
    client = Client(running.address)
    try:
        stub = client.stub
        big = pb.Input(image=b"\0" * (1 << 17))
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED,
               lambda: stub.Predict(pb.PredictRequest(task_id="x", inputs=[big])))
        task_id = unique_id()
        examples = [ex(image=png((i * 50, 0, 0), seed=i), label=str(i % 2)) for i in range(4)]
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, create(stub, task_id=task_id, backbone="mobilenet_v3_small",
                                                          examples=examples), "limit is 3")
        assert_absent(stub, task_id)
        huge = [ex(image=png((0, 0, 0), size=(200, 200)), label="a"), ex(image=png((9, 9, 9)), label="b")]
        expect(grpc.StatusCode.INVALID_ARGUMENT, create(stub, task_id=task_id, backbone="mobilenet_v3_small",
                                                        examples=huge), "pixels")
        strip = [ex(image=png((0, 0, 0), size=(90, 30)), label="a"), ex(image=png((9, 9, 9)), label="b")]
        expect(grpc.StatusCode.INVALID_ARGUMENT, create(stub, task_id=task_id, backbone="mobilenet_v3_small",
                                                        examples=strip), "more elongated than the limit of 2:1")
        # Still serving after all of that.
        stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="mobilenet_v3_small", examples=examples[:3]))
        assert client.wait_ready(task_id).state == pb.Job.SUCCEEDED
    finally:
        client.close()
        running.stop()


def test_server_keeps_serving_after_errors(stub, text_task):
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            stub.Predict(pb.PredictRequest(task_id=text_task, inputs=[pb.Input(text="")]))
    resp = stub.Predict(pb.PredictRequest(task_id=text_task, inputs=[pb.Input(text="Fry the garlic in butter.")]))
    assert resp.predictions[0].label == "cooking"


def test_unexpected_failure_is_internal_with_a_request_id_and_the_server_goes_on(server, client, tenant):
    """A stored head that onnxruntime cannot load (corrupted on disk): the caller gets INTERNAL with a
    generic message naming the request id; no internals leak; other tasks keep serving."""
    import hashlib
    import sqlite3

    task_id = unique_id()
    client.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="minilm-l6", examples=text_examples()))
    assert client.wait_ready(task_id).state == pb.Job.SUCCEEDED
    server.app.predictor.forget(tenant.key(task_id))  # next Predict loads the head from the store
    with sqlite3.connect(server.app.settings.data_dir / "headserve.sqlite3") as db:
        bad = b"not an onnx model"  # with a matching size and digest: stored intact, unusable all the same
        db.execute("UPDATE heads SET onnx = ?, size = ?, onnx_sha256 = ? WHERE task_key = ?",
                   (bad, len(bad), hashlib.sha256(bad).hexdigest(), tenant.key(task_id)))
    request = pb.PredictRequest(task_id=task_id, inputs=[pb.Input(text="hello")])
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Predict.with_call(request, metadata=[("x-request-id", "req-42")])
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "internal error; quote request id req-42 to the operator"
    other = unique_id()
    client.stub.CreateTask(pb.CreateTaskRequest(task_id=other, backbone="minilm-l6", examples=text_examples()))
    assert client.wait_ready(other).state == pb.Job.SUCCEEDED
    resp = client.stub.Predict(pb.PredictRequest(task_id=other, inputs=[pb.Input(text="Bake a pie.")]))
    assert resp.predictions[0].label == "cooking"
