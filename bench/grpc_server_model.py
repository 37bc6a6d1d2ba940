#!/usr/bin/env python
"""Which gRPC server model to serve Predict with: the threaded server or grpc.aio, measured.

    python bench/grpc_server_model.py [--repeats 3] [--requests 4000]

Each server (in its own process) answers PredictRequest with a fixed PredictResponse (one prediction,
three labels), so what is measured is the server model's own cost: latency, throughput and server CPU
per call, at concurrency 1 and 16, from a grpc.aio client in a third process. The models run
interleaved, `--repeats` times each, so a machine shared with other work loads them alike.

  threads: grpc.server(ThreadPoolExecutor(32)), a plain handler (what service/server.py builds)
  aio:     grpc.aio.server(), an `async def` handler on the event loop
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import pathlib
import resource
import statistics
import sys
import time
from concurrent import futures

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402

from service.gen import headserve_pb2 as pb  # noqa: E402
from service.gen import headserve_pb2_grpc as pb_grpc  # noqa: E402

RESPONSE = pb.PredictResponse(
    predictions=[pb.Prediction(label="a", score=0.5, top=[pb.LabelScore(label=x, score=0.3) for x in "abc"])],
    version=1,
    task_id="t",
)
REQUEST = pb.PredictRequest(
    task_id="t", inputs=[pb.Input(text="a sentence of an ordinary length for a request")]
)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Threaded(pb_grpc.HeadServeServicer):
    def Predict(self, request, context):
        return RESPONSE


class Async(pb_grpc.HeadServeServicer):
    async def Predict(self, request, context):
        return RESPONSE


def serve(model: str, ports, commands) -> None:
    if model == "threads":
        server = grpc.server(futures.ThreadPoolExecutor(32))
        pb_grpc.add_HeadServeServicer_to_server(Threaded(), server)
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        while commands.get() == "cpu":
            ports.put(cpu_seconds())
        server.stop(0)
        return

    async def main() -> None:
        server = grpc.aio.server()
        pb_grpc.add_HeadServeServicer_to_server(Async(), server)
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        loop = asyncio.get_running_loop()
        while await loop.run_in_executor(None, commands.get) == "cpu":
            ports.put(cpu_seconds())
        await server.stop(0)

    asyncio.run(main())


async def load(port: int, concurrency: int, n: int) -> dict:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.HeadServeStub(channel)
        for _ in range(200):
            await stub.Predict(REQUEST)
        latencies: list[float] = []

        async def caller(k: int) -> None:
            for _ in range(k):
                t = time.perf_counter()
                await stub.Predict(REQUEST)
                latencies.append(time.perf_counter() - t)

        cpu0, t0 = cpu_seconds(), time.perf_counter()
        await asyncio.gather(*[caller(n // concurrency) for _ in range(concurrency)])
        elapsed = time.perf_counter() - t0
        latencies.sort()
        return {
            "throughput": len(latencies) / elapsed,
            "p50_us": latencies[len(latencies) // 2] * 1e6,
            "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
            "client_cpu_us": (cpu_seconds() - cpu0) / len(latencies) * 1e6,
            "calls": len(latencies) + 200,
        }


def client(port: int, concurrency: int, n: int, out) -> None:
    out.put(asyncio.run(load(port, concurrency, n)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=4000)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    results: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.repeats):
        for model in ("threads", "aio"):
            ports, commands = ctx.Queue(), ctx.Queue()
            server = ctx.Process(target=serve, args=(model, ports, commands))
            server.start()
            port = ports.get()
            for concurrency in (1, 16):
                commands.put("cpu")
                cpu0 = ports.get()
                out = ctx.Queue()
                c = ctx.Process(target=client, args=(port, concurrency, args.requests, out))
                c.start()
                r = out.get()
                c.join()
                commands.put("cpu")
                r["server_cpu_us"] = (ports.get() - cpu0) / r["calls"] * 1e6
                results.setdefault((model, concurrency), []).append(r)
            commands.put("stop")
            server.join()
    print(
        "| server model | concurrency | p50 us | p99 us | calls/s | server CPU us/call | client CPU us/call |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (model, concurrency), runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"| {model} | {concurrency} | {med['p50_us']:.0f} | {med['p99_us']:.0f} | {med['throughput']:.0f} | "
            f"{med['server_cpu_us']:.0f} | {med['client_cpu_us']:.0f} |"
        )
    print(f"(medians of {args.repeats} interleaved runs of {args.requests} calls)")


if __name__ == "__main__":
    main()
