"""The backbones this server knows: loaded once at start-up, or listed as unavailable with the reason."""

from __future__ import annotations

import dataclasses
import logging

from adapters.backbones import (
    Backbone,
    BackboneSpec,
    BackboneUnavailable,
    LoadOptions,
    TrunkRun,
    builtin_spec,
    custom_spec,
    load_backbone,
)
from adapters.errors import FailedPrecondition, NotFound
from adapters.preprocessing import ImageTransform, InputLimits
from adapters.runtime import TrunkRuntime, default_trunk_cache
from service.config import Settings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Entry:
    spec: BackboneSpec
    backbone: Backbone | None = None
    trunk: TrunkRuntime | None = None
    unavailable_reason: str = ""

    @property
    def available(self) -> bool:
        return self.trunk is not None

    def training_trunk(self) -> TrunkRun:
        """What training jobs run the frozen trunk with. On the CPU that is the serving session: the
        features a head is trained on are then exactly those it is served, and onnxruntime runs the
        trunk several times faster than torch (MobileNetV2, 2 cores: 5x). On a GPU, torch at IEEE fp32,
        unless the trunk serves at another precision (tf32, int8): then its session, for the same reason."""
        assert self.backbone is not None and self.trunk is not None
        if self.backbone.device == "cpu" or self.precision != "fp32":
            return self.trunk.outputs
        return self.backbone.torch_outputs

    @property
    def precision(self) -> str:
        """The trunk's precision: "fp32", "tf32" or "int8" (setting `precision`)."""
        return self.trunk.precision if self.trunk is not None else "fp32"

    def trunk_key(self, tap: str) -> str:
        """Identifies a tap's features in the store: backbone name, weights digest, tap and precision
        (int8 features are not fp32 features: a head is trained on the features it will be served)."""
        assert self.backbone is not None
        return f"{self.spec.name}:{self.backbone.digest}:{tap}:{self.precision}"

    def head_metadata(self) -> dict[str, str]:
        """What a head trained on this trunk records of it (ONNX metadata and evaluation)."""
        assert self.backbone is not None
        return {"backbone": self.spec.name, "backbone_digest": self.backbone.digest, "precision": self.precision}


def resolve_device(setting: str) -> str:
    if setting == "cpu" or (setting == "auto" and not _cuda_driver()):
        return "cpu"  # without the driver torch sees no device either: not importing it saves a second
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device = 'cuda' but torch sees no CUDA device")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def _cuda_driver() -> bool:
    """Whether the CUDA driver library loads (torch.cuda needs it to see any device)."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


class BackboneRegistry:
    def __init__(self, entries: dict[str, Entry], device: str, head_threads: int = 1) -> None:
        self.entries = entries
        self.device = device
        self.head_threads = head_threads  # HeadRuntime's threads for heavy heads (the trunk's setting)

    @classmethod
    def load(cls, settings: Settings) -> BackboneRegistry:
        device = resolve_device(settings.device)
        specs: dict[str, BackboneSpec] = {}
        for name in settings.builtin_backbones:
            try:
                specs[name] = builtin_spec(name)
            except KeyError:
                raise ValueError(f"unknown built-in backbone {name!r} in builtin_backbones") from None
        for name, custom in settings.backbones.items():
            transform = ImageTransform(custom.image_size, custom.resize, custom.mean, custom.std, custom.interpolation)
            specs[name] = custom_spec(name, custom.arch, custom.weights, transform)

        limits = InputLimits(settings.max_text_length, settings.max_image_pixels, settings.max_image_aspect_ratio)
        cache = settings.trunk_cache_dir or default_trunk_cache()
        unknown = sorted(set(settings.precision) - set(specs))
        if unknown:
            raise ValueError(f"precision names backbone {unknown[0]!r}, which this server does not load; "
                             f"loaded: {', '.join(sorted(specs))}")
        entries: dict[str, Entry] = {}
        for name, spec in specs.items():
            opts = LoadOptions(
                torch_home=settings.weights_dir,
                allow_download=settings.allow_download,
                random_weights=name in settings.random_weights,
                device=device,
                limits=limits,
            )
            entry = Entry(spec)
            try:
                entry.backbone = load_backbone(spec, opts, cache)
                entry.trunk = TrunkRuntime(entry.backbone, cache, settings.intra_op_threads,
                                           spinning=settings.trunk_spinning, cuts=settings.trunk_cuts,
                                           tensorrt=settings.tensorrt,
                                           precision=settings.precision.get(name, "fp32"),
                                           cuda_graphs=settings.cuda_graphs)
            except BackboneUnavailable as exc:
                entry.unavailable_reason = exc.message
                log.warning("backbone %s unavailable: %s", name, exc.message)
            entries[name] = entry
        return cls(entries, device, settings.intra_op_threads)

    def get(self, name: str) -> Entry:
        entry = self.entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self.entries)) or "none"
            raise NotFound(f"backbone {name!r} is not known to this server; known: {known}")
        if not entry.available:
            raise FailedPrecondition(entry.unavailable_reason)
        return entry
