"""HeadServeClient: its pure helpers, then every method against the real server of tests/conftest.py."""

from __future__ import annotations

import hashlib
import io
import uuid

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from service.client import (
    open_channel,
    ExportError,
    HeadServeClient,
    example_batches,
    predict_request,
    to_example,
    to_input,
    training_config,
    write_export,
)
from service.gen import headserve_pb2 as pb

TOPICS = {
    "sports": [
        "The striker scored twice in the second half of the football match.",
        "Our basketball team won the championship after overtime.",
        "She ran the marathon in under three hours.",
        "The tennis player served an ace to win the set.",
        "The goalkeeper made a brilliant save in the penalty shootout.",
        "The cyclist took the yellow jersey on the mountain stage.",
        "The coach picked a new captain for the rugby season.",
        "He swam the hundred metres freestyle for a new national record.",
    ],
    "cooking": [
        "Chop the onions and fry them gently in butter.",
        "Bake the bread at two hundred degrees for forty minutes.",
        "Season the soup with salt, pepper and fresh thyme.",
        "Whisk the eggs with sugar until the mixture is pale.",
        "Let the pasta boil in salted water for ten minutes.",
        "Marinate the chicken overnight in yoghurt and spices.",
        "Stir the risotto slowly while adding warm stock.",
        "Roast the vegetables in olive oil with garlic.",
    ],
    "computing": [
        "The program crashed with a null pointer exception.",
        "Install the package with pip and restart the server.",
        "The database query needs an index to run faster.",
        "Compile the source code and run the unit tests.",
        "The laptop has sixteen gigabytes of memory and a fast processor.",
        "Refactor the function to remove the duplicated code.",
        "The network request timed out after thirty seconds.",
        "Push the commit to the remote git repository.",
    ],
}
EXAMPLES = [(text, label) for label, texts in TOPICS.items() for text in texts]
PROBES = {
    "sports": "The goalkeeper saved a penalty in the last minute of the match.",
    "cooking": "Simmer the tomato sauce with garlic and basil.",
    "computing": "The compiler reported a syntax error in my Python program.",
}


