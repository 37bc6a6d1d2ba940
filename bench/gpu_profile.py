"""Where an image's batch-1 time goes on a GPU, part by part, in one process (no service): decoding and
preprocessing on the CPU, the ONNX trunk on onnxruntime's CUDA provider (through TrunkRuntime, with and
without CUDA graphs, and a bare session.run), torch eager for reference, and, as a study for later, JPEG
decoding and preprocessing on the GPU (nvJPEG through torchvision) with its difference from the CPU path.
ResNet-50 on random weights (timing only).

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
    cache = pathlib.Path(tempfile.mkdtemp()) / "trunks"
    runtime = TrunkRuntime(backbone, cache)
    graphed = TrunkRuntime(backbone, cache, cuda_graphs=True)
    on_cuda = args.device.startswith("cuda")
    tf32 = TrunkRuntime(backbone, cache, cuda_graphs=True, precision="tf32") if on_cuda else None
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
        (f"ONNX trunk, batch 1, CUDA graphs (captured: {graphed.graphs is not None})",
         median_ms(lambda: graphed.features(one), n)),
        ("ONNX trunk, batch 8, CUDA graphs", median_ms(lambda: graphed.features(eight), n)),
        *([("ONNX trunk, batch 1, TF32 + CUDA graphs", median_ms(lambda: tf32.features(one), n)),
           ("ONNX trunk, batch 8, TF32 + CUDA graphs", median_ms(lambda: tf32.features(eight), n))]
          if tf32 else []),
        ("torch eager trunk, batch 1 (all trunk outputs, to host)",
         median_ms(lambda: backbone.torch_outputs(one, ("features",)), n)),
    ]
    if graphed.graphs is not None:
        worst = max(float(np.abs(graphed.features(b) - runtime.features(b)).max()) for b in (one, eight))
        print(f"CUDA graphs captured for batches {graphed.graphs.captured()}; max |diff| to the plain trunk {worst:.1e}")
    if tf32 is not None:
        a, b = runtime.features(eight), tf32.features(eight)
        cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        print(f"TF32 trunk: parity with torch (1 - cosine) {tf32.parity_diff:.1e}; worst cosine to the fp32 "
              f"trunk {cosine.min():.6f}; graphs {tf32.graphs.captured() if tf32.graphs else None}")
    rows += gpu_decode_rows(backbone, jpegs, n) if on_cuda else []
    print(f"{args.backbone} on {args.device}; providers {runtime.session.get_providers()}")
    print("| part | median ms |\n|---|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")


def gpu_preprocess(transform):
    """items (JPEG bytes as uint8 CPU tensors) -> the evaluation transform's NCHW batch on the GPU, decoded by
    nvJPEG (torchvision) and resized by torch, synchronised: a study of what decoding on the GPU would cost."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as F

    mean = torch.tensor(transform.mean, device="cuda").view(3, 1, 1)
    std = torch.tensor(transform.std, device="cuda").view(3, 1, 1)

    def on_gpu(items):
        images = decode_jpeg(items, device="cuda", mode=ImageReadMode.RGB)
        out = torch.stack([F.center_crop(F.resize(x.float(), [transform.resize], antialias=True),
                                         [transform.image_size] * 2) for x in images])
        out = (out / 255.0 - mean) / std
        torch.cuda.synchronize()
        return out

    return on_gpu


def gpu_decode_rows(backbone, jpegs: list[bytes], rounds: int) -> list[tuple[str, float]]:
    """JPEG decoding (nvJPEG) and the evaluation transform on the GPU, timed to a synchronised device
    tensor; and how far its pixels are from the CPU path's (PIL decode and resize), in grey levels."""
    try:
        import torch

        t = backbone.preprocess.transform
        on_gpu = gpu_preprocess(t)
        datas = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
        cpu = backbone.preprocess(jpegs)["pixel_values"]
        gpu = on_gpu(datas).cpu().numpy()
        levels = np.abs(gpu - cpu) * np.asarray(t.std, np.float32).reshape(1, 3, 1, 1) * 255.0
        print(f"GPU decode + preprocess against the CPU path: max {levels.max():.1f} grey levels, "
              f"mean {levels.mean():.3f}")
        return [("decode + preprocess on the GPU (nvJPEG, torch resize), 1 JPEG",
                 median_ms(lambda: on_gpu(datas[:1]), rounds)),
                ("decode + preprocess on the GPU, 8 JPEGs", median_ms(lambda: on_gpu(datas), rounds))]
    except Exception as exc:  # noqa: BLE001 - a study: report and go on
        print(f"GPU decoding not measured: {type(exc).__name__}: {exc}")
        return []


if __name__ == "__main__":
    main()
