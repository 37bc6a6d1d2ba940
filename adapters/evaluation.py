"""Honest evaluation of a head: how examples are held out (stratified folds, repeated, or a holdout),
the metrics of held-out predictions (scikit-learn's), the temperature that calibrates them, and the
warnings a task's evaluation carries."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from sklearn.model_selection import RepeatedStratifiedKFold

from adapters.heads import nll, softmax
from adapters.label_words import look_alike_warnings
from adapters.options import TrainingOptions

Folds = list[tuple[np.ndarray, np.ndarray]]


def folds(y: np.ndarray, opts: TrainingOptions, repeats: int = 1) -> tuple[Folds, str]:
    """Stratified validation: a holdout when asked, else k-fold with k = min(5, smallest label), repeated
    `repeats` times with fresh assignments (scikit-learn's RepeatedStratifiedKFold, seeded by the job).
    No folds when a label has a single example."""
    min_count = int(np.bincount(y).min())
    if min_count < 2:
        return [], "none (a label has a single example)"
    if opts.validation_fraction > 0:
        # At least one example of each label is held out, and at least one stays in training.
        rng = np.random.default_rng(opts.seed)
        by_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(int(y.max()) + 1)]
        val = np.concatenate([idx[: min(max(1, round(len(idx) * opts.validation_fraction)), len(idx) - 1)]
                              for idx in by_class])
        train = np.setdiff1d(np.arange(len(y)), val)
        return [(train, np.sort(val))], f"holdout {opts.validation_fraction:.0%}"
    k = min(5, min_count)
    splitter = RepeatedStratifiedKFold(n_splits=k, n_repeats=repeats, random_state=opts.seed)
    out = [(train, val) for train, val in splitter.split(np.zeros(len(y)), y)]
    return out, f"{k}-fold" + (f" x{repeats} repeats" if repeats > 1 else "")


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature T in [0.25, 20] minimising held-out NLL of softmax(logits / T) (golden-section on log T)."""
    lo, hi = np.log(0.25), np.log(20.0)  # tiny validation sets must not make heads overconfident
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(logits / np.exp(a), y), nll(logits / np.exp(b), y)
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(logits / np.exp(a), y)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(logits / np.exp(b), y)
    return float(np.exp((lo + hi) / 2))


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def classification_metrics(y: np.ndarray, pred: np.ndarray, names: Sequence[str]) -> dict:
    labels = np.arange(len(names))
    cm = confusion_matrix(y, pred, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    per_label = [{"label": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                 for name, p, r, f, s in zip(names, precision, recall, f1, support)]
    return {"accuracy": float(np.trace(cm) / max(cm.sum(), 1)), "macro_f1": float(np.mean(f1)),
            "per_label": per_label, "confusion_matrix": cm.tolist()}


NOT_VALIDATED = {"validation_accuracy": 0.0, "macro_f1": 0.0, "per_label": [], "confusion_matrix": [],
                 "expected_calibration_error": 0.0, "temperature": 1.0}


def validation_report(logits: np.ndarray, y: np.ndarray, names: Sequence[str]) -> dict:
    """Metrics of held-out logits, after fitting the temperature that calibrates them."""
    temperature = fit_temperature(logits, y)
    probs = softmax(logits / temperature)
    metrics = classification_metrics(y, probs.argmax(axis=1), names)
    counts = np.bincount(y, minlength=len(names))
    return {
        "validation_accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
        "per_label": metrics["per_label"], "confusion_matrix": metrics["confusion_matrix"],
        "temperature": temperature, "expected_calibration_error": expected_calibration_error(probs, y),
        "ece_before_calibration": expected_calibration_error(softmax(logits), y),
        "baseline_accuracy": float(counts.max() / counts.sum()),
    }


def binomial_tail(successes: int, n: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(n, p): how likely the accuracy is under the baseline.

    Summed in log space: C(n, i) outgrows a float from n = 1030 on, so multiplying the exact integer by
    p**i raised OverflowError once about a thousand held-out predictions were scored (and p**i alone
    underflows to 0 soon after); tasks may hold 100,000 examples."""
    if successes <= 0 or p >= 1:
        return 1.0
    if successes > n or p <= 0:
        return 0.0
    i = np.arange(successes, n + 1)
    log_choose = math.lgamma(n + 1) - _log_factorials(i) - _log_factorials(n - i)
    log_terms = log_choose + i * math.log(p) + (n - i) * math.log1p(-p)
    top = float(log_terms.max())
    return min(1.0, math.exp(top + math.log(float(np.exp(log_terms - top).sum()))))


def _log_factorials(k: np.ndarray) -> np.ndarray:
    """log(k!) for each k, exact to double precision (math.lgamma, which numpy lacks)."""
    return np.fromiter((math.lgamma(v + 1) for v in k.tolist()), dtype=np.float64, count=len(k))


def warnings_for(ev: dict, labels: Sequence[str], sample_ids: Sequence[str] | None) -> list[str]:
    out = []
    train_acc, val_acc = ev["train_accuracy"], ev["validation_accuracy"]
    validated = bool(ev["per_label"])
    if validated and train_acc - val_acc > 0.2:
        out.append(
            f"overfitting: train accuracy {train_acc:.2f} is far above validation accuracy {val_acc:.2f}; "
            "add examples or use a simpler strategy"
        )
    n_val = sum(m["support"] for m in ev["per_label"])
    if validated:
        p = binomial_tail(round(val_acc * n_val), n_val, ev["baseline_accuracy"])
        if p > 0.05:
            out.append(
                f"no transfer: validation accuracy {val_acc:.2f} is not significantly better than always answering "
                f"the most frequent label ({ev['baseline_accuracy']:.2f}; p={p:.2f} over {n_val} held-out "
                "predictions); the backbone's features may not fit this task, or the labels may be inconsistent"
            )
    proto = ev.get("prototype_accuracy")
    if validated and ev["strategy"] != "prototype" and proto is not None and val_acc < proto - 0.05:
        out.append(
            f"negative transfer: {ev['strategy']} ({val_acc:.2f}) is worse than the prototype baseline "
            f"({proto:.2f}) on validation; try strategy PROTOTYPE or AUTO"
        )
    counts = Counter(labels)
    few = sorted(label for label, n in counts.items() if n < 3)
    if few:
        out.append(f"too few examples for {', '.join(map(repr, few))}: fewer than 3; predictions will be unreliable")
    if max(counts.values()) >= 5 * min(counts.values()):
        out.append(
            f"imbalanced labels: {max(counts.values())} vs {min(counts.values())} examples; "
            "class weights compensate, but add examples to the small labels"
        )
    out += look_alike_warnings(counts)
    if sample_ids is not None:
        seen: dict[str, set[str]] = {}
        for sid, label in zip(sample_ids, labels):
            seen.setdefault(sid, set()).add(label)
        conflicts = [sorted(ls) for ls in seen.values() if len(ls) > 1]
        if conflicts:
            shown = "; ".join(" vs ".join(map(repr, ls)) for ls in conflicts[:3])
            out.append(f"conflicting labels: {len(conflicts)} input(s) were given with two or more labels ({shown})")
    return out
