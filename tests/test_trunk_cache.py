"""The trunk ONNX cache is shared by servers and data directories: one export per (weights, exporter,
precision), written atomically, and a damaged file is exported again, never trusted."""

from __future__ import annotations

import json
import logging
import pathlib
import threading

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from adapters import runtime
from adapters.runtime import TrunkCacheFile, TrunkRuntime
from service.config import Settings
from service.gen import headserve_pb2 as pb
from service.gen import headserve_pb2_grpc as pb_grpc
from service.registry import BackboneRegistry
from service.server import build_server


class StandIn:
    """What TrunkCacheFile needs of a backbone: a name, a weights digest and an exporter (a one-node ONNX
    model), counting its exports."""

    def __init__(self, digest: str = "d1") -> None:
        self.name = "standin"
        self.digest = digest
        self.exports = 0
        self._lock = threading.Lock()

    def export_onnx(self, path: pathlib.Path) -> None:
        with self._lock:
            self.exports += 1
        node = helper.make_node("Identity", ["x"], ["features"])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                                  [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 4])])
        onnx.save(helper.make_model(graph), str(path))


def passes(path: pathlib.Path) -> float:
    """The stand-in's check (there is no torch trunk to compare it with): it passes, with parity 0."""
    return 0.0


def test_export_once_then_trusted(tmp_path):
    b = StandIn()
    first = TrunkCacheFile(b, tmp_path, "fp32")
    assert not first.trusted()
    first.export(passes)
    again = TrunkCacheFile(b, tmp_path, "fp32")
    assert again.path == first.path and again.trusted()
    assert b.exports == 1
    meta = json.loads(first.sidecar.read_text())
    assert meta["key"]["weights"] == "d1" and meta["key"]["precision"] == "fp32"
    assert {"torch", "onnx", "onnxruntime", "export_version"} <= set(meta["key"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.path.name, first.sidecar.name])  # no temps


@pytest.mark.parametrize("change", ["weights", "precision", "export_version"])
def test_changed_key_is_another_file(tmp_path, monkeypatch, change):
    b = StandIn()
    old = TrunkCacheFile(b, tmp_path, "fp32")
    old.export(passes)
    if change == "weights":
        b.digest = "d2"
    elif change == "export_version":
        monkeypatch.setattr(runtime, "EXPORT_VERSION", runtime.EXPORT_VERSION + 1)
    new = TrunkCacheFile(b, tmp_path, "int8" if change == "precision" else "fp32")
    assert new.path != old.path
    assert not new.trusted()


