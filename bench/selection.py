#!/usr/bin/env python
"""AUTO's selection rule, studied leave-one-dataset-out (LODO) on the eight development sets.

Frozen trunk features are deterministic, so every set's features are computed once (every pooled tap,
the pool items any draw needs, the test split, the labels' words) and cached as .npz. Then, for every
set, N and draw, each candidate head AUTO can compare is cross-validated once on the draw
(`adapters.selection.cross_validate`: the same repeated stratified folds AUTO uses) and fit on the whole
draw and scored on the test split. What AUTO would pick under any rule constants is then a cheap
function of those figures (`adapters.selection.choose`), so the constants are chosen on seven sets and
scored on the eighth, for each set in turn.

FINE_TUNE is the expensive candidate: it runs on the image sets only, at N = 5 and 10, on the first
`--fine-tune-draws` draws (its holdout scores and the feature head's, on the same holdout, are what AUTO
compares; see `adapters.selection.prefer_fine_tune`).

    python bench/selection.py features            # cache features (minutes; torch trunk, in-process)
    python bench/selection.py candidates          # cross-validate and test every candidate per draw
    python bench/selection.py fine-tune           # image sets: FINE_TUNE per draw (slow)
    python bench/selection.py lodo --markdown t.md  # choose the constants LODO, print the table

"all" is the whole pool for the image sets and a seeded stratified sample of `--all-cap` (1,000) pool
items for the text sets, one draw: the text pools hold 5,000-10,000 items, and AUTO's cross-validation of
ten candidates on all of them would take tens of minutes per set on this shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.datasets import Dataset, draw, load_dataset  # noqa: E402
from bench.fewshot import DEFAULT_SHARED, IMAGE_SETS, TEXT_SETS, Reference, default_image_backbones  # noqa: E402

SHOTS = ("5", "8", "10", "64", "all")
DRAWS = {"5": 6, "8": 8, "10": 6, "64": 3, "all": 1}
IMAGE_DRAWS = {**DRAWS, "8": 3}  # the shared CPU's budget: the image sets' N = 8 is not one of their usual sizes
TEXT_TEST_LIMIT = 500
CACHED_ALL = 2000  # text pool items cached for the "all" draw; --all-cap may take fewer of them
SINGLE = ("linear", "prototype", "mlp", "fine_tune")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("stage", choices=("features", "candidates", "fine-tune", "lodo"))
    p.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED)
    p.add_argument("--sets", nargs="+", default=[*TEXT_SETS, *IMAGE_SETS])
    p.add_argument("--shots", nargs="+", default=list(SHOTS))
    p.add_argument("--cache", type=pathlib.Path, default=pathlib.Path.home() / ".cache" / "headserve-selection")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results" / "selection.json")
    p.add_argument("--all-cap", type=int, default=1000, help="text sets: pool items in the 'all' draw")
    p.add_argument("--fine-tune-draws", type=int, default=3)
    p.add_argument("--fine-tune-shots", nargs="+", default=["5", "10"])
    p.add_argument("--markdown", type=pathlib.Path)
    return p.parse_args(argv)


# --- data and features ------------------------------------------------------------------------------


def load(name: str, shared: pathlib.Path) -> Dataset:
    modality = "images" if name in IMAGE_SETS else "text"
    ds = load_dataset(shared / "data" / modality / name, split_seed=0)
    ds.limit_test(TEXT_TEST_LIMIT if ds.modality == "text" else 0, seed=0)
    return ds


def draw_indices(ds: Dataset, shots: str, d: int, all_cap: int) -> np.ndarray:
    """The pool rows of draw d at `shots` per label: bench/fewshot.py's draws ([0, N, d] seeds)."""
    if shots != "all":
        return draw(ds, int(shots), [0, int(shots), d])
    if ds.modality == "image" or len(ds.train_inputs) <= all_cap:
        return np.arange(len(ds.train_inputs))
    from sklearn.model_selection import train_test_split

    y = np.asarray(ds.train_labels)
    keep, _ = train_test_split(np.arange(len(y)), train_size=CACHED_ALL, random_state=0, stratify=y)
    if all_cap < CACHED_ALL:  # a stratified part of the cached sample
        keep, _ = train_test_split(keep, train_size=all_cap, random_state=0, stratify=y[keep])
    return np.sort(keep)


