#!/usr/bin/env python
"""Real-time serving: the service against the raw in-process pipeline, in one run, on the same inputs.

    python bench/serving.py                       # everything (what `make bench-serving` runs)
    python bench/serving.py --docs                # ... and update the Serving section of docs/benchmarks.md
    python bench/serving.py --scale-tasks 0 --concurrency 1 16 --duration 3   # a quick look

For each backbone (text: minilm-l6, real weights; image: the shared ImageNet MobileNetV2 weights, skipped
with a message when ../shared is absent) it measures, on the same inputs (SST-2 test sentences and
Caltech-101 validation images when ../shared is there, else seeded synthetic ones):

1. raw: the pipeline with no service, called directly in-process: preprocessing (tokenise / decode+resize)
   + the ONNX trunk + the task's ONNX head, batch 1 and batch sizes up to --batch-sizes (best throughput);
2. service: a real server on 127.0.0.1 (in this process), real gRPC clients in a separate process
   (bench/serving_client.py: grpc.aio, closed loop, one input per request) at each --concurrency;

and prints p50/p99 latency, throughput, the mean batch the server formed and the ratios service/raw.
Scale mode registers --scale-tasks tasks on the text backbone (Store.import_heads) and spreads requests
uniformly over --scale-spread of them (p99 against the single-task p99 at the same concurrency), and
measures memory per loaded head and per idle task and the head cache's hits, loads and evictions. It also times CreateTask (8 examples x 3 labels, text) to READY.

Results: JSON + PNG (+ Markdown) under bench/results/ (`-gpu` in the names when the trunk ran on CUDA);
--docs writes the table between the serving markers of docs/benchmarks.md and copies the plot to docs/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import logging
import os
import pathlib
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.serving_client import write_requests  # noqa: E402
from service.gen import headserve_pb2 as pb  # noqa: E402
from service.gen import headserve_pb2_grpc as pb_grpc  # noqa: E402

log = logging.getLogger("bench.serving")

SHARED = ROOT.parent / "shared" / "data"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet" / "mobilenet_v2_imagenet.safetensors"
SST2_TEST = SHARED / "text" / "sst2_sentences" / "stsa.binary.test"
CALTECH = SHARED / "images" / "caltech101_10"
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- serving:begin -->", "<!-- serving:end -->"

TARGETS = {"c1_latency": 1.15, "c16_throughput": 0.9, "scale_p99": 1.2, "ready_s": 1.0}

TOPICS = {
    "sports": [
        "The striker scored twice in the second half.",
        "Our team won the championship after extra time.",
        "The referee showed him a red card for the tackle.",
        "She finished the marathon in under three hours.",
        "The tennis final went to five sets.",
        "He was traded to another basketball club this season.",
        "The goalkeeper made a brilliant save in the last minute.",
        "The cyclists climbed the mountain stage in heavy rain.",
    ],
    "cooking": [
        "Simmer the tomato sauce for twenty minutes.",
        "Bake the bread until the crust is golden brown.",
        "Chop the onions and fry them in olive oil.",
        "Season the soup with salt, pepper and fresh thyme.",
        "Whisk the eggs with sugar until the mixture is pale.",
        "Marinate the chicken overnight in yogurt.",
        "Roast the vegetables in a hot oven.",
        "Knead the dough and let it rise for an hour.",
    ],
    "computing": [
        "The program crashed with a segmentation fault.",
        "Compile the code with optimisations on.",
        "The database server ran out of memory last night.",
        "Install the package and restart the app.",
        "The laptop will not boot after the firmware update.",
        "We rewrote the parser to handle unicode.",
        "The network switch dropped packets under load.",
        "Upgrade the operating system to fix the hole.",
    ],
}


# --- inputs ----------------------------------------------------------------------------------------------


AG_NEWS_TEST = SHARED / "text" / "ag_news" / "alps_agnews_test.tsv"


def load_text_mix(kind: str, n: int) -> tuple[list[str], str]:
    """short: SST-2 sentences (about 25 tokens); long: AG News title+description (about 50-150 tokens);
    mixed: two short for one long, shuffled (seed 0)."""
    if kind == "short" or not AG_NEWS_TEST.is_file():
        return load_texts(n)
    long = [line.split("\t")[0] for line in AG_NEWS_TEST.read_text(encoding="utf-8").splitlines() if "\t" in line]
    if kind == "long":
        return long[:n], f"AG News test texts ({AG_NEWS_TEST})"
    short, source = load_texts(n - n // 3)
    mixed = short + long[: n // 3]
    random.Random(0).shuffle(mixed)
    return mixed, f"{len(short)} {source} + {n // 3} AG News test texts, shuffled"


def load_texts(n: int) -> tuple[list[str], str]:
    if SST2_TEST.is_file():
        lines = [
            line.split(" ", 1)[1].strip()
            for line in SST2_TEST.read_text(encoding="utf-8").splitlines()
            if " " in line
        ]
        return lines[:n], f"SST-2 test sentences ({SST2_TEST})"
    rng = random.Random(0)
    words = (
        "the a service model fast slow request batch head trunk task label good bad film story actor plot "
        "music scene great boring fun long short new old end start day night city light dark"
    ).split()
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(6, 30))) + "." for _ in range(n)
    ], "synthetic sentences"


def load_images(n: int) -> tuple[list[bytes], str]:
    files = sorted((CALTECH / "val").glob("*/*.jpg")) if CALTECH.is_dir() else []
    if files:
        step = max(1, len(files) // n)
        return [
            f.read_bytes() for f in files[::step][:n]
        ], f"Caltech-101 (10 classes) validation images ({CALTECH})"
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        arr = np.linspace(0, 255, 320)[None, :, None] * rng.uniform(0.2, 1, 3) + rng.normal(
            0, 20, (240, 320, 3)
        )
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out, "synthetic JPEGs (320x240)"


def image_examples() -> list[tuple[bytes, str]]:
    if CALTECH.is_dir():
        classes = sorted(p.name for p in (CALTECH / "train").iterdir() if p.is_dir())[:3]
        return [
            (f.read_bytes(), c) for c in classes for f in sorted((CALTECH / "train" / c).glob("*.jpg"))[:5]
        ]
    from PIL import Image

    out = []
    for label, rgb in {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}.items():
        for i in range(5):
            arr = np.full((200, 240, 3), rgb, np.int16) + np.random.default_rng(i).integers(
                -25, 26, (200, 240, 3)
            )
            buf = io.BytesIO()
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG")
            out.append((buf.getvalue(), label))
    return out


def to_input(item: str | bytes) -> pb.Input:
    return pb.Input(text=item) if isinstance(item, str) else pb.Input(image=item)


# --- measurements ------------------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


def rss_bytes() -> int:
    """Resident memory of this process after handing freed heap pages back (glibc malloc_trim), so that
    deltas count live memory, not what the allocator happens to keep."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def busy_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def raw_pipeline(
    entry, head, items: list, batch_sizes: Sequence[int], seconds: float, quiet: bool = False
) -> dict:
    """Preprocessing + ONNX trunk + ONNX head, called directly: per batch size, latency of a batch and rows/s.
    Text is taken in length order (batches of similar lengths: the raw pipeline's best case)."""
    pre, trunk, names = entry.backbone.preprocess, entry.trunk, list(head.inputs)
    if items and isinstance(items[0], str):
        items = sorted(items, key=len)

    def once(batch):
        return head.run(trunk.outputs(pre(batch), names))

    for i in range(0 if quiet else 3):
        once(items[i : i + 1])
    out = {}
    cursor = 0
    for b in batch_sizes:
        once(items[:b])
        latencies, start, cpu0 = [], time.perf_counter(), own_cpu()
        while time.perf_counter() - start < seconds or len(latencies) < 5:
            batch = [items[(cursor + k) % len(items)] for k in range(b)]
            cursor += b
            t = time.perf_counter()
            once(batch)
            latencies.append(time.perf_counter() - t)
        total, cpu = sum(latencies), own_cpu() - cpu0
        out[b] = {
            "batch": b,
            "batches": len(latencies),
            "p50_ms": pct(latencies, 50) * 1e3,
            "p99_ms": pct(latencies, 99) * 1e3,
            "throughput": b * len(latencies) / total,
            "cpu_ms_per_input": cpu / (b * len(latencies)) * 1e3,
        }
        if not quiet:
            log.info(
                "raw %s batch %d: p50 %.2f ms, %.0f inputs/s",
                entry.spec.name,
                b,
                out[b]["p50_ms"],
                out[b]["throughput"],
            )
    return out


