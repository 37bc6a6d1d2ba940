"""Serving-time runtimes: the shared trunk and per-task heads, both as onnxruntime sessions."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from adapters.backbones import FEATURES, TRUNK_OUTPUTS, Backbone, library_version
from adapters.onnx_utils import HEAD_OUTPUT, OPSET, available_cores, create_session, cut_model

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)


PRECISIONS = ("fp32", "tf32", "int8")
# What the export code writes: bump when a change to it (or to the quantisation below) changes the file, so
# caches written by older code are not reused.
EXPORT_VERSION = 2
# An int8 trunk is checked by direction, not by value: the largest 1 - cosine(int8, torch fp32) over every
# sample's row of every trunk output. MiniLM-L6 with per-channel weights, measured: 0.02 on the pooled
# features; on the hidden states at the top two blocks, where BERT's outlier dimensions sit, 0.09 on the
# machine it was chosen on and 0.18 on an AMD EPYC with AVX2 and no VNNI, where onnxruntime's u8 x s8 kernel
# saturates 16-bit sums (unsigned weights: 0.02 there, 1.2x slower). A broken export is near 1. See
# docs/design.md, "int8 trunks".
INT8_ATOL = 0.25
# A TF32 trunk (CUDA only: the fp32 file, run with the CUDA provider's use_tf32) is checked by direction too:
# TF32 rounds matrix inputs to 10 mantissa bits, 7e-3 relative max |diff| from IEEE fp32 on MobileNetV2's
# features, over the 1e-3 that fp32 trunks are held to, at a worst cosine of 0.99997 over 324 photos
# (bench/gpu_precision.py, H200). 1e-3 is 30 times that and far from a broken trunk.
TF32_ATOL = 1e-3
# A batch whose heads read only outputs from early in the trunk (a tuned text head reads blocks_6, the
# embedding output) runs a session of the trunk cut after those outputs (TrunkRuntime.cut): for minilm-l6
# at eight sentences of 24 tokens, 0.16 ms for blocks_6 against 35 ms for the whole trunk asked for it,
# bit for bit the same (docs/design.md, "Cut trunks"). A cut is made only where it drops more than a
# quarter of the trunk's nodes (each holds its own copy of the weights it reads: 48 MB for minilm-l6's
# blocks_6, nearly all the token embedding table), for at most CUT_SESSIONS sets of outputs per trunk, and
# used only where it gives the whole trunk's values on the backbone's sample batch to within CUT_RTOL (a cut
# that lost the graph's recorded shapes let onnxruntime fuse an int8 trunk's blocks otherwise: 0.18 apart).
CUT_MAX_KEPT = 0.75
CUT_SESSIONS = 4
CUT_RTOL = 1e-6


def default_trunk_cache() -> pathlib.Path:
    """Where exported trunks are cached when the settings name no folder: shared by every server and
    data directory of this user."""
    return pathlib.Path.home() / ".cache" / "headserve" / "trunks"


def trunk_cache_key(backbone: Backbone, precision: str) -> dict[str, str]:
    """Everything an exported trunk file depends on: the weights (digest), the trunk's outputs, the
    exporter (torch, onnx, onnxruntime for the quantiser, our export code) and the precision. Versions are
    the installed distributions' (importing torch and onnx to ask them would cost a serving start 2 s)."""
    return {
        "backbone": backbone.name,
        "weights": backbone.digest,
        "outputs": ",".join(TRUNK_OUTPUTS),
        "torch": library_version("torch"),
        "onnx": library_version("onnx"),
        "onnxruntime": ort.__version__,
        "export_version": str(EXPORT_VERSION),
        "precision": precision,
    }


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def quantize_int8(source: pathlib.Path, target: pathlib.Path) -> None:
    """Dynamic int8 quantisation (onnxruntime): weights of MatMul/Gemm stored as int8, activations
    quantised per batch at run time; no calibration data (static quantisation with calibration measured
    worse on MiniLM: docs/design.md, "int8 trunks")."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    previous = logging.root.manager.disable
    logging.disable(logging.INFO)  # the quantiser logs a line per tensor on the root logger
    try:
        # Per-channel signed weights: per-tensor ones cost the same time and lose more (MiniLM-L6 features'
        # cosine to fp32: 0.946 at worst per tensor, 0.986 per channel; unsigned weights run 1.6-2x slower).
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        logging.disable(previous)


def _cosine_gap(a: np.ndarray, b: np.ndarray) -> float:
    """The largest 1 - cosine similarity between the rows (one per sample, flattened) of a and b."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return float(np.max(1.0 - (a * b).sum(axis=1) / norms))


