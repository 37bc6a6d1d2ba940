#!/usr/bin/env python
"""A tuned text task served with and without the cut trunk, in one run.

    python bench/trunk_cuts.py [--concurrency 1 4 16] [--rounds 3]

A tuned text head (FINE_TUNE: its own copies of the trunk's top blocks) reads the trunk's embedding output
only. The trunk runtime serves batches that ask for early outputs only from a session of the trunk cut after
them (adapters.runtime, `trunk_cuts` setting); before, the whole trunk ran for them and its features went
unused. A server in-process (minilm-l6, SQLite in a temporary folder) trains one FINE_TUNE task (8 examples x
3 labels) and one LINEAR task on the same examples, then:

  in-process  the raw pipeline (tokenizer + trunk + head) of the tuned task at batch 1, 8 and 32, whole
              trunk against cut trunk, interleaved; the linear task's pipeline at the same sizes for scale
  service     Predict of one SST-2 sentence (or a built-in sentence when ../shared is absent) to the tuned
              task, clients in a second process, at each concurrency: rounds of (whole, cut), switching
              the trunk runtime's `cuts` between them on the same server, task and head

Prints a table and writes bench/results/trunk_cuts.json, with the commit, load average and the RSS the cut
session added.
"""

from __future__ import annotations

import argparse
import json
import logging
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

