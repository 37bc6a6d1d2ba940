"""Zero-shot text tasks: created with labels (and descriptions) and no examples, READY at once with a head
built from the labels' words; examples + training replace it. Real MiniLM weights, real server."""

from __future__ import annotations

import json

import grpc
import numpy as np
import onnx
import pytest

from adapters.label_words import TEMPLATES, label_embeddings
from adapters.zeroshot import STRATEGY, TEMPERATURE, VALIDATION, can_zero_shot, label_texts, zero_shot_head
from conftest import HELD_OUT, TOPICS, text_examples, unique_id
from service.gen import headserve_pb2 as pb

DESCRIPTIONS = {
    "sports": "sport, games, athletes and matches",
    "cooking": "cooking, recipes and food",
    "computing": "computer software and hardware problems",
}
# Sentences written for this test (not the suite's training or held-out sentences).
PROBES = {
    "sports": ["The midfielder was injured during the derby.", "Both teams scored in the first ten minutes."],
    "cooking": ["Melt the butter in a pan and add the garlic.", "This pasta needs more parmesan and basil."],
    "computing": ["The app crashes whenever I click the save button.", "Reboot the router and update its firmware."],
}


def predict(stub, task_id: str, texts: list[str]) -> list[pb.Prediction]:
    resp = stub.Predict(pb.PredictRequest(task_id=task_id, inputs=[pb.Input(text=t) for t in texts]), timeout=60)
    return list(resp.predictions)


def test_rules_for_starting_zero_shot() -> None:
    assert can_zero_shot(["sports", "cooking"], {})
    assert can_zero_shot(["HUM", "LOC"], {"HUM": "a person"})
    assert not can_zero_shot(["0", "1"], {}), "labels without words have nothing to compare with"
    assert can_zero_shot(["0", "1"], {"0": "bad review", "1": "good review"}), "descriptions give them words"
    assert not can_zero_shot(["sports", "cooking"], {}, label_text="off")
    assert not can_zero_shot(["sports"], {})
    assert label_texts(["b", "a"], {"b": "bee"}) == ["a", "bee"]


def test_head_is_cosine_similarity_over_temperature() -> None:
    rng = np.random.default_rng(0)
    labels = rng.normal(size=(3, 8)).astype(np.float32)
    x = rng.normal(size=(5, 8)).astype(np.float32)
    head = zero_shot_head(labels)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(head.logits(x), unit(x) @ unit(labels).T / TEMPERATURE, rtol=1e-5, atol=1e-5)
    assert head.strategy == STRATEGY and head.num_classes == 3


def test_a_label_is_the_mean_of_its_words_in_every_template() -> None:
    asked: list[str] = []
    rng = np.random.default_rng(1)
    table: dict[str, np.ndarray] = {}

    def embed(sentences: list[str]) -> dict[str, np.ndarray]:  # a fixed vector per sentence, any length
        asked.extend(sentences)
        rows = np.stack([table.setdefault(t, rng.normal(size=6) * rng.uniform(0.5, 3)) for t in sentences])
        return {"last": rows, "last-1": 2 * rows}

    words = ["sports", "a question about a person"]
    got = label_embeddings(embed, words)
    assert asked == [t.format(w) for w in words for t in TEMPLATES]
    assert len(TEMPLATES) >= 3 and all(t.count("{}") == 1 for t in TEMPLATES)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    for i, w in enumerate(words):
        # the sentence embedding: cosine space, normalised before and after; other taps: the plain mean
        want = unit(np.mean([unit(table[t.format(w)]) for t in TEMPLATES], axis=0))
        np.testing.assert_allclose(got["last"][i], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["last-1"][i], np.mean([2 * table[t.format(w)] for t in TEMPLATES], axis=0),
                                   rtol=1e-5, atol=1e-5)


def test_created_with_descriptions_only_is_ready_and_sensible(client) -> None:
    stub = client.stub
    task_id = unique_id("zs")
    task = stub.CreateTask(pb.CreateTaskRequest(
        task_id=task_id, backbone="minilm-l6", labels=list(DESCRIPTIONS),
        config=pb.TrainingConfig(label_descriptions=DESCRIPTIONS)), timeout=60)
    assert task.state == pb.Task.READY and task.version == 1 and task.num_examples == 0
    ev = task.evaluation
    assert ev.strategy == STRATEGY and ev.validation_method == VALIDATION
    assert ev.num_examples == 0 and ev.validation_accuracy == 0.0 and ev.temperature == pytest.approx(TEMPERATURE)
    assert any(VALIDATION in w for w in ev.warnings)
    details = json.loads(ev.details_json)
    assert details["label_text"]["texts"] == DESCRIPTIONS and details["label_text"]["described"] == 3
    assert details["label_text"]["templates"] == list(TEMPLATES)
    # Its job is a finished one, like every version's.
    job = client.wait_ready(task_id, timeout=30)
    assert job.state == pb.Job.SUCCEEDED and job.version == 1

    texts = [t for label in PROBES for t in PROBES[label]]
    want = [label for label in PROBES for _ in PROBES[label]]
    got = predict(stub, task_id, texts)
    assert [p.label for p in got] == want
    assert all(0.34 < p.score <= 1 and p.top[0].label == p.label for p in got)

    # The exported head is the served one: an ONNX graph over the trunk's features.
    data = b"".join(c.data for c in stub.ExportTask(pb.ExportTaskRequest(task_id=task_id), timeout=60))
    model = onnx.load_from_string(data)
    assert [i.name for i in model.graph.input] == ["features"]
    assert {p.key: p.value for p in model.metadata_props}["strategy"] == STRATEGY


