"""Traps a new user met (issue 12), each against a real server: `headserve backbones` in an 80-column
terminal, a finished job's progress line, `train --describe` saying that the descriptions were used, and
exported models that carry what a client needs (version, inputs, preprocessing) in their ONNX metadata."""

from __future__ import annotations

import csv
import io
import json
import pathlib
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from adapters.backbones import TORCHVISION_BUILTINS
from conftest import TOPICS, make_settings, png, unique_id
from service.cli import _job_detail, main
from service.gen import headserve_pb2 as pb
from service.server import build_server


@pytest.fixture(autouse=True)
def _environment(monkeypatch, tenant):
    monkeypatch.setenv("COLUMNS", "80")  # rich sizes its output to this, as to a real terminal
    monkeypatch.setenv("HEADSERVE_API_KEY", tenant.api_key)
    monkeypatch.delenv("HEADSERVE_ADDRESS", raising=False)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def write_topics(path: pathlib.Path, per_label: int = 4) -> pathlib.Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(("text", "label"))
        writer.writerows((text, label) for label, texts in TOPICS.items() for text in texts[:per_label])
    return path


# --- backbones ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def all_builtins(tmp_path_factory):
    """A server with every torchvision built-in but one unavailable (an empty weights folder): the list a
    new user sees before fetching weights."""
    settings = make_settings(tmp_path_factory.mktemp("data"), builtin_backbones=list(TORCHVISION_BUILTINS),
                             weights_dir=tmp_path_factory.mktemp("no-weights"))
    running = build_server(settings.model_copy(update={"backbones": {}}))  # (without the tests' tiny text one)
    yield running
    running.stop()


def test_backbones_fit_an_80_column_terminal_and_show_the_device(all_builtins, capsys):
    status, out, err = run(capsys, "--address", all_builtins.address, "backbones")
    assert status == 0, err
    lines = out.rstrip("\n").splitlines()
    assert all(len(line) <= 80 for line in lines), out
    # One line per backbone, a header, and one line saying where the long reasons are (was ~100 lines).
    assert len(lines) <= len(TORCHVISION_BUILTINS) + 6, out
    cells = [[cell.strip() for cell in line.strip("│").split("│")] for line in lines if line.startswith("│")]
    rows = {row[0]: row for row in cells}
    assert set(rows) == set(TORCHVISION_BUILTINS)
    assert lines[1].split()[1:8:2] == ["backbone", "modality", "dim", "device"], out
    assert rows["mobilenet_v3_small"][1:] == ["image", "576", "cpu", "random (tests only)"]
    assert rows["resnet50"][1:] == ["image", "-", "-", "unavailable: no weights"]
    assert "`headserve backbones --wide`" in out


def test_backbones_wide_and_json_give_the_whole_reason(all_builtins, capsys):
    status, out, _ = run(capsys, "--address", all_builtins.address, "backbones", "--json")
    assert status == 0
    listed = {b["name"]: b for b in json.loads(out)}
    assert listed["mobilenet_v3_small"]["device"] == "cpu" and listed["mobilenet_v3_small"]["available"]
    assert "scripts/fetch_weights.py resnet50" in listed["resnet50"]["unavailable_reason"]
    assert listed["mobilenet_v3_small"]["preprocessing"]["image_size"] == 224
    status, out, _ = run(capsys, "--address", all_builtins.address, "backbones", "--wide")
    assert status == 0 and "fetch_weights.py" in out.replace("\n", "")


# --- a finished job's progress line ------------------------------------------------------------------


def test_a_finished_job_reports_the_epochs_it_ran(server, client, capsys, tmp_path):
    """LBFGS converges in a few iterations of its 100: the job stopped at 'epoch 10/100' (the last
    multiple of ten it reported), and the finished bar said so."""
    task_id = unique_id("epochs")
    status, out, err = run(capsys, "--address", server.address, "create", task_id, "--backbone", "minilm-l6",
                           "--text", str(write_topics(tmp_path / "topics.csv")), "--strategy", "linear")
    assert status == 0, err
    job = client.wait_ready(task_id)
    assert job.state == pb.Job.SUCCEEDED
    assert 0 < job.epoch == job.epochs < 100, (job.epoch, job.epochs)
    assert f"{job.epoch} epochs" in err and "epoch 10/100" not in err
    finished = [line for line in err.splitlines() if line.startswith("done")]
    assert finished and not re.search(r"epoch \d+/\d+", finished[-1]), err


def test_job_detail_of_a_finished_job():
    done = pb.Job(state=pb.Job.SUCCEEDED, epoch=14, epochs=14, loss=0.5)
    assert _job_detail(done).startswith("14 epochs  loss 0.5000")
    assert _job_detail(pb.Job(state=pb.Job.SUCCEEDED, epoch=1, epochs=1)).startswith("1 epoch ")
    stopped = pb.Job(state=pb.Job.SUCCEEDED, epoch=10, epochs=100)
    assert _job_detail(stopped).startswith("stopped at epoch 10 of 100")
    assert _job_detail(pb.Job(state=pb.Job.RUNNING, epoch=10, epochs=100)).startswith("epoch 10/100")