class TrunkCacheFile:
    """One exported trunk in the shared cache folder: `NAME-PRECISION-KEY.onnx` and a JSON sidecar with
    the full key, the file's SHA-256 and its parity with torch, checked before the file was moved in.
    Writers export to a private temporary file and move it in with os.replace, so servers starting at once
    never read a half-written file; a file whose SHA-256 or key does not match its sidecar is exported
    again, not trusted. A trusted file is served without torch: its parity was checked when it was written."""

    def __init__(self, backbone: Backbone, cache_dir: pathlib.Path, precision: str) -> None:
        self.backbone = backbone
        self.precision = precision
        self.key = trunk_cache_key(backbone, precision)
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = pathlib.Path(cache_dir) / f"{backbone.name}-{precision}-{digest}.onnx"
        self.sidecar = self.path.with_suffix(".json")
        self.parity: float | None = None  # recorded in the sidecar, read by trusted()

    def trusted(self) -> bool:
        """Whether the cached file is there, written for this key, intact, and checked against torch."""
        if not self.path.is_file():
            return False
        try:
            meta = json.loads(self.sidecar.read_text())
            parity = meta.get("parity")
            ok = (meta.get("key") == self.key and meta.get("sha256") == _sha256(self.path)
                  and isinstance(parity, (int, float)))
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            log.warning("cached trunk %s does not match its checksum or key; exporting it again", self.path)
            return False
        self.parity = float(parity)
        return True

    def export(self, check: Callable[[pathlib.Path], float]) -> float:
        """Exports the trunk, and moves it in once `check` (the exported file's path -> its parity with
        torch; it raises when the file is not fit to serve) has passed. Returns the parity."""
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        tag = f".{self.path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        fp32, model, side = folder / f"{tag}.fp32.onnx", folder / f"{tag}.onnx", folder / f"{tag}.json"
        try:
            log.info("exporting trunk %s (%s) to %s", self.backbone.name, self.precision, self.path)
            self.backbone.export_onnx(fp32)
            if self.precision == "int8":
                quantize_int8(fp32, model)
            else:
                os.replace(fp32, model)
            parity = float(check(model))
            side.write_text(json.dumps({"key": self.key, "sha256": _sha256(model), "parity": parity},
                                       sort_keys=True))
            os.replace(model, self.path)
            os.replace(side, self.sidecar)
            self.parity = parity
            return parity
        finally:
            for leftover in (fp32, model, side):
                leftover.unlink(missing_ok=True)


# Batch sizes that get a CUDA graph; a batch is padded up to the first that holds it (larger ones run plain).
GRAPH_BATCHES = (1, 2, 4, 8, 16, 32)


