#!/usr/bin/env python
"""Limits, measured: a task at (or towards) each configured maximum, through a real server, with time and
peak memory.

    python bench/limits.py                 # examples ladder up to 20,000, 1,000 labels, longest text,
                                           # largest images (about 15-25 minutes on 2 cores)
    python bench/limits.py --examples 1000 5000 100000   # choose the ladder (100,000 is the setting's max)
    python bench/limits.py --only labels text image      # some cases only

Each case runs in a fresh process (this file with --case), which starts an in-process server (auth none,
127.0.0.1, port 0) on a new data directory and calls it over gRPC, so its peak RSS (ru_maxrss) is that
case's alone. Cases:
- examples-N: a text task on minilm-l6 with N distinct synthetic sentences over 4 labels, streamed with
  AddExamples, trained with the default strategy (AUTO): seconds to READY and peak RSS.
- labels-1000: `max_labels_per_task` labels with 2 examples each, AUTO.
- text: Predict of one text of `max_text_length` characters (the tokenizer keeps 256 tokens).
- image: Predict of a JPEG and a PNG of `max_image_pixels` pixels (4:3), and of a 50:1 strip at the
  aspect limit, on mobilenet_v3_small (random weights: only cost is measured).
Writes bench/results/limits.json and prints a table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ("river mountain engine market vote piano garden storm bridge doctor harbour planet tennis "
         "recipe signal village theory battery island museum camera protein forest wallet").split()


def sentences(n: int, labels: int, seed: int = 0) -> list[tuple[str, str]]:
    """n distinct sentences; each label favours its own words, so the task is learnable."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        label = len(out) % labels
        own = WORDS[label % len(WORDS)]
        words = [own] + rng.choices(WORDS, k=rng.randint(6, 14)) + [str(rng.randint(0, 10**6))]
        rng.shuffle(words)
        text = " ".join(words).capitalize() + "."
        if text not in seen:
            seen.add(text)
            out.append((text, f"label-{label}"))
    return out


def run_case(case: str) -> dict:
    from service.client import HeadServeClient
    from service.config import Settings
    from service.server import build_server

    data = tempfile.mkdtemp(prefix="limits-")
    backbones = ["mobilenet_v3_small"] if case == "image" else ["minilm-l6"]
    settings = Settings.load(address="127.0.0.1:0", data_dir=data, builtin_backbones=backbones,
                             random_weights=["mobilenet_v3_small"], log_level="WARNING")
    running = build_server(settings)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result: dict = {"case": case, "rss_after_start_mb": base_rss / 1024}
    try:
        with HeadServeClient(running.address, timeout=600) as client:
            if case.startswith("examples-") or case == "labels":
                n, labels = ((int(case.split("-")[1]), 4) if case != "labels"
                             else (2 * settings.max_labels_per_task, settings.max_labels_per_task))
                examples = sentences(n, labels)
                start = time.perf_counter()
                task = client.create_task("minilm-l6", task_id="big")
                client.add_examples(task.task_id, examples, batch_size=500)
                uploaded = time.perf_counter() - start
                job = client.wait(client.train(task.task_id).job_id)
                result.update(examples=n, labels=labels, state=job.state, upload_seconds=uploaded,
                              ready_seconds=time.perf_counter() - start, error=job.error,
                              strategy=job.evaluation.strategy, validation_accuracy=job.evaluation.validation_accuracy)
                start = time.perf_counter()
                client.predict(task.task_id, [examples[0][0]])
                result["predict_ms"] = (time.perf_counter() - start) * 1e3
            elif case == "text":
                task = client.create_task("minilm-l6", sentences(16, 2), task_id="t")
                client.wait(task.job_id)
                text = ("word " * settings.max_text_length)[: settings.max_text_length]
                start = time.perf_counter()
                client.predict("t", [text])
                result.update(characters=len(text), predict_ms=(time.perf_counter() - start) * 1e3)
            elif case == "image":
                from PIL import Image

                def image(size, fmt):
                    buf = io.BytesIO()
                    Image.new("RGB", size, (120, 80, 40)).save(buf, format=fmt)
                    return buf.getvalue()

                colours = [(Image.new("RGB", (64, 48), c)) for c in ((200, 0, 0), (0, 0, 200))]
                shots = []
                for i, c in enumerate(colours):
                    buf = io.BytesIO()
                    c.save(buf, format="PNG")
                    shots.append((buf.getvalue(), f"c{i}"))
                task = client.create_task("mobilenet_v3_small", shots * 2, task_id="img")
                client.wait(task.job_id)
                side = int((settings.max_image_pixels / 12) ** 0.5)
                ratio = settings.max_image_aspect_ratio
                short = int((settings.max_image_pixels / ratio) ** 0.5)
                for name, size, fmt in (("jpeg_4x3", (4 * side, 3 * side), "JPEG"),
                                        ("png_4x3", (4 * side, 3 * side), "PNG"),
                                        ("png_strip", (int(short * ratio), short), "PNG")):
                    data_bytes = image(size, fmt)
                    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                    start = time.perf_counter()
                    client.predict("img", [data_bytes])
                    result[name] = {"pixels": size[0] * size[1], "size": list(size), "bytes": len(data_bytes),
                                    "predict_ms": (time.perf_counter() - start) * 1e3,
                                    "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                           - before) / 1024}
    finally:
        running.stop()
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--examples", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--only", nargs="+", choices=["examples", "labels", "text", "image"])
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per case")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    cases = []
    if not args.only or "examples" in args.only:
        cases += [f"examples-{n}" for n in args.examples]
    cases += [c for c in ("labels", "text", "image") if not args.only or c in args.only]
    results = []
    for case in cases:
        print(f"{case} ...", flush=True)
        try:
            done = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True,
                                  timeout=args.timeout, cwd=ROOT)
            line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
            result = json.loads(line) if done.returncode == 0 and line else {
                "case": case, "failed": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}
        except subprocess.TimeoutExpired:
            result = {"case": case, "failed": f"over {args.timeout} s"}
        print(json.dumps(result), flush=True)
        results.append(result)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    report = {"commit": commit.stdout.strip(), "load_average": os.getloadavg(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "results": results}
    out = ROOT / "bench" / "results" / "limits.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
