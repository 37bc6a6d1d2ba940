"""ONNX export, checking and onnxruntime sessions."""

from __future__ import annotations

import logging
import os
import pathlib
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch

log = logging.getLogger(__name__)

OPSET = 17


def export_module(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: pathlib.Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int = OPSET,
) -> None:
    """Exports with torch's TorchScript-based exporter (fast, compact graphs), falling back to the
    dynamo exporter on torch versions without it; then checks the file with onnx.checker."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, args, str(tmp), input_names=input_names, output_names=output_names,
                dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False,
            )
        except (TypeError, RuntimeError) as exc:  # no TorchScript exporter in this torch
            log.info("TorchScript ONNX export unavailable (%s); using the dynamo exporter", exc)
            shapes = {
                name: {axis: torch.export.Dim(f"{name}_{label}") for axis, label in axes.items()}
                for name, axes in dynamic_axes.items()
                if name in input_names
            }
            torch.onnx.export(
                module, args, str(tmp), input_names=input_names, output_names=output_names,
                dynamic_shapes=shapes, opset_version=max(opset, 18), dynamo=True, external_data=False,
            )
    onnx.checker.check_model(str(tmp), full_check=True)
    os.replace(tmp, path)


def check_model_bytes(data: bytes) -> onnx.ModelProto:
    model = onnx.load_model_from_string(data)
    onnx.checker.check_model(model, full_check=True)
    return model


def providers_for(device: str) -> list[str]:
    """Execution providers, named explicitly: CUDA only when a CUDA device is in use."""
    available = ort.get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def create_session(model: bytes | str | pathlib.Path, device: str = "cpu", threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads  # 0: onnxruntime picks (physical cores)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=opts, providers=providers_for(device))


def run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Runs a single-output model."""
    return session.run(None, feeds)[0]