def service_level(
    args,
    address: str,
    requests_file: pathlib.Path,
    concurrency: int,
    lane,
    workdir: pathlib.Path,
    level: str = "",
) -> dict:
    spec = {
        "address": address,
        "concurrency": concurrency,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "requests": str(requests_file),
        "timeout_s": 120,
    }
    spec_file = workdir / f"client-{concurrency}.json"
    spec_file.write_text(json.dumps(spec))
    lane.batcher.reset_stats()
    jiffies0, cpu0, child0, wall0 = busy_jiffies(), own_cpu(), children_cpu(), time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    profile = args.results / f"serving-profile-{level.replace(':', '-')}.speedscope.json"
    with profiled(level in args.profile, profile, args.warmup + args.duration):
        proc = subprocess.run(
            [sys.executable, "-m", "bench.serving_client", str(spec_file)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=args.warmup + args.duration + 300,
        )
    wall = time.perf_counter() - wall0
    if proc.returncode:
        raise RuntimeError(f"client failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    stats = lane.batcher.reset_stats()
    server_cpu, client_cpu = own_cpu() - cpu0, children_cpu() - child0
    busy = (busy_jiffies() - jiffies0) / os.sysconf("SC_CLK_TCK")
    lat = result["latencies_s"]
    return {
        "concurrency": concurrency,
        "requests": len(lat),
        "p50_ms": pct(lat, 50) * 1e3,
        "p99_ms": pct(lat, 99) * 1e3,
        "mean_ms": float(np.mean(lat)) * 1e3 if lat else float("nan"),
        "throughput": len(lat) / result["elapsed_s"],
        "errors": result["errors"],
        "mean_batch": stats.mean_rows,
        "largest_batch": stats.largest,
        "batches": stats.batches,
        "server_cpu_cores": server_cpu / wall,
        "client_cpu_cores": client_cpu / wall,
        "other_cpu_cores": max(0.0, busy - server_cpu - client_cpu) / wall,
        "client_cpu_ms_per_request": result["cpu_s"] / max(len(lat), 1) * 1e3,
        # CPU per request, server + client, over the whole level (warm-up included) at its throughput.
        "cpu_ms_per_request": (server_cpu + client_cpu) / wall / (len(lat) / result["elapsed_s"]) * 1e3
        if lat
        else 0.0,
    }


def requests_file(requests: list[pb.PredictRequest], workdir: pathlib.Path, tag: str) -> pathlib.Path:
    path = workdir / f"requests-{tag}.bin"
    write_requests(str(path), requests)
    return path


NUMERIC = (
    "p50_ms",
    "p99_ms",
    "mean_ms",
    "throughput",
    "mean_batch",
    "largest_batch",
    "server_cpu_cores",
    "client_cpu_cores",
    "other_cpu_cores",
    "client_cpu_ms_per_request",
    "cpu_ms_per_request",
)


def summarise(levels: list[dict]) -> dict:
    """Medians over rounds (errors and request counts summed)."""
    out = {k: statistics.median(lv[k] for lv in levels) for k in NUMERIC}
    out["requests"] = sum(lv["requests"] for lv in levels)
    errors: dict[str, int] = {}
    for lv in levels:
        for code, n in lv["errors"].items():
            errors[code] = errors.get(code, 0) + n
    out["errors"] = errors
    return out


def paired_levels(args, levels_of, reference_of, tag: str) -> list[dict]:
    """For each concurrency, `args.rounds` rounds of (reference, then service) back to back.

    On a shared machine the load drifts over minutes; a ratio taken inside one round compares two
    measurements made seconds apart, and the median over rounds drops a round that a burst of other
    work spoiled. `levels_of(c)` measures the service; `reference_of(c)` the thing it is compared with."""
    out = []
    for c in args.concurrency:
        rounds = []
        for _ in range(args.rounds):
            ref = reference_of(c)
            svc = levels_of(c)
            rounds.append({"reference": ref, "service": svc})
        level = {
            "concurrency": c,
            **summarise([r["service"] for r in rounds]),
            "reference": {
                k: statistics.median(r["reference"][k] for r in rounds)
                for k in ("p50_ms", "p99_ms", "throughput", "cpu_ms_per_input", "cpu_ms_per_request")
                if k in rounds[0]["reference"]
            },
            "reference_kind": rounds[0]["reference"].get("kind", ""),
            "rounds": rounds,
        }
        for key, name in (
            ("p50_ms", "p50_ratio"),
            ("p99_ms", "p99_ratio"),
            ("throughput", "throughput_ratio"),
        ):
            level[name] = statistics.median(r["service"][key] / r["reference"][key] for r in rounds)
        log.info(
            "%s c=%d: p50 %.2f ms p99 %.2f ms, %.0f req/s, mean batch %.1f; vs %s: p50 %.2fx, p99 %.2fx, "
            "throughput %.2fx; other load %.2f cores; errors %s",
            tag,
            c,
            level["p50_ms"],
            level["p99_ms"],
            level["throughput"],
            level["mean_batch"],
            level["reference_kind"],
            level["p50_ratio"],
            level["p99_ratio"],
            level["throughput_ratio"],
            level["other_cpu_cores"],
            level["errors"],
        )
        out.append(level)
    return out


# --- tasks ---------------------------------------------------------------------------------------------------


def wait_ready(stub, task_id: str, live: list[float] | None = None) -> pb.Job:
    """Watches the task's job to its end; appends to `live` when a version first answers (perf_counter)."""
    last = None
    for job in stub.WatchJob(pb.WatchJobRequest(task_id=task_id), timeout=600):
        if job.version and live is not None and not live:
            live.append(time.perf_counter())
        last = job
    if last is None or last.state != pb.Job.SUCCEEDED:
        raise RuntimeError(f"task {task_id} did not train: {last}")
    return last


def create_task(stub, task_id: str, backbone: str, examples, strategy=pb.AUTO, live: list[float] | None = None
                ) -> float:
    """CreateTask until READY, in seconds; `live` gets the seconds until a version first answered (AUTO's
    interim feature head, when it fine-tunes)."""
    t = time.perf_counter()
    stub.CreateTask(
        pb.CreateTaskRequest(
            task_id=task_id,
            backbone=backbone,
            config=pb.TrainingConfig(strategy=strategy),
            examples=[pb.Example(input=to_input(x), label=y) for x, y in examples],
        )
    )
    wait_ready(stub, task_id, live)
    if live:
        live[0] -= t
    return time.perf_counter() - t


def time_to_ready(stub, trials: int, backbone: str = "minilm-l6") -> tuple[list[float], list[float]]:
    """CreateTask with 8 examples x 3 labels (text) until a version answers and until READY, each trial on
    new sentences (cold features)."""
    times, lives = [], []
    for k in range(trials):
        examples = [
            (f"{text[:-1]}, day {k + 1}.", label) for label, texts in TOPICS.items() for text in texts
        ]
        live: list[float] = []
        times.append(create_task(stub, f"ready-{k}-{int(time.time())}", backbone, examples, live=live))
        lives.append(live[0] if live else times[-1])
        log.info("CreateTask -> a version answers, READY (trial %d): %.3f, %.3f s", k + 1, lives[-1], times[-1])
    return lives, times


def seed_tasks(store, template_key: str, count: int, prefix: str) -> list[str]:
    """Registers `count` READY tasks of the default tenant whose version 1 is a copy of the template task's
    head, through Store.import_heads (transactions of a few thousand tasks: task row, finished job, head
    with its digest), as an operator importing trained tasks would. Each task has its own head row and,
    when used, its own onnxruntime session. Returns their task ids."""
    from service.store import DEFAULT_TENANT

    task = store.get_task(template_key)
    head = store.get_head(template_key, task.live_version)
    ids = [f"{prefix}-{i:06d}" for i in range(count)]
    n = store.import_heads(
        DEFAULT_TENANT,
        ((t, task.backbone, head.labels, head.onnx, head.evaluation) for t in ids),
        config=task.config,
        batch_size=5000,
    )
    log.info("registered %d tasks (%d B of ONNX each)", n, len(head.onnx))
    return ids


# --- the run --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per level and round")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each measurement")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (reference, service) per level")
    p.add_argument("--raw-seconds", type=float, default=3.0, help="seconds per raw batch size")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument(
        "--image-backbone",
        default="mobilenet_v2_imagenet",
        help="mobilenet_v2_imagenet (shared weights), a built-in (resnet50, needs its weights), or none",
    )
    p.add_argument("--weights", type=pathlib.Path, default=MOBILENET_WEIGHTS)
    p.add_argument("--scale-tasks", type=int, default=100_000, help="tasks registered in scale mode (0: skip)")
    p.add_argument(
        "--scale-spread", type=int, default=10_000, help="tasks the scale-mode requests spread over"
    )
    p.add_argument(
        "--scale-requests", type=int, default=5_000, help="requests drawn per scale-mode level and round"
    )
    p.add_argument(
        "--no-scale-fit", dest="scale_fit", action="store_false",
        help="when the hot set does not fit head_cache_mb, do not measure again with a budget it fits in",
    )
    p.add_argument("--ready-trials", type=int, default=5)
    p.add_argument("--inputs", type=int, default=512, help="distinct inputs per backbone")
    p.add_argument("--text-backbone", default="minilm-l6",
                   help="the text backbone served (minilm-l6, or mpnet-base when its weights are installed)")
    p.add_argument("--texts", choices=["short", "long", "mixed"], default="short",
                   help="text inputs: SST-2 sentences, AG News texts, or two short for one long")
    p.add_argument("--data-dir", type=pathlib.Path, help="server data directory (default: a temporary one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="server setting override")
    p.add_argument("--results", type=pathlib.Path, default=HERE / "results")
    p.add_argument("--docs", action="store_true", help="update docs/benchmarks.md and copy the plot to docs/")
    p.add_argument(
        "--profile",
        metavar="LEVEL",
        action="append",
        default=[],
        help="py-spy the server during the service part of LEVEL (text:16, image:1, scale:1, ...); "
        "writes bench/results/serving-profile-LEVEL.speedscope.json",
    )
    return p.parse_args(argv)


def set_overrides(args) -> dict:
    """--set KEY=VALUE settings: VALUE read as JSON where it parses, else as a string."""
    out = {}
    for kv in args.set:
        key, _, value = kv.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def settings_for(args, data_dir: pathlib.Path):
    from service.config import Settings

    overrides = set_overrides(args)
    backbones = {}
    image = args.image_backbone
    builtin = [args.text_backbone]
    if image == "mobilenet_v2_imagenet":
        if args.weights.is_file():
            backbones[image] = {
                "arch": "mobilenet_v2",
                "weights": str(args.weights),
                "mean": [0.5, 0.5, 0.5],
                "std": [0.5, 0.5, 0.5],
                "image_size": 224,
                "resize": 256,
            }
        else:
            print(
                f"image backbone skipped: {args.weights} not found (the shared MobileNetV2 weights live in "
                "../shared/data/weights/); pass --image-backbone resnet50 with its torchvision weights installed",
                file=sys.stderr,
            )
            image = None
    elif image and image != "none":
        builtin.append(image)
    else:
        image = None
    settings = Settings.load(
        address="127.0.0.1:0",
        data_dir=data_dir,
        builtin_backbones=builtin,
        backbones=backbones,
        log_level="WARNING",
        **overrides,
    )
    return settings, image


def environment(args, settings, registry) -> dict:
    import grpc
    import onnxruntime

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
            ).stdout.strip()
        )
    except OSError:
        commit, dirty = "", False
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "",
    )
    return {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit + ("+dirty" if dirty else ""),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "grpcio": grpc.__version__,
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "switch_interval_ms": sys.getswitchinterval() * 1e3,  # the server's (setting switch_interval_ms)
        "device": registry.device,
        "rounds": args.rounds,
        "settings": {
            k: getattr(settings, k)
            for k in (
                "batch_max_size",
                "batch_adaptive",
                "batch_max_delay_us",
                "batch_queue_inputs",
                "head_cache_mb",
                "grpc_workers",
                "intra_op_threads",
                "trunk_spinning",
                "precision",
            )
        },
    }


