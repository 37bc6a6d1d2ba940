#!/usr/bin/env python
"""Few-shot accuracy of headserve, measured through its public gRPC API on a real server.

For each dataset, for each N (examples per label) and each of D random draws, and for each training
strategy asked for: CreateTask with the N x labels examples (a fresh task id), WatchJob until the job
ends, Predict the test split in batches, accuracy; then DeleteTask (so every task embeds its examples
cold and the next draw's timing is comparable). On the same draws and the same backbone weights it
runs the reference: frozen trunk features + scikit-learn LogisticRegression(max_iter=2000), default C,
with features computed in-process by the torch trunk (`adapters.backbones.load_backbone` +
`Backbone.torch_features`: the code path the service's training job uses).

    python bench/fewshot.py                                  # every shared set, the issue's settings
    python bench/fewshot.py ../shared/data/text/sst5 --shots 8 64 --draws 10 --test-limit 1000
    python bench/fewshot.py --report bench/results/fewshot.json --markdown table.md   # table from JSON

The JSON (`--out`) holds every per-draw figure, the configuration and the environment. It is
rewritten after every draw, and `--resume` skips the (dataset, N, draw, strategy) cells it holds.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
# Run as a script, bench/ is sys.path[0]; import it as the `bench` package instead, so its module
# names cannot shadow installed packages.
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.datasets import Dataset, digest, draw, load_dataset  # noqa: E402

log = logging.getLogger("bench.fewshot")
console = Console(stderr=True, highlight=False, soft_wrap=True)

DEFAULT_SHARED = ROOT.parent / "shared"
TEXT_SETS = ("sst2_sentences", "sst5", "trec", "ag_news", "subj", "mpqa")
IMAGE_SETS = ("caltech101_10", "clothing10")
DEFAULT_IMAGE_BACKBONE = "mobilenet_v2_imagenet"


def default_image_backbones(shared: pathlib.Path) -> dict[str, dict]:
    """The shared ImageNet MobileNetV2 weights with the preprocessing their README asks for."""
    weights = shared / "data" / "weights" / "mobilenet_v2_imagenet" / "mobilenet_v2_imagenet.safetensors"
    return {DEFAULT_IMAGE_BACKBONE: {"arch": "mobilenet_v2", "weights": str(weights), "mean": [0.5, 0.5, 0.5],
                                     "std": [0.5, 0.5, 0.5], "resize": 256, "image_size": 224,
                                     "interpolation": "bilinear"}}


STRATEGY_NAMES = ("auto", "linear", "mlp", "prototype", "fine_tune")
INLINE_BYTES = 16 << 20  # larger uploads go through CreateTask + AddExamples + TrainTask
ADD_CHUNK_BYTES = 4 << 20
WATCH_TIMEOUT_S = 3600

# Published figures to set ours against (accuracy %, keyed by dataset folder name and N).
PUBLISHED: dict[tuple[str, str], str] = {
    ("sst5", "8"): "SetFit MiniLM-L6 29.8; SetFit mpnet 43.6",
    ("sst5", "64"): "SetFit mpnet 51.9",
    ("ag_news", "8"): "SetFit MiniLM-L6 83.1; SetFit mpnet 82.9",
    ("ag_news", "64"): "SetFit mpnet 88.0",
    ("caltech101_10", "5"): "LogReg 97.7",
    ("caltech101_10", "10"): "LogReg 98.6",
    ("caltech101_10", "all"): "LogReg 99.4",
    ("clothing10", "5"): "LogReg 61.2",
    ("clothing10", "10"): "LogReg 68.6",
    ("clothing10", "all"): "LogReg 81.4",
}


class BenchError(Exception):
    """The service did not do what the benchmark needs (a job failed, a task is not ready)."""


# --- arguments ------------------------------------------------------------------------------------


def shots_arg(value: str) -> str:
    if value == "all" or (value.isdigit() and int(value) > 0):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: give a positive number of examples per label, or 'all'")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Few-shot accuracy through the headserve gRPC API, next to frozen features + LogReg.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("datasets", nargs="*", type=pathlib.Path,
                   help="dataset folders (text: label+text lines or CSV/TSV; images: <set>/<split>/<class>/); "
                        "default: the shared text and image sets")
    p.add_argument("--shots", nargs="+", type=shots_arg, default=["8", "64"], help="N per label, text sets")
    p.add_argument("--image-shots", nargs="+", type=shots_arg, default=["5", "10", "all"],
                   help="N per label, image sets ('all' = the whole pool, one draw)")
    p.add_argument("--draws", type=int, default=10, help="random draws per N")
    p.add_argument("--strategies", nargs="+", choices=STRATEGY_NAMES, default=["auto", "linear"])
    p.add_argument("--unfreeze-blocks", type=int, default=0,
                   help="TrainingConfig.unfreeze_blocks for fine_tune (and AUTO's fine-tuning); "
                        "0 = the default")
    p.add_argument("--epochs", type=int, default=0,
                   help="TrainingConfig.epochs (fine_tune, mlp, and AUTO's fine-tuning); 0 = the default")
    p.add_argument("--seed", type=int, default=0, help="draw d of N uses seed [seed, N, d]")
    p.add_argument("--test-limit", type=int, default=1000,
                   help="text sets: keep a seeded subsample of this many test items (0 = all)")
    p.add_argument("--image-test-limit", type=int, default=0, help="image sets: same (0 = all)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the 80/20 split of sets without one")
    p.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED,
                   help="the shared folder: default datasets and MobileNetV2 weights")
    p.add_argument("--backbone", default="minilm-l6", help="text backbone (built-in name)")
    p.add_argument("--image-backbone", default=DEFAULT_IMAGE_BACKBONE, help="image backbone name")
    p.add_argument("--image-backbone-config", type=pathlib.Path,
                   help="TOML file with [backbones.NAME] tables (service/config.py: CustomBackbone); "
                        "default: the shared MobileNetV2 ImageNet weights with mean/std 0.5, resize 256, crop 224")
    p.add_argument("--address", help="use a running server at HOST:PORT instead of starting one in-process "
                                     "(it must know the same backbones)")
    p.add_argument("--data-dir", type=pathlib.Path, help="in-process server's data dir (default: a temp dir)")
    p.add_argument("--batch", type=int, default=0, help="inputs per Predict request (default 256 text, 64 images)")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results" / "fewshot.json")
    p.add_argument("--resume", action="store_true", help="keep the cells --out already holds; run the rest")
    p.add_argument("--keep-tasks", action="store_true", help="do not delete tasks after predicting")
    p.add_argument("--report", type=pathlib.Path, help="only print the table of this results JSON")
    p.add_argument("--markdown", type=pathlib.Path, help="also write the table as Markdown here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="in-process server's setting override, e.g. precision='{\"minilm-l6\": \"int8\"}'")
    p.add_argument("--label", default="", help="free text recorded with the run (e.g. the code version measured)")
    p.add_argument("-v", "--verbose", action="store_true", help="server logs at INFO")
    args = p.parse_args(argv)
    if args.draws < 1:
        p.error("--draws must be at least 1")
    if args.batch and not 1 <= args.batch <= 256:
        p.error("--batch must be between 1 and 256")
    if not args.datasets:
        args.datasets = [args.shared / "data" / "text" / n for n in TEXT_SETS]
        args.datasets += [args.shared / "data" / "images" / n for n in IMAGE_SETS]
    return args


# --- environment ----------------------------------------------------------------------------------


def environment() -> dict:
    import grpc
    import onnxruntime
    import sklearn
    import torch

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "source_root": str(ROOT),
        "source_digest": source_digest(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "scikit_learn": sklearn.__version__,
        "numpy": np.__version__,
        "grpcio": grpc.__version__,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def source_digest() -> str:
    """sha256 of the service's code as this run read it (adapters/, service/, proto/), to tell versions apart
    when the working tree is not a clean commit."""
    h = hashlib.sha256()
    files = sorted(p for d in ("adapters", "service", "proto") for p in (ROOT / d).rglob("*")
                   if p.is_file() and p.suffix in (".py", ".proto"))
    for p in files:
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


# --- the server -----------------------------------------------------------------------------------


def image_backbones(args: argparse.Namespace) -> dict[str, dict]:
    if args.image_backbone_config is None:
        return default_image_backbones(args.shared)
    with open(args.image_backbone_config, "rb") as f:
        tables = tomllib.load(f).get("backbones", {})
    if not tables:
        raise SystemExit(f"error: {args.image_backbone_config} has no [backbones.NAME] tables")
    return tables


@contextlib.contextmanager
def server(args: argparse.Namespace, text_backbone: str | None, images: dict[str, dict]) -> Iterator[dict]:
    """Yields {"address", "in_process", ...}: a server started in-process on 127.0.0.1:0, or --address."""
    if args.address:
        yield {"address": args.address, "in_process": False}
        return
    from bench.serving import set_overrides
    from service.config import CustomBackbone, Settings
    from service.server import build_server, configure_logging

    configure_logging("INFO" if args.verbose else "WARNING")
    with contextlib.ExitStack() as stack:
        data_dir = args.data_dir or pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fewshot-")))
        settings = Settings.load(
            address="127.0.0.1:0",
            data_dir=data_dir,
            builtin_backbones=[text_backbone] if text_backbone else [],
            backbones={name: CustomBackbone(**spec) for name, spec in images.items()},
            log_level="INFO" if args.verbose else "WARNING",
            **set_overrides(args),
        )
        start = time.perf_counter()
        running = build_server(settings)
        started_s = time.perf_counter() - start
        try:
            yield {"address": running.address, "in_process": True, "start_seconds": started_s,
                   "settings": json.loads(settings.model_dump_json())}
        finally:
            running.stop()


def connect(address: str):
    import grpc

    from service.gen import headserve_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(address, options=[
        ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])
    grpc.channel_ready_future(channel).result(timeout=60)
    return channel, pb_grpc.HeadServeStub(channel)


def describe_backbones(stub) -> dict[str, dict]:
    from service.gen import headserve_pb2 as pb

    out = {}
    for b in stub.ListBackbones(pb.ListBackbonesRequest()).backbones:
        out[b.name] = {
            "available": b.available, "unavailable_reason": b.unavailable_reason, "feature_dim": b.feature_dim,
            "weights_source": b.weights_source, "architecture": b.architecture, "device": b.device,
            "preprocessing": json.loads(b.preprocessing_json) if b.preprocessing_json else None,
        }
    return out


# --- one task through the API ---------------------------------------------------------------------


def _inputs(payloads: Sequence[str | bytes]):
    from service.gen import headserve_pb2 as pb

    return [pb.Input(text=p) if isinstance(p, str) else pb.Input(image=p) for p in payloads]


def train_task(stub, task_id: str, backbone: str, payloads: Sequence[str | bytes], labels: Sequence[str],
               declared: Sequence[str], strategy: str, unfreeze_blocks: int = 0, epochs: int = 0) -> dict:
    """Registers and trains a task; returns time-to-READY, the job's phase times and the evaluation."""
    from service.gen import headserve_pb2 as pb

    config = pb.TrainingConfig(strategy=pb.Strategy.Value(strategy.upper()), unfreeze_blocks=unfreeze_blocks,
                               epochs=epochs)
    examples = [pb.Example(input=i, label=label) for i, label in zip(_inputs(payloads), labels)]
    size = sum(len(p) for p in payloads)
    start = time.perf_counter()
    if size <= INLINE_BYTES:
        task = stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone=backbone, examples=examples,
                                                    config=config, labels=list(declared)))
        job_id, upload = task.job_id, "CreateTask"
    else:
        stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone=backbone, config=config, labels=list(declared)))

        def chunks() -> Iterator:
            batch, nbytes = [], 0
            for ex in examples:
                batch.append(ex)
                nbytes += ex.ByteSize()
                if nbytes >= ADD_CHUNK_BYTES:
                    yield pb.AddExamplesRequest(task_id=task_id, examples=batch)
                    batch, nbytes = [], 0
            if batch:
                yield pb.AddExamplesRequest(task_id=task_id, examples=batch)

        added = stub.AddExamples(chunks())
        if added.num_examples != len(examples):
            raise BenchError(f"task {task_id}: {added.num_examples} examples stored, {len(examples)} sent")
        job_id, upload = stub.TrainTask(pb.TrainTaskRequest(task_id=task_id)).job_id, "CreateTask+AddExamples+TrainTask"
    uploaded = time.perf_counter() - start
    phases: dict[str, float] = {}
    last, live = None, None
    for job in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=WATCH_TIMEOUT_S):
        phases.setdefault(job.phase or "?", round(time.perf_counter() - start, 3))
        if job.version and live is None:  # a version answers (AUTO's interim feature head, or the final one)
            live = time.perf_counter() - start
        last = job
    ready = time.perf_counter() - start
    if last is None or last.state != pb.Job.SUCCEEDED:
        raise BenchError(f"task {task_id}: job {job_id} ended {pb.Job.State.Name(last.state) if last else 'silently'}"
                         f": {last.error if last else ''}")
    task = stub.GetTask(pb.GetTaskRequest(task_id=task_id))
    if task.state != pb.Task.READY:
        raise BenchError(f"task {task_id} is {pb.Task.State.Name(task.state)} after its job succeeded")
    ev = task.evaluation
    details = json.loads(ev.details_json) if ev.details_json else {}
    if task.num_examples != len(examples):
        raise BenchError(f"task {task_id} holds {task.num_examples} examples; {len(examples)} were sent")
    return {
        "task_id": task_id,
        "upload": upload,
        "upload_seconds": round(uploaded, 3),
        "time_to_ready_s": round(ready, 3),
        "time_to_live_s": round(ready if live is None else live, 3),
        "phases_at_s": phases,
        "strategy": ev.strategy,
        "strategy_reason": details.get("strategy_reason"),
        "candidate_scores": details.get("candidate_scores"),
        "validation_accuracy": round(ev.validation_accuracy, 4),
        "validation_method": ev.validation_method,
        "train_accuracy": round(ev.train_accuracy, 4),
        "server_train_seconds": round(ev.train_seconds, 3),
        "tap": getattr(ev, "tap", ""),
        "label_text": details.get("label_text"),
        "warnings": list(ev.warnings),
        "version": task.version,
    }


