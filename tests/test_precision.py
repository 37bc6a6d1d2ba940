"""int8 and tf32 trunks (setting `precision`): parity with fp32, heads served at the precision they were
trained at; tf32 is refused on a CPU (its parity and speed are checked on a GPU, tests/test_gpu.py)."""

from __future__ import annotations

import json

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from pydantic import ValidationError

from adapters.onnx_utils import providers_for
from adapters.runtime import INT8_ATOL
from service.config import Settings
from service.gen import headserve_pb2 as pb
from service.gen import headserve_pb2_grpc as pb_grpc
from service.registry import BackboneRegistry
from service.server import build_server
from tests.conftest import HELD_OUT, text_examples


def _settings(data_dir, **overrides) -> Settings:
    return Settings.load(**{**dict(address="127.0.0.1:0", data_dir=data_dir, builtin_backbones=["minilm-l6"],
                                   log_level="WARNING"), **overrides})


def test_precision_from_env_and_toml(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSERVE_PRECISION", '{"minilm-l6": "int8"}')
    assert Settings.load().precision == {"minilm-l6": "int8"}
    monkeypatch.delenv("HEADSERVE_PRECISION")
    toml = tmp_path / "headserve.toml"
    toml.write_text('[precision]\nminilm-l6 = "int8"\nresnet50 = "fp32"\n')
    assert Settings.load(toml).precision == {"minilm-l6": "int8", "resnet50": "fp32"}
    with pytest.raises(ValidationError, match="fp32"):
        Settings.load(precision={"minilm-l6": "fp16"})


def test_precision_of_a_backbone_not_loaded_is_refused(tmp_path):
    with pytest.raises(ValueError, match="precision names backbone 'resnet18'"):
        BackboneRegistry.load(_settings(tmp_path, precision={"resnet18": "int8"}))


def test_tf32_is_refused_on_a_cpu_and_asks_the_cuda_provider_for_tf32(tmp_path):
    with pytest.raises(ValueError, match="precision tf32 is for CUDA devices.*minilm-l6 runs on cpu"):
        BackboneRegistry.load(_settings(tmp_path, device="cpu", precision={"minilm-l6": "tf32"}))
    assert Settings.load(precision={"minilm-l6": "tf32"}).precision == {"minilm-l6": "tf32"}

    def cuda_options(**kw) -> dict:
        return next(p[1] for p in providers_for("cuda", **kw)
                    if isinstance(p, tuple) and p[0] == "CUDAExecutionProvider")

    if "CUDAExecutionProvider" in ort.get_available_providers():  # onnxruntime-gpu installed (CUDA or not)
        assert cuda_options()["use_tf32"] == 0 and "enable_cuda_graph" not in cuda_options()
        assert cuda_options(tf32=True)["use_tf32"] == 1
        assert cuda_options(cuda_graph=True)["enable_cuda_graph"] == 1


@pytest.mark.slow
def test_int8_trunk_parity_with_fp32(tmp_path):
    fp32 = BackboneRegistry.load(_settings(tmp_path)).get("minilm-l6")
    int8 = BackboneRegistry.load(_settings(tmp_path, precision={"minilm-l6": "int8"})).get("minilm-l6")
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    assert int8.trunk.path != fp32.trunk.path
    assert int8.trunk.parity_diff <= INT8_ATOL
    sentences = [s for texts in HELD_OUT.values() for s in texts]
    a, b = fp32.trunk.embed(sentences), int8.trunk.embed(sentences)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= 0.97, cosine  # measured 0.985-0.995
    # Features are cached per precision, so a head is trained on the features it is served.
    assert int8.trunk_key("last") != fp32.trunk_key("last")
    assert int8.trunk_key("last").endswith(":int8")


def _train(stub, task_id: str) -> pb.Task:
    stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="minilm-l6", examples=text_examples(),
                                         config=pb.TrainingConfig(strategy=pb.LINEAR)), timeout=60)
    last = None
    for job in stub.WatchJob(pb.WatchJobRequest(task_id=task_id), timeout=300):
        last = job
    assert last is not None and last.state == pb.Job.SUCCEEDED, last
    return stub.GetTask(pb.GetTaskRequest(task_id=task_id), timeout=30)


def _predict(stub, task_id: str) -> list[str]:
    inputs = [pb.Input(text=s) for texts in HELD_OUT.values() for s in texts]
    reply = stub.Predict(pb.PredictRequest(task_id=task_id, inputs=inputs), timeout=60)
    return [p.label for p in reply.predictions]


@pytest.mark.slow
def test_head_is_served_at_the_precision_it_was_trained_at(tmp_path):
    data = tmp_path / "data"
    expected = [label for label, texts in HELD_OUT.items() for _ in texts]
    running = build_server(_settings(data))
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.HeadServeStub(channel)
            task = _train(stub, "topics")
            assert json.loads(task.evaluation.details_json)["precision"] == "fp32"
            fp32_labels = _predict(stub, "topics")
    finally:
        running.stop()

    running = build_server(_settings(data, precision={"minilm-l6": "int8"}))
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.HeadServeStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                _predict(stub, "topics")
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "trained on fp32 features" in err.value.details()
            assert "train the task again" in err.value.details()

            stub.TrainTask(pb.TrainTaskRequest(task_id="topics"), timeout=60)
            last = None
            for job in stub.WatchJob(pb.WatchJobRequest(task_id="topics"), timeout=300):
                last = job
            assert last.state == pb.Job.SUCCEEDED, last
            task = stub.GetTask(pb.GetTaskRequest(task_id="topics"), timeout=30)
            assert task.version == 2
            assert json.loads(task.evaluation.details_json)["precision"] == "int8"
            int8_labels = _predict(stub, "topics")
    finally:
        running.stop()
    agree = sum(a == b for a, b in zip(fp32_labels, int8_labels))
    assert agree >= len(expected) - 1, (fp32_labels, int8_labels)
    assert sum(a == b for a, b in zip(int8_labels, expected)) >= len(expected) - 2
