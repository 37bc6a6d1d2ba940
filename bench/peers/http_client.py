"""The load generator for the HTTP peers: real clients in their own process (bench/.peers-venv/client).

    python http_client.py SPEC.json   ->  one JSON line on stdout

SPEC: {"url", "protocol": "json" | "kserve", "concurrency", "warmup_s", "duration_s", "inputs": FILE,
"timeout_s"}, where FILE is a JSON list of strings (texts, or base64 images). `concurrency` callers share
one aiohttp session (keep-alive connections, at most `concurrency` of them); each sends its next request as
soon as the previous answer arrives (closed loop), one input per request, for warmup_s (discarded) then
duration_s. Reports what bench/serving_client.py reports for headserve: every latency of the measured
window, the answers counted, errors by status, its own CPU time.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time

import aiohttp


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def body(protocol: str, x: str) -> bytes:
    if protocol == "kserve":  # Triton's HTTP/REST (KServe v2) inference request, one BYTES input
        return json.dumps({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1, 1], "data": [x]}]}).encode()
    return json.dumps({"input": x}).encode()


async def run(spec: dict) -> dict:
    with open(spec["inputs"]) as f:
        bodies = [body(spec["protocol"], x) for x in json.load(f)]
    connector = aiohttp.TCPConnector(limit=spec["concurrency"], force_close=False)
    timeout = aiohttp.ClientTimeout(total=spec.get("timeout_s", 60))
    headers = {"Content-Type": "application/json"}
    latencies: list[float] = []
    errors: dict[str, int] = {}
    measuring = stop = False
    next_index = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        # The server is up when it answers a request.
        deadline = time.monotonic() + 120
        while True:
            try:
                async with session.post(spec["url"], data=bodies[0]) as r:
                    await r.read()
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{spec['url']} did not answer 200 within 120 s")
            await asyncio.sleep(0.5)

        async def caller() -> None:
            nonlocal next_index
            while not stop:
                data = bodies[next_index % len(bodies)]
                next_index += 1
                start = time.perf_counter()
                try:
                    async with session.post(spec["url"], data=data) as r:
                        await r.read()
                        ok = r.status == 200
                        code = f"HTTP {r.status}"
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    ok, code = False, type(exc).__name__
                if not measuring:
                    continue
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors[code] = errors.get(code, 0) + 1

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