def predict(stub, task_id: str, payloads: Sequence[str | bytes], batch: int) -> tuple[list[str], float]:
    from service.gen import headserve_pb2 as pb

    out: list[str] = []
    start = time.perf_counter()
    for i in range(0, len(payloads), batch):
        resp = stub.Predict(pb.PredictRequest(task_id=task_id, inputs=_inputs(payloads[i : i + batch]), top_k=1))
        if len(resp.predictions) != len(payloads[i : i + batch]):
            raise BenchError(f"task {task_id}: {len(resp.predictions)} predictions for {batch} inputs")
        out.extend(p.label for p in resp.predictions)
    return out, time.perf_counter() - start


def delete_task(stub, task_id: str) -> None:
    from service.gen import headserve_pb2 as pb

    stub.DeleteTask(pb.DeleteTaskRequest(task_id=task_id))


# --- the reference ---------------------------------------------------------------------------------


class Reference:
    """Frozen features from the torch trunk, in-process, + sklearn LogisticRegression(max_iter=2000)."""

    HOW = ("frozen features from the torch trunk loaded in-process (adapters.backbones.load_backbone + "
           "Backbone.torch_features, the path the service's training job uses; the service predicts with the "
           "ONNX export of the same trunk) + sklearn.linear_model.LogisticRegression(max_iter=2000), default C=1, "
           "on the raw features (no scaling)")

    def __init__(self, text_backbone: str | None, images: dict[str, dict]) -> None:
        self.text_backbone = text_backbone
        self.images = images
        self._loaded: dict = {}

    def backbone(self, name: str):
        if name not in self._loaded:
            from adapters.backbones import LoadOptions, builtin_spec, custom_spec, load_backbone
            from adapters.preprocessing import ImageTransform

            if name in self.images:
                from service.config import CustomBackbone

                c = CustomBackbone(**self.images[name])
                spec = custom_spec(name, c.arch, c.weights,
                                   ImageTransform(c.image_size, c.resize, c.mean, c.std, c.interpolation))
            else:
                spec = builtin_spec(name)
            self._loaded[name] = load_backbone(spec, LoadOptions(device="cpu"))
        return self._loaded[name]

    def features(self, name: str, ds: Dataset, items: Sequence, chunk: int = 64) -> np.ndarray:
        bb = self.backbone(name)
        out = []
        for i in range(0, len(items), chunk):
            out.append(bb.torch_features(bb.preprocess([ds.payload(x) for x in items[i : i + chunk]])))
        return np.concatenate(out).astype(np.float32)

    @staticmethod
    def fit_score(x_train, y_train, x_test, y_test) -> dict:
        from sklearn.linear_model import LogisticRegression

        start = time.perf_counter()
        clf = LogisticRegression(max_iter=2000).fit(x_train, y_train)
        acc = float((clf.predict(x_test) == np.asarray(y_test)).mean())
        return {"accuracy": round(acc, 6), "fit_seconds": round(time.perf_counter() - start, 3),
                "n_iter": int(np.max(clf.n_iter_))}