@contextlib.contextmanager
def profiled(enabled: bool, out: pathlib.Path, seconds: float):
    if not enabled:
        yield None
        return
    local = pathlib.Path(sys.executable).parent / "py-spy"
    exe = str(local) if local.is_file() else shutil.which("py-spy")
    if not exe:
        print(
            "--profile: py-spy is not installed (pip install py-spy); skipping the profile", file=sys.stderr
        )
        yield None
        return
    proc = subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(os.getpid()),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--format",
            "speedscope",
            "--output",
            str(out),
            "--threads",
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield out
    finally:
        try:
            proc.wait(seconds + 60)
        except subprocess.TimeoutExpired:
            proc.kill()


def profile_summary(path: pathlib.Path, top: int = 12) -> dict:
    """Share of the server's sampled (non-idle) time per function: self time, and a few inclusive groups."""
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    total = 0.0
    self_time: dict[str, float] = {}
    groups = {
        "trunk (Session.run under TrunkRuntime)": 0.0,
        "heads (HeadRuntime.run)": 0.0,
        "tokenizer": 0.0,
        "gRPC Python layer (grpc/_server.py)": 0.0,
        "headserve code, self time": 0.0,
    }
    for prof in data["profiles"]:
        for stack, weight in zip(prof["samples"], prof["weights"]):
            total += weight
            if not stack:
                continue
            names = [frames[f]["name"] for f in stack]
            files = [frames[f].get("file", "") for f in stack]
            leaf = f"{names[-1]} ({pathlib.Path(files[-1]).name})"
            self_time[leaf] = self_time.get(leaf, 0.0) + weight
            if "TrunkRuntime._run" in names or "TrunkRuntime.outputs" in names:
                groups["trunk (Session.run under TrunkRuntime)"] += (
                    weight if names[-1] == "Session.run" else 0.0
                )
            if "HeadRuntime.run" in names:
                groups["heads (HeadRuntime.run)"] += weight
            if any("tokeniz" in f for f in files):
                groups["tokenizer"] += weight
            if files[-1].endswith("grpc/_server.py"):
                groups["gRPC Python layer (grpc/_server.py)"] += weight
            if any(part in files[-1] for part in ("/service/", "/adapters/")):
                groups["headserve code, self time"] += weight
    total = total or 1.0
    return {
        "samples_s": total,
        "groups": {k: v / total for k, v in groups.items()},
        "self": sorted(((v / total, k) for k, v in self_time.items()), reverse=True)[:top],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The server logs at WARNING, as configured below (no access line per RPC); only the bench talks.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    args.results.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="headserve-bench-")
    data_dir = args.data_dir or pathlib.Path(tmp.name) / "data"
    workdir = pathlib.Path(tmp.name)

    import grpc

    from adapters.runtime import HeadRuntime
    from service.server import build_server
    from service.store import DEFAULT_TENANT, task_key

    settings, image_backbone = settings_for(args, data_dir)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    running = build_server(settings)
    log.info("server up on %s in %.1f s", running.address, time.perf_counter() - t0)
    registry, store = running.app.registry, running.app.store
    gpu = registry.device.startswith("cuda")
    suffix = "-gpu" if gpu else ""
    report: dict = {
        "environment": environment(args, settings, registry),
        "backbones": {},
        "load_average_start": load0,
    }
    channel = grpc.insecure_channel(running.address)
    stub = pb_grpc.HeadServeStub(channel)
    try:
        report["create_to_live_s"], report["create_to_ready_s"] = time_to_ready(stub, args.ready_trials,
                                                                               args.text_backbone)

        texts, text_source = load_text_mix(args.texts, args.inputs)
        plans = [(args.text_backbone, texts, text_source, [(t, y) for y, ts in TOPICS.items() for t in ts], "text")]
        if image_backbone:
            images, image_source = load_images(min(args.inputs, 256))
            plans.append((image_backbone, images, image_source, image_examples(), "image"))

        for backbone, items, source, examples, tag in plans:
            entry = registry.get(backbone)
            task_id = f"bench-{tag}"
            create_task(stub, task_id, backbone, examples, pb.LINEAR)
            key = task_key(DEFAULT_TENANT, task_id)  # auth is off: the default tenant's task
            record = store.get_head(key, store.get_task(key).live_version)
            head = HeadRuntime(record.onnx, record.labels, record.version, backbone, registry.device)
            log.info("%s: raw pipeline on %d inputs (%s)", backbone, len(items), source)
            sweep = raw_pipeline(entry, head, items, args.batch_sizes, args.raw_seconds)
            best = max(sweep.values(), key=lambda r: r["throughput"])["batch"]
            path = requests_file(
                [pb.PredictRequest(task_id=task_id, inputs=[to_input(x)]) for x in items], workdir, tag
            )
            lane = running.app.predictor.lane(backbone)

            def reference(c, entry=entry, head=head, items=items, best=best):
                b = 1 if c == 1 else best
                return {
                    **raw_pipeline(entry, head, items, [b], args.raw_seconds, quiet=True)[b],
                    "kind": f"raw b={b}",
                }

            def service(c, path=path, lane=lane, tag=tag):
                return service_level(args, running.address, path, c, lane, workdir, f"{tag}:{c}")

            levels = paired_levels(args, service, reference, tag)
            report["backbones"][backbone] = {
                "modality": tag,
                "inputs": source,
                "task": task_id,
                "feature_dim": entry.backbone.feature_dim,
                "raw": {"by_batch": list(sweep.values()), "best_batch": best},
                "service": levels,
            }
            if tag == "text":
                text_requests = path

        if args.scale_tasks:
            report["scale"] = scale_mode(args, running, texts, workdir, text_requests)
    finally:
        channel.close()
        running.stop()
        tmp.cleanup()
    report["load_average_end"] = os.getloadavg()
    report["targets"] = check_targets(report)
    report["profiles"] = {}
    for level in args.profile:
        path = args.results / f"serving-profile-{level.replace(':', '-')}.speedscope.json"
        if path.is_file():
            report["profiles"][level] = profile_summary(path)

    out_json = args.results / f"serving{suffix}.json"
    out_json.write_text(json.dumps(report, indent=2, default=float))
    png = args.results / f"serving{suffix}.png"
    plot(report, png)
    markdown = render_markdown(
        report, png.name, " ".join(["python bench/serving.py", *(argv or sys.argv[1:])])
    )
    (args.results / f"serving{suffix}.md").write_text(markdown)
    print(markdown)
    if args.docs:
        update_docs(markdown, png, gpu)
    log.info("wrote %s, %s", out_json, png)
    return 0


