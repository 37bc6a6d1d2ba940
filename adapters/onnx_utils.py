"""ONNX export, checking and onnxruntime sessions. Serving imports this module; torch and onnx (over a
second of a server's start together) are imported only by the functions that need them."""

from __future__ import annotations

import logging
import os
import pathlib
import warnings
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:
    import onnx
    import torch

log = logging.getLogger(__name__)

OPSET = 17
HEAD_OUTPUT = "probabilities"  # every head's output: class probabilities, in its labels' order


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
    import onnx
    import torch

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
    import onnx

    model = onnx.load_model_from_string(data)
    onnx.checker.check_model(model, full_check=True)
    return model


def cut_model(model: onnx.ModelProto, outputs: list[str]) -> tuple[onnx.ModelProto, float] | None:
    """The part of `model` that computes `outputs`: the nodes they depend on, with only the graph inputs,
    initializers and recorded shapes (value_info; without them onnxruntime may fuse an int8 graph otherwise)
    those nodes read, and the fraction of the model's nodes kept. None when the graph has
    control flow (a subgraph may read any tensor of the outer graph) or an output is not the model's.

    `onnx.utils.Extractor` does the same after inferring every shape, which costs 1.3 s on minilm-l6's trunk
    against 0.2 s here, and its result is the same graph (shapes are not needed to cut one)."""
    import onnx

    graph = model.graph
    declared = {o.name: o for o in graph.output}
    if any(name not in declared for name in outputs):
        return None
    producer = {}
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        for name in node.output:
            producer[name] = node
    kept: set[int] = set()
    stack = list(outputs)
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in kept:
            kept.add(id(node))
            stack.extend(name for name in node.input if name)
    nodes = [n for n in graph.node if id(n) in kept]
    read = {name for n in nodes for name in n.input} | set(outputs)
    cut = onnx.helper.make_graph(
        nodes, graph.name,
        [i for i in graph.input if i.name in read],
        [declared[name] for name in outputs],
        [t for t in graph.initializer if t.name in read],
        value_info=[v for v in graph.value_info if v.name in read],
    )
    out = onnx.helper.make_model(cut, opset_imports=model.opset_import, ir_version=model.ir_version,
                                 functions=model.functions)
    return out, len(nodes) / max(len(graph.node), 1)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def onnxruntime_clash() -> str:
    """Why the CUDA provider may be missing although onnxruntime-gpu is installed: the CPU `onnxruntime`
    distribution is installed too (some packages require it, e.g. `headserve[mpnet]`'s first part). Both
    own the same `onnxruntime` package folder, so whichever was installed last wins. Empty when only one is."""
    from importlib import metadata

    try:
        gpu, cpu = metadata.version("onnxruntime-gpu"), metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        return ""
    return (f"both onnxruntime {cpu} (CPU build) and onnxruntime-gpu {gpu} are installed, into the same "
            f"package folder; to keep the GPU build: `pip uninstall -y onnxruntime && pip install "
            f"--force-reinstall --no-deps onnxruntime-gpu=={gpu}`")


_warned_no_cuda = False


def providers_for(
    device: str, tensorrt_cache: pathlib.Path | None = None, *, cuda_graph: bool = False, tf32: bool = False
) -> list:
    """Execution providers, named explicitly: CUDA only when a CUDA device is in use; TensorRT first
    when asked for (`tensorrt_cache` set) and installed, with its engines cached in that folder;
    `cuda_graph`: the CUDA provider captures and replays CUDA graphs (see adapters.runtime.CudaGraphs);
    `tf32`: its matrix products round inputs to TF32 (precision "tf32"; otherwise IEEE fp32)."""
    global _warned_no_cuda
    available = ort.get_available_providers()
    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        if not _warned_no_cuda:
            _warned_no_cuda = True
            clash = onnxruntime_clash()
            log.warning("device %s: onnxruntime %s has no CUDA provider (it has %s); ONNX runs on the CPU%s",
                        device, ort.__version__, ", ".join(available), f". {clash}" if clash else "")
        return ["CPUExecutionProvider"]
    device_id = int(device.partition(":")[2] or 0)
    providers: list = []
    if tensorrt_cache is not None and "TensorrtExecutionProvider" in available:
        tensorrt_cache.mkdir(parents=True, exist_ok=True)
        providers.append(("TensorrtExecutionProvider", {
            "device_id": device_id,
            "trt_fp16_enable": False,  # keep the trunk's features as exported (parity-checked)
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(tensorrt_cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(tensorrt_cache),
        }))
    # use_tf32 0: fp32 trunks stay IEEE fp32, as torch's side is (adapters.backbones.ieee_fp32).
    cuda = {"device_id": device_id, "arena_extend_strategy": "kSameAsRequested", "use_tf32": int(tf32)}
    if cuda_graph:
        cuda["enable_cuda_graph"] = 1
    providers.append(("CUDAExecutionProvider", cuda))
    providers.append("CPUExecutionProvider")
    return providers


def create_session(
    model: bytes | str | pathlib.Path,
    device: str = "cpu",
    threads: int = 0,
    *,
    spinning: bool = True,
    memory_arena: bool = True,
    tensorrt_cache: pathlib.Path | None = None,
    cuda_graph: bool = False,
    tf32: bool = False,
    optimize: bool = True,
) -> ort.InferenceSession:
    """An onnxruntime session, with every graph optimisation on unless `optimize` is False.

    threads: intra-op threads; 0 = every core this process may use (onnxruntime's own default counts
    physical cores of the machine, which over- or under-counts in containers). 1 runs on the caller's
    thread. spinning: let idle intra-op threads busy-wait between operators while a run is in progress, and
    stop when it ends (`session.force_spinning_stop`: onnxruntime's own default keeps them spinning after a
    run too, taking the cores from the rest of the process); off, they sleep between operators and each
    parallel section wakes them (docs/design.md, "Spinning during a pass, not after it"). memory_arena: off
    for small models (per-task heads), where the arena's pre-allocation is most of the session's memory.
    optimize: off for small heads, whose few nodes have nothing to fuse but whose optimised copy of the
    graph is held for the session's life (see adapters.runtime.HeadRuntime).
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.intra_op_num_threads = threads if threads > 0 else available_cores()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_cpu_mem_arena = memory_arena
    opts.log_severity_level = 3
    if spinning:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    else:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    providers = providers_for(device, tensorrt_cache, cuda_graph=cuda_graph, tf32=tf32)
    return ort.InferenceSession(source, sess_options=opts, providers=providers)


def run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Runs a single-output model."""
    return session.run(None, feeds)[0]