# --- results ---------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> dict:
    vals = [float(v) for v in values]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def summarize(cell: dict, strategies: Sequence[str]) -> dict:
    draws = cell["draws"]
    out: dict = {"reference": mean_std([d["reference"]["accuracy"] for d in draws if "reference" in d])}
    for s in strategies:
        runs = [d["service"][s] for d in draws if s in d.get("service", {})]
        out[s] = {
            **mean_std([r["accuracy"] for r in runs]),
            "time_to_ready_s": mean_std([r["time_to_ready_s"] for r in runs]),
            "time_to_live_s": mean_std([r.get("time_to_live_s", r["time_to_ready_s"]) for r in runs]),
            "predict_inputs_per_s": mean_std([r["predict_inputs_per_s"] for r in runs]),
            "chosen": dict(Counter(r["strategy"] + (f"@{r['tap']}" if r.get("tap") not in (None, "", "last") else "")
                                   for r in runs)),
            "label_text_weight": mean_std([r["label_text"]["weight"] for r in runs if r.get("label_text")]),
        }
        paired = [d["service"][s]["accuracy"] - d["reference"]["accuracy"]
                  for d in draws if s in d.get("service", {}) and "reference" in d]
        out[s]["minus_reference"] = mean_std(paired)
    return out


def write_json(path: pathlib.Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=False, default=str) + "\n")
    tmp.replace(path)


