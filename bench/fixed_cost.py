#!/usr/bin/env python
"""The fixed cost of a call, measured: p50 of small calls against a real server, interleaved.

    python bench/fixed_cost.py [--rounds 400]

A server (SQLite store in a temporary folder, minilm-l6, default settings but no AUTO fine-tuning) and one
synchronous client in a second process, on loopback. Each round makes one call of each kind, in a rotated
order, so that a machine's load falls on all of them alike:

  bare      a gRPC round trip to a handler that returns at once (grpc's health Check, auth "none")
  GetTask   the task's record, its live version's evaluation (one store transaction)
  Predict   one word on a trained task (tokenizer, trunk, head)

Prints p50 and p99 in milliseconds, and writes bench/results/fixed_cost.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import statistics
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=400)
    p.add_argument("--results", type=pathlib.Path, default=HERE / "results")
    args = p.parse_args()
    from service.config import Settings
    from service.server import build_server

    with tempfile.TemporaryDirectory(prefix="fixed-cost-") as data_dir:
        settings = Settings.load(address="127.0.0.1:0", data_dir=data_dir, builtin_backbones=["minilm-l6"],
                                 log_level="WARNING", auto_fine_tune_min_examples=0)
        running = build_server(settings)
        try:
            load0 = os.getloadavg()
            here, there = mp.Pipe()
            proc = mp.get_context("spawn").Process(target=client, args=(running.address, args.rounds, there))
            proc.start()
            times = here.recv()
            proc.join(30)
            load1 = os.getloadavg()
        finally:
            running.stop()
    rows = {n: {"p50_ms": statistics.median(v), "p99_ms": sorted(v)[int(0.99 * (len(v) - 1))], "n": len(v)}
            for n, v in times.items()}
    print(f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end; {args.rounds} interleaved rounds")
    print("| call | p50 ms | p99 ms |\n|---|---:|---:|")
    for n, r in rows.items():
        print(f"| {n} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "fixed_cost.json").write_text(json.dumps(
        {"rows": rows, "load_average": [load0, load1], "rounds": args.rounds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
