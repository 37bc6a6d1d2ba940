"""On a CUDA device (marker `gpu`; skipped where torch sees none, which is every CI run here): the ONNX trunk
on the CUDA execution provider agrees with torch, its IO binding returns what a plain run returns, its CUDA
graphs replay what the plain session computes (padded batches, concurrent callers), and a server with
device = "cuda" trains (torch on the GPU, fine-tuning included) and serves. bench/gpu_check.sh
runs these on a lent GPU machine."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from adapters.backbones import LoadOptions, builtin_spec, custom_spec, load_backbone
from adapters.preprocessing import ImageTransform
from adapters.runtime import TF32_ATOL, TrunkRuntime
from conftest import TINY_TEXT, Client, image_examples, make_settings, png, text_examples, tiny_text_folder
from service.gen import headserve_pb2 as pb
from service.server import build_server

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)"),
]

SENTENCES = ["a short one", "a rather longer sentence, with more tokens than the first one has", "third"]


def cuda_backbone(kind: str):
    opts = LoadOptions(device="cuda", random_weights=True)
    if kind == "text":
        return load_backbone(custom_spec(TINY_TEXT, "bert", tiny_text_folder(), ImageTransform()), opts)
    return load_backbone(builtin_spec("mobilenet_v3_small"), opts)


def inputs(kind: str) -> list:
    if kind == "text":
        return SENTENCES
    return [png((200, 40, 40), size=(96, 80), noise=20, seed=i) for i in range(3)]


@pytest.mark.parametrize("kind", ["text", "image"])
def test_trunk_on_the_cuda_provider_matches_torch(tmp_path, kind) -> None:
    backbone = cuda_backbone(kind)
    runtime = TrunkRuntime(backbone, tmp_path / "trunks")
    assert runtime.session.get_providers()[0] == "CUDAExecutionProvider", runtime.session.get_providers()
    assert runtime.session.get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == "0"  # IEEE fp32
    batch = backbone.preprocess(inputs(kind))
    assert runtime.parity(batch) < 1e-3
    assert runtime.parity(backbone.preprocess(inputs(kind)[:1])) < 1e-3  # batch 1, another shape


@pytest.mark.parametrize("kind", ["text", "image"])
def test_io_binding_returns_what_a_plain_run_returns(tmp_path, kind) -> None:
    backbone = cuda_backbone(kind)
    runtime = TrunkRuntime(backbone, tmp_path / "trunks")
    assert runtime.io_binding
    batch = backbone.preprocess(inputs(kind))
    feeds = {k: batch[k] for k in runtime.input_names}
    names = ["features", "blocks_1"]
    bound = runtime._run(names, feeds)
    plain = runtime.session.run(names, feeds)
    for a, b in zip(bound, plain):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_cuda_server_trains_on_the_gpu_and_serves(tmp_path) -> None:
    running = build_server(make_settings(tmp_path / "data", with_minilm=False, device="cuda"))
    client = Client(running.address)
    try:
        listed = {b.name: b for b in client.stub.ListBackbones(pb.ListBackbonesRequest(), timeout=30).backbones}
        assert listed[TINY_TEXT].available and listed["mobilenet_v3_small"].available
        assert running.app.registry.device.startswith("cuda")
        client.stub.CreateTask(pb.CreateTaskRequest(
            task_id="gpu-text", backbone=TINY_TEXT, examples=text_examples(),
            config=pb.TrainingConfig(strategy=pb.LINEAR)))
        client.stub.CreateTask(pb.CreateTaskRequest(
            task_id="gpu-tuned", backbone="mobilenet_v3_small", examples=image_examples(),
            config=pb.TrainingConfig(strategy=pb.FINE_TUNE, epochs=2, unfreeze_blocks=2)))
        for task_id in ("gpu-text", "gpu-tuned"):
            job = client.wait_ready(task_id, timeout=600)
            assert job.state == pb.Job.SUCCEEDED, job.error
        text = client.stub.Predict(pb.PredictRequest(
            task_id="gpu-text", inputs=[pb.Input(text=t) for t in SENTENCES]), timeout=60)
        assert len(text.predictions) == 3
        assert all(p.label in {"sports", "cooking", "computing"} for p in text.predictions)
        image = client.stub.Predict(pb.PredictRequest(
            task_id="gpu-tuned", inputs=[pb.Input(image=x) for x in inputs("image")]), timeout=60)
        assert [p.label for p in image.predictions] and all(p.label in {"red", "green", "blue"}
                                                              for p in image.predictions)
        graphs = running.app.registry.get("mobilenet_v3_small").trunk.graphs
        assert graphs is not None and graphs.captured() == [1, 2, 4, 8, 16, 32]
    finally:
        client.close()
        running.stop()


def test_cuda_graphs_replay_what_the_plain_session_computes(tmp_path) -> None:
    backbone = cuda_backbone("image")
    runtime = TrunkRuntime(backbone, tmp_path / "trunks", cuda_graphs=True)
    assert runtime.graphs is not None
    images = [png((40 * (i % 6), 200 - 30 * (i % 5), 90), size=(96, 80), noise=20, seed=i) for i in range(34)]
    names = ["features", "blocks_1"]
    # Sizes in an order that pads (3 -> 4), shrinks after a larger batch (stale rows), and passes the largest
    # graph (34 rows run plain).
    for rows in (1, 3, 1, 8, 2, 9, 34, 3):
        batch = backbone.preprocess(images[:rows])
        replayed = runtime.outputs(batch, names)
        plain = runtime.session.run(names, {"pixel_values": batch["pixel_values"]})
        for name, want in zip(names, plain):
            assert replayed[name].shape == want.shape
            np.testing.assert_allclose(replayed[name], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert runtime.graphs.captured() == [1, 2, 4, 8, 16, 32]  # all captured at load


def test_cuda_graphs_serve_concurrent_batches_each_its_own_rows(tmp_path) -> None:
    backbone = cuda_backbone("image")
    runtime = TrunkRuntime(backbone, tmp_path / "trunks", cuda_graphs=True)
    batches = [backbone.preprocess([png((30 * i, 90, 200 - 20 * i), size=(96, 80), noise=20, seed=i)] * (1 + i % 3))
               for i in range(8)]
    expected = [runtime.session.run(["features"], {"pixel_values": b["pixel_values"]})[0] for b in batches]

    def work(i: int) -> float:
        worst = 0.0
        for _ in range(25):
            got = runtime.features(batches[i])
            worst = max(worst, float(np.abs(got - expected[i]).max() / np.abs(expected[i]).max()))
        return worst

    with ThreadPoolExecutor(4) as pool:
        assert max(pool.map(work, range(8))) < 1e-4
    assert runtime.graphs.captured()


def test_a_tf32_trunk_is_checked_by_direction_and_replays_its_graphs(tmp_path) -> None:
    backbone = cuda_backbone("image")
    fp32 = TrunkRuntime(backbone, tmp_path / "trunks", cuda_graphs=True)
    tf32 = TrunkRuntime(backbone, tmp_path / "trunks", precision="tf32", cuda_graphs=True)
    assert tf32.session.get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == "1"
    assert tf32.graphs.session.get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == "1"
    assert tf32.path != fp32.path and tf32.parity_diff <= TF32_ATOL
    assert tf32.graphs.captured() == [1, 2, 4, 8, 16, 32]
    batch = backbone.preprocess(inputs("image"))
    a, b = fp32.features(batch), tf32.features(batch)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() > 1 - TF32_ATOL