def pct(stats: dict | None) -> str:
    if not stats or stats.get("mean") is None:
        return "-"
    if stats["n"] > 1:
        return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"
    return f"{100 * stats['mean']:.1f}"


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """One row per (dataset, N): reference, each strategy with its paired difference to the reference,
    what AUTO chose, mean time-to-READY per strategy, and the published figure."""
    strategies = results["config"]["strategies"]
    head = ["dataset", "N/label", "draws", "test n", "LogReg ref"]
    for s in strategies:
        head += [s.upper(), f"{s.upper()} − ref (pp)"]
        if s == "auto":
            head += ["AUTO chose (draws)", "label words (weight)"]
    head += [f"live / ready s {s.upper()}" for s in strategies] + ["published"]
    rows = []
    for name, ds in results["datasets"].items():
        for shots, cell in ds.get("cells", {}).items():
            summ = summarize(cell, strategies)
            row = [name, shots, str(len(cell["draws"])), str(ds["test"]), pct(summ["reference"])]
            for s in strategies:
                d = summ[s]["minus_reference"]
                row += [pct(summ[s]), "-" if d["mean"] is None else f"{100 * d['mean']:+.1f}"]
                if s == "auto":
                    row.append(", ".join(f"{k} {v}" for k, v in sorted(summ[s]["chosen"].items())) or "-")
                    w = summ[s]["label_text_weight"]
                    row.append("-" if w["mean"] is None else f"{w['mean']:.1f}")
            for s in strategies:
                t, live = summ[s]["time_to_ready_s"], summ[s]["time_to_live_s"]
                row.append("-" if t["mean"] is None else f"{live['mean']:.1f} / {t['mean']:.1f}")
            row.append(PUBLISHED.get((name, shots), ""))
            rows.append(row)
    return head, rows


