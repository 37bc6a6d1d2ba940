"""Where an image's batch-1 time goes on a GPU, part by part, in one process (no service): decoding and
preprocessing on the CPU, the ONNX trunk on onnxruntime's CUDA provider (through TrunkRuntime, and a bare
session.run), and torch eager for reference. ResNet-50 on random weights (timing only).

    python bench/gpu_profile.py [--device cuda] [--rounds 50]

Prints a table of median milliseconds; run by bench/gpu_check.sh after the serving benchmark.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

from adapters.backbones import LoadOptions, builtin_spec, load_backbone
from adapters.runtime import TrunkRuntime


def median_ms(fn, rounds: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    options = LoadOptions(device=args.device, random_weights=True)
    backbone = load_backbone(builtin_spec(args.backbone), options)
    runtime = TrunkRuntime(backbone, pathlib.Path(tempfile.mkdtemp()) / "trunks")
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(buf, "JPEG")
        jpegs.append(buf.getvalue())
    one, eight = backbone.preprocess(jpegs[:1]), backbone.preprocess(jpegs)
    feeds = {k: one[k] for k in runtime.input_names}
    n = args.rounds
    rows = [
        ("decode + preprocess, 1 JPEG 320x240", median_ms(lambda: backbone.preprocess(jpegs[:1]), n)),
        ("decode + preprocess, 8 JPEGs", median_ms(lambda: backbone.preprocess(jpegs), n)),
        (f"ONNX trunk, batch 1 (TrunkRuntime.features, IO binding {runtime.io_binding})",
         median_ms(lambda: runtime.features(one), n)),
        ("ONNX trunk, batch 8 (TrunkRuntime.features)", median_ms(lambda: runtime.features(eight), n)),
        ("ONNX trunk, batch 1, bare session.run(['features'])",
         median_ms(lambda: runtime.session.run(["features"], feeds), n)),
        ("torch eager trunk, batch 1 (all trunk outputs, to host)",
         median_ms(lambda: backbone.torch_outputs(one, ("features",)), n)),
    ]
    print(f"{args.backbone} on {args.device}; providers {runtime.session.get_providers()}")
    print("| part | median ms |\n|---|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
