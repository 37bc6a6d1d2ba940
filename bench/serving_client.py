"""The load generator of bench/serving.py: real gRPC clients in their own process.

    python -m bench.serving_client SPEC.json   ->  one JSON line on stdout

SPEC: {"address", "concurrency", "warmup_s", "duration_s", "requests": FILE, "timeout_s"}, where FILE holds
the requests as length-prefixed serialized PredictRequest messages (built once by the parent). The
client runs `concurrency` callers on one grpc.aio channel, each sending its next request as soon as the
previous answer arrives (closed loop), for warmup_s (discarded) then duration_s, and reports every
latency of the measured window, the number of answers, errors by status, and its own CPU time.

It imports grpc and the generated stubs only (no torch, no onnxruntime), so its CPU cost is a client's.
"""

from __future__ import annotations

import asyncio
import json
import resource
import struct
import sys
import time

import grpc

from service.gen import headserve_pb2 as pb
from service.gen import headserve_pb2_grpc as pb_grpc


def read_requests(path: str) -> list[pb.PredictRequest]:
    with open(path, "rb") as f:
        data = f.read()
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        out.append(pb.PredictRequest.FromString(data[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    return out


def write_requests(path: str, requests: list[pb.PredictRequest]) -> None:
    with open(path, "wb") as f:
        for r in requests:
            b = r.SerializeToString()
            f.write(struct.pack("<I", len(b)))
            f.write(b)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run(spec: dict) -> dict:
    requests = read_requests(spec["requests"])
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(spec["address"], options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = pb_grpc.HeadServeStub(channel)
        timeout = spec.get("timeout_s", 60)
        latencies: list[float] = []
        errors: dict[str, int] = {}
        measuring = False
        stop = False
        next_index = 0

        async def caller() -> None:
            nonlocal next_index
            while not stop:
                req = requests[next_index % len(requests)]
                next_index += 1
                start = time.perf_counter()
                try:
                    await stub.Predict(req, timeout=timeout)
                except grpc.aio.AioRpcError as exc:
                    if measuring:
                        errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                    continue
                if measuring:
                    latencies.append(time.perf_counter() - start)

        tasks = [asyncio.create_task(caller()) for _ in range(spec["concurrency"])]
        await asyncio.sleep(spec["warmup_s"])
        measuring = True
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        await asyncio.sleep(spec["duration_s"])
        measuring = False
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        stop = True
        await asyncio.gather(*tasks)
    return {"latencies_s": latencies, "elapsed_s": elapsed, "errors": errors, "cpu_s": cpu}


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    print(json.dumps(asyncio.run(run(spec))))


if __name__ == "__main__":
    main()
