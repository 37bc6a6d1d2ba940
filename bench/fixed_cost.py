#!/usr/bin/env python
"""The fixed cost of a call, measured: p50 of small calls against a real server, interleaved.

    python bench/fixed_cost.py [--rounds 400]

A server (SQLite store in a temporary folder, minilm-l6, default settings but no AUTO fine-tuning) and one
synchronous client in a second process, on loopback. Each round makes one call of each kind, in a rotated
order, so that a machine's load falls on all of them alike:

  bare      a gRPC round trip to a handler that returns at once (grpc's health Check, auth "none")
  GetTask   the task's record, its live version's evaluation (one store transaction)
  Predict   one word on a trained task (tokenizer, trunk, head)

Prints p50 and p99 in milliseconds, and writes bench/results/fixed_cost.json. With `--breakdown`, also where a
Predict's time goes inside the server (timers around the request pipeline, the batch and the trunk pass), next
to the same trunk pass called in-process without a server. With `--starts N`, also N warm
starts of `python -m service serve` (minilm-l6 only, a new data directory each, the shared trunk cache as
the previous start left it): seconds from the process's start to health SERVING.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))


def client(address: str, rounds: int, out) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from bench.serving import TOPICS
    from service.gen import headserve_pb2 as pb
    from service.gen import headserve_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(address)
    stub, health = pb_grpc.HeadServeStub(channel), health_pb2_grpc.HealthStub(channel)
    examples = [pb.Example(input=pb.Input(text=t), label=y) for y, ts in TOPICS.items() for t in ts]
    stub.CreateTask(pb.CreateTaskRequest(task_id="fixed", backbone="minilm-l6", examples=examples))
    while stub.GetTask(pb.GetTaskRequest(task_id="fixed")).state != pb.Task.READY:
        time.sleep(0.1)
    calls = {
        "bare": lambda: health.Check(health_pb2.HealthCheckRequest()),
        "GetTask": lambda: stub.GetTask(pb.GetTaskRequest(task_id="fixed")),
        "Predict": lambda: stub.Predict(pb.PredictRequest(task_id="fixed", inputs=[pb.Input(text="goal")])),
    }
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 20):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            calls[n]()
            if r >= 20:  # the first rounds warm up
                times[n].append(1000 * (time.perf_counter() - t))
    channel.close()
    out.send(times)


def warm_start() -> float:
    """Seconds from spawning `python -m service serve` to health SERVING, on a new data directory."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with tempfile.TemporaryDirectory(prefix="start-") as data_dir:
        env = {**os.environ, "HEADSERVE_BUILTIN_BACKBONES": '["minilm-l6"]', "PYTHONUNBUFFERED": "1"}
        began = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "service", "serve", "--address", "127.0.0.1:0",
                                 "--data-dir", data_dir, "--log-level", "INFO"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in proc.stdout:
                found = re.search(r"listening on \S+ \(port (\d+)\)", line)
                if found:
                    break
            else:
                raise RuntimeError("the server exited before listening")
            with grpc.insecure_channel(f"127.0.0.1:{found.group(1)}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status != \
                        health_pb2.HealthCheckResponse.SERVING:
                    time.sleep(0.01)
            return time.perf_counter() - began
        finally:
            proc.terminate()
            proc.wait(30)


class Breakdown:
    """Server-side timers of Predict calls: the request pipeline (from the first interceptor to the response),
    the batch (tokenizer, trunk pass, head) and the trunk pass alone; and the trunk pass called in-process."""

    def __init__(self) -> None:
        import service.pipeline

        self.parts: dict[str, list[float]] = {"pipeline": [], "batch": [], "trunk": [], "raw trunk": []}
        init = service.pipeline.RequestContext.__init__
        parts = self.parts

        def observed(stage, observe=None):  # the pipeline reports each call's seconds to its observer
            def seen(method, code, seconds):
                if method == "Predict":
                    parts["pipeline"].append(seconds)
                if observe is not None:
                    observe(method, code, seconds)
            init(stage, seen)

        service.pipeline.RequestContext.__init__ = observed

    def attach(self, running, backbone: str = "minilm-l6") -> None:
        lane, entry = running.app.predictor.lane(backbone), running.app.registry.get(backbone)
        run, outputs = lane.batcher._run, entry.trunk.outputs
        self.entry, self.outputs, self.names = entry, outputs, ["features"]

        def timed_run(batch):
            start = time.perf_counter()
            try:
                return run(batch)
            finally:
                self.parts["batch"].append(time.perf_counter() - start)

        def timed_outputs(batch, names):
            self.names = list(names)
            start = time.perf_counter()
            try:
                return outputs(batch, names)
            finally:
                self.parts["trunk"].append(time.perf_counter() - start)

        lane.batcher._run, entry.trunk.outputs = timed_run, timed_outputs

    def raw(self, text: str, calls: int) -> None:
        """The trunk pass the server's Predict makes (the outputs its head reads), called here `calls` times."""
        batch = self.entry.backbone.preprocess([text])
        for i in range(calls + 20):
            start = time.perf_counter()
            self.outputs(batch, self.names)
            if i >= 20:
                self.parts["raw trunk"].append(time.perf_counter() - start)

    def rows(self) -> dict[str, float]:
        return {k: 1000 * statistics.median(v) for k, v in self.parts.items() if v}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=400)
    p.add_argument("--starts", type=int, default=0, help="also time this many warm starts to SERVING")
    p.add_argument("--breakdown", action="store_true", help="also time a Predict's parts inside the server")
    p.add_argument("--results", type=pathlib.Path, default=HERE / "results")
    args = p.parse_args()
    from service.config import Settings
    from service.server import build_server

    with tempfile.TemporaryDirectory(prefix="fixed-cost-") as data_dir:
        settings = Settings.load(address="127.0.0.1:0", data_dir=data_dir, builtin_backbones=["minilm-l6"],
                                 log_level="WARNING", auto_fine_tune_min_examples=0)
        breakdown = Breakdown() if args.breakdown else None
        running = build_server(settings)
        try:
            if breakdown:
                breakdown.attach(running)
            load0 = os.getloadavg()
            here, there = mp.Pipe()
            proc = mp.get_context("spawn").Process(target=client, args=(running.address, args.rounds, there))
            proc.start()
            times = here.recv()
            proc.join(30)
            if breakdown:
                breakdown.raw("goal", args.rounds)
            load1 = os.getloadavg()
        finally:
            running.stop()
    rows = {n: {"p50_ms": statistics.median(v), "p99_ms": sorted(v)[int(0.99 * (len(v) - 1))], "n": len(v)}
            for n, v in times.items()}
    print(f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end; {args.rounds} interleaved rounds")
    print("| call | p50 ms | p99 ms |\n|---|---:|---:|")
    for n, r in rows.items():
        print(f"| {n} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    parts = breakdown.rows() if breakdown else {}
    if parts:
        print("\n| Predict, one word: part | p50 ms |\n|---|---:|")
        print(f"| the call, at the client | {rows['Predict']['p50_ms']:.2f} |")
        for name, label in (("pipeline", "the request pipeline, in the server (first interceptor to response)"),
                            ("batch", "the batch: tokenizer, trunk pass, head"),
                            ("trunk", "the trunk pass, in the server"),
                            ("raw trunk", "the same trunk pass in-process, no server (after the calls)")):
            print(f"| {label} | {parts[name]:.2f} |")
    starts = [warm_start() for _ in range(args.starts)]
    if starts:
        print("warm starts to SERVING (s): " + ", ".join(f"{t:.2f}" for t in starts)
              + f" (load average {os.getloadavg()[0]:.2f})")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "fixed_cost.json").write_text(json.dumps(
        {"rows": rows, "load_average": [load0, load1], "rounds": args.rounds, "warm_starts_s": starts,
         "predict_parts_p50_ms": parts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
