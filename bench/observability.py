#!/usr/bin/env python
"""Observability: what Prometheus metrics and OpenTelemetry tracing cost on Predict (issue 12: under 3% of
p50 latency and of 16-client throughput).

    python bench/observability.py            # the full run, about 4 minutes
    python bench/observability.py --quick    # a short look, about 1.5 minutes

Servers on the `minilm-l6` backbone, each in its own process, with the same LINEAR task (3 labels x 8
sentences), one per variant (--variants, default off,off2,on,sampled):

- `off`: no metrics, no tracing (the defaults); `off2`: the same, a second server, for an A/A check: how far
  apart two identical servers measure on this machine (on a small shared machine, a few percent);
- `on`: metrics_address set, and otel_endpoint pointing at an OTLP/gRPC sink (another process that accepts
  the spans and throws them away, so that the server pays for the whole export: the spans, the batch
  processor, the protobuf encoding and the gRPC send); every request is traced (the SDK's default sampler);
- `sampled`: as `on`, with OTEL_TRACES_SAMPLER=parentbased_traceidratio and OTEL_TRACES_SAMPLER_ARG=--ratio
  (0.1: one request in ten traced), what a busy deployment would run;
- `metrics`: metrics only; `tracing`: tracing only (every request), to split the cost.

Clients run in another process.

1. Latency (p50): one client at concurrency 1 sends Predict of one short sentence, in sets: a burst of
   --burst + 1 requests to each server in turn, in a random order per set (the first request of a burst,
   right after switching servers, is not kept). Reported: p50/p99 per server, the p50 ratio to `off` with a
   bootstrap 95% interval (resampling sets) and the median paired difference per set.
2. Throughput: 16 concurrent closed-loop callers (grpc.aio, one channel) for --window seconds on each server
   in turn, in rounds whose order rotates, so that drifts of the machine fall on all alike. Reported:
   requests/s per server summed over rounds, the ratio to `off`, and the median of the per-round ratios.

Targets (issue 12), for each variant against `off`: p50 ratio < 1.03 and throughput ratio > 0.97 (not
for `off2`, whose ratios say how much of a difference is noise).
Results: bench/results/observability.json (+ .md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import pathlib
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from service.gen import headserve_pb2 as pb  # noqa: E402
from service.gen import headserve_pb2_grpc as pb_grpc  # noqa: E402

log = logging.getLogger("bench.observability")

BACKBONE = "minilm-l6"
TARGETS = {"p50_ratio_max": 1.03, "throughput_ratio_min": 0.97}
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
TOPICS = {
    "weather": ["Heavy snow is expected across the hills tonight.", "The forecast promises sunshine all weekend.",
                "A strong wind knocked down trees along the coast.", "Temperatures will drop below freezing.",
                "Thunderstorms could bring hail this afternoon.", "The fog should lift by mid-morning.",
                "It has not rained here for six weeks.", "A warm front will push the clouds north."],
    "music": ["The band played their new album from start to finish.", "She practises the violin every day.",
              "The choir sang a hymn in four-part harmony.", "His guitar solo brought the crowd to its feet.",
              "The orchestra tuned up before the symphony.", "They recorded the single in a tiny studio.",
              "The drummer kept a steady beat.", "Tickets for the jazz festival sold out in an hour."],
    "finance": ["The central bank raised interest rates.", "Shares fell after the earnings report.",
                "She moved her savings into an index fund.", "The company issued bonds for the factory.",
                "Inflation eased for the third month in a row.", "Investors sold government debt.",
                "The startup raised forty million.", "Our mortgage payment went up."],
}
SENTENCES = ["Snow is coming tonight.", "The violinist played well.", "Rates went up again.",
             "A sunny weekend ahead.", "The concert sold out.", "Stocks fell sharply.",
             "Wind and rain tomorrow.", "The bank cut its forecast."]


def pct(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


# --- processes: the span sink, the servers, the clients -------------------------------------------------


def run_sink() -> None:
    """An OTLP/gRPC trace endpoint that accepts every export and discards it (no decoding); prints its
    port, then, when stdin closes, what it received."""
    from concurrent import futures

    received = {"exports": 0, "bytes": 0}
    lock = threading.Lock()

    def export(request: bytes, context) -> bytes:
        with lock:
            received["exports"] += 1
            received["bytes"] += len(request)
        return b""  # an empty ExportTraceServiceResponse

    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(export)})  # raw bytes in and out
    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[handler],
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(json.dumps({"port": port}), flush=True)
    sys.stdin.read()
    server.stop(1)
    print(json.dumps(received), flush=True)


def run_server(spec: dict) -> None:
    """A headserve server with `spec["settings"]`, the benchmark's task on it; prints its address, then
    answers each line `mark` with its CPU time and the Predict requests it has batched so far, and, when
    stdin closes, prints its batch counters and stops."""
    logging.basicConfig(level=logging.WARNING)
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from service.config import Settings
    from service.server import build_server

    running = build_server(Settings.load(**spec["settings"]))
    channel = grpc.insecure_channel(running.address)
    stub = pb_grpc.HeadServeStub(channel)
    stub.CreateTask(pb.CreateTaskRequest(
        task_id="bench", backbone=BACKBONE, config=pb.TrainingConfig(strategy=pb.LINEAR),
        examples=[pb.Example(input=pb.Input(text=t), label=y) for y, ts in TOPICS.items() for t in ts]), timeout=120)
    last = None
    for job in stub.WatchJob(pb.WatchJobRequest(task_id="bench"), timeout=300):
        last = job
    if last is None or last.state != pb.Job.SUCCEEDED:
        raise SystemExit(f"the benchmark task did not train: {last}")
    channel.close()
    print(json.dumps({"address": running.address, "metrics_port": running.metrics_port}), flush=True)
    for line in sys.stdin:
        if line.strip() == "mark":
            t = os.times()
            requests = sum(s["requests"] for s in running.app.predictor.batch_stats().values())
            print(json.dumps({"cpu_s": t.user + t.system, "requests": requests}), flush=True)
    out = {"batches": {n: dict(s) for n, s in running.app.predictor.batch_stats().items()}}
    if running.metrics_port:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        out["metrics_predict_ok"] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                        if line.startswith('headserve_rpcs_total{') and 'method="Predict"' in line
                                        and 'code="OK"' in line)
    running.stop()
    print(json.dumps(out), flush=True)


def run_clients(spec: dict) -> dict:
    """Both parts against the servers of `spec["targets"]` ({name: address}): latency sets, then rounds of
    throughput."""
    targets = spec["targets"]
    names = sorted(targets)
    channels = {n: grpc.insecure_channel(a) for n, a in targets.items()}
    predict = {n: pb_grpc.HeadServeStub(c).Predict for n, c in channels.items()}
    rng = random.Random(spec["seed"])

    def request(i: int) -> pb.PredictRequest:
        return pb.PredictRequest(task_id="bench", inputs=[pb.Input(text=SENTENCES[i % len(SENTENCES)])])

    for i in range(spec["warmup"]):
        for n in names:
            predict[n](request(i), timeout=30)
    latencies: dict[str, list[list[float]]] = {n: [] for n in names}
    burst = spec["burst"]
    deadline = time.monotonic() + spec["latency_time_limit_s"]
    for s in range(spec["sets"]):
        if time.monotonic() > deadline:
            break
        order = names[:]
        rng.shuffle(order)
        for n in order:
            kept = []
            for k in range(burst + 1):
                req = request(s * burst + k)
                start = time.perf_counter()
                predict[n](req, timeout=30)
                if k:
                    kept.append(time.perf_counter() - start)
            latencies[n].append(kept)
    for c in channels.values():
        c.close()

    throughput: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, int] = {}
    for r in range(spec["rounds"]):
        order = names[r % len(names):] + names[:r % len(names)]
        if r // len(names) % 2:
            order.reverse()
        for n in order:
            done, errs = asyncio.run(_closed_loop(targets[n], spec["clients"], spec["window_s"], spec["warmup_s"]))
            throughput[n].append(done / spec["window_s"])
            for code, k in errs.items():
                errors[code] = errors.get(code, 0) + k
    return {"latencies_s": latencies, "throughput_rps": throughput, "errors": errors}


async def _closed_loop(address: str, clients: int, window: float, warmup: float) -> tuple[int, dict[str, int]]:
    """`clients` concurrent callers, no pause, for warmup + window seconds; counts what completes in the window."""
    done = 0
    errors: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        predict = pb_grpc.HeadServeStub(channel).Predict
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        measure_from, stop_at = t0 + warmup, t0 + warmup + window

        async def caller(k: int) -> None:
            nonlocal done
            i = k
            while loop.time() < stop_at:
                try:
                    await predict(pb.PredictRequest(task_id="bench",
                                                    inputs=[pb.Input(text=SENTENCES[i % len(SENTENCES)])]), timeout=30)
                    if measure_from <= loop.time() <= stop_at:
                        done += 1
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                i += clients

        await asyncio.gather(*(caller(k) for k in range(clients)))
    return done, errors


class Child:
    """This file run again with --worker KIND [SPEC]: reads its first JSON line, and its last at the end."""

    def __init__(self, kind: str, spec: dict | None, workdir: pathlib.Path, env: dict | None = None) -> None:
        args = [sys.executable, str(HERE / "observability.py"), "--worker", kind]
        if spec is not None:
            path = workdir / f"{kind}-{len(list(workdir.iterdir()))}.json"
            path.write_text(json.dumps(spec, default=str))
            args.append(str(path))
        environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}  # OTel set here alone
        self.proc = subprocess.Popen(args, cwd=ROOT, env={**environ, "PYTHONPATH": str(ROOT), **(env or {})},
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def ask(self, command: str, timeout: float = 60) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.first(timeout)

    def first(self, timeout: float = 600) -> dict:
        line = _readline(self.proc, timeout)
        if not line:
            raise RuntimeError(f"worker failed ({self.proc.poll()}): {self.proc.stderr.read()[-3000:]}")
        return json.loads(line)

    def finish(self, timeout: float = 120) -> dict:
        out, err = self.proc.communicate("", timeout=timeout)
        lines = out.strip().splitlines()
        if self.proc.returncode or not lines:
            raise RuntimeError(f"worker failed ({self.proc.returncode}): {err[-3000:]}")
        return json.loads(lines[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        proc.kill()
        raise RuntimeError(f"worker gave no answer in {timeout:.0f} s")
    return out[0].strip()


# --- the parent ---------------------------------------------------------------------------------------------


def analyse(args, result: dict) -> dict:
    """Each variant against `off`."""
    import numpy as np

    lat = {n: np.asarray(v, dtype=float) for n, v in result["latencies_s"].items()}  # sets x burst
    tp = {k: np.asarray(v, dtype=float) for k, v in result["throughput_rps"].items()}
    off = lat["off"]
    rng = np.random.default_rng(0)
    n = len(off)
    out: dict = {"sets": n, "errors": result["errors"], "variants": {}}
    for name, v in lat.items():
        row = {"requests": int(v.size), "p50_ms": float(np.median(v)) * 1e3, "p90_ms": pct(v.ravel(), 90) * 1e3,
               "p99_ms": pct(v.ravel(), 99) * 1e3, "mean_ms": float(v.mean()) * 1e3,
               "throughput_rounds_rps": [float(x) for x in tp[name]], "throughput_rps": float(tp[name].mean())}
        if name != "off":
            boot = []
            for _ in range(args.bootstrap):
                idx = rng.integers(0, n, n)
                boot.append(float(np.median(v[idx]) / np.median(off[idx])))
            ratios = [float(a / b) for a, b in zip(tp[name], tp["off"])]
            row.update({
                "p50_ratio": float(np.median(v) / np.median(off)),
                "p50_ratio_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
                "p99_ratio": pct(v.ravel(), 99) / pct(off.ravel(), 99),
                "median_paired_diff_us": float(np.median(np.median(v, axis=1) - np.median(off, axis=1))) * 1e6,
                "throughput_ratio": float(tp[name].sum() / tp["off"].sum()),
                "throughput_round_ratios": ratios,
                "throughput_median_round_ratio": float(np.median(ratios)),
            })
            row["targets_met"] = {"p50": row["p50_ratio"] < TARGETS["p50_ratio_max"],
                                  "throughput": row["throughput_ratio"] > TARGETS["throughput_ratio_min"]}
        out["variants"][name] = row
    return out


DESCRIPTIONS = {"off": "off", "off2": "off, a second server (A/A)", "on": "metrics + tracing (every request)",
                "metrics": "metrics only",
                "tracing": "tracing only (every request)"}


def markdown(report: dict) -> str:
    a = report["analysis"]
    rows = [
        f"Command: `{report['command']}` ({report['environment']['cpus']} CPUs, load average at start "
        f"{report['load_average_start'][0]:.1f}, at end {report['load_average_end'][0]:.1f}; "
        f"{report['seconds']:.0f} s).",
        "",
        "| variant | p50 c=1 (ms) | p50 / off (95% CI) | p99 c=1 (ms) | 16 clients (req/s) | throughput / off "
        "(median per round) | server CPU per request, c=1 / 16 clients (us) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in a["variants"].items():
        what = DESCRIPTIONS.get(name, f"metrics + tracing, {report['ratio']:.0%} of requests traced")
        if name == "off":
            rows.append(f"| {what} | {v['p50_ms']:.2f} | | {v['p99_ms']:.2f} | {v['throughput_rps']:.1f} | | "
                        f"{v['cpu_us_per_request_latency']:.0f} / {v['cpu_us_per_request_throughput']:.0f} |")
            continue
        lo, hi = v["p50_ratio_ci95"]
        rows.append(f"| {what} | {v['p50_ms']:.2f} | {v['p50_ratio']:.3f} ({lo:.3f}-{hi:.3f}) | {v['p99_ms']:.2f} | "
                    f"{v['throughput_rps']:.1f} | {v['throughput_ratio']:.3f} ({v['throughput_median_round_ratio']:.3f}) | "
                    f"{v['cpu_us_per_request_latency']:.0f} ({v['cpu_ratio_latency']:.2f}x) / "
                    f"{v['cpu_us_per_request_throughput']:.0f} ({v['cpu_ratio_throughput']:.2f}x) |")
    rows += [
        "",
        f"Targets: p50 / off < {TARGETS['p50_ratio_max']}, throughput / off > {TARGETS['throughput_ratio_min']}. "
        f"Latency: {a['sets']} sets, {a['variants']['off']['requests']} requests per server. Spans exported to the "
        f"sink: {report['sink']['exports']} exports, {report['sink']['bytes'] / 1e6:.1f} MB. "
        f"Errors: {a['errors'] or 'none'}.",
    ]
    return "\n".join(rows) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer sets and shorter rounds")
    p.add_argument("--sets", type=int, help="latency sets (default 600; quick 150)")
    p.add_argument("--burst", type=int, default=4, help="requests kept per server per set")
    p.add_argument("--rounds", type=int, help="throughput rounds, each both servers (default 8; quick 4)")
    p.add_argument("--window", type=float, help="seconds measured per server per round (default 6; quick 3)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--variants", default="off,off2,on,sampled",
                   help="comma-separated, of off, off2, on, sampled, metrics, tracing (off is always included)")
    p.add_argument("--ratio", type=float, default=0.1, help="share of requests traced in the `sampled` variant")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--results", type=pathlib.Path, default=HERE / "results")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sets = args.sets or (150 if args.quick else 600)
    args.rounds = args.rounds or (4 if args.quick else 8)
    args.window = args.window or (3.0 if args.quick else 6.0)
    args.variants = ["off"] + [v for v in dict.fromkeys(args.variants.split(",")) if v and v != "off"]
    unknown = set(args.variants) - {"off", "off2", "on", "sampled", "metrics", "tracing"}
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        kind = args.worker[0]
        spec = json.loads(pathlib.Path(args.worker[1]).read_text()) if len(args.worker) > 1 else {}
        if kind == "sink":
            run_sink()
        elif kind == "server":
            run_server(spec)
        elif kind == "clients":
            print(json.dumps(run_clients(spec)), flush=True)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args.results.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    report: dict = {
        "command": " ".join(["python bench/observability.py", *(sys.argv[1:] if argv is None else argv)]),
        "environment": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()},
        "load_average_start": os.getloadavg(),
        "ratio": args.ratio,
    }
    children: list[Child] = []
    with tempfile.TemporaryDirectory(prefix="headserve-bench-obs-") as tmp:
        workdir = pathlib.Path(tmp)
        try:
            sink = Child("sink", None, workdir)
            children.append(sink)
            sink_port = sink.first()["port"]
            base = {"address": "127.0.0.1:0", "builtin_backbones": [BACKBONE], "log_level": "WARNING",
                    "auth": "none"}
            metrics = {"metrics_address": "127.0.0.1:0"}
            tracing = {"otel_endpoint": f"http://127.0.0.1:{sink_port}"}
            configs = {"off": base, "off2": base, "on": {**base, **metrics, **tracing},
                       "sampled": {**base, **metrics, **tracing},
                       "metrics": {**base, **metrics}, "tracing": {**base, **tracing}}
            sampled = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": str(args.ratio)}
            servers, targets = {}, {}
            for name in args.variants:  # one at a time: loading models in parallel on a small machine is slower
                servers[name] = Child("server", {"settings": {**configs[name], "data_dir": str(workdir / name)}},
                                      workdir, env=sampled if name == "sampled" else None)
                children.append(servers[name])
                targets[name] = servers[name].first()["address"]
            log.info("servers up (%s) in %.0f s; latency: %d sets of %d x %d requests, then throughput: %d rounds "
                     "of %d clients x %.0f s per server", targets, time.perf_counter() - t_start, args.sets,
                     len(targets), args.burst + 1, args.rounds, args.clients, args.window)
            spec = {"targets": targets, "seed": 0, "warmup": 20, "sets": args.sets, "burst": args.burst,
                    "latency_time_limit_s": 600, "rounds": 0, "clients": args.clients, "window_s": args.window,
                    "warmup_s": 1.0}
            report["server_cpu"] = {}
            result: dict = {"errors": {}}
            # Latency, then throughput, each in a client process of its own; each server's CPU time per request
            # over each part (after a pause in which the span processors export what they still hold, every
            # 5 s: that CPU counts too).
            for part, spec_part in (("latency", spec), ("throughput", {**spec, "warmup": 0, "sets": 0,
                                                                       "rounds": args.rounds})):
                marks = {name: s.ask("mark") for name, s in servers.items()}
                clients = Child("clients", spec_part, workdir)
                children.append(clients)
                got = clients.finish(timeout=600 + args.rounds * len(servers) * (args.window + 10))
                key = "latencies_s" if part == "latency" else "throughput_rps"
                result[key] = got[key]
                for code, k in got["errors"].items():
                    result["errors"][code] = result["errors"].get(code, 0) + k
                time.sleep(6)
                for name, s in servers.items():
                    end = s.ask("mark")
                    served, cpu = end["requests"] - marks[name]["requests"], end["cpu_s"] - marks[name]["cpu_s"]
                    report["server_cpu"].setdefault(name, {})[part] = {
                        "cpu_s": cpu, "requests": served, "cpu_us_per_request": cpu / max(served, 1) * 1e6}
            report["servers"] = {name: s.finish() for name, s in servers.items()}
            report["sink"] = sink.finish()
        finally:
            for child in children:
                child.kill()
    report["load_average_end"] = os.getloadavg()
    report["seconds"] = time.perf_counter() - t_start
    report["analysis"] = analyse(args, result)
    for name, v in report["analysis"]["variants"].items():
        for part in ("latency", "throughput"):
            v[f"cpu_us_per_request_{part}"] = report["server_cpu"][name][part]["cpu_us_per_request"]
            if name != "off":
                v[f"cpu_ratio_{part}"] = (v[f"cpu_us_per_request_{part}"]
                                          / report["server_cpu"]["off"][part]["cpu_us_per_request"])
    report["raw"] = result
    (args.results / "observability.json").write_text(json.dumps(report, indent=2, default=float))
    text = markdown(report)
    (args.results / "observability.md").write_text(text)
    print(text)
    for name, v in report["analysis"]["variants"].items():
        if name not in ("off", "off2"):
            log.info("%s: p50 ratio %.3f, throughput ratio %.3f: %s", name, v["p50_ratio"], v["throughput_ratio"],
                     "targets met" if all(v["targets_met"].values()) else "targets NOT met")
    metered = [n for n in args.variants if n in ("on", "sampled", "metrics")]
    if any(not report["servers"][n].get("metrics_predict_ok") for n in metered) or (
            set(args.variants) & {"on", "sampled", "tracing"} and not report["sink"]["exports"]):
        log.warning("a server with metrics counted no Predict, or no spans were exported: the comparison is not valid")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