class _Graph:
    """One captured graph: device buffers at fixed addresses for every input and trunk output, bound once."""

    def __init__(self, session: ort.InferenceSession, graph_id: int, inputs: dict[str, np.ndarray],
                 outputs: dict[str, tuple[tuple[int, ...], np.dtype]], device: tuple[str, int]) -> None:
        self.session = session
        self.rows = 0  # rows of the last batch copied in (padding past them is zero)
        self.host = {k: np.zeros_like(v) for k, v in inputs.items()}
        self.device_in = {k: ort.OrtValue.ortvalue_from_numpy(v, *device) for k, v in self.host.items()}
        self.device_out = {n: ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, *device)
                           for n, (shape, dtype) in outputs.items()}
        self.binding = session.io_binding()
        for k, v in self.device_in.items():
            self.binding.bind_ortvalue_input(k, v)
        for n, v in self.device_out.items():
            self.binding.bind_ortvalue_output(n, v)
        self.options = ort.RunOptions()
        self.options.add_run_config_entry("gpu_graph_id", str(graph_id))

    def run(self, feeds: dict[str, np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
        rows = len(next(iter(feeds.values())))
        for k, host in self.host.items():
            host[:rows] = feeds[k]
            if self.rows > rows:
                host[rows:self.rows] = 0
            self.device_in[k].update_inplace(host)
        self.rows = rows
        self.session.run_with_iobinding(self.binding, self.options)
        return [self.device_out[n].numpy()[:rows] for n in names]


class CudaGraphs:
    """A trunk on onnxruntime's CUDA provider, replayed as CUDA graphs: one per batch size of GRAPH_BATCHES.

    A plain run launches the trunk's kernels one by one from the CPU; a captured graph is launched in one
    call. Measured on an H200 (docs/benchmarks.md, GPU), ResNet-50 at batch 1: 2.73 -> 2.39-2.48 ms at IEEE
    fp32, where the arithmetic dominates, and 1.04 ms at tf32 with graphs. The provider's graphs need inputs and outputs at fixed device
    addresses and shapes, so this serves trunks whose inputs have one shape but for the batch (images), and
    pads a batch with zero rows up to its graph's size (a trunk's rows are independent: batch normalisation
    runs in eval mode). Every graph is captured when the trunk loads, not on a caller's request, and checked
    against the plain session on random inputs, twice, so that a replay that ignored new inputs is caught too.
    At the first size whose capture fails or disagrees, capturing stops with a warning: that size and larger
    ones run on the plain session. One batch replays at a time: a batch that finds the graphs busy (the fair
    lane beside the main one) runs on the plain session.

    With device "cpu" the same buffers, bindings, padding and checks run on the CPU provider, without
    capture: that is how the suite checks them on machines without a GPU (tests/test_batching.py)."""

    def __init__(self, path: pathlib.Path, device: str, plain: ort.InferenceSession,
                 sample: dict[str, np.ndarray], atol: float, threads: int = 0, *, tf32: bool = False) -> None:
        on_cuda = device.startswith("cuda")
        self.session = create_session(path, device, threads, spinning=False, cuda_graph=on_cuda, tf32=tf32)
        if on_cuda and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"the graph session is not on the CUDA provider ({self.session.get_providers()})")
        self.device = ("cuda" if on_cuda else "cpu", int(device.partition(":")[2] or 0))
        self.plain = plain
        self.atol = atol
        self.names = [o.name for o in self.session.get_outputs()]
        self.sample = {k: np.asarray(v) for k, v in sample.items()}  # a preprocessed batch: shapes, dtypes
        self._graphs: dict[int, _Graph] = {}
        self._lock = threading.Lock()
        for size in GRAPH_BATCHES:
            graph = self._capture(size)
            if graph is None:
                break
            self._graphs[size] = graph
        if not self._graphs:
            raise RuntimeError("no batch size could be captured")

    def run(self, names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray] | None:
        """The named outputs for `feeds`, from a replayed graph; None when the batch is to run plain (no
        graph for its size, or another batch is replaying)."""
        rows = len(next(iter(feeds.values())))
        graph = self._graphs.get(next((b for b in GRAPH_BATCHES if b >= rows), 0))
        if graph is None or not self._lock.acquire(blocking=False):
            return None
        try:
            return graph.run(feeds, names)
        finally:
            self._lock.release()

    def captured(self) -> list[int]:
        return sorted(self._graphs)

    def _capture(self, size: int) -> _Graph | None:
        try:
            rng = np.random.default_rng(size)
            trials = [{k: rng.standard_normal((size, *v.shape[1:])).astype(v.dtype)
                       for k, v in self.sample.items()} for _ in range(2)]
            expected = [self.plain.run(self.names, feeds) for feeds in trials]
            outputs = {n: (e.shape, e.dtype) for n, e in zip(self.names, expected[0])}
            graph = _Graph(self.session, size, trials[0], outputs, self.device)
            for _ in range(3):  # the provider runs a graph's first runs plain, then captures
                graph.run(trials[0], self.names)
            diff = 0.0
            for feeds, want in zip(trials, expected):
                got = graph.run(feeds, self.names)
                diff = max(diff, *(float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-30))
                                   for g, w in zip(got, want)))
            if not diff <= self.atol:
                log.warning("CUDA graph for batch %d disagrees with the plain session (relative max |diff| "
                            "%.1e); batches of %d rows or more run without a graph", size, diff, size)
                return None
            log.info("CUDA graph captured for batch %d (relative max |diff| to the plain session %.1e)",
                     size, diff)
            return graph
        except Exception as exc:  # noqa: BLE001 - any capture failure: run that size plain
            log.warning("CUDA graph for batch %d could not be captured (%s); batches of %d rows or more run "
                        "without a graph", size, exc, size)
            return None


