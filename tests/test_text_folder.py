"""A text encoder saved in a local folder as a backbone ([backbones.NAME] arch = "bert", weights = FOLDER): what
is checked before loading, and the trunk it makes (the suite's tiny-text backbone is one)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from adapters.backbones import BackboneConfigError, LoadOptions, custom_spec, load_backbone
from adapters.preprocessing import ImageTransform
from adapters.runtime import TrunkRuntime
from conftest import TINY_TEXT, tiny_text_folder


def test_a_folder_makes_a_text_spec_with_the_tokenizers_limit() -> None:
    spec = custom_spec(TINY_TEXT, "bert", tiny_text_folder(), ImageTransform())
    assert spec.modality == "text" and spec.weights.kind == "directory" and spec.transform is None
    assert spec.max_length == 512  # MiniLM's tokenizer_config says model_max_length 512


def test_the_arch_must_be_bert_and_match_config_json(tmp_path) -> None:
    with pytest.raises(BackboneConfigError, match="must be one of bert, not 'roberta'"):
        custom_spec("t", "roberta", tiny_text_folder(), ImageTransform())
    folder = tmp_path / "other"
    shutil.copytree(tiny_text_folder(), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "distilbert"}))
    with pytest.raises(BackboneConfigError, match="model_type 'distilbert'"):
        custom_spec("t", "bert", folder, ImageTransform())
    (folder / "config.json").unlink()
    with pytest.raises(BackboneConfigError, match="has no config.json"):
        custom_spec("t", "bert", folder, ImageTransform())


def test_a_folder_without_weights_stops_start_up_naming_it(tmp_path) -> None:
    folder = tmp_path / "empty"
    shutil.copytree(tiny_text_folder(), folder)
    (folder / "model.safetensors").unlink()
    spec = custom_spec("t", "bert", folder, ImageTransform())
    with pytest.raises(BackboneConfigError, match=f"backbone 't': cannot load {folder}"):
        load_backbone(spec, LoadOptions())


def test_the_folder_encoder_exports_and_matches_torch(tmp_path) -> None:
    backbone = load_backbone(custom_spec(TINY_TEXT, "bert", tiny_text_folder(), ImageTransform()), LoadOptions())
    assert backbone.feature_dim == 32 and backbone.weights_source == f"folder:{tiny_text_folder()}"
    runtime = TrunkRuntime(backbone, tmp_path / "trunks")
    batch = backbone.preprocess(["a short one", "a somewhat longer sentence with more tokens in it"])
    assert runtime.parity(batch) < 1e-4
    np.testing.assert_allclose(np.linalg.norm(runtime.features(batch), axis=1), 1.0, rtol=1e-5)