def needed_rows(ds: Dataset, shots: Sequence[str], all_cap: int) -> np.ndarray:
    rows = [draw_indices(ds, s, d, all_cap) for s in shots for d in range(DRAWS[s])]
    return np.unique(np.concatenate(rows))


def backbone_for(ds: Dataset, shared: pathlib.Path):
    images = default_image_backbones(shared)
    ref = Reference("minilm-l6", images)
    return ref.backbone("mobilenet_v2_imagenet" if ds.modality == "image" else "minilm-l6")


def taps_of(backbone, ds: Dataset, items: Sequence, chunk: int = 64) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(items), chunk):
        out = backbone.torch_taps(backbone.preprocess([ds.payload(x) for x in items[i : i + chunk]]))
        for tap, v in out.items():
            parts.setdefault(tap, []).append(v.astype(np.float32))
    return {tap: np.concatenate(v) for tap, v in parts.items()}


def cache_features(ds: Dataset, args: argparse.Namespace) -> pathlib.Path:
    path = args.cache / f"{ds.name}.npz"
    rows = needed_rows(ds, SHOTS, CACHED_ALL)
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            missing = np.setdiff1d(rows, z["rows"])
            if not len(missing):
                return path
            arrays = {k: z[k] for k in z.files}
        # More draws than the cache was made for: add their pool rows (the test rows are unchanged).
        start = time.perf_counter()
        extra = taps_of(backbone_for(ds, args.shared), ds, [ds.train_inputs[i] for i in missing])
        arrays["rows"] = np.concatenate([arrays["rows"], missing])
        for tap, v in extra.items():
            arrays[f"pool/{tap}"] = np.concatenate([arrays[f"pool/{tap}"], v])
        save_cache(path, arrays)
        print(f"{ds.name}: {len(missing)} pool rows added to the cache in {time.perf_counter() - start:.0f} s "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
        return path
    start = time.perf_counter()
    backbone = backbone_for(ds, args.shared)
    arrays = {"rows": rows}
    for tap, v in taps_of(backbone, ds, [ds.train_inputs[i] for i in rows]).items():
        arrays[f"pool/{tap}"] = v
    for tap, v in taps_of(backbone, ds, ds.test_inputs).items():
        arrays[f"test/{tap}"] = v
    if ds.modality == "text":
        batch = backbone.preprocess(ds.labels)
        from adapters.backbones import pooled_taps

        for tap, v in pooled_taps(backbone.torch_outputs, batch).items():
            arrays[f"words/{tap}"] = v.astype(np.float32)
    save_cache(path, arrays)
    print(f"{ds.name}: {len(rows)} pool rows, {len(ds.test_inputs)} test rows cached in "
          f"{time.perf_counter() - start:.0f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    return path


def save_cache(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


@dataclasses.dataclass
class Cached:
    ds: Dataset
    pool: dict[str, np.ndarray]  # tap -> [pool rows, d], indexed through `row_of`
    test: dict[str, np.ndarray]
    words: dict[str, np.ndarray] | None
    row_of: dict[int, int]

    def features(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        at = np.array([self.row_of[int(i)] for i in idx])
        return {tap: v[at] for tap, v in self.pool.items()}


def read_cache(ds: Dataset, args: argparse.Namespace) -> Cached:
    with np.load(cache_features(ds, args), allow_pickle=False) as z:
        rows = z["rows"]
        pool = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("pool/")}
        test = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("test/")}
        words = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("words/")} or None
    return Cached(ds, pool, test, words, {int(r): i for i, r in enumerate(rows)})


# --- candidates per draw -----------------------------------------------------------------------------


def run_draw(c: Cached, idx: np.ndarray) -> dict:
    """Every AUTO candidate's held-out correctness and test accuracy on one draw, and the single
    strategies' test accuracy, all through adapters' own functions."""
    from adapters.evaluation import folds
    from adapters.label_words import LabelText
    from adapters.options import TrainingOptions
    from adapters.selection import (candidates, cross_validate, join_taps, repeats_for, train_head, training_rows,
                                    weigh_label_text)

    ds = c.ds
    labels = [ds.train_labels[i] for i in idx]
    names = sorted(set(labels))
    y = np.array([names.index(label) for label in labels])
    y_test = np.array([names.index(label) for label in ds.test_labels])
    k = len(names)
    xs = join_taps(c.features(idx))
    test = join_taps(c.test)
    words = LabelText(c.words, list(names)) if c.words is not None else None
    out: dict = {"n": int(len(y)), "single": {}, "candidates": {}}
    start = time.perf_counter()
    for strategy in ("linear", "prototype", "mlp"):
        trained = train_head(c.features(idx), labels, TrainingOptions(strategy=strategy), label_text=words)
        pred = trained.head.predict_proba(np.hstack([c.test[t] for t in [trained.evaluation["tap"]]])).argmax(1)
        out["single"][strategy] = float((pred == y_test).mean())
    opts = TrainingOptions()
    text, _ = weigh_label_text(words, xs, y, names, opts)
    repeats = repeats_for(len(y), opts)
    fold_list, method = folds(y, opts, repeats)
    per_repeat = len(fold_list) // repeats
    cands = candidates(opts, list(xs), int(np.bincount(y).min()), bool(fold_list))
    out["method"] = method
    for cand in cands:
        cv = cross_validate(cand, xs, y, k, opts, fold_list, per_repeat, None, text)
        x_all, y_all = training_rows(xs[cand.tap], y, np.arange(len(y)), cand.tap, None, text)
        head = cand.trainer()(x_all, y_all, k, opts)
        acc = float((head.logits(test[cand.tap]).argmax(1) == y_test).mean())
        out["candidates"][cand.name] = {"complex": cand.complex, "cv": cv.accuracy, "test": acc,
                                        "correct": [round(float(v), 4) for v in cv.correct]}
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


# --- FINE_TUNE per draw (image sets) --------------------------------------------------------------------


def feature_candidates(xs: dict, y: np.ndarray, k: int, x_eval: dict, y_eval: np.ndarray) -> dict:
    """AUTO's candidates cross-validated on (xs, y), each fit on all of it and scored per example on
    (x_eval, y_eval): what the feature head of AUTO would pick under any rule, and how it would do."""
    from adapters.evaluation import folds
    from adapters.options import TrainingOptions
    from adapters.selection import candidates, cross_validate, join_taps, repeats_for

    opts = TrainingOptions()
    xs, x_eval = join_taps(xs), join_taps(x_eval)
    repeats = repeats_for(len(y), opts)
    fold_list, _ = folds(y, opts, repeats)
    out = {}
    for cand in candidates(opts, list(xs), int(np.bincount(y).min()), bool(fold_list)):
        cv = cross_validate(cand, xs, y, k, opts, fold_list, len(fold_list) // repeats)
        head = cand.trainer()(xs[cand.tap], y, k, opts)
        out[cand.name] = {"complex": cand.complex, "cv": cv.accuracy,
                          "correct": [round(float(v), 4) for v in cv.correct],
                          "eval_correct": (head.logits(x_eval[cand.tap]).argmax(1) == y_eval).astype(int).tolist()}
    return out


def stage_fine_tune(args: argparse.Namespace) -> None:
    from adapters.finetune import DEFAULT_BLOCKS, _maps, fine_tune, holdout_split
    from adapters.options import TrainingOptions

    ft_out = fine_tune_path(args.out)
    results = load_results(ft_out)
    sets = list(args.sets)
    cached, backbones, test_maps = {}, {}, {}
    # Draw by draw across the sets, so that a bounded run covers every set.
    for d, shots, name in itertools.product(range(args.fine_tune_draws), args.fine_tune_shots, sets):
        if name not in cached:
            cached[name] = read_cache(load(name, args.shared), args)
            backbones[name] = backbone_for(cached[name].ds, args.shared)
        c, backbone = cached[name], backbones[name]
        cell = results["sets"].setdefault(name, {"cells": {}})["cells"].setdefault(shots, {"draws": {}})
        rec = cell["draws"].setdefault(str(d), {})
        if "fine_tune" in rec:
            continue
        if name not in test_maps:
            test_maps[name] = _maps(backbone, backbone.torch_outputs,
                                    [c.ds.payload(x) for x in c.ds.test_inputs], DEFAULT_BLOCKS[c.ds.modality],
                                    lambda _: None)
        test_feeds = test_maps[name]
        idx = draw_indices(c.ds, shots, d, args.all_cap)
        labels = [c.ds.train_labels[i] for i in idx]
        names = sorted(set(labels))
        y = np.array([names.index(label) for label in labels])
        y_test = np.array([names.index(label) for label in c.ds.test_labels])
        start = time.perf_counter()
        seen: dict = {}

        def capture(evaluation: dict, holdout_correct: np.ndarray) -> bool:
            seen["holdout_correct"] = holdout_correct.astype(int).tolist()
            return True  # FINE_TUNE as a strategy of its own always tunes again on every example

        tuned, _ = fine_tune(backbone, [c.ds.payload(c.ds.train_inputs[i]) for i in idx], labels,
                             TrainingOptions(strategy="fine_tune"), refit_if=capture,
                             trunk=backbone.torch_outputs)
        probs = np.concatenate([tuned.head.reference({n: v[i : i + 64] for n, v in test_feeds.items()})
                                for i in range(0, len(y_test), 64)])
        train_idx, val_idx = holdout_split(y, 0.2, 0)
        feats = c.features(idx)
        rival = feature_candidates({t: v[train_idx] for t, v in feats.items()}, y[train_idx], len(names),
                                   {t: v[val_idx] for t, v in feats.items()}, y[val_idx])
        rec["fine_tune"] = {"test": float((probs.argmax(1) == y_test).mean()),
                            "best_epoch": tuned.evaluation["best_epoch"],
                            "holdout_correct": seen["holdout_correct"], "rival": rival,
                            "seconds": round(time.perf_counter() - start, 1),
                            "load": round(os.getloadavg()[0], 1)}
        save_results(ft_out, results)
        print(f"{name} N={shots} d{d}: fine_tune {100 * rec['fine_tune']['test']:.1f} (best epoch "
              f"{tuned.evaluation['best_epoch']}, holdout {np.mean(seen['holdout_correct']):.2f}) in "
              f"{rec['fine_tune']['seconds']:.0f} s (load {os.getloadavg()[0]:.1f})", flush=True)


# --- leave one dataset out ------------------------------------------------------------------------------

Z_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
MARGIN_GRID = (0.0, 0.01, 0.02, 0.05)
NEVER = "never complex"  # the rule that keeps the best baseline always (z = infinity)
AUTO_FINE_TUNE_MIN = 8  # the service's default auto_fine_tune_min_examples


def rules(admissible_only: bool = True) -> list:
    """The grid. Admissible rules never take a complex candidate for a win by one example: such a win
    has mean(d) = 1/n and sd(d)/sqrt(n) = 1/n, so its lower bound (1 - z)/n clears no margin >= 0 when
    z >= 1 (the issue's requirement, not a tuned value). The others are scored for comparison."""
    from adapters.selection import Rule

    grid = [Rule(z, m) for z in Z_GRID for m in MARGIN_GRID] + [Rule(math_inf(), 0.0)]
    return [r for r in grid if r.z >= 1] if admissible_only else grid


def math_inf() -> float:
    return float("inf")


def rule_name(rule) -> str:
    return NEVER if rule.z == float("inf") else f"z={rule.z:g}, margin={rule.margin:g}"


def pick(table: dict, rule) -> str:
    """The candidate AUTO's rule picks from a {name: {"complex", "correct"}} table (candidate order)."""
    from adapters.selection import Candidate, choose

    # Names stand in for candidates. PROTOTYPE on the last layer is an alternative to the LINEAR baseline
    # (adapters.selection.candidates), whatever an older results file recorded.
    cands = [Candidate(n, "last", 0.0, v["complex"] or n == "prototype") for n, v in table.items()]
    chosen, _ = choose(cands, {c: np.asarray(table[c.strategy]["correct"], np.float64) for c in cands}, rule)
    return chosen.strategy


def auto_accuracy(rec: dict, shots: str, rule, ft_rule) -> float:
    """AUTO's test accuracy on one draw: the feature head `rule` picks, replaced by the tuned head when
    AUTO fine-tunes (image sets from AUTO_FINE_TUNE_MIN per label) and `ft_rule` prefers it on the
    holdout to the feature head `rule` picks on the holdout's complement."""
    from adapters.selection import prefer_complex

    acc = rec["candidates"][pick(rec["candidates"], rule)]["test"]
    ft = rec.get("fine_tune")
    if ft_rule is not None and ft and shots != "all" and int(shots) >= AUTO_FINE_TUNE_MIN and ft["best_epoch"] > 0:
        rival = ft["rival"][pick(ft["rival"], rule)]["eval_correct"]
        if prefer_complex(np.asarray(ft["holdout_correct"]), np.asarray(rival), ft_rule)[0]:
            return ft["test"]
    return acc


def cell_draws(cell: dict) -> list[dict]:
    """The draws a cell is scored on: those with FINE_TUNE where the cell has any (the same draws for
    every column), else all."""
    draws = [cell["draws"][d] for d in sorted(cell["draws"], key=int) if "candidates" in cell["draws"][d]]
    with_ft = [r for r in draws if "fine_tune" in r]
    return with_ft or draws


def cell_figures(cell: dict, shots: str, rule, ft_rule) -> dict:
    draws = cell_draws(cell)
    singles = {s: float(np.mean([r["single"][s] for r in draws])) for s in draws[0]["single"]}
    if all("fine_tune" in r for r in draws):
        singles["fine_tune"] = float(np.mean([r["fine_tune"]["test"] for r in draws]))
    best = max(singles, key=singles.get)
    auto = float(np.mean([auto_accuracy(r, shots, rule, ft_rule) for r in draws]))
    max_cv = float(np.mean([max(r["candidates"].values(), key=lambda v: v["cv"])["test"] for r in draws]))
    return {"draws": len(draws), "auto": auto, "single": singles, "best": best, "best_acc": singles[best],
            "gap": auto - singles[best], "max_cv": max_cv}


def cells(results: dict, sets: Sequence[str]):
    for n in sets:
        for s in [s for s in SHOTS if s in results["sets"][n]["cells"]]:
            if cell_draws(results["sets"][n]["cells"][s]):
                yield n, s, results["sets"][n]["cells"][s]


def loss(results: dict, sets: Sequence[str], rule, ft_rule) -> tuple[float, float]:
    """Points by which AUTO falls more than 0.5 below the best single strategy, summed over the sets'
    cells (to 0.1 point); and minus AUTO's mean gap to the best single strategy (the tie-break)."""
    gaps = [round(100 * cell_figures(cell, s, rule, ft_rule)["gap"], 2) for _, s, cell in cells(results, sets)]
    return round(float(sum(max(0.0, -g - 0.5) for g in gaps)), 1), -round(float(np.mean(gaps)), 2)


def choose_rules(results: dict, sets: Sequence[str], modality: str | None = None):
    """The feature rule with the least loss on `sets` (AUTO without fine-tuning), then the FINE_TUNE
    rule with the least loss given it on those of `sets` with FINE_TUNE draws (of `modality` only, when
    given: the service has a FINE_TUNE rule per modality); ties go to the more conservative rule (larger
    z, then larger margin)."""
    rule = min((loss(results, sets, r, None), -r.z, -r.margin, i, r) for i, r in enumerate(rules()))[-1]
    tuned = [n for n in sets if modality in (None, results["sets"][n].get("modality")) and any(
        "fine_tune" in rec for cell in results["sets"][n]["cells"].values() for rec in cell["draws"].values())]
    if not tuned:
        return rule, None
    ft_rule = min((loss(results, tuned, rule, r), -r.z, -r.margin, i, r) for i, r in enumerate(rules()))[-1]
    return rule, ft_rule


def stage_lodo(args: argparse.Namespace) -> str:
    results = merged_results(args.out)
    sets = [n for n in args.sets if n in results["sets"]]
    lines = ["| set | N | draws | AUTO (LODO rules) | LINEAR | PROTOTYPE | MLP | FINE_TUNE | best single | "
             "AUTO − best (pp) | met (≥ −0.5) | max-CV AUTO | rules chosen without this set (features; FINE_TUNE) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    met = total = 0
    for held in sets:
        rule, ft_rule = choose_rules(results, [n for n in sets if n != held], results["sets"][held].get("modality"))
        for _, shots, cell in cells(results, [held]):
            f = cell_figures(cell, shots, rule, ft_rule)
            ok = 100 * f["gap"] >= -0.5
            met, total = met + ok, total + 1
            col = {s: f"{100 * v:.1f}" for s, v in f["single"].items()}
            lines.append(f"| {held} | {shots} | {f['draws']} | {100 * f['auto']:.1f} | {col.get('linear', '-')} | "
                         f"{col.get('prototype', '-')} | {col.get('mlp', '-')} | {col.get('fine_tune', '-')} | "
                         f"{f['best']} {100 * f['best_acc']:.1f} | {100 * f['gap']:+.1f} | {'yes' if ok else '**no**'} | "
                         f"{100 * f['max_cv']:.1f} | {rule_name(rule)}; "
                         f"{rule_name(ft_rule) if ft_rule else '-'} |")
    rule, ft_rule = choose_rules(results, sets)
    lo, neg = loss(results, sets, rule, ft_rule)
    summary = (f"\nLODO: AUTO >= best single - 0.5 in {met} of {total} cells. Chosen on all {len(sets)} sets: "
               f"features {rule_name(rule)}; FINE_TUNE {rule_name(ft_rule) if ft_rule else '-'} "
               f"({lo:.1f} points below the target in all, mean AUTO - best {-neg:+.2f}).\n")
    grid = ["\n| feature rule | points below target, all sets | mean AUTO − best (pp) |", "|---|---|---|"]
    for r in rules(admissible_only=False):
        lo, neg = loss(results, sets, r, None)
        grid.append(f"| {rule_name(r)} | {lo:.1f} | {-neg:+.2f} |")
    images = [n for n in sets if n in IMAGE_SETS]
    grid += ["\n| FINE_TUNE rule (feature rule as chosen) | points below target, image sets | "
             "mean AUTO − best (pp) |", "|---|---|---|"]
    for r in rules(admissible_only=False):
        lo, neg = loss(results, images, rule, r)
        grid.append(f"| {rule_name(r)} | {lo:.1f} | {-neg:+.2f} |")
    text = "\n".join(lines) + "\n" + summary + "\n".join(grid) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return text


def fine_tune_path(out: pathlib.Path) -> pathlib.Path:
    """FINE_TUNE's records go to a file of their own (its stage runs beside the candidates stage)."""
    return out.with_name(out.stem + "-fine-tune.json")


def merged_results(out: pathlib.Path) -> dict:
    results = load_results(out)
    for name, entry in load_results(fine_tune_path(out))["sets"].items():
        for shots, cell in entry["cells"].items():
            for d, rec in cell["draws"].items():
                target = results["sets"].get(name, {}).get("cells", {}).get(shots, {}).get("draws", {}).get(d)
                if target is not None and "fine_tune" in rec:
                    target["fine_tune"] = rec["fine_tune"]
    return results


def load_results(path: pathlib.Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"sets": {}}


def save_results(path: pathlib.Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, separators=(",", ":")) + "\n")
    tmp.replace(path)


def stage_candidates(args: argparse.Namespace) -> None:
    from adapters.heads import torch_threads

    results = load_results(args.out)
    cache = {name: read_cache(load(name, args.shared), args) for name in args.sets}
    for shots in args.shots:  # every set at one N before the next N: partial results are usable
        for name, c in cache.items():
            cell = results["sets"].setdefault(name, {"modality": c.ds.modality, "test": len(c.ds.test_inputs),
                                                    "cells": {}})["cells"].setdefault(shots, {"draws": {}})
            for d in range((IMAGE_DRAWS if c.ds.modality == "image" else DRAWS)[shots]):
                if str(d) in cell["draws"]:
                    continue
                with torch_threads(1):
                    rec = run_draw(c, draw_indices(c.ds, shots, d, args.all_cap))
                cell["draws"][str(d)] = rec
                save_results(args.out, results)
                best = max(rec["candidates"].items(), key=lambda kv: kv[1]["cv"])[0]
                print(f"{name} N={shots} d{d}: n={rec['n']} single " + " ".join(
                    f"{s} {100 * v:.1f}" for s, v in rec["single"].items()) + f" | max-CV {best} "
                    f"{100 * rec['candidates'][best]['test']:.1f} | {rec['seconds']:.0f} s "
                    f"(load {os.getloadavg()[0]:.1f})", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage == "features":
        for name in args.sets:
            cache_features(load(name, args.shared), args)
        return 0
    if args.stage == "candidates":
        stage_candidates(args)
        return 0
    if args.stage == "fine-tune":
        stage_fine_tune(args)
        return 0
    stage_lodo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