class TrunkRuntime:
    """A backbone's trunk exported once to ONNX (cached in a folder shared by servers, see
    TrunkCacheFile) and served by onnxruntime, at fp32, tf32 (CUDA) or int8."""

    graphs: CudaGraphs | None = None  # set once the trunk has passed its parity check (image trunks on CUDA)

    def __init__(
        self,
        backbone: Backbone,
        cache_dir: pathlib.Path,
        threads: int = 0,
        atol: float = 1e-3,
        *,
        spinning: bool = False,
        cuts: bool = True,
        tensorrt: bool = False,
        precision: str = "fp32",
        cuda_graphs: bool = False,
    ) -> None:
        """threads: intra-op threads, 0 = every core; spinning: see create_session (off by default: under
        load, busy-waiting holds the cores other work on the machine needs); cuts: serve a batch that asks for
        early outputs only from the trunk cut after them (`cut`); tensorrt: TensorRT before CUDA
        on a GPU, engines cached under cache_dir/tensorrt; precision: "fp32", "tf32" (the fp32 file with the
        CUDA provider's TF32 products, CUDA only, checked with TF32_ATOL) or "int8" (dynamic quantisation,
        checked against torch with INT8_ATOL); cuda_graphs: on the CUDA provider, replay image trunks as
        CUDA graphs (CudaGraphs; not with TensorRT)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
        self.backbone = backbone
        self.precision = precision
        self.threads = threads
        self.spinning = spinning
        self.cuts = cuts
        if precision == "tf32" and not str(backbone.device).startswith("cuda"):
            raise ValueError(f"precision tf32 is for CUDA devices (TF32 is a GPU matrix-unit format); "
                             f"{backbone.name} runs on {backbone.device}: use fp32 or int8")
        self.atol = {"int8": INT8_ATOL, "tf32": TF32_ATOL}.get(precision, atol)
        self.cache = TrunkCacheFile(backbone, cache_dir, precision)
        self.path = self.cache.path
        self.trt_cache = pathlib.Path(cache_dir) / "tensorrt" if tensorrt else None
        self.parity_diff: float | None = None
        # Cut sessions by the set of outputs they compute; None while one is made, or where none is used.
        self._cuts: dict[frozenset[str], tuple[ort.InferenceSession, list[str]] | None] = {}
        self._cuts_lock = threading.Lock()
        if self.cache.trusted():
            try:
                self._open(self.path)
                self.parity_diff = self.cache.parity
            except Exception as exc:  # a cached file onnxruntime cannot load: export it again
                log.warning("cached trunk %s failed to load (%s); exporting it again", self.path, exc)
        if self.parity_diff is None:
            self.parity_diff = self.cache.export(self._checked)
        if cuda_graphs and self.io_binding and not tensorrt and backbone.preprocess.modality == "image":
            try:
                self.graphs = CudaGraphs(self.path, str(backbone.device), self.session, backbone.sample_batch(),
                                         self.atol, threads, tf32=precision == "tf32")
            except Exception as exc:  # noqa: BLE001 - the trunk still serves, without graphs
                log.warning("trunk %s: no CUDA graphs (%s)", backbone.name, exc)
        log.info("trunk %s ready (%s, %s, torch/onnx relative max |diff| %.1e)", backbone.name, precision,
                 self.session.get_providers()[0], self.parity_diff)

    def _checked(self, path: pathlib.Path) -> float:
        """Opens the session on a freshly exported file and checks it against torch."""
        self._open(path)
        diff = self.parity(self.backbone.sample_batch())
        if not diff <= self.atol:
            raise RuntimeError(f"ONNX trunk of {self.backbone.name} ({self.precision}) disagrees with torch "
                               f"(relative max |diff| {diff:.2e})")
        return diff

    def _open(self, path: pathlib.Path) -> None:
        device = str(self.backbone.device)
        self.session: ort.InferenceSession = create_session(
            path, device, self.threads, spinning=self.spinning, tensorrt_cache=self.trt_cache,
            tf32=self.precision == "tf32",
        )
        # On a GPU, outputs are bound straight to host memory (the heads run on the CPU).
        on_gpu = "CUDAExecutionProvider" in self.session.get_providers()
        self.io_binding = device.startswith("cuda") and on_gpu
        self.input_names = self.backbone.preprocess.input_names

    def features(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self._run([FEATURES], {k: batch[k] for k in self.input_names})[0]

    def outputs(self, batch: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        """The named trunk outputs; trunk inputs (e.g. attention_mask) named too are passed through."""
        wanted = [n for n in names if n not in self.input_names]
        values = self._run(wanted, {k: batch[k] for k in self.input_names}) if wanted else []
        return {**{n: batch[n] for n in names if n in self.input_names}, **dict(zip(wanted, values))}

    def _run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.graphs is not None:
            replayed = self.graphs.run(names, feeds)
            if replayed is not None:
                return replayed
        session, inputs = self.session, self.input_names
        if self.cuts and FEATURES not in names:  # the last output of every trunk: nothing to cut
            key = frozenset(names)
            if key not in self._cuts:
                self._start_cut(key)
            session, inputs = self._cuts.get(key) or (session, inputs)
        return self._run_on(session, names, {k: feeds[k] for k in inputs})

    def _run_on(self, session: ort.InferenceSession, names: list[str],
                feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self.io_binding:
            return session.run(names, feeds)
        binding = session.io_binding()
        for k, v in feeds.items():
            binding.bind_cpu_input(k, v)
        for n in names:
            binding.bind_output(n, "cpu")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _start_cut(self, key: frozenset[str]) -> None:
        """Makes the cut for `key` on a thread of its own; until it is ready, the whole trunk serves."""
        with self._cuts_lock:
            if key in self._cuts or len(self._cuts) >= CUT_SESSIONS:
                return
            self._cuts[key] = None
        threading.Thread(target=self.cut, args=(key,), name=f"trunk-cut-{self.backbone.name}",
                         daemon=True).start()

    def cuts_in_use(self) -> list[frozenset[str]]:
        """The sets of outputs that run on a cut session."""
        return [key for key, made in list(self._cuts.items()) if made is not None]

    def cut(self, names: frozenset[str] | Sequence[str]) -> bool:
        """Makes and checks the session of the trunk cut after `names` (CUT_MAX_KEPT, CUT_RTOL); from then on
        a batch asking for exactly those outputs runs it. Whether one is in use."""
        key = frozenset(names)
        with self._cuts_lock:
            if self._cuts.get(key) is not None:
                return True
            self._cuts[key] = None
        ordered = sorted(key)
        try:
            made = cut_model(self.model(), ordered)
            if made is None or made[1] > CUT_MAX_KEPT:
                log.info("trunk %s: no cut for %s (it would keep %s of the nodes)", self.backbone.name,
                         ",".join(ordered), "all" if made is None else f"{made[1]:.0%}")
                return False
            session = create_session(made[0].SerializeToString(), str(self.backbone.device), self.threads,
                                     spinning=self.spinning, tf32=self.precision == "tf32")
            inputs = [i.name for i in session.get_inputs()]
            batch = self.backbone.sample_batch()
            ours = self._run_on(session, ordered, {k: batch[k] for k in inputs})
            whole = self._run_on(self.session, ordered, {k: batch[k] for k in self.input_names})
            gap = max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) for a, b in zip(ours, whole))
            if not gap <= CUT_RTOL:
                log.info("trunk %s: the cut for %s differs from the whole trunk (relative max |diff| %.1e); "
                         "not used", self.backbone.name, ",".join(ordered), gap)
                return False
        except Exception as exc:  # noqa: BLE001 - the whole trunk still serves these outputs
            log.warning("trunk %s: no cut for %s (%s)", self.backbone.name, ",".join(ordered), exc)
            return False
        self._cuts[key] = (session, inputs)
        log.info("trunk %s: outputs %s now run %.0f%% of the trunk's nodes", self.backbone.name,
                 ",".join(ordered), 100 * made[1])
        return True

    def embed(self, items: Sequence[str | bytes]) -> np.ndarray:
        return self.features(self.backbone.preprocess(items))

    def parity(self, batch: dict[str, np.ndarray]) -> float:
        """fp32: the largest |onnx - torch| over every trunk output, relative to that output's largest
        |value|. int8 and tf32: the largest 1 - cosine(onnx, torch) over each sample's row of every output."""
        ours = self.outputs(batch, TRUNK_OUTPUTS)
        ref = self.backbone.torch_outputs(batch)
        if self.precision in ("int8", "tf32"):
            return max(_cosine_gap(ours[k], ref[k]) for k in TRUNK_OUTPUTS)
        return max(float(np.abs(ours[k] - ref[k]).max() / max(np.abs(ref[k]).max(), 1e-30)) for k in TRUNK_OUTPUTS)

    def model(self) -> onnx.ModelProto:
        import onnx

        return onnx.load(str(self.path))