# --- train --describe ----------------------------------------------------------------------------------


def test_train_describe_says_the_descriptions_were_used(server, capsys, tmp_path):
    task_id = unique_id("described")
    data = write_topics(tmp_path / "topics.csv", per_label=3)
    status, _, err = run(capsys, "--address", server.address, "create", task_id, "--backbone", "minilm-l6",
                         "--text", str(data))
    assert status == 0, err
    status, out, err = run(capsys, "--address", server.address, "train", task_id,
                           "--describe", "computing=computers and software")
    assert status == 0, err
    words = " ".join(out.split())  # the line may wrap at 80 columns
    assert re.search(r"label words worth \d+ examples each \(they sort the examples [0-9.]+ of the way "
                     r"from chance\); 1 of 3 labels described \(--describe\), the others by their names",
                     words), out
    status, out, _ = run(capsys, "--address", server.address, "get", task_id)
    assert status == 0 and "1 of 3 labels described" in " ".join(out.split())


# --- exported models -----------------------------------------------------------------------------------


def export(client, task_id: str, fmt) -> tuple[bytes, dict[str, str], dict]:
    chunks = list(client.stub.ExportTask(pb.ExportTaskRequest(task_id=task_id, format=fmt)))
    data = b"".join(c.data for c in chunks)
    props = {p.key: p.value for p in onnx.load_model_from_string(data).metadata_props}
    return data, props, json.loads(chunks[0].metadata_json)


def test_exported_head_names_its_version_task_backbone_labels_and_inputs(client, text_task):
    data, props, meta = export(client, text_task, pb.HEAD_ONNX)
    assert props["version"] == "1" and props["task_id"] == text_task and props["backbone"] == "minilm-l6"
    assert json.loads(props["labels"]) == sorted(TOPICS) == meta["labels"]
    assert props["format"] == "head" and props["output"] == "probabilities"
    inputs = json.loads(props["inputs"])
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert list(inputs) == [i.name for i in session.get_inputs()]
    # AUTO's head reads pooled features of the trunk's last layers (the README names them), in the trunk's order.
    taps = ["features", "features_last_1", "features_last_2", "features_last_3"]
    assert inputs and list(inputs) == [t for t in taps if t in inputs]
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in inputs)
    assert json.loads(props["headserve.preprocessing"])["max_length"] == 256


def test_fused_text_model_records_its_tokenisation(client, text_task):
    _, props, meta = export(client, text_task, pb.FUSED_ONNX)
    assert props["version"] == "1" and props["format"] == "fused"
    pre = json.loads(props["headserve.preprocessing"])
    assert pre["inputs"] == ["input_ids", "attention_mask"] and pre["dtype"] == "int64"
    assert pre == meta["preprocessing"]


def _preprocess_as_documented(image: bytes, pre: dict) -> np.ndarray:
    """An edge client's preprocessing, from the fused model's metadata alone (PIL and numpy, no torch)."""
    assert pre["channel_order"] == "RGB" and pre["input_layout"] == "NCHW" and pre["dtype"] == "float32"
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
    img = Image.open(io.BytesIO(image)).convert("RGB")
    w, h = img.size
    scale = pre["resize"] / min(w, h)
    img = img.resize((max(pre["resize"], int(w * scale)), max(pre["resize"], int(h * scale))),
                     resample[pre["interpolation"]])
    size = pre["image_size"]
    left, top = round((img.width - size) / 2), round((img.height - size) / 2)
    img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, np.float32) / 255.0
    x = (x - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def test_fused_image_model_records_the_preprocessing_it_expects(client, image_task):
    data, props, _ = export(client, image_task, pb.FUSED_ONNX)
    assert props["version"] == "1" and props["task_id"] == image_task
    assert props["backbone"] == "mobilenet_v3_small"
    pre = json.loads(props["headserve.preprocessing"])
    assert (pre["image_size"], pre["resize"], pre["interpolation"]) == (224, 256, "bilinear")
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert pre["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert pre["input_shape"] == ["batch", 3, 224, 224] and pre["inputs"] == ["pixel_values"]
    # Following the metadata gives the server's answer: nothing is left to guess.
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    labels = json.loads(props["labels"])
    images = [png((200, 40, 40), size=(64, 48), noise=20, seed=1), png((40, 60, 210), size=(30, 50), seed=2)]
    for image in images:
        got = session.run(None, {"pixel_values": _preprocess_as_documented(image, pre)})[0][0]
        served = client.stub.Predict(pb.PredictRequest(task_id=image_task, inputs=[pb.Input(image=image)]))
        scores = {s.label: s.score for s in served.predictions[0].top}
        np.testing.assert_allclose(got, [scores[label] for label in labels], atol=1e-4)
