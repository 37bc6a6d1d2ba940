#!/usr/bin/env python
"""Tenants: what API-key auth costs on the Predict path, and whether one tenant's flood starves another.

    python bench/tenants.py            # the full run, about 5 minutes (what `make bench-tenants` runs)
    python bench/tenants.py --quick    # a short look, under 2 minutes
    python bench/tenants.py --docs     # ... and rewrite the Tenants results in docs/benchmarks.md

Servers run in this process on 127.0.0.1 (port 0); every client runs in a separate process (this file,
started again with --worker), so that no client's Python competes with the server for its GIL.

1. Auth cost. Four servers on the `minilm-l6` backbone, two with `auth = "api_key"` and two with
   `auth = "none"` (built in the order api_key, none, none, api_key), each with the same LINEAR task (3
   labels x 8 sentences). One client process sends Predict of one short sentence at concurrency 1, in
   sets: a burst of --auth-burst + 1 requests to each of 6 variants in turn, in a random order per set
   (the first request of a burst, right after switching servers, is not kept: another model just evicted
   this one's from the CPU caches). The variants: each `none` server on a plain channel; each `api_key`
   server through `service.client.open_channel(api_key=...)` (what the project's client does: a channel
   interceptor adds the key) and with the key passed as call metadata on a plain channel (the server's
   part alone). A set takes a fraction of a second, so the machine's noise hits every variant alike.
   Reported per kind (both servers pooled): p50, p99, the p50 ratio to `none` with a bootstrap 95%
   interval (resampling sets), and the median over sets of the paired p50 difference; and an A/A check,
   server 2 against server 1 of the same kind, which says how far apart identical servers measure.
   `authenticate()` against `anonymous()` is also timed in-process, for the step alone.
2. Fairness. One server with `auth = "api_key"`, tenants A and B, one task each on the same backbone
   (one batcher). B sends Predict of one short sentence at concurrency 1 (one process); A floods with
   --flood-streams concurrent closed-loop callers of --flood-inputs inputs per request, no pause (another
   process, grpc.aio). Each round measures, on the same server: B alone; B while A floods with no quota;
   B while A floods with a `predict_inputs_per_second` quota of --quota-fraction of the inputs/s A got
   without a quota in round 1 (or --quota-inputs). Reported: B's p50/p99 per condition (pooled over
   rounds), B's p99 under flood / B's p99 alone, A's achieved inputs/s and its errors, and what the
   server saw (mean batch, queue depth, gRPC thread pool, queue-full rejections, CPU).

Results: bench/results/tenants.json (+ .md); --docs writes the Markdown between the tenants markers of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import pathlib
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Self

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import grpc

from bench.serving import busy_jiffies, children_cpu, own_cpu, set_overrides  # shared with the serving bench
from service.gen import headserve_pb2 as pb
from service.gen import headserve_pb2_grpc as pb_grpc

log = logging.getLogger("bench.tenants")

DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- tenants:begin -->", "<!-- tenants:end -->"
BACKBONE = "minilm-l6"
TARGETS = {"auth_p50_ratio": 1.03, "fairness_p99_ratio": 2.0}

# Tenant A's task (the flooder) and tenant B's (the one that must not starve): 3 labels x 8 sentences each.
TOPICS_A = {
    "weather": [
        "Heavy snow is expected across the hills tonight.",
        "The forecast promises sunshine for the whole weekend.",
        "A strong wind knocked down trees along the coast.",
        "Temperatures will drop below freezing after midnight.",
        "Thunderstorms could bring hail to the valley this afternoon.",
        "The fog should lift by the middle of the morning.",
        "It has not rained here for six weeks.",
        "A warm front will push the clouds north tomorrow.",
    ],
    "music": [
        "The band played their new album from start to finish.",
        "She practises the violin for two hours every day.",
        "The choir sang a hymn in four-part harmony.",
        "His guitar solo brought the crowd to its feet.",
        "The orchestra tuned up before the symphony began.",
        "They recorded the single in a tiny studio in Leeds.",
        "The drummer kept a steady beat through the whole song.",
        "Tickets for the jazz festival sold out in an hour.",
    ],
    "finance": [
        "The central bank raised interest rates by a quarter point.",
        "Shares fell sharply after the quarterly earnings report.",
        "She moved her savings into a low-cost index fund.",
        "The company issued bonds to pay for the new factory.",
        "Inflation eased for the third month in a row.",
        "Investors sold government debt as yields climbed.",
        "The startup raised forty million in its latest round.",
        "Our mortgage payment went up when the fixed rate ended.",
    ],
}
TOPICS_B = {
    "gardening": [
        "Plant the tulip bulbs before the first frost.",
        "Prune the roses back hard in late winter.",
        "The tomatoes need watering every evening in July.",
        "Spread compost around the roots of the apple tree.",
        "Slugs ate every lettuce seedling in the bed.",
        "Sow the carrot seeds thinly in shallow rows.",
        "The hedge needs trimming before the birds nest.",
        "Divide the irises once the flowers have faded.",
    ],
    "travel": [
        "Our flight to Lisbon was delayed by three hours.",
        "We took the night train across the border.",
        "The hostel near the station was cheap and clean.",
        "Remember to renew your passport before the trip.",
        "The ferry to the island leaves every morning at nine.",
        "We rented a car to drive along the coast road.",
        "The museum pass saved us a lot of queuing.",
        "Pack light if you plan to change hotels often.",
    ],
    "health": [
        "The doctor prescribed antibiotics for the infection.",
        "Regular exercise lowers the risk of heart disease.",
        "Drink plenty of water when you have a fever.",
        "The nurse took my blood pressure twice.",
        "He sprained his ankle and needs to rest it.",
        "A balanced diet includes fruit and vegetables every day.",
        "The clinic offers flu vaccines every autumn.",
        "Poor sleep can make headaches worse.",
    ],
}
# What B asks: one short sentence per request (rotating, the same ones in every measurement).
PROBE_SENTENCES = [
    "Water the basil every morning.",
    "The train to Rome was late.",
    "I caught a cold last week.",
    "Repot the fern in spring.",
    "Our hotel had a sea view.",
    "She takes vitamins daily.",
    "Weed the garden path today.",
    "We missed the last bus home.",
]
# What A floods with: requests of --flood-inputs of these, in turn.
FLOOD_SENTENCES = [
    "Rain will spread from the west during the afternoon.",
    "The pianist closed the concert with a slow nocturne.",
    "Bond markets rallied after the jobs report came out.",
    "A cold snap is forecast for the end of the month.",
    "The festival line-up includes three folk bands.",
    "The pension fund cut its exposure to property.",
    "Gusts of up to seventy miles an hour hit the harbour.",
    "Her debut record topped the charts for a month.",
    "The currency slipped against the dollar overnight.",
    "Expect clear skies and light winds on Sunday.",
    "The quartet rehearsed the Brahms for weeks.",
    "Analysts expect the merger to close next year.",
    "Flood warnings remain in place along the river.",
    "The conductor raised his baton and the hall fell silent.",
    "The bank wrote off its loans to the failed developer.",
    "A heatwave pushed temperatures past forty degrees.",
]


def pct(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --- workers: the client processes ----------------------------------------------------------------------


def worker_auth(spec: dict) -> dict:
    """Concurrency 1, in sets: `burst` requests to each variant in turn, in a random order per set."""
    from service.client import open_channel

    rng = random.Random(spec.get("seed", 0))
    variants = spec["variants"]
    calls = []
    channels = []
    for v in variants:
        if v["how"] == "channel":
            ch = open_channel(v["address"], api_key=v["api_key"] or None)
            metadata = None
        else:  # plain channel, the key (if any) as call metadata
            ch = grpc.insecure_channel(v["address"])
            metadata = (("authorization", f"Bearer {v['api_key']}"),) if v["api_key"] else None
        channels.append(ch)
        calls.append((pb_grpc.HeadServeStub(ch).Predict, metadata, v["task_id"]))
    sentences = spec["sentences"]
    timeout = spec["timeout_s"]
    latencies: dict[str, list[list[float]]] = {v["name"]: [] for v in variants}  # per set, `burst` values
    errors: dict[str, dict[str, int]] = {v["name"]: {} for v in variants}
    for k in range(spec["warmup_sets"]):
        for predict, metadata, task in calls:
            with contextlib.suppress(grpc.RpcError):
                predict(pb.PredictRequest(task_id=task, inputs=[pb.Input(text=sentences[k % len(sentences)])]),
                        timeout=timeout, metadata=metadata)
    deadline = time.monotonic() + spec["time_limit_s"]
    order = list(range(len(variants)))
    burst = spec["burst"]
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    sets = 0
    for i in range(spec["sets"]):
        if time.monotonic() > deadline:
            break
        rng.shuffle(order)
        row: dict[str, list[float] | None] = {}
        for j in order:
            predict, metadata, task = calls[j]
            name = variants[j]["name"]
            kept: list[float] | None = []
            # `burst` requests in a row to this variant; the first one, right after the switch from another
            # server (whose model evicted this one's from the CPU caches), is not kept.
            for k in range(burst + 1):
                text = sentences[(i * burst + k) % len(sentences)]
                request = pb.PredictRequest(task_id=task, inputs=[pb.Input(text=text)])
                start = time.perf_counter()
                try:
                    predict(request, timeout=timeout, metadata=metadata)
                except grpc.RpcError as exc:
                    code = exc.code().name
                    errors[name][code] = errors[name].get(code, 0) + 1
                    kept = None
                    break
                if k:
                    kept.append(time.perf_counter() - start)
            row[name] = kept
        if any(v is None for v in row.values()):
            continue  # keep sets complete, so that the variants stay paired
        for name, values in row.items():
            latencies[name].append(values)
        sets += 1
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    for ch in channels:
        ch.close()
    return {"latencies_s": latencies, "errors": errors, "sets": sets, "elapsed_s": elapsed, "cpu_s": cpu}


def worker_probe(spec: dict) -> dict:
    """Tenant B: concurrency 1, closed loop, one short sentence per request, until `measure_to` (wall
    clock); keeps the requests that started inside [measure_from, measure_to]."""
    channel = grpc.insecure_channel(spec["address"])
    predict = pb_grpc.HeadServeStub(channel).Predict
    metadata = (("authorization", f"Bearer {spec['api_key']}"),)
    sentences = spec["sentences"]
    timeout = spec["timeout_s"]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    cpu0 = cpu_seconds()
    while time.time() < spec["measure_to"] and sent < spec["max_requests"]:
        request = pb.PredictRequest(task_id=spec["task_id"], inputs=[pb.Input(text=sentences[sent % len(sentences)])])
        sent += 1
        started = time.time()
        start = time.perf_counter()
        code = "OK"
        try:
            predict(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            code = exc.code().name
        seconds = time.perf_counter() - start
        if started < spec["measure_from"]:
            continue
        if code == "OK":
            latencies.append(seconds)
        else:
            errors[code] = errors.get(code, 0) + 1
            if code == "RESOURCE_EXHAUSTED":
                time.sleep(0.05)  # as a client told to back off would; bounded by the loop's limits
    channel.close()
    return {"latencies_s": latencies, "errors": errors, "sent": sent, "cpu_s": cpu_seconds() - cpu0}


RETRY_IN = re.compile(r"retry in ([0-9.]+) s")


async def _flood(spec: dict) -> dict:
    """Tenant A: `streams` concurrent closed-loop callers of `inputs` inputs per request on one channel,
    with no pause (unless `honour_retry`), until `stop_at` (wall clock). Counts what completes inside
    [measure_from, measure_to]."""
    metadata = (("authorization", f"Bearer {spec['api_key']}"),)
    sentences = spec["sentences"]
    n = spec["inputs"]
    timeout = spec["timeout_s"]
    ok_latencies: list[float] = []
    ok_inputs = 0
    errors: dict[str, int] = {}
    sent = 0
    start_from, stop_at, measure_from, measure_to = (
        spec["start_at"], spec["stop_at"], spec["measure_from"], spec["measure_to"])
    async with grpc.aio.insecure_channel(spec["address"]) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        predict = pb_grpc.HeadServeStub(channel).Predict

        async def caller(k: int) -> None:
            nonlocal ok_inputs, sent
            i = k * n
            while time.time() < stop_at and sent < spec["max_requests"]:
                request = pb.PredictRequest(
                    task_id=spec["task_id"],
                    inputs=[pb.Input(text=sentences[(i + j) % len(sentences)]) for j in range(n)])
                i += n
                sent += 1
                start = time.perf_counter()
                try:
                    await predict(request, timeout=timeout, metadata=metadata)
                    code, message = "OK", ""
                except grpc.aio.AioRpcError as exc:
                    code, message = exc.code().name, exc.details() or ""
                done = time.time()
                if measure_from <= done <= measure_to:
                    if code == "OK":
                        ok_latencies.append(time.perf_counter() - start)
                        ok_inputs += n
                    else:
                        errors[code] = errors.get(code, 0) + 1
                if code == "RESOURCE_EXHAUSTED" and spec["honour_retry"]:
                    found = RETRY_IN.search(message)
                    await asyncio.sleep(min(float(found.group(1)) if found else 0.05, 1.0))

        await asyncio.sleep(max(0.0, start_from - time.time()))
        cpu0 = cpu_seconds()
        tasks = [asyncio.create_task(caller(k)) for k in range(spec["streams"])]
        await asyncio.sleep(max(0.0, stop_at - time.time()))
        for t in tasks:  # calls still queued on the server are cancelled: the batcher skips them
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        cpu = cpu_seconds() - cpu0
    window = measure_to - measure_from
    return {
        "ok_requests": len(ok_latencies),
        "ok_inputs": ok_inputs,
        "inputs_per_s": ok_inputs / window,
        "requests_per_s": len(ok_latencies) / window,
        "errors": errors,
        "errors_per_s": sum(errors.values()) / window,
        "latencies_s": ok_latencies,
        "sent": sent,
        "cpu_s": cpu,
    }


def worker_main(path: str) -> None:
    spec = json.loads(pathlib.Path(path).read_text())
    kind = spec["kind"]
    if kind == "auth":
        out = worker_auth(spec)
    elif kind == "probe":
        out = worker_probe(spec)
    elif kind == "flood":
        out = asyncio.run(_flood(spec))
    else:
        raise SystemExit(f"unknown worker kind {kind!r}")
    print(json.dumps(out))


# --- the parent: servers, phases, measurements -------------------------------------------------------------


class Workers:
    """Client processes: this file with --worker SPEC; each prints one JSON line."""

    def __init__(self, workdir: pathlib.Path) -> None:
        self.workdir = workdir
        self.count = 0

    def start(self, spec: dict) -> tuple[subprocess.Popen, float]:
        self.count += 1
        path = self.workdir / f"worker-{self.count}-{spec['kind']}.json"
        path.write_text(json.dumps(spec))
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "tenants.py"), "--worker", str(path)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        return proc, spec.get("time_limit_s", 60) + 60

    @staticmethod
    def result(started: tuple[subprocess.Popen, float]) -> dict:
        proc, limit = started
        try:
            out, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise RuntimeError(f"client process ran past {limit:.0f} s: {err[-2000:]}") from None
        if proc.returncode:
            raise RuntimeError(f"client process failed ({proc.returncode}): {err[-2000:]}")
        return json.loads(out.strip().splitlines()[-1])


class Sampler:
    """Samples, in the server's process, the batcher's queue and gRPC's thread pool every `interval` s."""

    def __init__(self, running, interval: float = 0.02) -> None:
        self.lane = running.app.predictor.lane(BACKBONE)
        self.pool = getattr(getattr(running.server, "_state", None), "thread_pool", None)
        self.workers = running.app.settings.grpc_workers
        self.interval = interval
        self.queued: list[int] = []
        self.limits: list[int] = []
        self.backlog: list[int] = []
        self.busy: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)

    def _loop(self) -> None:
        for _ in range(100_000):  # bounded: 100,000 samples at most (over half an hour at 20 ms)
            if self._stop.wait(self.interval):
                return
            with contextlib.suppress(Exception):
                self.queued.append(int(self.lane.batcher.queued_rows))
                self.limits.append(int(self.lane.batcher.limit))
            if self.pool is not None:
                with contextlib.suppress(Exception):
                    self.backlog.append(self.pool._work_queue.qsize())  # RPCs waiting for a free thread
                    idle = self.pool._idle_semaphore._value
                    self.busy.append(len(self.pool._threads) - idle)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def summary(self) -> dict:
        def stats(xs):
            return {"mean": statistics.fmean(xs), "max": max(xs)} if xs else {"mean": None, "max": None}

        sizes = sorted(set(self.limits))
        return {
            "samples": len(self.queued),
            "queued_inputs": stats(self.queued),
            # share of the samples at each batch size limit (the adaptive limit moves with the load)
            "batch_limit_share": {str(k): self.limits.count(k) / len(self.limits) for k in sizes},
            "rpc_threads_busy": stats(self.busy),
            "rpc_backlog": stats(self.backlog),
            "grpc_workers": self.workers,
        }