def scale_mode(args, running, texts: list[str], workdir: pathlib.Path, single_requests: pathlib.Path) -> dict:
    """--scale-tasks registered tasks, requests drawn uniformly over --scale-spread of them (a new draw for
    every level and round, so that the traffic keeps reaching the whole hot set), against the same inputs
    sent to one task, round by round. Memory: RSS per idle registered task, per loaded head; the head
    cache's hits, loads and evictions while traffic was spread."""
    from service.store import DEFAULT_TENANT, task_key

    store, predictor = running.app.store, running.app.predictor
    db = pathlib.Path(store.url.database or "") if store.dialect == "sqlite" else None

    def db_bytes() -> int:  # SQLite's file with its WAL (0 on PostgreSQL: its server's disk)
        return sum(p.stat().st_size for p in db.parent.glob(db.name + "*")) if db else 0

    def cache_stats() -> dict:
        return dict(predictor.heads.stats.__dict__)

    rss0, db0 = rss_bytes(), db_bytes()
    t = time.perf_counter()
    ids = seed_tasks(store, task_key(DEFAULT_TENANT, "bench-text"), args.scale_tasks, "scale")
    seed_s = time.perf_counter() - t
    rss1, db1 = rss_bytes(), db_bytes()
    rng = random.Random(0)
    spread = rng.sample(ids, min(args.scale_spread, len(ids)))
    keys = [task_key(DEFAULT_TENANT, t) for t in spread]
    # Loading heads on first use, in-process: store read + onnxruntime session, per head. RSS per loaded
    # head over the first heads (that fit any budget); then the rest of the hot set, least recent first out.
    first = keys[: min(1000, len(keys))]
    heads0 = len(predictor.heads)
    t = time.perf_counter()
    for key in first:
        predictor.heads.get(key)
    load_first_s = time.perf_counter() - t
    first_heads = len(predictor.heads)
    rss2 = rss_bytes()
    for key in keys[len(first) :]:
        predictor.heads.get(key)
    load_s = (time.perf_counter() - t) / len(keys)
    rss3 = rss_bytes()
    after_warm = cache_stats()
    lane = predictor.lane("minilm-l6")
    counted = {"hits": 0, "loads": 0, "evictions": 0}  # the spread rounds' cache counts, per pass
    draws = iter(range(1, 1 << 30))

    def single(c):  # the same inputs, all to one task
        return {
            **service_level(args, running.address, single_requests, c, lane, workdir, f"one-task:{c}"),
            "kind": "one task",
        }

    def spread_over(c):
        draw = random.Random(next(draws))
        path = requests_file(
            [
                pb.PredictRequest(
                    task_id=spread[draw.randrange(len(spread))], inputs=[pb.Input(text=texts[i % len(texts)])]
                )
                for i in range(args.scale_requests)
            ],
            workdir,
            "scale",
        )
        before = cache_stats()
        level = service_level(args, running.address, path, c, lane, workdir, f"scale:{c}")
        after = cache_stats()
        level["cache"] = {k: after[k] - before[k] for k in ("hits", "loads", "evictions")}
        for k in counted:
            counted[k] += level["cache"][k]
        return level

    def measure(tag: str) -> tuple[list[dict], dict]:
        for k in counted:
            counted[k] = 0
        levels = paired_levels(args, spread_over, single, tag)
        for lv in levels:
            lv["cache"] = {k: sum(r["service"]["cache"][k] for r in lv["rounds"]) for k in counted}
        return levels, dict(counted)

    levels, traffic = measure("scale")
    estimate = after_warm["bytes"] / max(after_warm["heads"], 1)
    result = {
        "tasks": args.scale_tasks,
        "spread": len(spread),
        "seed_s": seed_s,
        "idle_task_rss_bytes": (rss1 - rss0) / args.scale_tasks,
        "idle_task_disk_bytes": (db1 - db0) / args.scale_tasks,
        "loaded_head_rss_bytes": (rss2 - rss1) / max(first_heads - heads0, 1),  # (those still loaded)
        "loaded_head_estimate_bytes": estimate,
        "head_load_ms": load_first_s / len(first) * 1e3,
        "warm_load_ms": load_s * 1e3,
        "rss_bytes": {"before": rss0, "registered": rss1, "first_heads": rss2, "hot_set_loaded": rss3},
        "head_cache_budget_bytes": predictor.heads.budget_bytes,
        "hot_set_fits": after_warm["evictions"] == 0,
        "heads_that_fit": int(predictor.heads.budget_bytes // max(estimate, 1)),
        "cache_after_warm": after_warm,
        "cache_traffic": traffic,
        "cache": cache_stats(),
        "service": levels,
    }
    if args.scale_fit and not result["hot_set_fits"]:
        # The same measurement with a budget the hot set fits in (the LRU's estimate + 10%), in this run.
        budget = predictor.heads.budget_bytes
        fit_mb = -(-int(len(keys) * estimate * 1.1) >> 20)
        predictor.heads.set_budget(fit_mb << 20)
        for key in keys:
            predictor.heads.get(key)
        warm = cache_stats()
        fit_levels, fit_traffic = measure(f"scale@{fit_mb}MiB")
        result["fit"] = {
            "head_cache_mb": fit_mb,
            "heads_loaded": warm["heads"],
            "rss_bytes": rss_bytes(),
            "cache_traffic": fit_traffic,
            "service": fit_levels,
        }
        predictor.heads.set_budget(budget)
        log.info("scale with head_cache_mb=%d: %d heads loaded; spread traffic %s", fit_mb, warm["heads"], fit_traffic)
    hits_share = traffic["hits"] / max(traffic["hits"] + traffic["loads"], 1)
    log.info(
        "scale: %d tasks, %d hot; idle task %.0f B RSS, %.0f B disk; loaded head %.0f B RSS (estimate %.0f B), "
        "load %.2f ms; cache after warming: %d heads, %d evictions (budget %d MiB: %s); spread traffic: "
        "%d hits, %d loads, %d evictions (%.0f%% hits)",
        args.scale_tasks,
        len(spread),
        result["idle_task_rss_bytes"],
        result["idle_task_disk_bytes"],
        result["loaded_head_rss_bytes"],
        estimate,
        result["head_load_ms"],
        after_warm["heads"],
        after_warm["evictions"],
        predictor.heads.budget_bytes >> 20,
        "the hot set fits" if result["hot_set_fits"] else "the hot set does not fit",
        traffic["hits"],
        traffic["loads"],
        traffic["evictions"],
        100 * hits_share,
    )
    return result


# --- targets, table, plot --------------------------------------------------------------------------------------


def check_targets(report: dict) -> list[dict]:
    out = []
    text = next((b for b in report["backbones"].values() if b.get("modality") == "text"), None)
    if text:
        by_c = {lv["concurrency"]: lv for lv in text["service"]}
        if 1 in by_c:
            r = by_c[1]["p50_ratio"]
            out.append(
                {
                    "target": "c=1: service p50 / raw batch-1 p50",
                    "limit": f"<= {TARGETS['c1_latency']}",
                    "measured": r,
                    "met": r <= TARGETS["c1_latency"],
                }
            )
        if 16 in by_c:
            r = by_c[16]["throughput_ratio"]
            out.append(
                {
                    "target": f"c=16: service throughput / raw best-batch ({by_c[16]['reference_kind']}) throughput",
                    "limit": f">= {TARGETS['c16_throughput']}",
                    "measured": r,
                    "met": r >= TARGETS["c16_throughput"],
                }
            )
        scale = report.get("scale")
        if scale:
            passes = [(scale["service"], "")]
            if scale.get("fit"):
                passes.append((scale["fit"]["service"], f", head_cache_mb={scale['fit']['head_cache_mb']}"))
            for levels, budget in passes:
                for lv in levels:
                    r = lv["p99_ratio"]
                    out.append(
                        {
                            "target": (
                                f"c={lv['concurrency']}: p99 with {scale['tasks']:,} tasks ({scale['spread']:,} "
                                f"used{budget}) / single-task p99"
                            ),
                            "limit": f"<= {TARGETS['scale_p99']}",
                            "measured": r,
                            "met": r <= TARGETS["scale_p99"],
                        }
                    )
    ready = report.get("create_to_ready_s")
    if ready:
        for key, what in (("create_to_live_s", "a version answers Predict"), ("create_to_ready_s", "READY")):
            worst = max(report.get(key) or ready)
            out.append(
                {
                    "target": f"CreateTask (8 x 3 text) -> {what}, worst of trials (s)",
                    "limit": f"<= {TARGETS['ready_s']}",
                    "measured": worst,
                    "met": worst <= TARGETS["ready_s"],
                }
            )
    return out


def render_markdown(report: dict, png_name: str, command: str) -> str:
    env = report["environment"]
    rounds = env.get("rounds", 1)
    lines = [
        f"Measured {env['when']} at commit `{env['commit']}` on {env['cores']} cores ({env['cpu']}), device "
        f"`{env['device']}`, onnxruntime {env['onnxruntime']}, grpcio {env['grpcio']}. Server settings: "
        + ", ".join(f"`{k}={v}`" for k, v in env["settings"].items())
        + f"; switch interval {env.get('switch_interval_ms', 5.0):g} ms.",
        f"Load average (1/5/15 min) at start {tuple(round(x, 2) for x in report['load_average_start'])}, at end "
        f"{tuple(round(x, 2) for x in report['load_average_end'])}: the machine was shared with other work; the "
        "`other load` column is the CPU other processes used during that level, in cores (of "
        f"{env['cores']}). `CPU ms/req` is the CPU the server and the client process spent per request (the raw "
        f"pipeline's CPU per input in brackets). Every level is {rounds} rounds of (reference, then service) back to back; figures are "
        "medians over rounds, and each ratio is the median of the per-round ratios.",
        "",
        "```bash",
        command,
        "```",
        "",
    ]
    for name, b in report["backbones"].items():
        lines += [
            f"#### {name} ({b['modality']}; inputs: {b['inputs']})",
            "",
            "Raw pipeline (preprocessing + ONNX trunk + ONNX head, in-process, no service), one sweep:",
            "",
            "| batch | p50 ms | p99 ms | inputs/s | CPU ms/input |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in b["raw"]["by_batch"]:
            mark = " (best)" if r["batch"] == b["raw"]["best_batch"] else ""
            lines.append(
                f"| {r['batch']}{mark} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['throughput']:.0f} | "
                f"{r['cpu_ms_per_input']:.1f} |"
            )
        lines += [
            "",
            "Service (gRPC on loopback, clients in another process, one input per request); the reference "
            "is raw batch 1 for concurrency 1 and raw best batch otherwise, measured in the same rounds:",
            "",
            "| concurrency | p50 ms | p99 ms | req/s | mean batch | reference | ref p50 ms | ref inputs/s | "
            "p50 / ref | req/s / ref | CPU ms/req (ref) | server CPU | client CPU | other load | errors |",
            "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for lv in b["service"]:
            ref = lv["reference"]
            lines.append(
                f"| {lv['concurrency']} | {lv['p50_ms']:.2f} | {lv['p99_ms']:.2f} | {lv['throughput']:.0f} | "
                f"{lv['mean_batch']:.1f} | {lv['reference_kind']} | {ref['p50_ms']:.2f} | {ref['throughput']:.0f} | "
                f"{lv['p50_ratio']:.2f}x | {lv['throughput_ratio']:.2f}x | "
                f"{lv['cpu_ms_per_request']:.1f} ({ref.get('cpu_ms_per_input', float('nan')):.1f}) | {lv['server_cpu_cores']:.2f} | "
                f"{lv['client_cpu_cores']:.2f} | {lv['other_cpu_cores']:.2f} | {sum(lv['errors'].values())} |"
            )
        lines.append("")
    scale = report.get("scale")
    if scale:
        lines += [
            f"#### Scale: {scale['tasks']:,} tasks on minilm-l6, requests spread over {scale['spread']:,}",
            "",
            (
                "Each round measures the same inputs sent to one task, then the same inputs to tasks drawn "
                "uniformly from the hot set (a new draw each round); the head cache's hits, loads and evictions "
                "are those of the spread rounds:"
            ),
            "",
            (
                "| concurrency (head cache) | p50 ms | p99 ms | req/s | mean batch | one task: p50 ms | "
                "one task: p99 ms | p99 / one task | req/s / one task | cache hits / loads / evictions | other load | "
                "errors |"
            ),
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
        ]
        warm, budget = scale["cache_after_warm"], scale["head_cache_budget_bytes"]
        fit = scale.get("fit")
        passes = [(budget >> 20, scale["service"])] + ([(fit["head_cache_mb"], fit["service"])] if fit else [])
        for mb, levels in passes:
            for lv in levels:
                ref, cache = lv["reference"], lv["cache"]
                lines.append(
                    f"| {lv['concurrency']} ({mb} MiB) | {lv['p50_ms']:.2f} | {lv['p99_ms']:.2f} | "
                    f"{lv['throughput']:.0f} | {lv['mean_batch']:.1f} | {ref['p50_ms']:.2f} | {ref['p99_ms']:.2f} | "
                    f"{lv['p99_ratio']:.2f}x | {lv['throughput_ratio']:.2f}x | "
                    f"{cache['hits']} / {cache['loads']} / {cache['evictions']} | {lv['other_cpu_cores']:.2f} | "
                    f"{sum(lv['errors'].values())} |"
                )
        lines += [
            "",
            (
                f"Head cache: budget {budget >> 20} MiB (`head_cache_mb`), about {scale['heads_that_fit']:,} heads "
                f"at the LRU's estimate; after loading the {scale['spread']:,} hot heads once it held "
                f"{warm['heads']:,} ({warm['evictions']:,} evicted): the hot set "
                f"{'fits' if scale['hot_set_fits'] else '**does not fit**'}."
                + (
                    f" Measured again in this run with `head_cache_mb={fit['head_cache_mb']}` "
                    f"({fit['heads_loaded']:,} heads loaded, RSS {fit['rss_bytes'] / 2**30:.2f} GiB)."
                    if fit
                    else ""
                )
            ),
            "",
            (
                f"Memory: a loaded head (linear, 3 labels) adds {scale['loaded_head_rss_bytes'] / 1024:.0f} KiB of "
                f"RSS (the LRU's estimate: {scale['loaded_head_estimate_bytes'] / 1024:.0f} KiB) and loads in "
                f"{scale['head_load_ms']:.2f} ms (store read + onnxruntime session); an idle registered task adds "
                f"{scale['idle_task_rss_bytes']:.0f} B of RSS and {scale['idle_task_disk_bytes'] / 1024:.1f} KiB "
                f"on disk. Registering the {scale['tasks']:,} tasks (Store.import_heads) took {scale['seed_s']:.1f} s."
            ),
            "",
        ]
    ready = report.get("create_to_ready_s")
    if ready:
        live = report.get("create_to_live_s") or ready
        lines += [
            "CreateTask (8 examples x 3 labels, text, new sentences each time) until a version answers Predict: "
            + ", ".join(f"{t:.2f}" for t in live)
            + f" s (median {statistics.median(live):.2f} s); to READY: "
            + ", ".join(f"{t:.2f}" for t in ready)
            + f" s (median {statistics.median(ready):.2f} s).",
            "",
        ]
    lines += ["#### Targets", "", "| target | limit | measured | met |", "|---|---|---:|---|"]
    for t in report["targets"]:
        lines.append(
            f"| {t['target']} | {t['limit']} | {t['measured']:.2f} | {'yes' if t['met'] else '**no**'} |"
        )
    for level, prof in report.get("profiles", {}).items():
        lines += [
            "",
            f"py-spy profile of the server during `{level}` ({prof['samples_s']:.1f} s of samples, "
            "all threads, idle time excluded): "
            + "; ".join(f"{k} {v:.1%}" for k, v in prof["groups"].items())
            + ". Top self time: "
            + "; ".join(f"`{name}` {share:.1%}" for share, name in prof["self"][:6])
            + ".",
        ]
    lines += ["", f"![latency vs throughput]({png_name})", ""]
    return "\n".join(lines)


def plot(report: dict, path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'); no plot", file=sys.stderr)
        return
    names = list(report["backbones"])
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 5), squeeze=False)
    for ax, name in zip(axes[0], names):
        b = report["backbones"][name]
        raw = b["raw"]["by_batch"]
        ax.plot(
            [r["throughput"] for r in raw],
            [r["p50_ms"] for r in raw],
            "s-",
            color="grey",
            label="raw p50 (by batch size)",
        )
        for r in raw:
            ax.annotate(
                f"b={r['batch']}",
                (r["throughput"], r["p50_ms"]),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=7,
                color="grey",
            )
        series = [("service", b["service"], "tab:blue")]
        if name == "minilm-l6" and report.get("scale"):
            series.append(
                (f"service, {report['scale']['tasks']:,} tasks", report["scale"]["service"], "tab:orange")
            )
        for label, levels, color in series:
            thr = [lv["throughput"] for lv in levels]
            ax.plot(thr, [lv["p50_ms"] for lv in levels], "o-", color=color, label=f"{label} p50")
            ax.plot(thr, [lv["p99_ms"] for lv in levels], "o--", color=color, alpha=0.6, label=f"{label} p99")
            for lv in levels:
                ax.annotate(
                    f"c={lv['concurrency']}",
                    (lv["throughput"], lv["p50_ms"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=color,
                )
        ax.set_yscale("log")
        ax.set_xlabel("throughput (inputs/s)")
        ax.set_ylabel("latency (ms, log)")
        ax.set_title(f"{name}: service vs raw pipeline ({report['environment']['device']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_docs(markdown: str, png: pathlib.Path, gpu: bool) -> None:
    """Writes the table between the serving markers of docs/benchmarks.md (other sections untouched)."""
    DOCS.parent.mkdir(exist_ok=True)
    target_png = DOCS.parent / png.name
    if png.is_file():
        shutil.copyfile(png, target_png)
    begin, end = (
        (BEGIN.replace("serving", "serving-gpu"), END.replace("serving", "serving-gpu"))
        if gpu
        else (BEGIN, END)
    )
    text = DOCS.read_text() if DOCS.is_file() else "# Benchmarks\n"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        heading = "### Results (GPU)" if gpu else "### Results (CPU)"
        text = text.rstrip() + f"\n\n{heading}\n\n{block}\n"
    DOCS.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
