"""Turns raw inputs into the tensors a trunk expects, exactly as its weights were trained.

Text: the backbone's own tokenizer (padding to the longest in the batch, truncation at max_length).
Images: decode (JPEG/PNG/WebP/...; a large one at reduced scale, see DECODE_MARGIN), upright by its EXIF
orientation, RGB, resize of the shorter side, centre crop, scale to [0, 1], normalise with the weights'
mean/std; torchvision's functional transforms on PIL images.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np
from PIL import ExifTags, Image

from adapters.errors import InvalidInput

Modality = Literal["text", "image"]
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class InputLimits:
    """Bounds every input is checked against before it reaches a model."""

    max_text_length: int = 20_000
    max_image_pixels: int = 40_000_000
    # Long side over short side. The most elongated pictures people send are long receipt or strip scans
    # (an 80 mm till roll photographed or scanned at 1-2 m: 15-30:1), stitched phone panoramas (up to
    # ~10:1) and web banners (970x90, ~11:1). Past 50:1 an image is a line or a sprite strip whose centre
    # crop shows under 2% of it; a 1x12000 PNG of ~100 bytes is one of those.
    max_image_aspect_ratio: float = 50.0

    def __post_init__(self) -> None:
        if self.max_image_aspect_ratio < 1:
            raise ValueError(f"max_image_aspect_ratio must be at least 1, got {self.max_image_aspect_ratio}")


class Preprocessor(Protocol):
    modality: Modality
    input_names: tuple[str, ...]

    def __call__(self, items: Sequence[str | bytes]) -> Batch: ...

    def check(self, items: Sequence[str | bytes]) -> None:
        """Raises InvalidInput for the first input that preprocessing would reject."""

    def describe(self) -> dict: ...


def _check_modality(items: Sequence[str | bytes], modality: Modality) -> None:
    want = str if modality == "text" else bytes
    for i, item in enumerate(items):
        if not isinstance(item, want):
            got = "text" if isinstance(item, str) else "image"
            raise InvalidInput(
                f"input {i} is {got}, but this backbone takes {modality} inputs; "
                f"send {'Input.text' if modality == 'text' else 'Input.image'}"
            )


class TextPreprocessor:
    """Tokenises into int64 input_ids and attention_mask, padded to the batch's longest member and cut at
    max_length tokens, with the fast tokenizer (`tokenizers`) that a Hugging Face tokenizer wraps: the
    same ids as calling that tokenizer with padding=True, truncation=True, without its Python layer."""

    modality: Modality = "text"
    input_names = ("input_ids", "attention_mask")

    def __init__(self, tokenizer, max_length: int, limits: InputLimits = InputLimits()) -> None:
        """tokenizer: a Hugging Face fast tokenizer (transformers), whose padding token is used."""
        from tokenizers import Tokenizer

        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer (no backend_tokenizer)")
        own = Tokenizer.from_str(backend.to_str())  # a copy: its padding and truncation are ours to set
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        own.enable_padding(pad_id=pad_id, pad_token=tokenizer.pad_token or "[PAD]")
        self._init(own, type(tokenizer).__name__, max_length, limits)

    @classmethod
    def from_record(cls, record: dict, max_length: int, limits: InputLimits = InputLimits()) -> TextPreprocessor:
        """The preprocessor that `record()` describes, without transformers."""
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(record["tokenizer"])
        if tokenizer.padding is None:
            raise ValueError("the recorded tokenizer does not pad")
        pre = cls.__new__(cls)
        pre._init(tokenizer, str(record["tokenizer_class"]), max_length, limits)
        return pre

    def _init(self, tokenizer, name: str, max_length: int, limits: InputLimits) -> None:
        tokenizer.enable_truncation(max_length)
        self.tokenizer = tokenizer
        self.tokenizer_class = name
        self.max_length = max_length
        self.limits = limits

    def record(self) -> dict:
        """What `from_record` rebuilds this preprocessor from (JSON)."""
        return {"tokenizer": self.tokenizer.to_str(), "tokenizer_class": self.tokenizer_class}

    def validate(self, items: Sequence[str | bytes]) -> None:
        _check_modality(items, "text")
        for i, text in enumerate(items):
            if not text.strip():
                raise InvalidInput(f"input {i}: text is empty; send at least one non-blank character")
            if len(text) > self.limits.max_text_length:
                raise InvalidInput(
                    f"input {i}: text has {len(text)} characters, more than the limit of "
                    f"{self.limits.max_text_length}"
                )

    check = validate

    def __call__(self, items: Sequence[str | bytes]) -> Batch:
        self.validate(items)
        encodings = self.tokenizer.encode_batch(list(items))
        return {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64)}

    def describe(self) -> dict:
        return {
            "modality": "text",
            "tokenizer": self.tokenizer_class,
            "max_length": self.max_length,
            "inputs": list(self.input_names),
            "pooling": "mean over attention_mask, then L2 normalisation",
        }


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """Resize of the shorter side, centre crop, normalise: the ImageNet evaluation transform."""

    image_size: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"


IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")  # nothing else is parsed (no EPS, no plugins)
# A large image is decoded at reduced scale (JPEG's DCT scaling, then Image.reduce) down to no less than
# this many times the shorter side the transform resizes to. Pillow's docs for `reducing_gap`: from 3 on,
# the two-step result "is indistinguishable from fair resampling in most cases"; and an image under
# 3 x 256 = 768 px on its shorter side (most web images) is decoded and resized exactly as in training.
# Measured on a 6000x4000 photo (JPEG and PNG): at most one grey level from the full decode, 0.14 on average.
DECODE_MARGIN = 3
# EXIF orientation -> the transpose that shows the image upright (the table of ImageOps.exif_transpose).
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _check_size(size: tuple[int, int], index: int, limits: InputLimits) -> None:
    """Refuses, from the header alone, an image whose pixels or shape are past the limits."""
    width, height = size
    if width * height > limits.max_image_pixels:
        raise InvalidInput(f"input {index}: image is {width}x{height}, more than the limit of "
                           f"{limits.max_image_pixels} pixels")
    short, long = sorted((width, height))
    if short < 1 or long > limits.max_image_aspect_ratio * short:
        raise InvalidInput(
            f"input {index}: image is {width}x{height}, more elongated than the limit of "
            f"{limits.max_image_aspect_ratio:g}:1 (long side : short side); crop or pad it"
        )


def _orientation(img: Image.Image) -> Image.Transpose | None:
    """The transpose that EXIF's Orientation tag asks for; None when there is none or it cannot be read.

    Only that one tag is read. ImageOps.exif_transpose also rewrites the rest of the EXIF block, and phone
    photos whose XResolution or ResolutionUnit is typed as text make that raise (TypeError, struct.error):
    a photo must never fail for its metadata, so any failure here means "as stored"."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation)
    except Exception:  # noqa: BLE001 - any EXIF parser failure: keep the pixels as stored
        return None
    return ORIENTATIONS.get(value) if isinstance(value, int) else None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I") or img.mode == "F":
        # 16-bit (and 32-bit) greyscale: PIL's RGB conversion clips at 255; scale to 8 bits instead.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max() > 255:
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def decode_image(
    data: bytes, index: int, limits: InputLimits = InputLimits(), shorter_side: int = 0
) -> Image.Image:
    """Decodes an encoded image file into upright RGB, or raises InvalidInput naming the input.

    Bounded before it allocates: the header's size is checked against `limits` before a pixel is decoded,
    and only the first frame of an animation is read. With `shorter_side` (what the caller will resize the
    shorter side to), a larger image is decoded at reduced scale, down to DECODE_MARGIN x that side: a
    6000x4000 JPEG costs a 1500x1000 decode instead of 72 MB of pixels.
    Corrupt bytes make Pillow's decoders raise a long tail of exception types (OSError, SyntaxError,
    struct.error, EOFError, IndexError, ZeroDivisionError, ...); they are all the caller's bad input, so
    they all become InvalidInput, whose message names the type but never echoes the bytes.
    """
    if not data:
        raise InvalidInput(f"input {index}: image is empty; send the bytes of a JPEG, PNG or WebP file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Tag data larger than file"...: callers could flood the log
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            _check_size(img.size, index, limits)
            margin = DECODE_MARGIN * shorter_side
            if margin:
                img.draft(None, (margin, margin))  # JPEG: DCT scaling by 1/2, 1/4 or 1/8; others ignore it
            img.load()
            orientation = _orientation(img)
            img = _to_rgb(img)
            factor = min(img.size) // margin if margin else 1
            if factor >= 2:
                img = img.reduce(factor)
            if orientation is not None:
                img = img.transpose(orientation)  # phone photos: upright, as the user sees them
    except InvalidInput:
        raise
    except MemoryError:  # the server's state, not the input's fault
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own check, in Image.open, of headers past MAX_IMAGE_PIXELS (89 million).
        limit = min(limits.max_image_pixels, Image.MAX_IMAGE_PIXELS or limits.max_image_pixels)
        raise InvalidInput(f"input {index}: image has more pixels than the limit of {limit}") from None
    except Exception as exc:  # noqa: BLE001 - see the docstring: every decoder failure is the input's
        raise InvalidInput(
            f"input {index}: image bytes could not be decoded ({type(exc).__name__}); "
            "send a complete JPEG, PNG, WebP, BMP or GIF file"
        ) from None
    return img


class ImagePreprocessor:
    """Decodes and transforms images into a float32 NCHW `pixel_values` batch."""

    modality: Modality = "image"
    input_names = ("pixel_values",)

    def __init__(self, transform: ImageTransform, limits: InputLimits = InputLimits()) -> None:
        from torchvision.transforms import InterpolationMode

        self.transform = transform
        self.limits = limits
        self._interpolation = InterpolationMode(transform.interpolation)
        # Normalisation as a table: channel c's value for each 8-bit level v, (v - 255 mean_c) / (255 std_c)
        # in float32, the same arithmetic as on the float array, so the same bits; a lookup per pixel costs
        # half of the subtract-and-multiply over a strided CHW view (0.30 against 0.65 ms at 224x224).
        mean = np.asarray(transform.mean, dtype=np.float32) * np.float32(255.0)
        scale = 1.0 / (255.0 * np.asarray(transform.std, dtype=np.float32))
        self._levels = ((np.arange(256, dtype=np.float32)[:, None] - mean) * scale).T.copy()  # 3 x 256

    def decode(self, data: bytes, index: int) -> Image.Image:
        """One encoded image -> upright RGB, at no more resolution than the transform can use."""
        return decode_image(data, index, self.limits, self.transform.resize)

    def check(self, items: Sequence[str | bytes]) -> None:
        _check_modality(items, "image")
        for i, data in enumerate(items):
            self.decode(data, i)

    def to_array(self, img: Image.Image) -> np.ndarray:
        """One decoded RGB image -> normalised CHW float32.

        The resize before the crop costs as much as its long side; the aspect-ratio limit is what bounds
        it (at 50:1 and a shorter side of 256, 256x12800 pixels: 9.8 MB, not the 256x3,072,000 a 1x12000
        strip asked for)."""
        from torchvision.transforms import functional as F

        t = self.transform
        img = F.resize(img, [t.resize], interpolation=self._interpolation)
        img = F.center_crop(img, [t.image_size, t.image_size])
        return self.normalised(img)

    def normalised(self, img: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
        """An RGB image (HxW) -> normalised CHW float32, written into `out` when given."""
        hwc = np.asarray(img)
        if out is None:
            out = np.empty((3, *hwc.shape[:2]), np.float32)
        for c in range(3):
            np.take(self._levels[c], hwc[:, :, c], out=out[c])
        return out

    def __call__(self, items: Sequence[str | bytes]) -> Batch:
        _check_modality(items, "image")
        size = self.transform.image_size
        batch = np.empty((len(items), 3, size, size), np.float32)
        for i, data in enumerate(items):
            batch[i] = self.to_array(self.decode(data, i))
        return {"pixel_values": batch}

    def augmented(self, items: Sequence[bytes], views: int, seed: int = 0) -> tuple[Batch, np.ndarray]:
        """`views` random views of each image (random resized crop, horizontal flip, colour jitter),
        normalised like the evaluation transform; returns the batch and each view's item index."""
        import torch
        from torchvision.transforms import v2

        t = self.transform
        augment = v2.Compose([
            v2.RandomResizedCrop(t.image_size, scale=(0.5, 1.0), interpolation=self._interpolation, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05),
        ])
        torch.manual_seed(seed)
        arrays, origin = [], []
        for i, data in enumerate(items):
            img = self.decode(data, i)
            for _ in range(views):
                arrays.append(self.normalised(augment(img)))
                origin.append(i)
        shape = (0, 3, t.image_size, t.image_size)
        batch = np.ascontiguousarray(np.stack(arrays)) if arrays else np.zeros(shape, np.float32)
        return {"pixel_values": batch}, np.asarray(origin, dtype=np.int64)

    def describe(self) -> dict:
        return {"modality": "image", "inputs": list(self.input_names), **dataclasses.asdict(self.transform),
                "layout": "NCHW float32, RGB, pixels/255 then (x-mean)/std"}


def describe_json(pre: Preprocessor) -> str:
    return json.dumps(pre.describe(), sort_keys=True)