def batch_stats(running, reset: bool = True) -> dict:
    """The batcher's counters (reset), its batch size limit and what it has measured a batch to cost."""
    batcher = running.app.predictor.lane(BACKBONE).batcher
    stats = batcher.reset_stats() if reset else batcher.stats
    out = {k: v for k, v in dataclasses.asdict(stats).items() if isinstance(v, (int, float))}
    out["mean_batch"] = getattr(stats, "mean_rows", 0.0)
    with contextlib.suppress(Exception):
        out["batch_limit"] = int(batcher.limit)
        # the adaptive limit's running estimate of a batch's time, per size bucket (ms per batch)
        out["batch_ms_by_size"] = {str(size): cost * size * 1e3 for size, cost in sorted(batcher.tuner.cost.items())}
    return out


def wait_drained(running, limit_s: float = 30.0) -> float:
    """Waits (at most limit_s) until the backbone's queue is empty and no batch runs; returns seconds waited."""
    batcher = running.app.predictor.lane(BACKBONE).batcher
    t = time.perf_counter()
    for _ in range(int(limit_s / 0.02)):
        if not batcher.queued_rows and not getattr(batcher, "_busy", False):
            break
        time.sleep(0.02)
    time.sleep(0.3)  # let the last answers and cancellations settle
    return time.perf_counter() - t