def test_labels_spelled_two_ways_are_named_in_the_warnings(client) -> None:
    task = client.stub.CreateTask(pb.CreateTaskRequest(task_id=unique_id("zs-alike"), backbone="minilm-l6",
                                                       labels=["Sports", "sports ", "cooking"]), timeout=60)
    assert task.state == pb.Task.READY
    assert [w for w in task.evaluation.warnings if w.startswith("look-alike")] == [
        "look-alike labels: 'Sports' and 'sports ' differ only in case, spacing or Unicode form, and are separate "
        "labels; use one spelling if they mean the same"]


def test_plain_label_names_are_enough(client) -> None:
    task_id = unique_id("zs-names")
    task = client.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="minilm-l6",
                                                       labels=["sports", "cooking"]), timeout=60)
    assert task.state == pb.Task.READY and task.evaluation.strategy == STRATEGY
    got = predict(client.stub, task_id, PROBES["sports"] + PROBES["cooking"])
    assert [p.label for p in got] == ["sports"] * 2 + ["cooking"] * 2


def test_adding_examples_and_training_replaces_the_zero_shot_head(client) -> None:
    stub = client.stub
    task_id = unique_id("zs-train")
    task = stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="minilm-l6", labels=list(TOPICS),
                                                config=pb.TrainingConfig(label_descriptions=DESCRIPTIONS)),
                           timeout=60)
    assert task.state == pb.Task.READY and task.version == 1
    resp = stub.AddExamples(iter([pb.AddExamplesRequest(task_id=task_id, examples=text_examples())]), timeout=60)
    assert resp.added == 24
    # Adding examples alone keeps serving the zero-shot head.
    assert stub.GetTask(pb.GetTaskRequest(task_id=task_id)).evaluation.strategy == STRATEGY
    stub.TrainTask(pb.TrainTaskRequest(task_id=task_id), timeout=60)
    job = client.wait_ready(task_id, timeout=600)  # a busy shared machine can queue the job for minutes
    assert job.state == pb.Job.SUCCEEDED and job.version == 2, job.error
    task = stub.GetTask(pb.GetTaskRequest(task_id=task_id))
    assert task.version == 2 and task.evaluation.strategy != STRATEGY
    assert task.evaluation.validation_method != VALIDATION and task.evaluation.num_examples == 24
    held = [t for label in HELD_OUT for t in HELD_OUT[label]]
    want = [label for label in HELD_OUT for _ in HELD_OUT[label]]
    got = [p.label for p in predict(stub, task_id, held)]
    assert np.mean([g == w for g, w in zip(got, want)]) >= 0.9


def test_opting_out_or_wordless_labels_stay_pending(client) -> None:
    stub = client.stub
    off = stub.CreateTask(pb.CreateTaskRequest(task_id=unique_id("zs-off"), backbone="minilm-l6",
                                               labels=["sports", "cooking"],
                                               config=pb.TrainingConfig(label_text=pb.LABEL_TEXT_OFF)), timeout=60)
    assert off.state == pb.Task.PENDING and off.version == 0
    wordless = stub.CreateTask(pb.CreateTaskRequest(task_id=unique_id("zs-ab"), backbone="minilm-l6",
                                                    labels=["0", "1"]), timeout=60)
    assert wordless.state == pb.Task.PENDING and wordless.version == 0
    # No labels at all: as before, a task waiting for examples.
    bare = stub.CreateTask(pb.CreateTaskRequest(task_id=unique_id("zs-bare"), backbone="minilm-l6"), timeout=60)
    assert bare.state == pb.Task.PENDING


def test_image_tasks_are_not_zero_shot(client) -> None:
    task = client.stub.CreateTask(pb.CreateTaskRequest(task_id=unique_id("zs-img"), backbone="mobilenet_v3_small",
                                                       labels=["red", "blue"]), timeout=60)
    assert task.state == pb.Task.PENDING and task.version == 0


def test_bad_descriptions_are_refused_and_nothing_is_created(client) -> None:
    task_id = unique_id("zs-bad")
    with pytest.raises(grpc.RpcError) as err:
        client.stub.CreateTask(pb.CreateTaskRequest(
            task_id=task_id, backbone="minilm-l6", labels=["sports", "cooking"],
            config=pb.TrainingConfig(label_descriptions={"gardening": "plants"})), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "gardening" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.stub.GetTask(pb.GetTaskRequest(task_id=task_id), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
