#!/usr/bin/env python
"""The text FINE_TUNE recipe's step budget, studied leave-one-dataset-out on the six text sets.

A few-shot text task has few examples: at N = 8 SST-2 has 16, and with a batch of 32 each epoch is a single
optimiser step, so 8 epochs are 8 steps in all. This script tunes MiniLM-L6 (the strategy's six blocks)
in-process on bench/fewshot.py's draws (seed [0, N, d]) under each (batch, epochs) pair of a grid, scores
the tuned head's torch graph on the same 200 test sentences the service runs used, and then chooses the
pair leave-one-dataset-out: for each set, the pair with the best mean over the other five, scored on it.

    python bench/finetune_recipe.py run --out bench/results/finetune_recipe.json
    python bench/finetune_recipe.py lodo --out bench/results/finetune_recipe.json

`run` is resumable (cells already in --out are skipped) and writes after every cell.

`wise` studies weight averaging (WiSE-FT) of the service's recipe: each draw is tuned once as the service
tunes it, then its blocks are averaged with the pretrained ones at each of --alphas, the classifier refitted
by logistic regression, and scored; `wise-lodo` chooses alpha leave-one-dataset-out (results in
`<out stem>_wise.json`):

    python bench/finetune_recipe.py wise --draws 5
    python bench/finetune_recipe.py wise-lodo --draws 5
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Sequence

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.datasets import draw, load_dataset  # noqa: E402
from bench.fewshot import DEFAULT_SHARED, TEXT_SETS, Reference  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("stage", choices=("run", "lodo", "wise", "wise-lodo"))
    p.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED)
    p.add_argument("--sets", nargs="+", default=list(TEXT_SETS))
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--batches", nargs="+", type=int, default=[32, 16, 8])
    p.add_argument("--epochs", nargs="+", type=int, default=[8, 16])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["ce"],
                   help="objectives: cross-entropy on the classifier (ce, the default), SetFit's pair loss with the "
                        "classifier refitted by logistic regression after every epoch (pair), or both (ce+pair)")
    p.add_argument("--alphas", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="wise: weight averaging of the tuned blocks with the pretrained ones (WiSE-FT): the fraction "
                        "of the tuning's change kept (1: the tuned head as trained, 0: the frozen features)")
    p.add_argument("--test-limit", type=int, default=200)
    p.add_argument("--backbone", default="minilm-l6")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results" / "finetune_recipe.json")
    return p.parse_args(argv)


VARIANTS = {"ce": (1.0, 0.0), "pair": (0.0, 1.0), "ce+pair": (1.0, 1.0)}  # (cross-entropy, pair loss) weights


def key(variant: str, batch: int, epochs: int) -> str:
    return f"b{batch}e{epochs}" if variant == "ce" else f"{variant}:b{batch}e{epochs}"


def stage_run(args: argparse.Namespace) -> None:
    import adapters.finetune as ft
    from adapters.options import TrainingOptions

    results = json.loads(args.out.read_text()) if args.out.exists() else {
        "config": {k: str(v) for k, v in vars(args).items()},
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(), "cells": {}}
    backbone = Reference(args.backbone, {}).backbone(args.backbone)
    blocks = ft.DEFAULT_BLOCKS["text"]
    defaults = ft.TRAIN_BATCH, ft.CE_WEIGHT, ft.PAIR_WEIGHT
    for name in args.sets:
        ds = load_dataset(args.shared / "data" / "text" / name, split_seed=0)
        ds.limit_test(args.test_limit, seed=0)
        test_feeds = ft._maps(backbone, backbone.torch_outputs, [ds.payload(x) for x in ds.test_inputs], blocks,
                              lambda _: None)
        for d, variant, batch, epochs in itertools.product(range(args.draws), args.variants, args.batches,
                                                           args.epochs):
            cell = f"{name}/{d}/{key(variant, batch, epochs)}"
            if cell in results["cells"]:
                continue
            idx = draw(ds, args.shots, [0, args.shots, d])
            labels = [ds.train_labels[i] for i in idx]
            names = sorted(set(labels))
            y_test = np.array([names.index(label) for label in ds.test_labels])
            start = time.perf_counter()
            ce, pair = VARIANTS[variant]
            ft.TRAIN_BATCH, ft.CE_WEIGHT, ft.PAIR_WEIGHT = (
                {**defaults[0], "text": batch}, {**defaults[1], "text": ce}, {**defaults[2], "text": pair})
            try:
                tuned, _ = ft.fine_tune(backbone, [ds.payload(ds.train_inputs[i]) for i in idx], labels,
                                        TrainingOptions(strategy="fine_tune", epochs=epochs),
                                        trunk=backbone.torch_outputs)
            finally:
                ft.TRAIN_BATCH, ft.CE_WEIGHT, ft.PAIR_WEIGHT = defaults
            probs = np.concatenate([tuned.head.reference({n: v[i : i + 64] for n, v in test_feeds.items()})
                                    for i in range(0, len(y_test), 64)])
            results["cells"][cell] = {
                "test": float((probs.argmax(1) == y_test).mean()), "best_epoch": tuned.evaluation["best_epoch"],
                "seconds": round(time.perf_counter() - start, 1), "load": round(os.getloadavg()[0], 1)}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(args.out)
            r = results["cells"][cell]
            print(f"{cell}: {100 * r['test']:.1f} (best epoch {r['best_epoch']}) in {r['seconds']:.0f} s "
                  f"(load {r['load']})", flush=True)


def stage_lodo(args: argparse.Namespace) -> None:
    results = json.loads(args.out.read_text())
    configs = [key(v, b, e) for v in args.variants for b in args.batches for e in args.epochs]
    mean: dict[tuple[str, str], float] = {}
    for name, c in itertools.product(args.sets, configs):
        scores = [results["cells"].get(f"{name}/{d}/{c}", {}).get("test") for d in range(args.draws)]
        if None not in scores:
            mean[name, c] = 100 * float(np.mean(scores))
    configs = [c for c in configs if all((s, c) in mean for s in args.sets)]
    if "b32e8" not in configs:
        raise SystemExit("the reference cell b32e8 (cross-entropy, the old text default) is missing: "
                         "include --variants ce --batches 32 --epochs 8")
    print_lodo(args.sets, configs, configs, mean, "b32e8", "old default")
    secs = {c: np.median([results["cells"][f"{s}/{d}/{c}"]["seconds"] for s in args.sets for d in range(args.draws)])
            for c in configs}
    print("median seconds per task: " + ", ".join(f"{c} {secs[c]:.0f}" for c in configs))


def stage_wise(args: argparse.Namespace) -> None:
    """The service's text recipe tuned once per draw; then its blocks averaged with the pretrained ones at
    each alpha (theta = theta_0 + alpha * (theta_tuned - theta_0)), the classifier refitted by logistic
    regression on the averaged blocks' features of the training examples, scored on the test sentences."""
    import torch

    import adapters.finetune as ft
    from adapters.heads import train_linear
    from adapters.options import TrainingOptions

    out = args.out.with_name(args.out.stem + "_wise.json")
    results = json.loads(out.read_text()) if out.exists() else {
        "config": {k: str(v) for k, v in vars(args).items()},
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(), "cells": {}}
    backbone = Reference(args.backbone, {}).backbone(args.backbone)
    blocks = ft.DEFAULT_BLOCKS["text"]
    pretrained = backbone.module.top(blocks).state_dict()
    for name in args.sets:
        ds = load_dataset(args.shared / "data" / "text" / name, split_seed=0)
        ds.limit_test(args.test_limit, seed=0)
        test_feeds = ft._maps(backbone, backbone.torch_outputs, [ds.payload(x) for x in ds.test_inputs], blocks,
                              lambda _: None)
        for d in range(args.draws):
            cell = f"{name}/{d}"
            if cell in results["cells"]:
                continue
            idx = draw(ds, args.shots, [0, args.shots, d])
            items = [ds.payload(ds.train_inputs[i]) for i in idx]
            labels = [ds.train_labels[i] for i in idx]
            names = sorted(set(labels))
            y = np.array([names.index(label) for label in labels])
            y_test = np.array([names.index(label) for label in ds.test_labels])
            start = time.perf_counter()
            tuned, _ = ft.fine_tune(backbone, items, labels, TrainingOptions(strategy="fine_tune"),
                                    trunk=backbone.torch_outputs)
            seconds = time.perf_counter() - start
            module = tuned.head.module
            trained = {k: v.clone() for k, v in module.top.state_dict().items()}
            train_feeds = ft._maps(backbone, backbone.torch_outputs, items, blocks, lambda _: None)
            scores, probs = {}, {}
            for alpha in args.alphas:
                module.top.load_state_dict({k: (pretrained[k] + alpha * (v - pretrained[k]))
                                            if v.is_floating_point() else v for k, v in trained.items()})
                module.eval()
                with torch.inference_mode():
                    def pooled(feeds):
                        n = len(feeds["attention_mask"])
                        return torch.cat([module.top(*[torch.from_numpy(feeds[k][i : i + 64])
                                                       for k in tuned.head.input_names])
                                          for i in range(0, n, 64)]).numpy()
                    x_train, x_test = pooled(train_feeds), pooled(test_feeds)
                probe = train_linear(x_train, y, len(names), TrainingOptions(strategy="linear"))
                p = probe.predict_proba(x_test)
                probs[alpha] = p
                scores[f"{alpha:g}"] = float((p.argmax(1) == y_test).mean())
            if 0.0 in probs and 1.0 in probs:
                scores["ensemble"] = float((((probs[0.0] + probs[1.0]) / 2).argmax(1) == y_test).mean())
            results["cells"][cell] = {"test": scores, "seconds": round(seconds, 1),
                                      "load": round(os.getloadavg()[0], 1)}
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(out)
            print(f"{cell}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in scores.items())
                  + f" (tuned in {seconds:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)


def stage_wise_lodo(args: argparse.Namespace) -> None:
    out = args.out.with_name(args.out.stem + "_wise.json")
    cells = json.loads(out.read_text())["cells"]
    configs = list(next(iter(cells.values()))["test"])
    mean = {(s, c): 100 * float(np.mean([cells[f"{s}/{d}"]["test"][c] for d in range(args.draws)]))
            for s in args.sets for c in configs}
    print_lodo(args.sets, configs, [f"alpha {c}" if c[0].isdigit() else c for c in configs], mean, "1", "now")


def print_lodo(sets: list[str], configs: list[str], heads: list[str], mean: dict[tuple[str, str], float],
               reference: str, reference_name: str) -> None:
    """The leave-one-dataset-out table: each set's mean under every config, the config with the best mean
    over the other sets (ties to `reference`), its score on the set, and the reference's."""
    print("| set | " + " | ".join(heads) + f" | LODO choice | LODO score | {reference_name} ({reference}) "
          f"| LODO − {reference_name} |")
    print("|---|" + "---|" * (len(configs) + 4))
    lodo, ref = [], []
    for name in sets:
        others = [s for s in sets if s != name]
        choice = max(configs, key=lambda c: (np.mean([mean[s, c] for s in others]), c == reference))
        lodo.append(mean[name, choice])
        ref.append(mean[name, reference])
        print(f"| {name} | " + " | ".join(f"{mean[name, c]:.1f}" for c in configs)
              + f" | {choice} | {lodo[-1]:.1f} | {ref[-1]:.1f} | {lodo[-1] - ref[-1]:+.1f} |")
    print("| **mean** | " + " | ".join(f"{np.mean([mean[s, c] for s in sets]):.1f}" for c in configs)
          + f" | | {np.mean(lodo):.1f} | {np.mean(ref):.1f} | {np.mean(lodo) - np.mean(ref):+.1f} |")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    {"run": stage_run, "lodo": stage_lodo, "wise": stage_wise, "wise-lodo": stage_wise_lodo}[args.stage](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
