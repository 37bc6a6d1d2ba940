"""Serving-time runtimes: the shared trunk and per-task heads, both as onnxruntime sessions."""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from adapters.backbones import FEATURES, TRUNK_OUTPUTS, Backbone
from adapters.heads import HEAD_OUTPUT
from adapters.onnx_utils import create_session

log = logging.getLogger(__name__)


class TrunkRuntime:
    """A backbone's trunk exported once to ONNX (cached on disk by weights digest) and served by onnxruntime."""

    def __init__(
        self,
        backbone: Backbone,
        cache_dir: pathlib.Path,
        threads: int = 0,
        atol: float = 1e-3,
        *,
        spinning: bool = False,
        tensorrt: bool = False,
    ) -> None:
        """threads: intra-op threads, 0 = every core; spinning: see create_session (off by default: in a
        server the RPC threads need the cores between operators); tensorrt: TensorRT before CUDA on a
        GPU, engines cached under cache_dir/tensorrt."""
        self.backbone = backbone
        # Named by weights digest and by the trunk's outputs, so a cache from another layout is not reused.
        layout = hashlib.sha256(",".join(TRUNK_OUTPUTS).encode()).hexdigest()[:8]
        self.path = pathlib.Path(cache_dir) / f"{backbone.name}-{backbone.digest}-{layout}.onnx"
        if not self.path.is_file():
            log.info("exporting trunk %s to %s", backbone.name, self.path)
            backbone.export_onnx(self.path)
        device = str(backbone.device)
        trt_cache = pathlib.Path(cache_dir) / "tensorrt" if tensorrt else None
        self.session: ort.InferenceSession = create_session(
            self.path, device, threads, spinning=spinning, tensorrt_cache=trt_cache
        )
        # On a GPU, outputs are bound straight to host memory (the heads run on the CPU).
        on_gpu = "CUDAExecutionProvider" in self.session.get_providers()
        self.io_binding = device.startswith("cuda") and on_gpu
        self.input_names = backbone.preprocess.input_names
        diff = self.parity(backbone.sample_batch())
        if diff > atol:
            raise RuntimeError(f"ONNX trunk of {backbone.name} disagrees with torch (relative max |diff| {diff:.2e})")
        log.info("trunk %s ready (%s, torch/onnx relative max |diff| %.1e)", backbone.name, self.session.get_providers()[0], diff)

    def features(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([FEATURES], {k: batch[k] for k in self.input_names})[0]

    def outputs(self, batch: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        """The named trunk outputs; trunk inputs (e.g. attention_mask) named too are passed through."""
        wanted = [n for n in names if n not in self.input_names]
        values = self._run(wanted, {k: batch[k] for k in self.input_names}) if wanted else []
        return {**{n: batch[n] for n in names if n in self.input_names}, **dict(zip(wanted, values))}

    def _run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self.io_binding:
            return self.session.run(names, feeds)
        binding = self.session.io_binding()
        for k, v in feeds.items():
            binding.bind_cpu_input(k, v)
        for n in names:
            binding.bind_output(n, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def embed(self, items: Sequence[str | bytes]) -> np.ndarray:
        return self.features(self.backbone.preprocess(items))

    def parity(self, batch: dict[str, np.ndarray]) -> float:
        """Largest |onnx - torch| over every trunk output, relative to that output's largest |value|."""
        ours = self.outputs(batch, TRUNK_OUTPUTS)
        ref = self.backbone.torch_outputs(batch)
        return max(float(np.abs(ours[k] - ref[k]).max() / max(np.abs(ref[k]).max(), 1e-30)) for k in TRUNK_OUTPUTS)

    def model(self) -> onnx.ModelProto:
        return onnx.load(str(self.path))


# What a loaded head costs in memory, measured (RSS over 1,000 loaded heads, bench/serving.py): a fixed
# ~112 KiB per onnxruntime session, plus about twice the model's bytes (the initializers, and the
# pre-packed copy of the Gemm weights).
HEAD_SESSION_BYTES = 112 << 10
HEAD_BYTES_FACTOR = 2.0
# Heads up to this size run on the CPU even when the trunk is on a GPU: a dense layer or two over one
# feature row costs less than a kernel launch, and thousands of small CUDA sessions would each hold
# device memory. Larger heads (tuned trunk blocks) run on the trunk's device.
SMALL_HEAD_BYTES = 1 << 20


class HeadRuntime:
    """One task's head version: an onnxruntime session from stored ONNX bytes, with its label order.

    The session runs on the caller's thread (one intra-op thread) without a memory arena, so an idle
    loaded head holds its weights and little else."""

    def __init__(self, onnx_bytes: bytes, labels: Sequence[str], version: int, backbone: str, device: str = "cpu") -> None:
        device = "cpu" if len(onnx_bytes) <= SMALL_HEAD_BYTES else device
        self.session = create_session(onnx_bytes, device, threads=1, memory_arena=False)
        self.labels = list(labels)
        self.version = version
        self.backbone = backbone
        self.nbytes = len(onnx_bytes)
        self.memory_bytes = int(HEAD_SESSION_BYTES + HEAD_BYTES_FACTOR * self.nbytes)  # estimate, for the LRU
        self.inputs = [i.name for i in self.session.get_inputs()]  # trunk outputs (and inputs) it reads
        meta = self.session.get_modelmeta().custom_metadata_map
        self.reject_threshold = float(meta.get("reject_threshold", 0.0))

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([HEAD_OUTPUT], {k: feeds[k] for k in self.inputs})[0]


def fuse(trunk: onnx.ModelProto, head_bytes: bytes, metadata: dict[str, str]) -> bytes:
    """One model, preprocessed input -> probabilities: the trunk's outputs feed the head's inputs."""
    from onnx import compose, helper, version_converter

    head = onnx.load_model_from_string(head_bytes)
    trunk = onnx.ModelProto.FromString(trunk.SerializeToString())
    trunk_opset = next(o.version for o in trunk.opset_import if o.domain in ("", "ai.onnx"))
    head_opset = next(o.version for o in head.opset_import if o.domain in ("", "ai.onnx"))
    if head_opset != trunk_opset:
        head = version_converter.convert_version(head, trunk_opset)
    head.ir_version = trunk.ir_version
    trunk_inputs = {i.name: i for i in trunk.graph.input}
    trunk_outputs = {o.name for o in trunk.graph.output}
    io_map = []
    for inp in head.graph.input:
        if inp.name in trunk_inputs:  # e.g. attention_mask: pass the trunk's input through
            passed = f"{inp.name}/passthrough"
            trunk.graph.node.append(helper.make_node("Identity", [inp.name], [passed]))
            trunk.graph.output.append(helper.make_tensor_value_info(
                passed, trunk_inputs[inp.name].type.tensor_type.elem_type, None))
            io_map.append((passed, inp.name))
        elif inp.name in trunk_outputs:
            io_map.append((inp.name, inp.name))
        else:
            raise ValueError(f"head input {inp.name!r} is neither a trunk input nor a trunk output")
    head = compose.add_prefix(head, "head/", rename_inputs=False, rename_outputs=False)
    fused = compose.merge_models(trunk, head, io_map=io_map)
    keep = [o for o in fused.graph.output if o.name == HEAD_OUTPUT]
    del fused.graph.output[:]
    fused.graph.output.extend(keep)
    onnx.helper.set_model_props(fused, {**{p.key: p.value for p in head.metadata_props}, **metadata})
    return fused.SerializeToString()


PREPROCESSING_KEY = "headserve.preprocessing"  # metadata_props key of an exported model's input recipe


def with_metadata(model_bytes: bytes, metadata: dict[str, str]) -> bytes:
    """The model with `metadata` added to its metadata_props (a key already there takes the new value)."""
    model = onnx.load_model_from_string(model_bytes)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **metadata})
    return model.SerializeToString()


def preprocessing_metadata(description: dict) -> dict:
    """A backbone's preprocessing (Preprocessor.describe()) spelt out for a client that has to reproduce
    it without headserve: every step, the tensors' names, layout, dtype and shape. Stored as JSON under
    PREPROCESSING_KEY in exported models (see the README's "Exported models")."""
    d = dict(description)
    if d.get("modality") == "image":
        size, resize = d["image_size"], d["resize"]
        d.update({
            "channel_order": "RGB",
            "input_layout": "NCHW",
            "dtype": "float32",
            "input_shape": ["batch", 3, size, size],
            "antialias": True,
            "steps": [
                "decode; apply the EXIF orientation; convert to RGB (8 bits per channel)",
                f"resize so the shorter side is {resize} pixels and the longer int({resize} * long / short) "
                f"({d['interpolation']}, antialiased, as PIL's Image.resize)",
                f"crop the centre {size}x{size} (left and top offsets round((side - {size}) / 2))",
                "to float32 in [0, 1] (divide by 255), channels first (HWC -> CHW)",
                "normalise each channel: (x - mean) / std",
                "stack images along a new first (batch) axis",
            ],
        })
    elif d.get("modality") == "text":
        d.update({
            "dtype": "int64",
            "input_shape": {name: ["batch", "sequence"] for name in d.get("inputs", ())},
            "steps": [
                f"tokenise with the backbone's own tokenizer ({d.get('tokenizer', '?')}: its vocabulary and "
                f"normalisation), adding its special tokens, truncating to {d.get('max_length')} tokens",
                "pad the batch to its longest sequence; attention_mask is 1 on tokens, 0 on padding",
            ],
        })
    return d


def graph_inputs(model_bytes: bytes) -> dict[str, list[int | str]]:
    """Input name -> shape (a dimension's name where it is dynamic) of a serialised ONNX model."""
    graph = onnx.load_model_from_string(model_bytes).graph
    return {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input
    }


def labels_of(head_bytes: bytes) -> list[str]:
    props = {p.key: p.value for p in onnx.load_model_from_string(head_bytes).metadata_props}
    return json.loads(props["labels"])
