"""Turns raw inputs into the tensors a trunk expects, exactly as its weights were trained.

Text: the backbone's own tokenizer (padding to the longest in the batch, truncation at max_length).
Images: decode (JPEG/PNG/WebP/...), RGB, resize of the shorter side, centre crop, scale to [0, 1],
normalise with the weights' mean/std; torchvision's functional transforms on PIL images.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from adapters.errors import InvalidInput

Modality = Literal["text", "image"]
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class InputLimits:
    """Bounds every input is checked against before it reaches a model."""

    max_text_length: int = 20_000
    max_image_pixels: int = 40_000_000


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
    """Tokenises with a Hugging Face tokenizer into int64 input_ids and attention_mask."""

    modality: Modality = "text"
    input_names = ("input_ids", "attention_mask")

    def __init__(self, tokenizer, max_length: int, limits: InputLimits = InputLimits()) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.limits = limits

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
        enc = self.tokenizer(
            list(items), padding=True, truncation=True, max_length=self.max_length, return_tensors="np"
        )
        return {name: np.ascontiguousarray(enc[name], dtype=np.int64) for name in self.input_names}

    def describe(self) -> dict:
        return {
            "modality": "text",
            "tokenizer": type(self.tokenizer).__name__,
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


def decode_image(data: bytes, index: int, max_pixels: int) -> Image.Image:
    """Decodes an encoded image file into RGB, or raises InvalidInput naming the input."""
    if not data:
        raise InvalidInput(f"input {index}: image is empty; send the bytes of a JPEG, PNG or WebP file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = img.size
            if width * height > max_pixels:
                raise InvalidInput(
                    f"input {index}: image is {width}x{height}, more than the limit of {max_pixels} pixels"
                )
            img.load()
            img = ImageOps.exif_transpose(img)  # phone photos: upright, as the user sees them
    except InvalidInput:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise InvalidInput(
            f"input {index}: image bytes could not be decoded ({type(exc).__name__}); "
            "send a complete JPEG, PNG, WebP, BMP or GIF file"
        ) from None
    if img.mode.startswith("I") or img.mode == "F":
        # 16-bit (and 32-bit) greyscale: PIL's RGB conversion clips at 255; scale to 8 bits instead.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max() > 255:
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


class ImagePreprocessor:
    """Decodes and transforms images into a float32 NCHW `pixel_values` batch."""

    modality: Modality = "image"
    input_names = ("pixel_values",)

    def __init__(self, transform: ImageTransform, limits: InputLimits = InputLimits()) -> None:
        from torchvision.transforms import InterpolationMode

        self.transform = transform
        self.limits = limits
        self._interpolation = InterpolationMode(transform.interpolation)
        self._mean = np.asarray(transform.mean, dtype=np.float32).reshape(3, 1, 1)
        self._scale = (1.0 / (255.0 * np.asarray(transform.std, dtype=np.float32))).reshape(3, 1, 1)

    def check(self, items: Sequence[str | bytes]) -> None:
        _check_modality(items, "image")
        for i, data in enumerate(items):
            decode_image(data, i, self.limits.max_image_pixels)

    def to_array(self, img: Image.Image) -> np.ndarray:
        """One decoded RGB image -> normalised CHW float32."""
        from torchvision.transforms import functional as F

        t = self.transform
        img = F.resize(img, [t.resize], interpolation=self._interpolation)
        img = F.center_crop(img, [t.image_size, t.image_size])
        chw = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
        return (chw - self._mean * 255.0) * self._scale

    def __call__(self, items: Sequence[str | bytes]) -> Batch:
        _check_modality(items, "image")
        arrays = [self.to_array(decode_image(data, i, self.limits.max_image_pixels)) for i, data in enumerate(items)]
        return {"pixel_values": np.ascontiguousarray(np.stack(arrays))}

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
            img = decode_image(data, i, self.limits.max_image_pixels)
            for _ in range(views):
                chw = np.asarray(augment(img), dtype=np.float32).transpose(2, 0, 1)
                arrays.append((chw - self._mean * 255.0) * self._scale)
                origin.append(i)
        shape = (0, 3, t.image_size, t.image_size)
        batch = np.ascontiguousarray(np.stack(arrays)) if arrays else np.zeros(shape, np.float32)
        return {"pixel_values": batch}, np.asarray(origin, dtype=np.int64)

    def describe(self) -> dict:
        return {"modality": "image", "inputs": list(self.input_names), **dataclasses.asdict(self.transform),
                "layout": "NCHW float32, RGB, pixels/255 then (x-mean)/std"}


def describe_json(pre: Preprocessor) -> str:
    return json.dumps(pre.describe(), sort_keys=True)