# What a loaded head costs in memory, measured (RSS over 10,000 loaded heads in a server, bench/serving.py
# scale mode: 68 KiB for a linear head of 3 labels, 5 KB of ONNX): a fixed ~58 KiB per onnxruntime session
# and its place in the cache, plus about twice the model's bytes (the initializers, and the pre-packed copy
# of the Gemm weights). Small heads' sessions skip graph optimisation, which held an optimised copy of
# the graph: 99.6 -> 59.6 KiB for a linear head of 3 labels (5 KB of ONNX), 113 -> 73 KiB for a prototype
# head of 10; loading 0.40 -> 0.28 ms; one row through a linear head 12.3 -> 12.6 us, a prototype head
# 23.6 -> 13.9 us, an MLP of 512 hidden units 51 -> 56 us. Measured in-process on 1,000 sessions (300 for
# the MLP), 2 cores; docs/design.md.
HEAD_SESSION_BYTES = 58 << 10
HEAD_BYTES_FACTOR = 2.0
# Heads over SMALL_HEAD_BYTES keep every graph optimisation and hold about their model's bytes, measured after
# a run (2 cores, 6-10 sessions each, malloc_trim'd): a tuned minilm-l6 head 42.7 MiB of RSS for 40.7 MiB of
# ONNX (1.05x), MLPs of 2.5 and 8.0 MiB 1.04x and 0.67x. At the small heads' 2x the default cache held about
# six tuned heads where eleven fit.
LARGE_HEAD_BYTES_FACTOR = 1.1
# Heads up to this size run on the CPU even when the trunk is on a GPU: a dense layer or two over one
# feature row costs less than a kernel launch, and thousands of small CUDA sessions would each hold
# device memory. Larger heads (tuned trunk blocks) run on the trunk's device.
SMALL_HEAD_BYTES = 1 << 20
# Heads of this size or more (tuned trunk blocks: 43 MB for minilm-l6's six) run on up to HEAVY_HEAD_THREADS
# intra-op threads, not one: a tuned minilm-l6 head on 2 cores, in-process, 8 sentences 51 -> 38 ms, 32
# sentences 306 -> 167 ms (docs/design.md, "Cut trunks"). Each such session keeps its own pool of
# threads - 1 sleeping threads (no spinning), and head_cache_mb bounds how many are loaded.
HEAVY_HEAD_BYTES = 4 << 20
HEAVY_HEAD_THREADS = 4