def wait_ready(stub, task_id: str, metadata=None) -> None:
    last = None
    for job in stub.WatchJob(pb.WatchJobRequest(task_id=task_id), timeout=300, metadata=metadata):
        last = job
    if last is None or last.state != pb.Job.SUCCEEDED:
        raise RuntimeError(f"task {task_id} did not train: {last}")


def create_task(address: str, api_key: str | None, task_id: str, topics: dict[str, list[str]]) -> None:
    from service.client import open_channel

    channel = open_channel(address, api_key=api_key)
    try:
        stub = pb_grpc.HeadServeStub(channel)
        stub.CreateTask(pb.CreateTaskRequest(
            task_id=task_id, backbone=BACKBONE, config=pb.TrainingConfig(strategy=pb.LINEAR),
            examples=[pb.Example(input=pb.Input(text=t), label=y) for y, ts in topics.items() for t in ts]),
            timeout=60)
        wait_ready(stub, task_id)
    finally:
        channel.close()


def latency_summary(latencies_s: Sequence[float]) -> dict:
    return {
        "requests": len(latencies_s),
        "p50_ms": pct(latencies_s, 50) * 1e3,
        "p90_ms": pct(latencies_s, 90) * 1e3,
        "p99_ms": pct(latencies_s, 99) * 1e3,
        "max_ms": max(latencies_s) * 1e3 if latencies_s else float("nan"),
        "mean_ms": statistics.fmean(latencies_s) * 1e3 if latencies_s else float("nan"),
    }


# --- 1. auth cost ------------------------------------------------------------------------------------------


