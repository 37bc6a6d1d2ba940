#!/usr/bin/env python
"""Label words: bare words against sentence templates, chosen leave-one-dataset-out.

    python bench/label_templates.py [--shared ../shared] [--test-limit 500]      # zero-shot heads
    python bench/label_templates.py --trained 5 8 [--draws 6]                   # trained heads (AUTO)

A zero-shot head (adapters/zeroshot.py) scores an input by the cosine similarity of its embedding to each
label text's embedding. This embeds each text set's test subsample (the seeded subsample bench/fewshot.py
uses) and each label's text (bench/setfit_reference.py's ZERO_SHOT_DESCRIPTIONS, else its name) with the
serving trunk of minilm-l6 in-process, under each candidate way of writing a label:

  bare        the label's words alone (the service before the templates)
  one of adapters.label_words.TEMPLATES, with {} the label's words
  ensemble    the mean of the normalised embeddings over every template (CLIP's prompt ensembling; what
              the service does, adapters.label_words.label_embeddings)

and scores accuracy per set. Then, leave one dataset out: for each set, the way with the best mean accuracy
over the other five sets, among all ways ("any way") and between bare and ensemble only ("bare or
ensemble"), scored on the held-out set. Prints the table; writes bench/results/zero_shot_templates.json.

With --trained: AUTO feature heads (adapters.selection.train_head, in-process) trained on the same draws as
bench/fewshot.py at each N, with the label words (the label names, as a client that writes no descriptions
sends them) embedded bare and in the templates, scored on the test subsample; the mean per set and N, and the
leave-one-dataset-out choice between the two per N. Writes bench/results/label_templates_trained.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.setfit_reference import TEXT_SETS, ZERO_SHOT_DESCRIPTIONS, load  # noqa: E402

from adapters.label_words import TEMPLATES, label_embeddings  # noqa: E402


def embedder(backbone: str, taps: bool = False):
    from adapters.backbones import pooled_taps
    from service.config import Settings
    from service.registry import BackboneRegistry

    settings = Settings.load(data_dir=tempfile.mkdtemp(prefix="zs-"), builtin_backbones=[backbone])
    entry = BackboneRegistry.load(settings).get(backbone)
    trunk = entry.training_trunk()

    def embed(texts: list[str]) -> np.ndarray:
        e = pooled_taps(trunk, entry.backbone.preprocess(texts))["last"]
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)

    def embed_taps(texts: list[str]) -> dict[str, np.ndarray]:
        return pooled_taps(trunk, entry.backbone.preprocess(texts))
    return embed_taps if taps else embed


def trained(args, embed_taps) -> int:
    from adapters.backbones import POOLED_TAPS
    from adapters.label_words import LabelText
    from adapters.options import TrainingOptions
    from adapters.selection import train_head
    from bench.datasets import draw

    acc: dict[str, dict[str, dict[str, float]]] = {}  # N -> set -> way -> mean accuracy over draws
    for name in TEXT_SETS:
        ds = load(args.shared / "data" / "text" / name, args.test_limit, args.split_seed)
        test, truth = embed_taps(list(ds.test_inputs)), np.asarray(ds.test_labels)
        feeds = {POOLED_TAPS[tap]: v for tap, v in test.items()}
        words = sorted(ds.labels)
        ways = {"bare": LabelText(embed_taps(words), words), "ensemble": LabelText(label_embeddings(embed_taps, words),
                                                                                  words)}
        for shots in args.trained:
            scores: dict[str, list[float]] = {w: [] for w in ways}
            for d in range(args.draws):
                idx = draw(ds, shots, d)
                x = embed_taps([ds.train_inputs[i] for i in idx])
                y = [ds.train_labels[i] for i in idx]
                for way, label_text in ways.items():
                    head = train_head(x, y, TrainingOptions(strategy="auto", seed=d), label_text=label_text)
                    predicted = np.asarray(head.labels)[head.head.reference(feeds).argmax(axis=1)]
                    scores[way].append(float(np.mean(predicted == truth)))
            acc.setdefault(str(shots), {})[name] = {w: float(np.mean(v)) for w, v in scores.items()}
            print(f"{name} N={shots}: " + ", ".join(f"{w} {100 * a:.2f}" for w, a in acc[str(shots)][name].items()),
                  flush=True)
    print(f"\n{args.backbone}, AUTO feature heads, {args.draws} draws, {args.test_limit} test items per set")
    print("| N | " + " | ".join(TEXT_SETS) + " | mean | LODO choice (folds) |\n|---|" + "---:|" * (len(TEXT_SETS) + 2))
    for shots, cells in acc.items():
        gains = {n: cells[n]["ensemble"] - cells[n]["bare"] for n in TEXT_SETS}
        chosen = ["ensemble" if np.mean([gains[o] for o in TEXT_SETS if o != n]) > 0 else "bare" for n in TEXT_SETS]
        print(f"| {shots} | " + " | ".join(f"{100 * cells[n]['bare']:.1f} → {100 * cells[n]['ensemble']:.1f}"
                                         for n in TEXT_SETS)
              + f" | {100 * np.mean(list(gains.values())):+.2f} | ensemble on {chosen.count('ensemble')} of 6 |")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "label_templates_trained.json").write_text(json.dumps(
        {"backbone": args.backbone, "draws": args.draws, "test_limit": args.test_limit, "accuracy": acc,
         "load_average": os.getloadavg()}, indent=2))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", type=pathlib.Path, default=ROOT.parent / "shared")
    p.add_argument("--backbone", default="minilm-l6")
    p.add_argument("--test-limit", type=int, default=500)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--results", type=pathlib.Path, default=HERE / "results")
    p.add_argument("--trained", type=int, nargs="+", help="examples per label: compare on trained heads instead")
    p.add_argument("--draws", type=int, default=6)
    args = p.parse_args()
    if args.trained:
        return trained(args, embedder(args.backbone, taps=True))
    embed = embedder(args.backbone)
    ways = ["bare", *TEMPLATES, "ensemble"]
    acc: dict[str, dict[str, float]] = {}
    for name in TEXT_SETS:
        ds = load(args.shared / "data" / "text" / name, args.test_limit, args.split_seed)
        x = embed(list(ds.test_inputs))
        labels = sorted(ds.labels)
        words = [ZERO_SHOT_DESCRIPTIONS.get(name, {}).get(y, y) for y in labels]
        label_sets = {"bare": embed(words)}
        for t in TEMPLATES:
            label_sets[t] = embed([t.format(w) for w in words])
        label_sets["ensemble"] = label_embeddings(lambda sentences: {"last": embed(sentences)}, words)["last"]
        truth = np.array([labels.index(y) for y in ds.test_labels])
        acc[name] = {w: float(np.mean((x @ e.T).argmax(1) == truth)) for w, e in label_sets.items()}
        print(f"{name}: " + ", ".join(f"{w!r} {100 * a:.1f}" for w, a in acc[name].items()), flush=True)
    menus = {"any way": ways, "bare or ensemble": ["bare", "ensemble"]}
    lodo: dict[str, dict[str, dict]] = {m: {} for m in menus}
    for menu, options in menus.items():
        for held in TEXT_SETS:
            others = [n for n in TEXT_SETS if n != held]
            chosen = max(options, key=lambda w: np.mean([acc[n][w] for n in others]))
            lodo[menu][held] = {"chosen": chosen, "accuracy": acc[held][chosen]}
    print(f"\n{args.backbone}, {args.test_limit} test items per set; LODO: the choice on the other five sets")
    print("| set | " + " | ".join(f"`{w}`" for w in ways) + " | " +
          " | ".join(f"LODO, {m} (− bare)" for m in menus) + " |")
    print("|---|" + "---:|" * (len(ways) + len(menus)))
    for n in TEXT_SETS:
        print(f"| {n} | " + " | ".join(f"{100 * acc[n][w]:.1f}" for w in ways) + " | " + " | ".join(
            f"`{lodo[m][n]['chosen']}` {100 * lodo[m][n]['accuracy']:.1f} "
            f"({100 * (lodo[m][n]['accuracy'] - acc[n]['bare']):+.1f})" for m in menus) + " |")
    means = {w: np.mean([acc[n][w] for n in TEXT_SETS]) for w in ways}
    print("| **mean** | " + " | ".join(f"{100 * means[w]:.1f}" for w in ways) + " | " + " | ".join(
        f"{100 * np.mean([lodo[m][n]['accuracy'] for n in TEXT_SETS]):.1f} "
        f"({100 * (np.mean([lodo[m][n]['accuracy'] for n in TEXT_SETS]) - means['bare']):+.1f})" for m in menus)
        + " |")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "zero_shot_templates.json").write_text(json.dumps(
        {"backbone": args.backbone, "test_limit": args.test_limit, "templates": TEMPLATES, "accuracy": acc,
         "lodo": lodo, "load_average": os.getloadavg()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