def dense_logits(x: np.ndarray, layers: Sequence[tuple[np.ndarray, np.ndarray]], normalize: bool,
                 eps: float = 1e-12) -> np.ndarray:
    """[L2-normalise] -> Dense (-> ReLU -> Dense)*, float32, W as [out, in]: a dense head's logits (the
    numpy reference of adapters.heads.DenseHead, and how small heads are served: DenseArrays)."""
    x = np.asarray(x, dtype=np.float32)
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(eps))
    for i, (w, b) in enumerate(layers):
        if i:
            x = np.maximum(x, 0.0)
        x = x @ w.T + b
    return x


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


DENSE_IR_VERSION = 8  # adapters.heads.DenseHead.to_onnx's (readable by onnxruntime >= 1.14), with opset 17


@dataclasses.dataclass
class DenseArrays:
    """A dense head's ONNX graph read back as its arrays (`read`), run with numpy: a loaded linear head of 3
    labels then holds its 4.6 KB of weights, not an onnxruntime session of about 68 KiB."""

    inputs: list[str]  # graph inputs, concatenated in this order
    widths: list[int]  # their declared widths
    layers: list[tuple[np.ndarray, np.ndarray]]
    normalize: bool
    eps: float
    metadata: dict[str, str]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        parts = [np.asarray(feeds[n], np.float32) for n in self.inputs]
        for name, part, width in zip(self.inputs, parts, self.widths):
            if part.ndim != 2 or part.shape[1] != width:
                raise ValueError(f"head input {name!r} of shape {part.shape}; the head takes [batch, {width}]")
        x = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        with np.errstate(all="ignore"):  # as onnxruntime: non-finite weights give non-finite outputs, silently
            return softmax(dense_logits(x, self.layers, self.normalize, self.eps))

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes + b.nbytes for w, b in self.layers)

    @classmethod
    def read(cls, data: bytes) -> DenseArrays | None:
        """The arrays of a graph exactly as adapters.heads.DenseHead.to_onnx writes it, checked node by node
        (ops, inputs, attributes, shapes); None for any other graph (an imported head, say), which then runs
        on onnxruntime, which reports what is wrong with a damaged one."""
        try:
            return cls._read(data)
        except Exception:  # noqa: BLE001 - bytes from a client: any fault means "not a dense head"
            return None

    @classmethod
    def _read(cls, data: bytes) -> DenseArrays | None:
        import onnx
        from onnx import helper, numpy_helper

        model = onnx.load_model_from_string(data)
        # What DenseHead.to_onnx writes (other versions and opsets run on onnxruntime, which may refuse them).
        opsets = [(o.domain, o.version) for o in model.opset_import]
        if model.ir_version != DENSE_IR_VERSION or opsets != [("", OPSET)]:
            return None
        onnx.checker.check_model(model)
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        if (model.functions or [o.name for o in graph.output] != [HEAD_OUTPUT]
                or any(i.name in inits for i in graph.input) or not graph.input):
            return None
        # Every tensor onnxruntime would load or type-check is float32, as the writer makes it: the checker
        # lets an UNDEFINED (0) element type through, and onnxruntime then refuses the whole model.
        if (any(t.data_type != onnx.TensorProto.FLOAT for t in graph.initializer)
                or any(v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT
                       for v in [*graph.output, *graph.value_info])
                or graph.sparse_initializer or model.training_info):
            return None
        widths = []
        for i in graph.input:
            t = i.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
            # [batch, width]: any number of rows (a fixed one is a graph onnxruntime would hold callers to)
            if t.elem_type != onnx.TensorProto.FLOAT or len(dims) != 2 or dims[0] != 0 or dims[1] <= 0:
                return None
            widths.append(dims[1])

        def array(name: str, ndim: int) -> np.ndarray | None:
            if name not in inits:  # (every initializer is float32: checked above)
                return None
            value = numpy_helper.to_array(inits[name])
            return value if value.ndim == ndim else None

        nodes = list(graph.node)
        pos = 0

        def take(op: str, n_inputs: int, **attributes) -> onnx.NodeProto | None:
            nonlocal pos
            if pos >= len(nodes):
                return None
            node = nodes[pos]
            found = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if (node.op_type != op or node.domain not in ("", "ai.onnx") or len(node.input) != n_inputs
                    or len(node.output) != 1 or found != attributes):
                return None
            pos += 1
            return node

        names = [i.name for i in graph.input]
        x = names[0]
        if len(names) > 1:
            node = take("Concat", len(names), axis=1)
            if node is None or list(node.input) != names:
                return None
            x = node.output[0]
        normalize, eps = False, 1e-12
        if pos < len(nodes) and nodes[pos].op_type == "ReduceL2":
            norm = take("ReduceL2", 1, axes=[1], keepdims=1)
            clamp = take("Max", 2)
            div = take("Div", 2)
            if None in (norm, clamp, div) or norm.input[0] != x or clamp.input[0] != norm.output[0]:
                return None
            value = array(clamp.input[1], 1)
            if value is None or value.shape != (1,) or list(div.input) != [x, clamp.output[0]]:
                return None
            normalize, eps, x = True, float(value[0]), div.output[0]
        layers: list[tuple[np.ndarray, np.ndarray]] = []
        while True:
            if layers:
                relu = take("Relu", 1)
                if relu is None:
                    break
                if relu.input[0] != x:
                    return None
                x = relu.output[0]
            gemm = take("Gemm", 3, transB=1)
            if gemm is None or gemm.input[0] != x:
                return None
            w, b = array(gemm.input[1], 2), array(gemm.input[2], 1)
            fan_in = sum(widths) if not layers else layers[-1][0].shape[0]
            if w is None or b is None or w.shape[1] != fan_in or b.shape != (w.shape[0],):
                return None
            layers.append((w, b))
            x = gemm.output[0]
        out = take("Softmax", 1, axis=1)
        if out is None or out.input[0] != x or out.output[0] != HEAD_OUTPUT or pos != len(nodes):
            return None
        metadata = {p.key: p.value for p in model.metadata_props}
        return cls(names, widths, layers, normalize, eps, metadata)