class Frontend:
    """Another gRPC server on a running server's app (store, models, batcher, heads): what build_server sets
    up, with the same interceptor chain, authentication on or off. Front-ends of one app share one model
    session, so comparing them measures the request path alone."""

    def __init__(self, running, auth_enabled: bool) -> None:
        from concurrent import futures

        from service import pipeline
        from service.server import stream_slots
        from service.servicer import add_to_server
        from service.tenants import Authenticator, RateLimiter

        settings = running.app.settings
        limits = [("grpc.max_receive_message_length", settings.max_message_bytes),
                  ("grpc.max_send_message_length", settings.max_message_bytes)]
        authenticator = Authenticator(running.app.store, settings.auth_cache_seconds)
        observe = getattr(getattr(running, "metrics", None), "rpc", None)  # as build_server, when metrics are on
        chain = pipeline.interceptors(authenticator, RateLimiter(), auth_enabled, stream_slots(settings), observe)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.grpc_workers), options=limits, interceptors=chain)
        add_to_server(running.app, running.admin, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(1).wait()


def auth_check_us(authenticator, api_key: str, seconds: float = 1.0) -> dict:
    """In-process cost of the authentication step itself: authenticate(key) (cached key) vs anonymous()."""
    from service.tenants import bearer

    metadata = (("authorization", f"Bearer {api_key}"),)
    out = {}
    for name, fn in (("authenticate_us", lambda: authenticator.authenticate(bearer(metadata))),
                     ("anonymous_us", authenticator.anonymous)):
        fn()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds and n < 1_000_000:
            for _ in range(100):
                fn()
            n += 100
        out[name] = (time.perf_counter() - t0) / n * 1e6
    return out


def _ratio_stats(args, other, base, rng) -> dict:
    """p50 and p99 of `other` over `base` (arrays: sets x servers of a kind, rows paired by set), a bootstrap
    95% interval of the p50 ratio resampling sets, the median paired difference, per-block p50 ratios."""
    import numpy as np

    n = len(base)
    ratio = float(np.median(other) / np.median(base))
    boot = []
    for _ in range(args.bootstrap):
        idx = rng.integers(0, n, n)
        boot.append(float(np.median(other[idx]) / np.median(base[idx])))
    b = args.auth_block
    return {
        "p50_ratio": ratio,
        "p50_ratio_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "p99_ratio": float(np.percentile(other, 99) / np.percentile(base, 99)),
        "p50_diff_us": float(np.median(other) - np.median(base)) * 1e6,
        "median_paired_diff_us": float(np.median(np.median(other, axis=1) - np.median(base, axis=1))) * 1e6,
        "block_p50_ratios": [float(np.median(other[i:i + b]) / np.median(base[i:i + b]))
                             for i in range(0, n - b + 1, b)],
    }


def auth_cost(args, workers: Workers, design: str, auth_targets: list[tuple[str, str]], none_targets: list[str],
              task_id: str) -> dict:
    """Requests in sets: a burst to every target of each kind, in a random order per set (see the docstring).
    `auth_targets`: (address, API key) of servers with auth on; `none_targets`: addresses with auth off."""
    import numpy as np

    variants = []
    for i, address in enumerate(none_targets, 1):
        variants.append({"name": f"none@{i}", "address": address, "api_key": "", "how": "channel",
                         "task_id": task_id})
    for i, (address, key) in enumerate(auth_targets, 1):
        variants.append({"name": f"api_key@{i}", "address": address, "api_key": key, "how": "channel",
                         "task_id": task_id})
        variants.append({"name": f"api_key_metadata@{i}", "address": address, "api_key": key,
                         "how": "metadata", "task_id": task_id})
    spec = {
        "kind": "auth", "variants": variants, "sentences": PROBE_SENTENCES, "sets": args.auth_sets,
        "burst": args.auth_burst, "warmup_sets": 3, "timeout_s": 30, "seed": 0, "time_limit_s": args.auth_time_limit,
    }
    log.info("auth cost (%s): %d sets of %d x %d requests (%s), c=1, random order within each set", design,
             args.auth_sets, len(variants), args.auth_burst + 1, ", ".join(v["name"] for v in variants))
    load0 = os.getloadavg()
    jiffies0, cpu0, child0, wall0 = busy_jiffies(), own_cpu(), children_cpu(), time.perf_counter()
    result = Workers.result(workers.start(spec))
    wall = time.perf_counter() - wall0
    busy = (busy_jiffies() - jiffies0) / os.sysconf("SC_CLK_TCK")
    server_cpu, client_cpu = own_cpu() - cpu0, children_cpu() - child0
    lat = result["latencies_s"]
    kinds: dict[str, np.ndarray] = {}
    for name in ("none", "api_key", "api_key_metadata"):
        cols = [np.asarray(lat[v["name"]], dtype=float) for v in variants if v["name"].split("@")[0] == name]
        kinds[name] = np.concatenate(cols, axis=1)  # sets x (servers x burst)
    out: dict = {
        "design": design,
        "sets": result["sets"],
        "servers_per_kind": len(none_targets),
        "requests": sum(len(row) for v in lat.values() for row in v),
        "elapsed_s": result["elapsed_s"],
        "load_average_start": load0,
        "server_cpu_cores": server_cpu / wall,
        "client_cpu_cores": client_cpu / wall,
        "other_cpu_cores": max(0.0, busy - server_cpu - client_cpu) / wall,
        "burst": args.auth_burst,
        "variants": {name: {**latency_summary(list(v.ravel())), "errors": {}} for name, v in kinds.items()},
        "servers": {name: {**latency_summary([x for row in v for x in row]), "errors": result["errors"][name]}
                    for name, v in lat.items()},
    }
    for name in out["variants"]:
        for server, errs in result["errors"].items():
            if server.split("@")[0] == name:
                for code, n in errs.items():
                    out["variants"][name]["errors"][code] = out["variants"][name]["errors"].get(code, 0) + n
    rng = np.random.default_rng(0)
    if not result["sets"]:
        raise RuntimeError(f"no complete set of requests in the auth-cost part; errors {result['errors']}")
    for name in ("api_key", "api_key_metadata"):
        out[name] = _ratio_stats(args, kinds[name], kinds["none"], rng)
        log.info(design + ": %s vs none: p50 %.3f ms vs %.3f ms (ratio %.3f, 95%% CI %.3f-%.3f), paired median "
                 "difference %+.0f us, p99 ratio %.2f", name, np.median(kinds[name]) * 1e3,
                 np.median(kinds["none"]) * 1e3, out[name]["p50_ratio"], *out[name]["p50_ratio_ci95"],
                 out[name]["median_paired_diff_us"], out[name]["p99_ratio"])
    # A/A: two servers of the same kind, same code, same settings: how far apart identical servers measure.
    out["a_a"] = {}
    for name in ("none", "api_key"):
        if kinds[name].shape[1] >= 2:
            half = kinds[name].shape[1] // 2  # server 1's columns, then server 2's
            aa = _ratio_stats(args, kinds[name][:, half:], kinds[name][:, :half], rng)
            out["a_a"][name] = aa
            log.info(design + ": A/A, %s@2 vs %s@1: p50 ratio %.3f (95%% CI %.3f-%.3f)", name, name, aa["p50_ratio"],
                     *aa["p50_ratio_ci95"])
    return out


# --- 2. fairness -------------------------------------------------------------------------------------------


def phase(args, workers: Workers, running, who: dict, flood: str | None, tag: str) -> dict:
    """One measurement window: B at c=1, alone or while A floods (`flood`: 'none' | 'quota' | 'quota_backoff'
    names A's quota and client behaviour); server-side figures over the same window."""
    wait_drained(running)
    duration = args.alone_s if flood is None else args.flood_s
    warmup = args.alone_warmup_s if flood is None else args.flood_warmup_s
    now = time.time()
    start_at = now + args.spawn_s
    measure_from = start_at + warmup
    measure_to = measure_from + duration
    probe = {
        "kind": "probe", "address": running.address, "api_key": who["key_b"], "task_id": who["task_b"],
        "sentences": PROBE_SENTENCES, "measure_from": measure_from, "measure_to": measure_to,
        "max_requests": 100_000, "timeout_s": 60, "time_limit_s": measure_to - now + 60,
    }
    flood_spec = None
    if flood is not None:
        flood_spec = {
            "kind": "flood", "address": running.address, "api_key": who["key_a"], "task_id": who["task_a"],
            "sentences": FLOOD_SENTENCES, "streams": args.flood_streams, "inputs": args.flood_inputs,
            "start_at": start_at, "measure_from": measure_from, "measure_to": measure_to,
            "stop_at": measure_to + 0.2, "max_requests": 2_000_000, "timeout_s": 60,
            "honour_retry": flood == "quota_backoff", "time_limit_s": measure_to - now + 60,
        }
    batch_stats(running)  # reset
    jiffies0, cpu0, child0, wall0, t0 = busy_jiffies(), own_cpu(), children_cpu(), time.perf_counter(), time.time()
    with Sampler(running) as sampler:
        started_flood = workers.start(flood_spec) if flood_spec else None
        # B starts with A (B's first requests, before measure_from, are its warm-up under the same flood).
        started_probe = workers.start(probe)
        b = Workers.result(started_probe)
        a = Workers.result(started_flood) if started_flood else None
    wall = time.perf_counter() - wall0
    busy = (busy_jiffies() - jiffies0) / os.sysconf("SC_CLK_TCK")
    server_cpu, client_cpu = own_cpu() - cpu0, children_cpu() - child0
    stats = batch_stats(running)
    out = {
        "phase": tag,
        "flood": flood or "alone",
        "window_s": measure_to - measure_from,
        "started_at": datetime.datetime.fromtimestamp(t0, datetime.timezone.utc).isoformat(timespec="seconds"),
        "b": {**latency_summary(b["latencies_s"]), "errors": b["errors"], "latencies_s": b["latencies_s"]},
        "server": {
            **stats,
            **sampler.summary(),
            "server_cpu_cores": server_cpu / wall,
            "client_cpu_cores": client_cpu / wall,
            "other_cpu_cores": max(0.0, busy - server_cpu - client_cpu) / wall,
        },
    }
    if a is not None:
        out["a"] = {k: v for k, v in a.items() if k != "latencies_s"}
        out["a"].update({f"latency_{k}": v for k, v in latency_summary(a["latencies_s"]).items()
                         if k in ("p50_ms", "p99_ms")})
    line = (f"{tag}: B p50 {out['b']['p50_ms']:.1f} ms p99 {out['b']['p99_ms']:.1f} ms ({out['b']['requests']} req, "
            f"errors {b['errors']})")
    if a is not None:
        line += (f"; A {a['inputs_per_s']:.1f} inputs/s ({a['requests_per_s']:.1f} req/s), errors/s "
                 f"{a['errors_per_s']:.0f} {a['errors']}")
    line += (f"; mean batch {stats['mean_batch']:.1f}, batch limit "
             + ", ".join(f"{k}: {v:.0%}" for k, v in out["server"]["batch_limit_share"].items())
             + f", queue max {out['server']['queued_inputs']['max']}, rpc threads "
             f"busy max {out['server']['rpc_threads_busy']['max']}, backlog max {out['server']['rpc_backlog']['max']}, "
             f"server CPU {out['server']['server_cpu_cores']:.2f}, clients {out['server']['client_cpu_cores']:.2f}, "
             f"other {out['server']['other_cpu_cores']:.2f} cores")
    log.info(line)
    return out


def set_quota(running, tenant_id: str, inputs_per_second: float) -> None:
    from service.store import Quotas

    running.admin.set_quotas(tenant_id, Quotas(predict_inputs_per_second=inputs_per_second))


def fairness(args, workers: Workers, running, who: dict) -> dict:
    rounds = []
    quota = args.quota_inputs
    conditions = ["none", "quota"] + (["quota_backoff"] if args.backoff else [])
    for r in range(args.rounds):
        log.info("fairness round %d/%d", r + 1, args.rounds)
        phases = {"alone": phase(args, workers, running, who, None, f"round {r + 1} alone")}
        for cond in conditions:
            if cond != "none":
                if not quota:
                    sustained = rounds[0]["none"]["a"]["inputs_per_s"] if rounds else phases["none"]["a"]["inputs_per_s"]
                    quota = max(1.0, round(args.quota_fraction * sustained, 1))
                    log.info("A's quota: %.1f inputs/s (%.0f%% of the %.1f inputs/s A got with no quota)", quota,
                             args.quota_fraction * 100, sustained)
                set_quota(running, who["tenant_a"], quota)
            try:
                phases[cond] = phase(args, workers, running, who, cond, f"round {r + 1} flood ({cond})")
            finally:
                if cond != "none":
                    set_quota(running, who["tenant_a"], 0.0)
        rounds.append(phases)

    def pooled(cond: str) -> dict:
        lat = [x for rd in rounds for x in rd[cond]["b"]["latencies_s"]]
        errors: dict[str, int] = {}
        for rd in rounds:
            for code, n in rd[cond]["b"]["errors"].items():
                errors[code] = errors.get(code, 0) + n
        out = {"b": {**latency_summary(lat), "errors": errors, "latencies_ms": [round(x * 1e3, 3) for x in lat]}}
        if cond != "alone":
            a = [rd[cond]["a"] for rd in rounds]
            a_errors: dict[str, int] = {}
            for x in a:
                for code, n in x["errors"].items():
                    a_errors[code] = a_errors.get(code, 0) + n
            out["a"] = {
                "inputs_per_s": statistics.median(x["inputs_per_s"] for x in a),
                "requests_per_s": statistics.median(x["requests_per_s"] for x in a),
                "errors_per_s": statistics.median(x["errors_per_s"] for x in a),
                "errors": a_errors,
                "latency_p50_ms": statistics.median(x["latency_p50_ms"] for x in a),
                "latency_p99_ms": statistics.median(x["latency_p99_ms"] for x in a),
            }
        server = [rd[cond]["server"] for rd in rounds]

        def med(key, sub=None):
            vals = [s[key][sub] if sub else s[key] for s in server]
            vals = [v for v in vals if v is not None]
            return statistics.median(vals) if vals else None

        out["server"] = {
            "mean_batch": med("mean_batch"),
            "largest_batch": max(s.get("largest", 0) for s in server),
            "queue_full_rejections": sum(s.get("rejected", 0) for s in server),
            "expired": sum(s.get("expired", 0) for s in server),
            "cancelled": sum(s.get("cancelled", 0) for s in server),
            "queued_inputs_mean": med("queued_inputs", "mean"),
            "queued_inputs_max": max((s["queued_inputs"]["max"] or 0) for s in server),
            "rpc_threads_busy_max": max((s["rpc_threads_busy"]["max"] or 0) for s in server),
            "rpc_backlog_max": max((s["rpc_backlog"]["max"] or 0) for s in server),
            "server_cpu_cores": med("server_cpu_cores"),
            "client_cpu_cores": med("client_cpu_cores"),
            "other_cpu_cores": med("other_cpu_cores"),
            "batch_limit_share": {
                k: statistics.fmean(s["batch_limit_share"].get(k, 0.0) for s in server)
                for k in sorted({k for s in server for k in s["batch_limit_share"]}, key=int)},
            "batch_limit_at_end": server[-1].get("batch_limit"),
            "batch_ms_by_size_at_end": server[-1].get("batch_ms_by_size"),
        }
        return out

    summary = {"alone": pooled("alone")}
    alone_p99 = summary["alone"]["b"]["p99_ms"]
    for cond in conditions:
        summary[cond] = pooled(cond)
        summary[cond]["b_p99_ratio"] = summary[cond]["b"]["p99_ms"] / alone_p99
        summary[cond]["b_p50_ratio"] = summary[cond]["b"]["p50_ms"] / summary["alone"]["b"]["p50_ms"]
        summary[cond]["b_p99_ratio_by_round"] = [rd[cond]["b"]["p99_ms"] / rd["alone"]["b"]["p99_ms"] for rd in rounds]
    for rd in rounds:  # per-request latencies are kept pooled per condition (summary.*.b.latencies_ms)
        for ph in rd.values():
            ph["b"].pop("latencies_s", None)
    return {
        "streams": args.flood_streams,
        "inputs_per_request": args.flood_inputs,
        "quota_inputs_per_second": quota,
        "quota_fraction": None if args.quota_inputs else args.quota_fraction,
        "conditions": conditions,
        "summary": summary,
        "rounds": rounds,
    }


# --- the run -------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run (< 2 min): fewer requests, one round, "
                   "shorter windows")
    p.add_argument("--auth-sets", type=int, help="sets in the auth-cost part; a set sends --auth-burst + 1 "
                   "requests to each of the 6 server/channel variants in turn [default 150, quick 40]")
    p.add_argument("--auth-burst", type=int, default=5, help="requests kept per variant and set (sent in a row, "
                   "after one that is not kept)")
    p.add_argument("--auth-block", type=int, default=20, help="sets per block for the per-block p50 ratios")
    p.add_argument("--auth-time-limit", type=float, default=240, help="seconds at most for the auth-cost part")
    p.add_argument("--auth-servers", action=argparse.BooleanOptionalAction,
                   help="also compare whole servers (one model session each: 2 with auth, 2 without), A/A "
                   "included [default on, quick off]")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the auth p50 ratio's interval")
    p.add_argument("--rounds", type=int, help="fairness rounds [default 3, quick 1]")
    p.add_argument("--alone-s", type=float, help="seconds B is measured alone per round [default 8, quick 5]")
    p.add_argument("--flood-s", type=float, help="seconds B is measured per flood condition and round "
                   "[default 15, quick 10]")
    p.add_argument("--alone-warmup-s", type=float, default=1.0)
    p.add_argument("--flood-warmup-s", type=float, default=3.0, help="flood before B's measurement starts")
    p.add_argument("--spawn-s", type=float, default=2.0, help="allowance for the client processes to start")
    p.add_argument("--flood-streams", type=int, default=16)
    p.add_argument("--flood-inputs", type=int, default=8)
    p.add_argument("--quota-fraction", type=float, default=0.5,
                   help="A's inputs/s quota as a fraction of the inputs/s A got with no quota (round 1)")
    p.add_argument("--quota-inputs", type=float, default=0.0, help="A's inputs/s quota (overrides the fraction)")
    p.add_argument("--backoff", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the quota with A honouring the 'retry in N s' of its refusals")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="server setting override")
    p.add_argument("--results", type=pathlib.Path, default=HERE / "results")
    p.add_argument("--docs", action="store_true", help="rewrite the Tenants results in docs/benchmarks.md")
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = {"auth_sets": (150, 40), "auth_servers": (True, False), "rounds": (3, 1), "alone_s": (8.0, 5.0),
                "flood_s": (15.0, 10.0)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def git(*argv: str) -> str:
    try:
        done = subprocess.run(["git", *argv], check=False, cwd=ROOT, capture_output=True, text=True, timeout=30)
        return done.stdout.rstrip()  # not strip(): `status --porcelain` lines start with a space
    except (OSError, subprocess.TimeoutExpired):
        return ""


def source_digest() -> str:
    """sha256 of the code the server ran (adapters/, service/), to tell working trees apart."""
    h = hashlib.sha256()
    for p in sorted(p for d in ("adapters", "service") for p in (ROOT / d).rglob("*.py") if p.is_file()):
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def environment(settings) -> dict:
    import onnxruntime

    cpu = next((line.split(":", 1)[1].strip() for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "")
    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "--short", "HEAD") + ("+dirty" if changed else ""),
        "changed_files": changed,
        "source_digest": source_digest(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "grpcio": grpc.__version__,
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "settings": {k: getattr(settings, k) for k in (
            "batch_max_size", "batch_adaptive", "batch_max_delay_us", "batch_queue_inputs", "grpc_workers",
            "intra_op_threads", "auth_cache_seconds")},
    }


def check_targets(report: dict) -> list[dict]:
    out = []
    auth = report.get("auth_cost", {}).get("api_key")
    if auth:
        out.append({"target": "auth cost: Predict p50 with api_key (open_channel) / without auth, c=1",
                    "limit": f"< {TARGETS['auth_p50_ratio']}", "measured": auth["p50_ratio"],
                    "met": auth["p50_ratio"] < TARGETS["auth_p50_ratio"]})
    fair = report.get("fairness", {}).get("summary", {})
    names = {"none": "no quota on A", "quota": "inputs/s quota on A",
             "quota_backoff": "inputs/s quota on A, A backs off as told"}
    for cond, name in names.items():
        if cond in fair:
            r = fair[cond]["b_p99_ratio"]
            out.append({"target": f"fairness: B p99 while A floods ({name}) / B p99 alone",
                        "limit": f"<= {TARGETS['fairness_p99_ratio']}", "measured": r,
                        "met": r <= TARGETS["fairness_p99_ratio"]})
    return out


AUTH_HEAD = ("variant", "requests", "p50 ms", "p99 ms", "p50 ratio (95% CI)", "p99 ratio", "paired median diff µs")
AUTH_LABELS = {"none": "`auth = none` (reference)", "api_key": "`api_key`, `open_channel(api_key=...)`",
               "api_key_metadata": "`api_key`, key as call metadata"}


def auth_rows(auth: dict) -> list[list[str]]:
    """The auth-cost table: each kind against `none`, then the A/A rows (server 2 against server 1)."""
    def cells(label: str, v: dict, cmp: dict | None) -> list[str]:
        head = [label, f"{v['requests']:,}", f"{v['p50_ms']:.2f}", f"{v['p99_ms']:.2f}"]
        if cmp is None:
            return head + ["1", "1", ""]
        lo, hi = cmp["p50_ratio_ci95"]
        return head + [f"{cmp['p50_ratio']:.3f} ({lo:.3f}-{hi:.3f})", f"{cmp['p99_ratio']:.2f}",
                       f"{cmp['median_paired_diff_us']:+.0f}"]

    rows = [cells(AUTH_LABELS.get(name, name), v, auth.get(name)) for name, v in auth["variants"].items()]
    for name, cmp in auth.get("a_a", {}).items():
        v = auth["servers"][f"{name}@2"]
        what = "front-end" if auth.get("design", "").startswith("front") else "server"
        rows.append(cells(f"A/A: {name} {what} 2 vs {what} 1", v, cmp))
    return rows


def render_markdown(report: dict, command: str) -> str:
    env = report["environment"]
    fair = report["fairness"]
    lines = [
        f"Measured {env['when']} at commit `{env['commit']}` (service source digest `{env['source_digest']}`) on "
        f"{env['cores']} cores ({env['cpu']}), onnxruntime {env['onnxruntime']}, grpcio {env['grpcio']}; server "
        "settings: " + ", ".join(f"`{k}={v}`" for k, v in env["settings"].items()) + ". Load average (1/5/15 min) "
        f"at start {tuple(round(x, 2) for x in report['load_average_start'])}, at end "
        f"{tuple(round(x, 2) for x in report['load_average_end'])}.",
        "",
        "```bash",
        command,
        "```",
        "",
    ]
    for key in ("auth_cost", "auth_cost_servers"):
        auth = report.get(key)
        if not auth:
            continue
        what = ("front-ends of one server (one model session)" if auth["design"].startswith("front")
                else "separate servers (a model session each)")
        lines += [
            (f"**Auth cost, {what}** (c=1, one short sentence, {auth['sets']:,} sets of "
             f"{auth['burst']} requests to each of {2 * auth['servers_per_kind']} targets and 2 channel kinds, "
             f"{auth['requests']:,} requests kept, {auth['elapsed_s']:.0f} s; other processes used "
             f"{auth['other_cpu_cores']:.2f} cores meanwhile):"),
            "",
            "| " + " | ".join(AUTH_HEAD) + " |",
            "|---|" + "---:|" * (len(AUTH_HEAD) - 1),
        ]
        lines += ["| " + " | ".join(row) + " |" for row in auth_rows(auth)]
        lines.append("")
    chk = report["auth_cost"].get("auth_check_us", {})
    if chk:
        lines += [(f"The authentication step alone, in-process: `authenticate()` of a cached key "
                   f"{chk['authenticate_us']:.1f} µs, `anonymous()` (auth none) {chk['anonymous_us']:.1f} µs."), ""]
    s = fair["summary"]
    lines += [
        f"**Fairness** (B: c=1, one short sentence; A: {fair['streams']} streams of {fair['inputs_per_request']} "
        f"inputs per request, no pause; {len(fair['rounds'])} round(s) of {{alone, " + ", ".join(fair["conditions"])
        + "}; B's latencies pooled over rounds; A's quota when set: "
        f"`predict_inputs_per_second = {fair['quota_inputs_per_second']:g}`):",
        "",
        ("| condition | B requests | B p50 ms | B p99 ms | B p99 / alone | by round | B errors | A inputs/s | "
         "A req/s | A refused/s | A p50 ms | mean batch | queue max | RPC threads busy max | queue-full | "
         "server CPU | client CPU | other load |"),
        "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"alone": "B alone", "none": "A floods, no quota", "quota": "A floods, quota",
             "quota_backoff": "A floods, quota, A backs off"}
    for cond in ["alone", *fair["conditions"]]:
        c = s[cond]
        b, srv, a = c["b"], c["server"], c.get("a")
        ratio = f"{c['b_p99_ratio']:.2f}x" if "b_p99_ratio" in c else ""
        by_round = ", ".join(f"{x:.2f}" for x in c.get("b_p99_ratio_by_round", []))
        errs = ", ".join(f"{k} {v}" for k, v in b["errors"].items()) or "0"
        a_cols = (f"{a['inputs_per_s']:.1f} | {a['requests_per_s']:.1f} | {a['errors_per_s']:.0f} | "
                  f"{a['latency_p50_ms']:.0f}" if a else "- | - | - | -")
        lines.append(
            f"| {names[cond]} | {b['requests']:,} | {b['p50_ms']:.1f} | {b['p99_ms']:.1f} | {ratio} | {by_round} | "
            f"{errs} | {a_cols} | {srv['mean_batch']:.1f} | {srv['queued_inputs_max']} | {srv['rpc_threads_busy_max']} "
            f"/ {env['settings']['grpc_workers']} | {srv['queue_full_rejections']} | {srv['server_cpu_cores']:.2f} | "
            f"{srv['client_cpu_cores']:.2f} | {srv['other_cpu_cores']:.2f} |")
    lines += ["", "| target | limit | measured | met |", "|---|---|---:|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['limit']} | {t['measured']:.3f} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def print_tables(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 250)
    fair = report["fairness"]
    for key in ("auth_cost", "auth_cost_servers"):
        auth = report.get(key)
        if not auth:
            continue
        t = Table(title=f"auth cost on Predict, {auth['design']} (c=1, {auth['sets']} interleaved sets, "
                  f"{auth['requests']} requests)")
        for h in AUTH_HEAD:
            t.add_column(h, justify="left" if h == "variant" else "right")
        for row in auth_rows(auth):
            t.add_row(*row)
        console.print(t)
    t = Table(title=f"fairness: B at c=1 while A floods ({fair['streams']} x {fair['inputs_per_request']} inputs); "
              f"quota {fair['quota_inputs_per_second']:g} inputs/s")
    for h in ("condition", "B req", "B p50 ms", "B p99 ms", "p99 / alone", "by round", "B errors", "A inputs/s",
              "A refused/s", "mean batch", "queue max", "threads busy max", "queue-full", "server CPU",
              "clients CPU", "other"):
        t.add_column(h, justify="left" if h in ("condition", "B errors", "by round") else "right")
    for cond in ["alone", *fair["conditions"]]:
        c = fair["summary"][cond]
        b, srv, a = c["b"], c["server"], c.get("a")
        t.add_row(cond, str(b["requests"]), f"{b['p50_ms']:.1f}", f"{b['p99_ms']:.1f}",
                  f"{c['b_p99_ratio']:.2f}" if "b_p99_ratio" in c else "",
                  ", ".join(f"{x:.2f}" for x in c.get("b_p99_ratio_by_round", [])),
                  json.dumps(b["errors"]) if b["errors"] else "0",
                  f"{a['inputs_per_s']:.1f}" if a else "", f"{a['errors_per_s']:.0f}" if a else "",
                  f"{srv['mean_batch']:.1f}", str(srv["queued_inputs_max"]), str(srv["rpc_threads_busy_max"]),
                  str(srv["queue_full_rejections"]), f"{srv['server_cpu_cores']:.2f}",
                  f"{srv['client_cpu_cores']:.2f}", f"{srv['other_cpu_cores']:.2f}")
    console.print(t)
    t = Table(title="targets")
    for h in ("target", "limit", "measured", "met"):
        t.add_column(h, justify="right" if h == "measured" else "left")
    for x in report["targets"]:
        t.add_row(x["target"], x["limit"], f"{x['measured']:.3f}", "yes" if x["met"] else "[bold red]no[/]")
    console.print(t)


def update_docs(markdown: str) -> None:
    text = DOCS.read_text() if DOCS.is_file() else "# Benchmarks\n"
    block = f"{BEGIN}\n{markdown.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + f"\n\n## Tenants: fairness and the cost of auth\n\n{block}\n"
    DOCS.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    args.results.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    from service.config import Settings
    from service.server import build_server
    from service.tenants import Authenticator

    t_start = time.perf_counter()
    load0 = os.getloadavg()
    tmp = tempfile.TemporaryDirectory(prefix="headserve-bench-tenants-")
    workdir = pathlib.Path(tmp.name)
    workers = Workers(workdir)

    def settings(name: str, auth: str):
        return Settings.load(**{"address": "127.0.0.1:0", "data_dir": workdir / name, "builtin_backbones": [BACKBONE],
                                "log_level": "WARNING", **set_overrides(args), "auth": auth})

    auth_settings = settings("main", "api_key")
    servers: list = []
    report: dict = {"environment": environment(auth_settings), "mode": "quick" if args.quick else "default",
                    "command": " ".join(["python bench/tenants.py", *(sys.argv[1:] if argv is None else argv)]),
                    "load_average_start": load0}
    try:
        main_server = build_server(auth_settings)
        servers.append(main_server)
        tenant_a, _, key_a = main_server.admin.create_tenant("bench-a", ["predict", "train"])
        tenant_b, _, key_b = main_server.admin.create_tenant("bench-b", ["predict", "train"])
        who = {"tenant_a": tenant_a.tenant_id, "key_a": key_a, "task_a": "flood-topics",
               "tenant_b": tenant_b.tenant_id, "key_b": key_b, "task_b": "probe-topics"}
        create_task(main_server.address, key_a, who["task_a"], TOPICS_A)
        create_task(main_server.address, key_b, who["task_b"], TOPICS_B)

        # 1. Auth cost: four front-ends on the main server's app, api_key, none, none, api_key. B's task for
        # the keyed ones; the same task in the default tenant (what auth = none serves) for the others.
        fronts = [Frontend(main_server, on) for on in (True, False, False, True)]
        servers += fronts
        create_task(fronts[1].address, None, who["task_b"], TOPICS_B)
        log.info("server and front-ends up, tasks trained in %.1f s", time.perf_counter() - t_start)
        report["auth_cost"] = auth_cost(
            args, workers, "front-ends of one server", [(fronts[0].address, key_b), (fronts[3].address, key_b)],
            [fronts[1].address, fronts[2].address], who["task_b"])
        report["auth_cost"]["auth_check_us"] = auth_check_us(
            Authenticator(main_server.app.store, auth_settings.auth_cache_seconds), key_b)
        for f in fronts:
            f.stop()
            servers.remove(f)

        if args.auth_servers:
            # The same with whole servers, one model session each: built api_key (main), none, none, api_key.
            others = [build_server(settings(f"none{i}", "none")) for i in (1, 2)]
            servers += others
            for srv in others:
                create_task(srv.address, None, who["task_b"], TOPICS_B)
            second = build_server(settings("auth2", "api_key"))
            servers.append(second)
            others.append(second)
            _, _, key_b2 = second.admin.create_tenant("bench-b", ["predict", "train"])
            create_task(second.address, key_b2, who["task_b"], TOPICS_B)
            report["auth_cost_servers"] = auth_cost(
                args, workers, "separate servers", [(main_server.address, key_b), (second.address, key_b2)],
                [others[0].address, others[1].address], who["task_b"])
            for srv in others:
                srv.stop()
                servers.remove(srv)

        # 2. Fairness, on the main server.
        report["fairness"] = fairness(args, workers, main_server, who)
    finally:
        for srv in servers:
            srv.stop()
        tmp.cleanup()
    report["load_average_end"] = os.getloadavg()
    report["seconds"] = time.perf_counter() - t_start
    report["targets"] = check_targets(report)

    out_json = args.results / "tenants.json"
    out_json.write_text(json.dumps(report, indent=2, default=float))
    markdown = render_markdown(report, report["command"])
    (args.results / "tenants.md").write_text(markdown)
    print_tables(report)
    if args.docs:
        update_docs(markdown)
    log.info("wrote %s (%.0f s)", out_json, report["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