@pytest.fixture(scope="module", autouse=True)
def _api_key(tenant):
    """The suite's server wants API keys: clients and the CLI read this tenant's from the environment."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HEADSERVE_API_KEY", tenant.api_key)
        yield


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def png(rgb: tuple[int, int, int], size: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def chunks_of(data: bytes, size: int, **first: str) -> list[pb.ExportChunk]:
    chunks = [
        pb.ExportChunk(data=data[start : start + size], offset=start, total_size=len(data))
        for start in range(0, len(data), size)
    ]
    chunks[0].metadata_json = first.get("metadata_json", "")
    chunks[0].sha256 = first.get("sha256", hashlib.sha256(data).hexdigest())
    return chunks


# --- pure helpers ------------------------------------------------------------------------------------


def test_to_input_maps_python_types_to_the_oneof(tmp_path):
    image = tmp_path / "red.png"
    image.write_bytes(png((255, 0, 0)))
    assert to_input("hello").WhichOneof("kind") == "text"
    assert to_input("hello").text == "hello"
    assert to_input(b"\x89PNG").image == b"\x89PNG"
    assert to_input(image).image == image.read_bytes()
    message = pb.Input(text="as is")
    assert to_input(message) is message
    with pytest.raises(TypeError, match="str"):
        to_input(42)  # type: ignore[arg-type]


def test_to_example_takes_pairs_and_messages():
    example = to_example(("a goal", "sports"))
    assert (example.input.text, example.label) == ("a goal", "sports")
    message = pb.Example(input=pb.Input(image=b"x"), label="cat")
    assert to_example(message) is message


def test_training_config_takes_strategy_names_and_fields():
    assert training_config().strategy == pb.AUTO
    assert training_config("linear").strategy == pb.LINEAR
    assert training_config("MLP", hidden_units=32).hidden_units == 32
    assert training_config("fine-tune").strategy == pb.FINE_TUNE
    assert training_config(pb.PROTOTYPE, epochs=5, seed=3) == pb.TrainingConfig(
        strategy=pb.PROTOTYPE, epochs=5, seed=3
    )
    with pytest.raises(ValueError, match="linear"):
        training_config("svm")
    with pytest.raises(ValueError):
        training_config("linear", epoch=3)  # misspelt field


def test_example_batches_split_by_count_and_by_bytes():
    texts = [(f"text {i}", "a") for i in range(10)]
    assert [len(batch) for batch in example_batches(texts, 4)] == [4, 4, 2]
    assert [len(batch) for batch in example_batches(texts, 64)] == [10]
    assert list(example_batches([], 4)) == []
    big = [(bytes(1000), "a")] * 3
    assert [len(batch) for batch in example_batches(big, 64, max_bytes=2500)] == [2, 1]
    assert [len(batch) for batch in example_batches(big, 64, max_bytes=10)] == [1, 1, 1]
    with pytest.raises(ValueError):
        list(example_batches(texts, 0))


def test_predict_request_converts_inputs():
    request = predict_request("t", ["a", b"b"], top_k=2, request_id="r1")
    assert [i.WhichOneof("kind") for i in request.inputs] == ["text", "image"]
    assert (request.task_id, request.top_k, request.request_id) == ("t", 2, "r1")


def test_write_export_returns_metadata_of_a_sound_stream():
    data = bytes(range(256)) * 40
    out = io.BytesIO()
    metadata = write_export(chunks_of(data, 1000, metadata_json='{"labels": ["a", "b"]}'), out)
    assert metadata == {"labels": ["a", "b"]}
    assert out.getvalue() == data


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda chunks: chunks[0].__setattr__("sha256", "0" * 64), "sha256 mismatch"),
        (lambda chunks: chunks[1].__setattr__("data", b"corrupted" + chunks[1].data[9:]), "sha256 mismatch"),
        (lambda chunks: chunks.pop(), "expected 10240"),
        (lambda chunks: chunks.pop(1), "expected 1000"),
        (lambda chunks: chunks.clear(), "empty"),
    ],
    ids=["wrong-sha", "corrupted-chunk", "truncated", "missing-chunk", "empty"],
)
def test_write_export_detects_broken_streams(spoil, message):
    chunks = chunks_of(bytes(range(256)) * 40, 1000)
    spoil(chunks)
    with pytest.raises(ExportError, match=message):
        write_export(chunks, io.BytesIO())


# --- against the real server ------------------------------------------------------------------------


@pytest.fixture
def headserve(server):
    """A HeadServeClient on the test server (named apart from conftest's raw `client`)."""
    with HeadServeClient(server.address, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def trained_task(server):
    """A text task trained once from CreateTask's examples, for the tests that only read it."""
    with HeadServeClient(server.address, timeout=60) as client:
        task = client.create_task(
            "minilm-l6", EXAMPLES, task_id=new_id("client-text"), config=training_config("linear")
        )
        assert task.job_id
        job = client.wait(task.job_id, timeout=600)
        assert job.state == pb.Job.SUCCEEDED, job.error
        yield client.get_task(task.task_id)
        client.delete_task(task.task_id)


def test_list_backbones_describes_the_test_backbones(headserve):
    backbones = {b.name: b for b in headserve.list_backbones()}
    text, image = backbones["minilm-l6"], backbones["mobilenet_v3_small"]
    assert text.available and text.modality == pb.TEXT and text.feature_dim == 384
    assert image.available and image.modality == pb.IMAGE and image.feature_dim > 0


def test_created_task_is_trained_and_predicts_the_topic(headserve, trained_task):
    assert trained_task.state == pb.Task.READY
    assert trained_task.version == 1
    assert sorted(trained_task.labels) == sorted(TOPICS)
    assert trained_task.evaluation.train_accuracy == pytest.approx(1.0)
    assert dict(trained_task.examples_per_label) == {label: 8 for label in TOPICS}

    response = headserve.predict(trained_task.task_id, list(PROBES.values()))
    assert response.version == trained_task.version
    assert [p.label for p in response.predictions] == list(PROBES)
    for prediction in response.predictions:
        scores = [s.score for s in prediction.top]
        assert sorted(s.label for s in prediction.top) == sorted(TOPICS)
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-4)
        assert prediction.score == pytest.approx(scores[0])

    top1 = headserve.predict(trained_task.task_id, [PROBES["cooking"]], top_k=1).predictions[0]
    assert [s.label for s in top1.top] == ["cooking"]


def test_predict_stream_answers_each_request_in_order(headserve, trained_task):
    labels = list(PROBES)
    requests = (predict_request(trained_task.task_id, [PROBES[label]], request_id=label) for label in labels)
    responses = list(headserve.predict_stream(requests))
    assert [r.request_id for r in responses] == labels
    assert [r.predictions[0].label for r in responses] == labels
    assert all(r.task_id == trained_task.task_id for r in responses)


def test_add_examples_streams_batches_then_train(headserve):
    # (label words off: with them, a task created with its labels and no examples is zero-shot, READY at once)
    task = headserve.create_task("minilm-l6", task_id=new_id("client-add"), labels=list(TOPICS),
                                 config=pb.TrainingConfig(label_text=pb.LABEL_TEXT_OFF))
    assert task.state == pb.Task.PENDING and task.version == 0 and not task.job_id

    added = headserve.add_examples(task.task_id, iter(EXAMPLES), batch_size=5)
    assert (added.task_id, added.added, added.duplicates) == (task.task_id, len(EXAMPLES), 0)
    assert added.num_examples == len(EXAMPLES)
    assert dict(added.examples_per_label) == {label: 8 for label in TOPICS}

    again = headserve.add_examples(task.task_id, EXAMPLES[:7], batch_size=3)
    assert (again.added, again.duplicates, again.num_examples) == (0, 7, len(EXAMPLES))

    job = headserve.train(task.task_id, training_config("prototype"))
    assert job.task_id == task.task_id and job.job_id
    states = [j.state for j in headserve.watch(job.job_id)]
    assert states[-1] == pb.Job.SUCCEEDED
    assert pb.Job.SUCCEEDED not in states[:-1]

    final = headserve.wait(task_id=task.task_id)  # the task's latest job, already finished
    assert (final.job_id, final.state, final.version) == (job.job_id, pb.Job.SUCCEEDED, 1)
    assert final.evaluation.strategy == "prototype"
    stored = headserve.get_task(task.task_id)
    assert (stored.state, stored.version, stored.num_examples) == (pb.Task.READY, 1, len(EXAMPLES))
    assert headserve.predict(task.task_id, [PROBES["sports"]]).predictions[0].label == "sports"


def test_add_examples_reraises_errors_of_the_local_examples(headserve, tmp_path):
    task = headserve.create_task("mobilenet_v3_small", task_id=new_id("client-missing"))
    examples = [(png((250, 0, 0)), "red"), (tmp_path / "missing.png", "red")]
    with pytest.raises(FileNotFoundError):
        headserve.add_examples(task.task_id, examples, batch_size=1)
    headserve.delete_task(task.task_id)


def test_list_tasks_follows_every_page(headserve):
    ids = {new_id("client-list") for _ in range(3)}
    for task_id in ids:
        headserve.create_task("minilm-l6", task_id=task_id)
    listed = [t.task_id for t in headserve.list_tasks(page_size=2)]
    assert ids <= set(listed)
    assert len(listed) == len(set(listed))
    assert ids <= {t.task_id for t in headserve.list_tasks("minilm-l6", page_size=1)}
    assert not ids & {t.task_id for t in headserve.list_tasks("mobilenet_v3_small")}
    for task_id in ids:
        headserve.delete_task(task_id)
    assert not ids & {t.task_id for t in headserve.list_tasks()}


def test_server_errors_keep_their_status_codes(headserve, trained_task):
    def code(call, *args, **kwargs) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as caught:
            call(*args, **kwargs)
        return caught.value.code()

    missing = new_id("client-missing")
    assert code(headserve.get_task, missing) == grpc.StatusCode.NOT_FOUND
    assert code(headserve.delete_task, missing) == grpc.StatusCode.NOT_FOUND
    assert code(headserve.predict, missing, ["x"]) == grpc.StatusCode.NOT_FOUND
    assert code(headserve.create_task, "no-such-backbone", task_id=missing) == grpc.StatusCode.NOT_FOUND
    assert (
        code(headserve.create_task, "minilm-l6", task_id=trained_task.task_id)
        == grpc.StatusCode.ALREADY_EXISTS
    )
    assert code(headserve.predict, trained_task.task_id, [png((1, 2, 3))]) == grpc.StatusCode.INVALID_ARGUMENT

    pending = headserve.create_task("minilm-l6", task_id=new_id("client-pending"))
    assert code(headserve.predict, pending.task_id, ["x"]) == grpc.StatusCode.FAILED_PRECONDITION
    assert code(headserve.export, pending.task_id, io.BytesIO()) == grpc.StatusCode.FAILED_PRECONDITION
    headserve.delete_task(pending.task_id)


def test_export_head_runs_in_onnxruntime(headserve, trained_task, tmp_path):
    path = tmp_path / "head.onnx"
    metadata = headserve.export(trained_task.task_id, path)
    assert sorted(metadata["labels"]) == sorted(TOPICS)
    assert metadata["version"] == trained_task.version
    assert [p.name for p in tmp_path.iterdir()] == ["head.onnx"]  # no partial file left behind

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (feed,) = session.get_inputs()
    features = np.random.default_rng(0).standard_normal((2, 384)).astype(np.float32)
    probabilities = session.run(None, {feed.name: features})[0]
    assert probabilities.shape == (2, len(TOPICS))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)

    buffer = io.BytesIO()
    assert headserve.export(trained_task.task_id, buffer, version=trained_task.version) == metadata
    assert buffer.getvalue() == path.read_bytes()