# Memory of a loaded head served with numpy (DenseArrays): its arrays plus this, for the Python objects
# around them and the head's place in the cache. Measured in-process over 1,000 heads (2 cores): a linear
# head of 3 labels over 384 features 6.1 KiB (its session: 68.0 KiB), loaded in 0.056 ms (0.261), one row
# 10.7 us (13.5); a prototype head of 10 labels 15.0 KiB (71.8), 0.087 ms (0.334), 17.8 us (18.0).
DENSE_HEAD_BYTES = 2 << 10


class HeadRuntime:
    """One task's head version: an onnxruntime session from stored ONNX bytes, with its label order.

    A small head that is a dense head's graph (DenseArrays.read) runs with numpy from its arrays. Otherwise
    the session runs on the caller's thread (one intra-op thread; a heavy head, up to `threads`) without a
    memory arena and, for a small head, without graph optimisation (nothing to fuse in a Gemm or two and a
    Softmax), so an idle loaded head holds its weights and little else.

    Reading the graph needs the onnx package, whose import costs a serving process 0.8 s (ml_dtypes):
    until a thread has imported it, small heads load as sessions (the first such load starts the import)."""

    def __init__(self, onnx_bytes: bytes, labels: Sequence[str], version: int, backbone: str, device: str = "cpu",
                 threads: int = 1) -> None:
        """threads: intra-op threads for a heavy head (HEAVY_HEAD_BYTES), at most HEAVY_HEAD_THREADS; 0 = every
        core this process may use, as for the trunk."""
        small = len(onnx_bytes) <= SMALL_HEAD_BYTES
        self.dense: DenseArrays | None = None
        if small and _onnx_imported():
            self.dense = DenseArrays.read(onnx_bytes)
        self.labels = list(labels)
        self.version = version
        self.backbone = backbone
        self.nbytes = len(onnx_bytes)
        if self.dense is not None:
            self.session = None
            self.memory_bytes = DENSE_HEAD_BYTES + self.dense.nbytes  # estimate, for the LRU
            self.inputs = list(self.dense.inputs)
            meta = self.dense.metadata
        else:
            heavy = len(onnx_bytes) >= HEAVY_HEAD_BYTES
            pool = min(threads if threads > 0 else available_cores(), HEAVY_HEAD_THREADS) if heavy else 1
            self.session = create_session(onnx_bytes, "cpu" if small else device, threads=pool, spinning=False,
                                          memory_arena=False, optimize=not small)
            factor = HEAD_BYTES_FACTOR if small else LARGE_HEAD_BYTES_FACTOR
            self.memory_bytes = int(HEAD_SESSION_BYTES + factor * self.nbytes)
            self.inputs = [i.name for i in self.session.get_inputs()]  # trunk outputs (and inputs) it reads
            meta = self.session.get_modelmeta().custom_metadata_map
        self.reject_threshold = float(meta.get("reject_threshold", 0.0))
        # The trunk precision whose features the head was trained on (heads from before int8: fp32).
        self.precision = meta.get("precision", "fp32")

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if self.dense is not None:
            return self.dense.run(feeds)
        return self.session.run([HEAD_OUTPUT], {k: feeds[k] for k in self.inputs})[0]


_onnx_import = threading.Lock()
_onnx_importing = False


def _onnx_imported() -> bool:
    """Whether the onnx package is imported; if not, imports it on a thread of its own (once)."""
    global _onnx_importing
    if "onnx.numpy_helper" in sys.modules:
        return True
    with _onnx_import:
        if not _onnx_importing:
            _onnx_importing = True
            threading.Thread(target=_import_onnx, name="import-onnx", daemon=True).start()
    return False


def _import_onnx() -> None:
    import onnx.numpy_helper  # noqa: F401


def fuse(trunk: onnx.ModelProto, head_bytes: bytes, metadata: dict[str, str]) -> bytes:
    """One model, preprocessed input -> probabilities: the trunk's outputs feed the head's inputs."""
    import onnx
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
    import onnx

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
    import onnx

    graph = onnx.load_model_from_string(model_bytes).graph
    return {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input
    }


def labels_of(head_bytes: bytes) -> list[str]:
    import onnx

    props = {p.key: p.value for p in onnx.load_model_from_string(head_bytes).metadata_props}
    return json.loads(props["labels"])