@pytest.mark.parametrize("damage", ["flip", "truncate", "sidecar", "no-sidecar", "other-key"])
def test_damaged_file_is_not_trusted(tmp_path, caplog, damage):
    b = StandIn()
    f = TrunkCacheFile(b, tmp_path, "fp32")
    f.export(passes)
    data = f.path.read_bytes()
    if damage == "flip":
        f.path.write_bytes(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:])
    elif damage == "truncate":
        f.path.write_bytes(data[: len(data) // 2])
    elif damage == "sidecar":
        f.sidecar.write_text("{not json")
    elif damage == "no-sidecar":
        f.sidecar.unlink()
    else:
        meta = json.loads(f.sidecar.read_text())
        meta["key"]["torch"] = "0.0"
        f.sidecar.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="adapters.runtime"):
        assert not TrunkCacheFile(b, tmp_path, "fp32").trusted()
    assert "exporting it again" in caplog.text
    f.export(passes)
    assert TrunkCacheFile(b, tmp_path, "fp32").trusted()


def test_a_file_that_fails_its_check_is_never_moved_in(tmp_path):
    b = StandIn()
    f = TrunkCacheFile(b, tmp_path, "fp32")

    def disagrees(path):
        assert path.is_file() and path != f.path  # checked where it was written, before it is moved in
        raise RuntimeError("ONNX trunk disagrees with torch")

    with pytest.raises(RuntimeError, match="disagrees"):
        f.export(disagrees)
    assert list(tmp_path.iterdir()) == [] and not TrunkCacheFile(b, tmp_path, "fp32").trusted()
    assert f.export(lambda path: 2.5e-7) == 2.5e-7
    again = TrunkCacheFile(b, tmp_path, "fp32")
    assert again.trusted() and again.parity == 2.5e-7


def test_a_file_without_a_recorded_check_is_not_trusted(tmp_path):
    b = StandIn()
    f = TrunkCacheFile(b, tmp_path, "fp32")
    f.export(passes)
    meta = json.loads(f.sidecar.read_text())
    del meta["parity"]  # as written by a version that checked parity at every start instead
    f.sidecar.write_text(json.dumps(meta))
    assert not TrunkCacheFile(b, tmp_path, "fp32").trusted()


def test_concurrent_writers_leave_one_intact_file(tmp_path):
    b = StandIn()
    files = [TrunkCacheFile(b, tmp_path, "fp32") for _ in range(6)]
    errors = []

    def write(f):
        try:
            f.export(passes)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(f,)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert TrunkCacheFile(b, tmp_path, "fp32").trusted()
    assert len(list(tmp_path.glob("*.onnx"))) == 1 and not list(tmp_path.glob(".*"))


def _settings(data_dir, cache_dir, **overrides) -> Settings:
    return Settings.load(**{**dict(address="127.0.0.1:0", data_dir=data_dir, builtin_backbones=["minilm-l6"],
                                   log_level="WARNING", trunk_cache_dir=cache_dir), **overrides})


@pytest.mark.slow
def test_two_servers_with_their_own_data_dirs_share_one_export(tmp_path, caplog):
    cache = tmp_path / "trunks"
    with caplog.at_level(logging.INFO, logger="adapters.runtime"):
        first = build_server(_settings(tmp_path / "a", cache))
        try:
            second = build_server(_settings(tmp_path / "b", cache))
            try:
                for running in (first, second):
                    with grpc.insecure_channel(running.address) as channel:
                        names = [b.name for b in pb_grpc.HeadServeStub(channel).ListBackbones(
                            pb.ListBackbonesRequest(), timeout=30).backbones if b.available]
                    assert names == ["minilm-l6"]
            finally:
                second.stop()
        finally:
            first.stop()
    assert caplog.text.count("exporting trunk minilm-l6") == 1
    assert len(list(cache.glob("minilm-l6-fp32-*.onnx"))) == 1
    assert not (tmp_path / "a" / "trunks").exists() and not (tmp_path / "b" / "trunks").exists()


@pytest.mark.slow
def test_corrupt_cached_trunk_is_exported_again_at_start(tmp_path, caplog):
    cache = tmp_path / "trunks"
    registry = BackboneRegistry.load(_settings(tmp_path / "a", cache))
    trunk: TrunkRuntime = registry.get("minilm-l6").trunk
    expected = trunk.embed(["a sentence to compare"])
    data = bytearray(trunk.path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # zero some weights
    trunk.path.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="adapters.runtime"):
        again = BackboneRegistry.load(_settings(tmp_path / "b", cache)).get("minilm-l6").trunk
    assert "does not match its checksum" in caplog.text and "exporting trunk minilm-l6" in caplog.text
    np.testing.assert_allclose(again.embed(["a sentence to compare"]), expected, atol=1e-5)
    assert TrunkCacheFile(again.backbone, cache, "fp32").trusted()


@pytest.mark.parametrize("spinning", [True, False])
def test_trunk_threads_busy_wait_only_while_a_pass_runs(tmp_path, spinning):
    """`trunk_spinning = true`: the trunk's intra-op threads busy-wait between operators during a pass and stop
    when it ends (onnxruntime's default keeps them spinning after it, taking the cores the RPC threads
    need); off (the default), they never busy-wait."""
    from conftest import TINY_TEXT, make_settings

    settings = make_settings(tmp_path, builtin_backbones=[], **({"trunk_spinning": True} if spinning else {}))
    assert settings.trunk_spinning is spinning
    options = BackboneRegistry.load(settings).get(TINY_TEXT).trunk.session.get_session_options()

    def entry(key: str) -> str | None:
        try:
            return options.get_session_config_entry(key)
        except RuntimeError:  # not set: onnxruntime's default
            return None

    if spinning:
        assert entry("session.intra_op.allow_spinning") in (None, "1")
        assert entry("session.force_spinning_stop") == "1"
    else:
        assert entry("session.intra_op.allow_spinning") == "0"


class _CountingSession:
    """The trunk's whole session, counting the passes asked of it."""

    def __init__(self, session) -> None:
        self.session = session
        self.runs = 0

    def run(self, names, feeds):
        self.runs += 1
        return self.session.run(names, feeds)


def test_a_batch_that_reads_early_outputs_only_runs_the_trunk_cut_after_them(tmp_path):
    """A tuned text head reads the embedding output (blocks_6) alone: once the cut trunk is made (on a
    thread of its own, at the first such batch), those batches run the embeddings only, with the same values
    as the whole trunk; batches that need the features still run the whole trunk; a cut that would keep
    most of the trunk is not made."""
    import time

    from conftest import TINY_TEXT, make_settings

    from adapters.backbones import MAX_UNFREEZE

    trunk = BackboneRegistry.load(make_settings(tmp_path, builtin_backbones=[])).get(TINY_TEXT).trunk
    batch = trunk.backbone.preprocess(["a few words", "and a longer sentence than the one before it"])
    embeddings = f"blocks_{MAX_UNFREEZE}"
    whole = trunk.session.run([embeddings, "blocks_1"], {k: batch[k] for k in trunk.input_names})

    first = trunk.outputs(batch, [embeddings, "attention_mask"])  # served by the whole trunk; starts the cut
    deadline = time.monotonic() + 60
    while frozenset([embeddings]) not in trunk.cuts_in_use() and time.monotonic() < deadline:
        time.sleep(0.05)
    cut, inputs = trunk._cuts[frozenset([embeddings])]
    assert inputs == ["input_ids"]  # the embeddings do not read the mask
    assert len(cut.get_inputs()) == 1

    trunk.session = counting = _CountingSession(trunk.session)
    second = trunk.outputs(batch, [embeddings, "attention_mask"])
    assert counting.runs == 0
    for got in (first, second):
        np.testing.assert_array_equal(got[embeddings], whole[0])
        np.testing.assert_array_equal(got["attention_mask"], batch["attention_mask"])
    trunk.outputs(batch, ["features", embeddings])
    assert counting.runs == 1

    assert not trunk.cut(["blocks_1"])  # it would keep five of six blocks
    np.testing.assert_array_equal(trunk.outputs(batch, ["blocks_1"])["blocks_1"], whole[1])


def test_trunk_cuts_off_runs_the_whole_trunk_for_every_batch(tmp_path):
    from conftest import TINY_TEXT, make_settings

    from adapters.backbones import MAX_UNFREEZE

    settings = make_settings(tmp_path, builtin_backbones=[], trunk_cuts=False)
    trunk = BackboneRegistry.load(settings).get(TINY_TEXT).trunk
    trunk.session = counting = _CountingSession(trunk.session)
    batch = trunk.backbone.preprocess(["a few words"])
    for _ in range(2):
        trunk.outputs(batch, [f"blocks_{MAX_UNFREEZE}"])
    assert counting.runs == 2 and not trunk._cuts