log = logging.getLogger("bench.trunk_cuts")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=3, help="rounds of (whole, cut) per level")
    p.add_argument("--duration", type=float, default=4.0, help="seconds measured per level and round")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--raw-seconds", type=float, default=2.0, help="seconds per raw batch size and round")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--inputs", type=int, default=512)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="server setting override")
    p.add_argument("--results", type=pathlib.Path, default=HERE / "results")
    args = p.parse_args(argv)
    # What bench.serving's helpers read.
    args.image_backbone, args.text_backbone, args.profile = "none", "minilm-l6", []
    args.weights = pathlib.Path("/nonexistent")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    args.results.mkdir(parents=True, exist_ok=True)

    import grpc

    from adapters.runtime import HeadRuntime
    from bench.serving import (TOPICS, environment, load_texts, raw_pipeline, requests_file, rss_bytes,
                               service_level, settings_for, to_input)
    from service.gen import headserve_pb2 as pb
    from service.gen import headserve_pb2_grpc as pb_grpc
    from service.server import build_server
    from service.store import DEFAULT_TENANT, task_key

    tmp = tempfile.TemporaryDirectory(prefix="headserve-bench-cuts-")
    workdir = pathlib.Path(tmp.name)
    settings, _ = settings_for(args, workdir / "data")
    load0 = os.getloadavg()
    running = build_server(settings)
    registry, store = running.app.registry, running.app.store
    entry = registry.get("minilm-l6")
    trunk = entry.trunk
    channel = grpc.insecure_channel(running.address)
    stub = pb_grpc.HeadServeStub(channel)
    examples = [pb.Example(input=pb.Input(text=t), label=y) for y, ts in TOPICS.items() for t in ts]
    heads = {}
    report: dict = {"environment": environment(args, settings, registry), "load_average_start": load0,
                    "raw": {}, "service": []}
    try:
        for name, strategy in (("tuned", pb.FINE_TUNE), ("linear", pb.LINEAR)):
            t = time.perf_counter()
            stub.CreateTask(pb.CreateTaskRequest(task_id=name, backbone="minilm-l6", examples=examples,
                                                 config=pb.TrainingConfig(strategy=strategy)))
            for job in stub.WatchJob(pb.WatchJobRequest(task_id=name), timeout=600):
                pass
            if job.state != pb.Job.SUCCEEDED:
                raise RuntimeError(f"task {name} did not train: {job}")
            key = task_key(DEFAULT_TENANT, name)
            record = store.get_head(key, store.get_task(key).live_version)
            heads[name] = HeadRuntime(record.onnx, record.labels, record.version, "minilm-l6", registry.device,
                                      registry.head_threads)
            log.info("%s task READY in %.1f s; its head reads %s", name, time.perf_counter() - t,
                     ", ".join(heads[name].inputs))
        tuned = heads["tuned"]
        early = [n for n in tuned.inputs if n not in trunk.input_names]
        trunk.cuts = False
        rss0 = rss_bytes()
        t = time.perf_counter()
        if not trunk.cut(early):
            raise RuntimeError(f"no cut for {early}: see the server's log")
        report["cut"] = {"outputs": early, "made_s": time.perf_counter() - t,
                         "rss_added_mb": (rss_bytes() - rss0) / 2**20}
        log.info("cut for %s made in %.2f s, RSS +%.0f MB", early, report["cut"]["made_s"],
                 report["cut"]["rss_added_mb"])

        texts, source = load_texts(args.inputs)
        report["inputs"] = source
        for b in args.batch_sizes:
            rows = {"whole": [], "cut": [], "linear": []}
            for _ in range(args.rounds):
                for mode in ("whole", "cut", "linear"):
                    trunk.cuts = mode == "cut"
                    head = heads["linear" if mode == "linear" else "tuned"]
                    rows[mode].append(raw_pipeline(entry, head, texts, [b], args.raw_seconds, quiet=True)[b])
            report["raw"][b] = {mode: {k: statistics.median(r[k] for r in rs) for k in ("p50_ms", "throughput")}
                                for mode, rs in rows.items()}
            r = report["raw"][b]
            log.info("raw batch %d: tuned whole %.2f ms, cut %.2f ms (%.2fx throughput); linear %.2f ms", b,
                     r["whole"]["p50_ms"], r["cut"]["p50_ms"], r["cut"]["throughput"] / r["whole"]["throughput"],
                     r["linear"]["p50_ms"])

        path = requests_file([pb.PredictRequest(task_id="tuned", inputs=[to_input(x)]) for x in texts],
                             workdir, "tuned")
        lane = running.app.predictor.lane("minilm-l6")
        for c in args.concurrency:
            rounds = []
            for _ in range(args.rounds):
                pair = {}
                for mode in ("whole", "cut"):
                    trunk.cuts = mode == "cut"
                    pair[mode] = service_level(args, running.address, path, c, lane, workdir, f"{mode}:{c}")
                rounds.append(pair)
            level = {"concurrency": c, **{
                mode: {k: statistics.median(r[mode][k] for r in rounds)
                       for k in ("p50_ms", "p99_ms", "throughput", "cpu_ms_per_request", "mean_batch")}
                for mode in ("whole", "cut")}}
            level["p50_ratio"] = statistics.median(r["cut"]["p50_ms"] / r["whole"]["p50_ms"] for r in rounds)
            level["throughput_ratio"] = statistics.median(
                r["cut"]["throughput"] / r["whole"]["throughput"] for r in rounds)
            level["errors"] = sum(sum(r[m]["errors"].values()) for r in rounds for m in ("whole", "cut"))
            report["service"].append(level)
            log.info("Predict c=%d: p50 %.2f -> %.2f ms (%.2fx), %.0f -> %.0f req/s (%.2fx); errors %d", c,
                     level["whole"]["p50_ms"], level["cut"]["p50_ms"], level["p50_ratio"],
                     level["whole"]["throughput"], level["cut"]["throughput"], level["throughput_ratio"],
                     level["errors"])
    finally:
        channel.close()
        running.stop()
        tmp.cleanup()
    report["load_average_end"] = os.getloadavg()

    env = report["environment"]
    print(f"\ncommit {env.get('commit')}, {env.get('cores')} cores, load {load0[0]:.2f} -> "
          f"{report['load_average_end'][0]:.2f}; cut {report['cut']['outputs']}: "
          f"{report['cut']['made_s']:.2f} s, RSS +{report['cut']['rss_added_mb']:.0f} MB")
    print("\n| raw pipeline, batch | tuned, whole trunk p50 (ms) | tuned, cut trunk p50 (ms) | cut/whole throughput "
          "| linear head p50 (ms) |\n|---|---|---|---|---|")
    for b, r in report["raw"].items():
        print(f"| {b} | {r['whole']['p50_ms']:.2f} | {r['cut']['p50_ms']:.2f} | "
              f"{r['cut']['throughput'] / r['whole']['throughput']:.2f}x | {r['linear']['p50_ms']:.2f} |")
    print("\n| Predict to the tuned task, c | p50 whole / cut (ms) | p99 whole / cut (ms) | req/s whole / cut | "
          "p50 ratio | throughput ratio |\n|---|---|---|---|---|---|")
    for lv in report["service"]:
        w, k = lv["whole"], lv["cut"]
        print(f"| {lv['concurrency']} | {w['p50_ms']:.2f} / {k['p50_ms']:.2f} | {w['p99_ms']:.2f} / "
              f"{k['p99_ms']:.2f} | {w['throughput']:.0f} / {k['throughput']:.0f} | {lv['p50_ratio']:.2f}x | "
              f"{lv['throughput_ratio']:.2f}x |")
    out = args.results / "trunk_cuts.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