def print_table(results: dict) -> None:
    head, rows = table_rows(results)
    table = Table(title="few-shot accuracy, % (mean ± std over draws)")
    for h in head:
        table.add_column(h, justify="left" if h in ("dataset", "published", "AUTO chose (draws)") else "right")
    for row in rows:
        table.add_row(*row)
    Console(highlight=False, width=None if sys.stdout.isatty() else 250).print(table)


def markdown_table(results: dict) -> str:
    head, rows = table_rows(results)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --- the run ----------------------------------------------------------------------------------------


def fingerprint(ds: Dataset, backbone: str, args: argparse.Namespace) -> str:
    key = {"test": digest(ds.test_inputs, ds.test_labels), "pool": digest(ds.train_inputs, ds.train_labels),
           "backbone": backbone, "seed": args.seed}
    if args.unfreeze_blocks:
        key["unfreeze_blocks"] = args.unfreeze_blocks
    if args.epochs:
        key["epochs"] = args.epochs
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def task_id_for(name: str, shots: str, d: int, strategy: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", name)[:60]
    return f"fewshot-{safe}-{shots}-d{d}-{strategy}-{uuid.uuid4().hex[:8]}"


def run_dataset(stub, ds: Dataset, backbone: str, args, reference: Reference, results: dict) -> None:
    entry = results["datasets"].get(ds.name)
    fp = fingerprint(ds, backbone, args)
    if entry is None or entry.get("fingerprint") != fp:
        if entry is not None:
            console.print(f"[yellow]{ds.name}: data, backbone or seed changed since the saved results; starting over")
        entry = {"fingerprint": fp, "cells": {}}
    entry.update(ds.summary())
    entry.update(backbone=backbone, reference=Reference.HOW)
    results["datasets"][ds.name] = entry
    shot_list = args.image_shots if ds.modality == "image" else args.shots
    batch = args.batch or (64 if ds.modality == "image" else 256)
    test_payloads = [ds.payload(x) for x in ds.test_inputs]
    test_features = None
    pool_features: dict[int, np.ndarray] = {}
    declared = ds.labels

    for shots in shot_list:
        cell = entry["cells"].setdefault(shots, {"shots": shots, "draws": []})
        n_draws = 1 if shots == "all" else args.draws
        cell["draws_requested"] = n_draws
        if shots == "all":
            cell["note"] = "the whole pool: every draw would be the same set, so one draw"
        by_index = {d["draw"]: d for d in cell["draws"]}
        for d in range(n_draws):
            seed = [args.seed, 0 if shots == "all" else int(shots), d]
            idx = draw(ds, None if shots == "all" else int(shots), seed)
            rec = by_index.get(d)
            train_digest = digest([ds.train_inputs[i] for i in idx], [ds.train_labels[i] for i in idx])
            if rec is None or rec.get("train_digest") != train_digest:
                rec = {"draw": d, "seed": seed, "n_train": int(len(idx)), "train_digest": train_digest,
                       "service": {}}
                by_index[d] = rec
                cell["draws"] = [by_index[k] for k in sorted(by_index)]
            payloads = [ds.payload(ds.train_inputs[i]) for i in idx]
            labels = [ds.train_labels[i] for i in idx]
            line = [f"{ds.name} N={shots} draw {d + 1}/{n_draws} ({len(idx)} examples):"]
            for strategy in args.strategies:
                if strategy in rec["service"]:
                    continue
                task_id = task_id_for(ds.name, shots, d, strategy)
                run = train_task(stub, task_id, backbone, payloads, labels, declared, strategy,
                                 args.unfreeze_blocks, args.epochs)
                predicted, seconds = predict(stub, task_id, test_payloads, batch)
                if not args.keep_tasks:
                    delete_task(stub, task_id)
                run["accuracy"] = round(float(np.mean([p == t for p, t in zip(predicted, ds.test_labels)])), 6)
                run["predict_seconds"] = round(seconds, 3)
                run["predict_inputs_per_s"] = round(len(test_payloads) / seconds, 1)
                rec["service"][strategy] = run
                write_json(args.out, results)
            if "reference" not in rec:
                if test_features is None:
                    start = time.perf_counter()
                    test_features = reference.features(backbone, ds, ds.test_inputs)
                    entry["reference_test_features_seconds"] = round(time.perf_counter() - start, 2)
                todo = [int(i) for i in idx if int(i) not in pool_features]
                if todo:
                    for i, v in zip(todo, reference.features(backbone, ds, [ds.train_inputs[i] for i in todo])):
                        pool_features[i] = v
                x_train = np.stack([pool_features[int(i)] for i in idx])
                rec["reference"] = Reference.fit_score(x_train, labels, test_features, ds.test_labels)
                write_json(args.out, results)
            for s in args.strategies:
                r = rec["service"][s]
                line.append(f"{s} {100 * r['accuracy']:.1f}" + (f" ({r['strategy']})" if s == "auto" else "")
                            + f" ready {r['time_to_ready_s']:.1f}s")
            line.append(f"| ref {100 * rec['reference']['accuracy']:.1f}")
            console.print(" ".join(line))
        cell["summary"] = summarize(cell, args.strategies)
        write_json(args.out, results)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        results = json.loads(args.report.read_text())
        print_table(results)
        if args.markdown:
            args.markdown.write_text(markdown_table(results))
        return 0

    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets = []
    for path in args.datasets:
        ds = load_dataset(path, split_seed=args.split_seed)
        ds.limit_test(args.image_test_limit if ds.modality == "image" else args.test_limit, seed=args.split_seed)
        datasets.append(ds)
        console.print(f"{ds.name}: {ds.modality}, {len(ds.labels)} labels, pool {len(ds.train_inputs)}, "
                      f"test {len(ds.test_inputs)}" + (f" (of {ds.meta['test_size_full']})"
                                                       if ds.meta.get("test_limit") else ""))
    has_text = any(ds.modality == "text" for ds in datasets)
    images = image_backbones(args) if any(ds.modality == "image" for ds in datasets) else {}
    if images and args.image_backbone not in images:
        raise SystemExit(f"error: image backbone {args.image_backbone!r} is not declared; declared: {sorted(images)}")

    results: dict = {}
    if args.resume and args.out.is_file():
        results = json.loads(args.out.read_text())
    config = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()
              if k not in ("report", "markdown")}
    config["datasets"] = [str(p) for p in args.datasets]
    config["image_backbones"] = images
    config["command"] = " ".join(["python", "bench/fewshot.py", *(argv if argv is not None else sys.argv[1:])])
    results.update(schema=1, config=config, environment=environment(), published_references=
                   {f"{k[0]} N={k[1]}": v for k, v in PUBLISHED.items()})
    results.setdefault("datasets", {})
    results.setdefault("runs", []).append({"started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                                           "command": config["command"], "config": config,
                                           "load_average_at_start": results["environment"]["load_average_at_start"]})
    start = time.perf_counter()

    with server(args, args.backbone if has_text else None, images) as srv:
        channel, stub = connect(srv["address"])
        with channel:
            results["server"] = {**srv, "backbones": describe_backbones(stub)}
            for name, info in results["server"]["backbones"].items():
                if not info["available"]:
                    raise SystemExit(f"error: backbone {name} is unavailable: {info['unavailable_reason']}")
            reference = Reference(args.backbone if has_text else None, images)
            for ds in datasets:
                backbone = args.image_backbone if ds.modality == "image" else args.backbone
                ds_start = time.perf_counter()
                run_dataset(stub, ds, backbone, args, reference, results)
                results["datasets"][ds.name].setdefault("seconds", []).append(round(time.perf_counter() - ds_start, 1))
                write_json(args.out, results)

    results["runs"][-1].update(
        finished_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        seconds=round(time.perf_counter() - start, 1),
        load_average_at_end=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    )
    write_json(args.out, results)
    print_table(results)
    if args.markdown:
        args.markdown.write_text(markdown_table(results))
    console.print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