def test_export_rejects_unknown_formats_and_versions(headserve, trained_task, tmp_path):
    with pytest.raises(ValueError, match="head, fused"):
        headserve.export(trained_task.task_id, tmp_path / "x.onnx", format="onnx")
    with pytest.raises(grpc.RpcError) as caught:
        headserve.export(trained_task.task_id, tmp_path / "x.onnx", version=99)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert list(tmp_path.iterdir()) == []


def test_image_task_from_paths_and_bytes_predicts_and_exports_fused(headserve, tmp_path):
    reds = [(255 - 12 * i, 10 * i, 0) for i in range(6)]
    blues = [(0, 10 * i, 255 - 12 * i) for i in range(6)]
    paths = []
    for i, rgb in enumerate(reds):
        path = tmp_path / f"red{i}.png"
        path.write_bytes(png(rgb))
        paths.append((path, "red"))
    examples = paths + [(png(rgb), "blue") for rgb in blues]

    task = headserve.create_task("mobilenet_v3_small", examples, task_id=new_id("client-image"))
    job = headserve.wait(task.job_id, timeout=600)
    assert job.state == pb.Job.SUCCEEDED, job.error
    predictions = headserve.predict(task.task_id, [png((230, 30, 5)), png((5, 30, 230))]).predictions
    assert [p.label for p in predictions] == ["red", "blue"]

    path = tmp_path / "fused.onnx"
    metadata = headserve.export(task.task_id, str(path), format="fused")
    assert sorted(metadata["labels"]) == ["blue", "red"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (feed,) = session.get_inputs()
    shape = [dim if isinstance(dim, int) else 1 for dim in feed.shape]
    probabilities = session.run(None, {feed.name: np.zeros(shape, np.float32)})[0]
    assert probabilities.shape == (1, 2)
    headserve.delete_task(task.task_id)


def test_client_closes_only_its_own_channel(server, tenant):
    with HeadServeClient(server.address) as owned:
        assert owned.list_backbones()
    with pytest.raises(ValueError):  # grpc refuses calls on a closed channel
        owned.list_backbones()

    channel = open_channel(server.address, api_key=tenant.api_key)
    try:
        HeadServeClient(channel=channel).close()
        assert HeadServeClient(channel=channel, timeout=10).list_backbones()
    finally:
        channel.close()


def test_predict_many_scores_several_tasks_in_one_call(server):
    from conftest import TOPICS

    with HeadServeClient(server.address) as hs:
        ids = []
        for _ in range(2):
            task = hs.create_task("minilm-l6", [(t, label) for label, texts in TOPICS.items() for t in texts])
            hs.wait(task.job_id)
            ids.append(task.task_id)
        resp = hs.predict_many(ids, ["Knead the dough for ten minutes."], top_k=1)
        assert [r.task_id for r in resp.results] == ids
        assert all(r.predictions[0].label == "cooking" and r.version == 1 for r in resp.results)
