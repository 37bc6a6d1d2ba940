"""How image preprocessing on RPC threads fares against the GIL, in one process (no service, no model).

    python bench/gil_convoy.py [--images 300] [--threads 1 2 4 8 16] [--intervals 5 0.5] [--service]

The server preprocesses each image on its RPC thread (decode, resize, crop, normalise), and every step that
leaves Python (Pillow's decoder and resize, numpy) releases the GIL and must take it back. A thread that
wants it back while another runs Python waits until that one blocks or until the interpreter's switch
interval (`sys.setswitchinterval`, 5 ms by default) forces a switch. Two tables (three with `--service`),
each at every switch interval of `--intervals` (milliseconds):

  beside     one thread preprocessing alone, then beside a thread that only runs Python (the worst case
             of RPC threads busy with protobuf and the pipeline): ms per image
  threads    N threads sharing `--images` images (the RPC threads of N concurrent requests): images/s
  service    (with --service) a real server (minilm-l6, SQLite, 2,000 READY tasks) and one client in another
             process calling Predict one at a time: p50 and p99 alone, and while a second client process
             lists tasks 500 to a page without pause (a call that runs much Python in the server)

Synthetic 320x240 JPEGs (what bench/serving.py sends); MobileNet's transform (resize 256, crop 224).
Writes bench/results/gil_convoy.json; run by bench/gpu_check.sh on a lent GPU machine, where the image
path at concurrency 16 was found serial (docs/benchmarks.md, GPU).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import sys
import threading
import time

import numpy as np
from PIL import Image

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from adapters.preprocessing import ImagePreprocessor, ImageTransform


def jpegs(n: int = 32) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        # Smooth gradients plus noise: a photo's cost to decode, not white noise's.
        base = np.linspace(0, 255, 320, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1, (1, 1, 3))
        pixels = (base + rng.normal(0, 12, (240, 320, 3))).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def beside(pre: ImagePreprocessor, images: list[bytes], n: int) -> dict[str, float]:
    def ms_per_image() -> float:
        start = time.perf_counter()
        for i in range(n):
            pre([images[i % len(images)]])
        return (time.perf_counter() - start) / n * 1e3

    alone = ms_per_image()
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            for _ in range(1000):
                x += 1

    busy = threading.Thread(target=spin, daemon=True)
    busy.start()
    try:
        contended = ms_per_image()
    finally:
        stop.set()
        busy.join()
    return {"alone_ms": alone, "beside_busy_ms": contended}


def threads(pre: ImagePreprocessor, images: list[bytes], n: int, count: int) -> float:
    """Images per second of `count` threads, each preprocessing its share of `n` in a loop (no thread hands
    out work: a feeding thread would itself compete for the GIL), started together."""
    start = threading.Barrier(count + 1)

    def work(first: int) -> None:
        start.wait()
        for i in range(first, n, count):
            pre([images[i % len(images)]])

    workers = [threading.Thread(target=work, args=(k,)) for k in range(count)]
    for w in workers:
        w.start()
    began = time.perf_counter()
    start.wait()
    for w in workers:
        w.join()
    return n / (time.perf_counter() - began)


def _predict_client(address: str, calls: int, out) -> None:
    import grpc

    from service.gen import headserve_pb2 as pb
    from service.gen import headserve_pb2_grpc as pb_grpc

    stub = pb_grpc.HeadServeStub(grpc.insecure_channel(address))
    request = pb.PredictRequest(task_id="t", inputs=[pb.Input(text="The striker scored twice in the second half.")])
    for _ in range(30):
        stub.Predict(request)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        stub.Predict(request)
        times.append(time.perf_counter() - start)
    times.sort()
    out.send((1e3 * times[len(times) // 2], 1e3 * times[int(0.99 * (len(times) - 1))]))


def _list_client(address: str, stop) -> None:
    import grpc

    from service.gen import headserve_pb2 as pb
    from service.gen import headserve_pb2_grpc as pb_grpc

    stub = pb_grpc.HeadServeStub(grpc.insecure_channel(address))
    while not stop.is_set():
        stub.ListTasks(pb.ListTasksRequest(page_size=500))


def service(intervals: list[float], calls: int = 400, rounds: int = 2) -> list[dict]:
    """Predict p50/p99 at c=1, alone and beside a client listing tasks, per switch interval (see the
    module's docstring); the intervals alternate within each round."""
    import multiprocessing as mp
    import tempfile

    import grpc

    from bench.serving import TOPICS, create_task, seed_tasks
    from service.config import Settings
    from service.gen import headserve_pb2 as pb
    from service.gen import headserve_pb2_grpc as pb_grpc
    from service.server import build_server
    from service.store import DEFAULT_TENANT, task_key

    spawn = mp.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gil-convoy-") as data_dir:
        running = build_server(Settings.load(address="127.0.0.1:0", data_dir=data_dir, log_level="WARNING",
                                             builtin_backbones=["minilm-l6"], auto_fine_tune_min_examples=0))
        try:
            with grpc.insecure_channel(running.address) as channel:
                examples = [(t, y) for y, texts in TOPICS.items() for t in texts]
                create_task(pb_grpc.HeadServeStub(channel), "t", "minilm-l6", examples, pb.LINEAR)
            seed_tasks(running.app.store, task_key(DEFAULT_TENANT, "t"), 2000, "listed")
            for r in range(rounds):
                for ms in intervals:
                    sys.setswitchinterval(ms / 1e3)
                    row = {"round": r, "switch_interval_ms": ms}
                    for beside in (False, True):
                        stop, listers = spawn.Event(), []
                        if beside:
                            listers = [spawn.Process(target=_list_client, args=(running.address, stop))]
                            listers[0].start()
                            time.sleep(3)  # the lister's process started and listing
                        here, there = spawn.Pipe()
                        caller = spawn.Process(target=_predict_client, args=(running.address, calls, there))
                        caller.start()
                        p50, p99 = here.recv()
                        caller.join()
                        stop.set()
                        for lister in listers:
                            lister.join()
                        key = "beside_list" if beside else "alone"
                        row[key + "_p50_ms"], row[key + "_p99_ms"] = p50, p99
                    rows.append(row)
        finally:
            running.stop()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=300, help="images per measurement")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--intervals", type=float, nargs="+", default=[5.0, 0.5], help="switch intervals, ms")
    p.add_argument("--service", action="store_true", help="also Predict through a server, alone and beside "
                   "a client listing tasks (about 1 min per interval and round)")
    p.add_argument("--results", type=pathlib.Path, default=HERE / "results")
    args = p.parse_args()
    pre = ImagePreprocessor(ImageTransform())
    images = jpegs()
    for data in images[:8]:
        pre([data])
    default = sys.getswitchinterval()
    report: dict = {"cores": len(os.sched_getaffinity(0)), "load_average": os.getloadavg(), "rows": []}
    try:
        for ms in args.intervals:
            sys.setswitchinterval(ms / 1e3)
            row = {"switch_interval_ms": ms, **beside(pre, images, max(args.images // 3, 20))}
            row["images_per_s"] = {str(t): threads(pre, images, args.images, t) for t in args.threads}
            report["rows"].append(row)
        if args.service:
            report["service"] = service(args.intervals)
    finally:
        sys.setswitchinterval(default)
    print(f"{report['cores']} cores, load average {report['load_average'][0]:.2f}")
    print("| switch interval ms | alone ms/image | beside a busy Python thread ms/image | "
          + " | ".join(f"{t} threads images/s" for t in args.threads) + " |")
    print("|---:|---:|---:|" + "---:|" * len(args.threads))
    for r in report["rows"]:
        print(f"| {r['switch_interval_ms']:g} | {r['alone_ms']:.2f} | {r['beside_busy_ms']:.2f} | "
              + " | ".join(f"{v:.0f}" for v in r["images_per_s"].values()) + " |")
    if report.get("service"):
        print("\n| round | switch interval ms | Predict alone p50 / p99 ms | beside a client listing 500 tasks a "
              "page p50 / p99 ms |\n|---:|---:|---:|---:|")
        for r in report["service"]:
            print(f"| {r['round']} | {r['switch_interval_ms']:g} | {r['alone_p50_ms']:.2f} / {r['alone_p99_ms']:.2f} "
                  f"| {r['beside_list_p50_ms']:.2f} / {r['beside_list_p99_ms']:.2f} |")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "gil_convoy.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
