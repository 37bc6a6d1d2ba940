"""What batch-1 image latency a GPU allows below IEEE fp32, and what it costs in agreement: a study for the
GPU target (ResNet-50 class at batch 1, 1.5 ms end to end), run on a lent machine with torch alone.

For ResNet-50 (random weights: timing) and MobileNetV2 (the shared ImageNet weights: timing and agreement),
at batch 1 and 8: torch eager and a captured CUDA graph, in channels-last layout, at IEEE fp32 (what the
service serves), TF32, bf16 and fp16 (autocast). Agreement is measured on real photos (a folder of JPEGs,
preprocessed by the service's own ImagePreprocessor): the features' worst cosine with IEEE fp32, and how
many ImageNet top-1 classes change. It also compares JPEG decoding and preprocessing on the GPU (nvJPEG
through torchvision) with the service's CPU path on those photos, in grey levels.

    python bench/gpu_precision.py --weights W.safetensors --images FOLDER [--rounds 200]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import numpy as np
import torch
import torchvision
from safetensors.torch import load_file

from adapters.preprocessing import ImagePreprocessor, ImageTransform
from gpu_profile import gpu_preprocess  # bench/ is on sys.path: scripts run as bench/NAME.py

MODES = ("fp32", "tf32", "bf16", "fp16")


def set_mode(mode: str) -> None:
    tf32 = mode == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def runner(model: torch.nn.Module, x: torch.Tensor, mode: str, graph: bool):
    """A function that runs the model on x (a static input) and returns the output tensor."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)

    def step() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None,
                                                     cache_enabled=False):
            return model(x)

    if not graph:
        return step
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()

    def replay() -> torch.Tensor:
        g.replay()
        return out

    return replay


def median_ms(fn, rounds: int) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=pathlib.Path, required=True)
    parser.add_argument("--images", type=pathlib.Path, required=True)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True

    mnv2 = torchvision.models.mobilenet_v2()
    mnv2.load_state_dict(load_file(str(args.weights)))
    models = {"resnet50": torchvision.models.resnet50(), "mobilenet_v2": mnv2}
    for m in models.values():
        m.eval().cuda().to(memory_format=torch.channels_last)

    print("| model | mode | batch 1 eager ms | batch 1 graph ms | batch 8 eager ms | batch 8 graph ms |")
    print("|---|---|---:|---:|---:|---:|")
    for name, model in models.items():
        for mode in MODES:
            set_mode(mode)
            row = []
            for batch in (1, 8):
                x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
                for graph in (False, True):
                    row.append(median_ms(runner(model, x, mode, graph), args.rounds))
            print(f"| {name} | {mode} | " + " | ".join(f"{v:.2f}" for v in row) + " |")

    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    jpegs = [p.read_bytes() for p in files]
    transform = ImageTransform(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    pixels = ImagePreprocessor(transform)(jpegs)["pixel_values"]
    x = torch.from_numpy(pixels).cuda().to(memory_format=torch.channels_last)
    trunk = torch.nn.Sequential(mnv2.features, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    outputs = {}
    for mode in MODES:
        set_mode(mode)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            outputs[mode] = (trunk(x).float(), mnv2(x).float().argmax(1))
    ref_f, ref_top = outputs["fp32"]
    print(f"\nMobileNetV2 (ImageNet weights) on {len(jpegs)} photos, against IEEE fp32:")
    print("| mode | worst feature cosine | mean feature cosine | relative max diff | top-1 classes changed |")
    print("|---|---:|---:|---:|---:|")
    for mode in MODES[1:]:
        f, top = outputs[mode]
        cos = torch.nn.functional.cosine_similarity(f, ref_f, dim=1)
        rel = float((f - ref_f).abs().max() / ref_f.abs().max())
        changed = int((top != ref_top).sum())
        print(f"| {mode} | {float(cos.min()):.5f} | {float(cos.mean()):.5f} | {rel:.1e} | {changed} of {len(top)} |")

    set_mode("fp32")
    on_gpu = gpu_preprocess(transform)
    datas = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]

    try:
        gpu = on_gpu(datas).cpu().numpy()
        levels = np.abs(gpu - pixels) * 0.5 * 255.0
        print(f"\nJPEG decode + preprocess on the GPU against the service's CPU path, {len(jpegs)} photos: "
              f"max {levels.max():.1f} grey levels, mean {levels.mean():.3f}, "
              f"99th percentile {np.percentile(levels, 99):.2f}")
        with torch.inference_mode():
            feats = trunk(torch.from_numpy(gpu).cuda().to(memory_format=torch.channels_last))
        cos = torch.nn.functional.cosine_similarity(feats, ref_f, dim=1)
        print(f"MobileNetV2 features from GPU-preprocessed photos against CPU-preprocessed: worst cosine "
              f"{float(cos.min()):.5f}, mean {float(cos.mean()):.5f}")
        print(f"GPU decode + preprocess: 1 photo {median_ms(lambda: on_gpu(datas[:1]), 50):.2f} ms, "
              f"8 photos {median_ms(lambda: on_gpu(datas[:8]), 50):.2f} ms; CPU path (ImagePreprocessor): 1 photo "
              f"{statistics.median(_cpu_times(jpegs, transform)):.2f} ms")
    except Exception as exc:  # noqa: BLE001 - a study: report and go on
        print(f"GPU decoding not measured: {type(exc).__name__}: {exc}")


def _cpu_times(jpegs: list[bytes], transform: ImageTransform) -> list[float]:
    pre = ImagePreprocessor(transform)
    times = []
    for j in jpegs[:50]:
        start = time.perf_counter()
        pre([j])
        times.append((time.perf_counter() - start) * 1e3)
    return times


if __name__ == "__main__":
    main()
