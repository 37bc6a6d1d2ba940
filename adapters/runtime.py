"""Serving-time runtimes: the shared trunk and per-task heads, both as onnxruntime sessions."""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from adapters.backbones import FEATURES, Backbone
from adapters.heads import HEAD_INPUT, HEAD_OUTPUT
from adapters.onnx_utils import create_session

log = logging.getLogger(__name__)


class TrunkRuntime:
    """A backbone's trunk exported once to ONNX (cached on disk by weights digest) and served by onnxruntime."""

    def __init__(self, backbone: Backbone, cache_dir: pathlib.Path, threads: int = 0, atol: float = 1e-3) -> None:
        self.backbone = backbone
        self.path = pathlib.Path(cache_dir) / f"{backbone.name}-{backbone.digest}.onnx"
        if not self.path.is_file():
            log.info("exporting trunk %s to %s", backbone.name, self.path)
            backbone.export_onnx(self.path)
        self.session: ort.InferenceSession = create_session(self.path, str(backbone.device), threads)
        self.input_names = backbone.preprocess.input_names
        diff = self.parity(backbone.sample_batch())
        if diff > atol:
            raise RuntimeError(f"ONNX trunk of {backbone.name} disagrees with torch (max |diff| {diff:.2e})")
        log.info("trunk %s ready (%s, torch/onnx max |diff| %.1e)", backbone.name, self.session.get_providers()[0], diff)

    def features(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([FEATURES], {k: batch[k] for k in self.input_names})[0]

    def embed(self, items: Sequence[str | bytes]) -> np.ndarray:
        return self.features(self.backbone.preprocess(items))

    def parity(self, batch: dict[str, np.ndarray]) -> float:
        return float(np.abs(self.features(batch) - self.backbone.torch_features(batch)).max())

    def model(self) -> onnx.ModelProto:
        return onnx.load(str(self.path))


class HeadRuntime:
    """One task's head version: an onnxruntime session from stored ONNX bytes, with its label order."""

    def __init__(self, onnx_bytes: bytes, labels: Sequence[str], version: int, backbone: str, device: str = "cpu") -> None:
        self.session = create_session(onnx_bytes, device, threads=1)
        self.labels = list(labels)
        self.version = version
        self.backbone = backbone
        self.nbytes = len(onnx_bytes)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        return self.session.run([HEAD_OUTPUT], {HEAD_INPUT: features})[0]


def fuse(trunk: onnx.ModelProto, head_bytes: bytes, metadata: dict[str, str]) -> bytes:
    """One model, preprocessed input -> probabilities: the trunk's `features` feed the head."""
    from onnx import compose, version_converter

    head = onnx.load_model_from_string(head_bytes)
    trunk_opset = next(o.version for o in trunk.opset_import if o.domain in ("", "ai.onnx"))
    head_opset = next(o.version for o in head.opset_import if o.domain in ("", "ai.onnx"))
    if head_opset != trunk_opset:
        head = version_converter.convert_version(head, trunk_opset)
    head.ir_version = trunk.ir_version
    head = compose.add_prefix(head, "head/", rename_inputs=False, rename_outputs=False)
    fused = compose.merge_models(trunk, head, io_map=[(FEATURES, HEAD_INPUT)])
    onnx.helper.set_model_props(fused, {**{p.key: p.value for p in head.metadata_props}, **metadata})
    return fused.SerializeToString()


def labels_of(head_bytes: bytes) -> list[str]:
    props = {p.key: p.value for p in onnx.load_model_from_string(head_bytes).metadata_props}
    return json.loads(props["labels"])
