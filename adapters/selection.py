"""Which feature head a task gets: the candidates, their cross-validation, and AUTO's rule.

A named strategy (LINEAR, MLP, PROTOTYPE) is one candidate, or LINEAR at each C of its grid; the best
held-out accuracy wins, ties to the earlier. AUTO compares more, in two groups:

- the baseline: LINEAR on the final features (tap "last"), its C chosen over a grid by cross-validated
  accuracy, exactly as the LINEAR strategy does;
- the alternatives: PROTOTYPE on the final features; LINEAR and PROTOTYPE on the last four layers' pooled
  features side by side; MLP on either, from MLP_MIN_EXAMPLES per label. (FINE_TUNE is compared in
  `auto_fine_tune`, by the same rule: `prefer_complex`.)

AUTO keeps the baseline, and takes an alternative (here called "complex") only when the paired
evidence says it is better on these examples (`Rule`): per example, the difference between the two
candidates' out-of-fold correctness (averaged over repeated stratified folds) has a mean whose lower
bound, mean - z * standard error, is above a margin. A candidate that wins the folds by one lucky
example does not clear it; one that wins on many examples does. The constants were chosen
leave-one-dataset-out on the eight development sets (bench/selection.py; docs/design.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from adapters.errors import InvalidInput
from adapters.evaluation import NOT_VALIDATED, Folds, folds, validation_report, warnings_for
from adapters.heads import TRAINERS, DenseHead, TrainedHead, torch_threads, train_linear
from adapters.label_words import LabelText, label_text_quality, label_text_weight
from adapters.options import TAP_OUTPUTS, TAPS, Progress, TrainingOptions, no_progress

C_GRID = (0.3, 1.0, 3.0)  # linear: inverse L2 strength as scikit-learn's C, chosen by cross-validation
# The wider view AUTO may read: the first of these the features allow. The last four layers' pooled
# features side by side gave +0.5 (MPQA) to +2.2 points (TREC) over the last two on the six shared text
# sets at N = 8 (10 draws, logistic regression).
AUTO_TAPS = ("last+last-1+last-2+last-3", "last+last-1")
MLP_MIN_EXAMPLES = 16  # AUTO adds MLP from this many examples per label
# AUTO repeats its stratified k-fold with fresh assignments until about this many held-out predictions
# per candidate (at most MAX_REPEATS times): a small task's folds are a few examples each, and one
# assignment's luck would otherwise decide.
REPEAT_ROWS = 300
MAX_REPEATS = 3


@dataclasses.dataclass(frozen=True)
class Rule:
    """When AUTO may prefer a complex candidate c over the best baseline b: with d_i the difference of
    c's and b's out-of-fold correctness on example i, mean(d) - z * sd(d) / sqrt(n) > margin.
    Defaults: chosen leave-one-dataset-out (docs/design.md, "Choosing a strategy: the AUTO rule")."""

    z: float = 1.0
    margin: float = 0.0

    def lower_bound(self, d: np.ndarray) -> float:
        if len(d) < 2 or math.isinf(self.z):
            return -math.inf
        return float(d.mean() - self.z * d.std(ddof=1) / math.sqrt(len(d)))

    def prefers(self, d: np.ndarray) -> bool:
        return self.lower_bound(d) > self.margin + 1e-9


# Two uses: the feature candidates' repeated folds over every example, and FINE_TUNE's single holdout (a
# fifth of the examples, which also picked its epoch). Chosen on the eight development sets (bench/selection.py,
# docs/benchmarks.md "AUTO against single strategies"; each set's own figure there comes from the rule the
# other seven chose): among the rules that never take a one-example win (z >= 1), z = 1 lost least to the
# best single strategy (1.4 points below the target summed over 40 cells; z = 1.5: 2.2, z = 2: 2.7).
RULE = Rule(z=1.0, margin=0.0)


@dataclasses.dataclass(frozen=True)
class FineTunePolicy:
    """How AUTO judges its tuned head against its feature head on their shared holdout. `tuned_first`: keep
    the tuned head unless the feature head is clearly better there (the rule, the other way round); else
    keep it only when it is clearly better itself. A z of infinity never tunes."""

    rule: Rule
    tuned_first: bool = False


# FINE_TUNE, per modality, chosen on the development sets of that modality.
# Text: tuned first. Tuning the sentence encoder's six exposed blocks beat AUTO's feature head at N = 8 on
# five of the six text sets, by +2.7 points on their mean (TREC +13.1; MPQA -2.7), and with every set left
# out the other five favour it; but on a holdout of 4-12 sentences no rule can tell the two apart (AUTO
# with "tuned only when clearly better" kept the feature head on every draw), so the evidence across sets
# decides and the holdout only vetoes a tuned head that is clearly worse (docs/benchmarks.md, "AUTO and
# FINE_TUNE on text").
# Images: the study finished one draw (40 minutes a task on the shared CPU), on which every finite rule
# tied; ties go to the conservative rule, so AUTO does not fine-tune image tasks (FINE_TUNE stays
# available by name) until a study with more draws says otherwise.
FINE_TUNE_RULES = {"text": FineTunePolicy(RULE, tuned_first=True), "image": FineTunePolicy(Rule(z=math.inf))}


@dataclasses.dataclass(frozen=True)
class Augmented:
    """Extra training rows (augmented views): per tap, features; `origin[i]` indexes the example each
    row was made from, so a view joins training only when its example is in the training fold."""

    features: Mapping[str, np.ndarray]
    origin: np.ndarray


@dataclasses.dataclass(frozen=True)
class Candidate:
    strategy: str
    tap: str
    C: float = 0.0  # linear only
    complex: bool = False  # AUTO: needs the rule's evidence to beat the baselines

    @property
    def name(self) -> str:
        return self.strategy + (f"(C={self.C:g})" if self.C else "") + (f"@{self.tap}" if self.tap != "last" else "")

    def trainer(self) -> Callable[..., DenseHead]:
        return functools.partial(train_linear, C=self.C) if self.C else TRAINERS[self.strategy]


def candidates(opts: TrainingOptions, taps: Sequence[str], min_count: int, has_folds: bool) -> list[Candidate]:
    """What is compared, simplest first: a named strategy alone (LINEAR over its C grid unless `l2` is
    given), or AUTO's baselines and complex candidates (see the module's docstring)."""
    if opts.tap and opts.tap not in taps:
        raise InvalidInput(f"tap {opts.tap!r} is not available; use one of {', '.join(taps)}")
    grid = C_GRID if has_folds and not opts.l2 else (0.0,)

    def at(strategy: str, tap: str, complex_: bool) -> list[Candidate]:
        cs = grid if strategy == "linear" else (0.0,)
        return [Candidate(strategy, tap, c, complex_) for c in cs]

    if opts.strategy != "auto":
        return at(opts.strategy, opts.tap or "last", False)
    if not has_folds:
        return [Candidate("prototype", opts.tap or "last")]
    base = opts.tap or ("last" if "last" in taps else taps[0])
    wide = [] if opts.tap else [t for t in AUTO_TAPS if t in taps][:1]
    # PROTOTYPE is an alternative, not a second baseline: taking the better of LINEAR and PROTOTYPE by
    # fold accuracy alone lost 6.8 points against the best single strategy over the development sets'
    # cells, requiring the paired evidence for it 2.7 (bench/selection.py, leave-one-dataset-out).
    out = at("linear", base, False) + at("prototype", base, True)
    for tap in wide:
        out += at("linear", tap, True) + at("prototype", tap, True)
    if min_count >= MLP_MIN_EXAMPLES:
        for tap in [base, *wide]:
            out += at("mlp", tap, True)
    return out


def repeats_for(n: int, opts: TrainingOptions) -> int:
    """Fold assignments AUTO averages over (one for a named strategy or a holdout)."""
    if opts.strategy != "auto" or opts.validation_fraction > 0:
        return 1
    return max(1, min(MAX_REPEATS, REPEAT_ROWS // max(n, 1)))


def join_taps(features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds every joined tap ("last+last-1", ...) whose parts are present."""
    out = dict(features)
    for joined in [t for t in TAPS if "+" in t and all(part in out for part in t.split("+"))]:
        out[joined] = np.hstack([out[part] for part in joined.split("+")])
    return out


def training_rows(x, y, train_idx, tap, augmented: Augmented | None, label_text: LabelText | None):
    """The fold's examples, their augmented views, and the labels' words (when they carry weight)."""
    xs, ys = [x[train_idx]], [y[train_idx]]
    if augmented is not None:
        keep = np.isin(augmented.origin, train_idx)
        xs.append(augmented.features[tap][keep])
        ys.append(y[augmented.origin[keep]])
    if label_text is not None and label_text.weight:
        rows = label_text.features[tap]
        xs.append(np.repeat(rows, label_text.weight, axis=0))
        ys.append(np.repeat(np.arange(len(rows)), label_text.weight))
    return np.concatenate(xs), np.concatenate(ys)


@dataclasses.dataclass
class CrossValidation:
    """One candidate's held-out record: logits of the first fold assignment (every example held out
    once, in `held` order) and, per example, the share of assignments that got it right."""

    logits: np.ndarray
    correct: np.ndarray  # [n] in example order, in [0, 1]
    accuracy: float


def cross_validate(c: Candidate, xs, y, k, opts, fold_list: Folds, per_repeat: int, augmented=None,
                   label_text=None) -> CrossValidation:
    """Fits `c` on every fold's training rows and predicts its held-out rows."""
    hits = np.zeros(len(y))
    seen = np.zeros(len(y))
    first = np.zeros((len(y), k), dtype=np.float32)
    for i, (train, val) in enumerate(fold_list):
        xt, yt = training_rows(xs[c.tap], y, train, c.tap, augmented, label_text)
        logits = c.trainer()(xt, yt, k, opts).logits(xs[c.tap][val])
        if i < per_repeat:
            first[val] = logits
        hits[val] += logits.argmax(axis=1) == y[val]
        seen[val] += 1
    held = np.concatenate([val for _, val in fold_list[:per_repeat]])
    scored = seen > 0
    correct = np.where(scored, hits / np.maximum(seen, 1), np.nan)
    return CrossValidation(first[held], correct, float(np.nanmean(correct[scored])))


def choose(cands: Sequence[Candidate], correct: Mapping[Candidate, np.ndarray], rule: Rule = RULE
           ) -> tuple[Candidate, str]:
    """AUTO's choice from each candidate's per-example held-out correctness (same examples, same folds):
    the best baseline by accuracy (ties to the earlier), replaced by the complex candidate with the
    highest lower bound on its paired gain when that bound clears the rule's margin."""
    def acc(c: Candidate) -> float:
        v = correct[c]
        return float(np.nanmean(v))

    simple = [c for c in cands if not c.complex] or list(cands)
    best = max(simple, key=lambda c: (acc(c), -cands.index(c)))
    rivals = []
    for c in cands:
        if c.complex:
            d = correct[c] - correct[best]
            d = d[~np.isnan(d)]
            rivals.append((rule.lower_bound(d), float(d.mean()) if len(d) else 0.0, c))
    if not rivals:
        return best, f"best held-out accuracy {acc(best):.3f}"
    bound, gain, top = max(rivals, key=lambda r: (r[0], -cands.index(r[2])))
    if bound > rule.margin + 1e-9:
        return top, (f"{top.name} beat the best baseline {best.name} by {gain:+.3f} per example "
                     f"(lower bound {bound:+.3f} > {rule.margin:g}, z = {rule.z:g})")
    return best, (f"baseline {best.name} kept: no complex candidate beat it clearly enough (best: {top.name} "
                  f"{gain:+.3f} per example, lower bound {bound:+.3f} <= {rule.margin:g}, z = {rule.z:g})")


def prefer_complex(complex_correct: np.ndarray, simple_correct: np.ndarray, rule: Rule = RULE) -> tuple[bool, float]:
    """The rule on one paired comparison (FINE_TUNE against the feature head on a holdout): whether the
    complex side clears it, and the lower bound of its per-example gain."""
    d = np.asarray(complex_correct, np.float64) - np.asarray(simple_correct, np.float64)
    bound = rule.lower_bound(d)
    return bound > rule.margin + 1e-9, bound


def train_head(
    features: np.ndarray | Mapping[str, np.ndarray],
    labels: Sequence[str],
    options: TrainingOptions = TrainingOptions(),
    progress: Progress = no_progress,
    sample_ids: Sequence[str] | None = None,
    augmented: Augmented | None = None,
    label_text: LabelText | None = None,
    rule: Rule = RULE,
) -> TrainedHead:
    """Trains a feature head on trunk features and evaluates it honestly on held-out data.

    `features` maps tap -> [n, d] (a bare array is the "last" tap). Validation is stratified k-fold
    (repeated under AUTO) or a holdout; the chosen candidate's out-of-fold logits give the reported
    metrics and the temperature that calibrates the final head, which is then fit on all examples.
    `label_text` holds the trunk's features of each label's words (weight 0: set here from
    `options.label_text` and label_text_quality). Label order in the head's output, and the row order
    of `label_text`, is sorted label order.
    """
    with torch_threads(1):
        return _train_head(features, labels, options, progress, sample_ids, augmented, label_text, rule)


def _train_head(features, labels, options, progress, sample_ids, augmented, label_text, rule) -> TrainedHead:
    start = time.perf_counter()
    xs = {"last": features} if isinstance(features, np.ndarray) else dict(features)
    xs = {tap: np.ascontiguousarray(v, dtype=np.float32) for tap, v in xs.items()}
    widths = {tap: (int(v.shape[1]),) for tap, v in xs.items()}
    xs = join_taps(xs)
    widths.update({t: sum((widths[part] for part in t.split("+")), ()) for t in xs if "+" in t})
    if augmented is not None:
        augmented = Augmented(join_taps(augmented.features), augmented.origin)
    names = sorted(set(labels))
    if len(names) < 2:
        raise InvalidInput(f"a task needs at least 2 labels with examples; got {len(names)}")
    index = {name: i for i, name in enumerate(names)}
    y = np.array([index[label] for label in labels], dtype=np.int64)
    k = len(names)
    counts = np.bincount(y, minlength=k)
    label_text, label_text_report = weigh_label_text(label_text, xs, y, names, options)
    repeats = repeats_for(len(y), options)
    fold_list, method = folds(y, options, repeats)
    per_repeat = len(fold_list) // repeats if fold_list else 0
    cands = candidates(options, list(xs), int(counts.min()), bool(fold_list))

    results: dict[Candidate, CrossValidation] = {}
    held = np.concatenate([val for _, val in fold_list[:per_repeat]]) if fold_list else np.zeros(0, np.int64)
    for i, c in enumerate(cands if fold_list else []):
        progress({"phase": "validating", "message": f"{method} cross-validation of {c.name} ({i + 1}/{len(cands)})"})
        results[c] = cross_validate(c, xs, y, k, options, fold_list, per_repeat, augmented, label_text)
    scores = {c.name: r.accuracy for c, r in results.items()}
    if not fold_list:
        chosen, reason = cands[0], "a label has a single example: prototype needs no validation data"
    elif options.strategy != "auto":
        chosen = max(cands, key=lambda c: (scores[c.name], -cands.index(c)))
        reason = "requested" if len(cands) == 1 else f"requested; C by {method} accuracy: " + ", ".join(
            f"{name} {score:.3f}" for name, score in scores.items())
    else:
        chosen, why = choose(cands, {c: r.correct for c, r in results.items()}, rule)
        reason = f"{why}; {method} accuracy of {len(cands)} candidates: " + ", ".join(
            f"{name} {score:.3f}" for name, score in scores.items())

    progress({"phase": "training", "message": f"fitting {chosen.name} on all {len(y)} examples"})
    x_all, y_all = training_rows(xs[chosen.tap], y, np.arange(len(y)), chosen.tap, augmented, label_text)
    head = chosen.trainer()(x_all, y_all, k, options, lambda p: progress({"phase": "training", **p}))
    head.inputs = tuple(zip(TAP_OUTPUTS[chosen.tap], widths[chosen.tap]))

    evaluation = {
        "strategy": chosen.strategy,
        "strategy_reason": reason,
        "candidate_scores": scores,
        "tap": chosen.tap,
        "C": chosen.C or None,
        "validation_method": method + (" (model selection on the same folds)" if len(cands) > 1 else ""),
        "examples_per_label": {name: int(n) for name, n in zip(names, counts)},
        "num_examples": len(y),
        "augmented_rows": 0 if augmented is None else len(augmented.origin),
        "label_text": label_text_report,
        "feature_dim": int(xs[chosen.tap].shape[1]),
        "parameters": head.parameter_count(),
        "temperature": 1.0,
        "reject_threshold": options.reject_threshold,
    }
    if fold_list:
        evaluation.update(validation_report(results[chosen].logits, y[held], names))
        evaluation["validation_accuracy"] = results[chosen].accuracy  # over every repeat, as compared
        head.scale_logits(1.0 / evaluation["temperature"])
        proto = next((r.accuracy for c, r in results.items() if c.strategy == "prototype" and c.tap == chosen.tap), None)
        if proto is None and chosen.strategy != "prototype":
            proto = cross_validate(Candidate("prototype", chosen.tap), xs, y, k, options, fold_list, per_repeat,
                                   None, label_text).accuracy
        evaluation["prototype_accuracy"] = proto
    else:
        evaluation.update(NOT_VALIDATED, baseline_accuracy=float(counts.max() / counts.sum()))
    evaluation["train_accuracy"] = float((head.predict_proba(xs[chosen.tap]).argmax(axis=1) == y).mean())
    evaluation["warnings"] = warnings_for(evaluation, labels, sample_ids)
    evaluation["train_seconds"] = time.perf_counter() - start
    return TrainedHead(head, names, evaluation)


def weigh_label_text(label_text: LabelText | None, xs: Mapping[str, np.ndarray], y: np.ndarray,
                     names: Sequence[str], options: TrainingOptions) -> tuple[LabelText | None, dict | None]:
    """The labels' words with their weight set from how well they sort the examples, and the report."""
    if label_text is None:
        return None, None
    k = len(names)
    if len(label_text.texts) != k:
        raise ValueError(f"label_text has {len(label_text.texts)} rows for {k} labels")
    # Measured once on every example (a single scalar, shared by the folds: far less noisy than
    # per-fold estimates, at the cost of the folds' validation rows having a say in it).
    sentence = "last" if "last" in xs else next(iter(xs))  # the sentence-embedding space
    quality = label_text_quality(xs[sentence], y, label_text.features[sentence])
    weight = label_text_weight(quality, options.label_text, label_text.texts)
    weighted = LabelText(join_taps(label_text.features), label_text.texts, weight)
    report = {"mode": options.label_text, "quality": quality, "weight": weight,
              "described": sum(text != name for name, text in zip(names, label_text.texts))}
    return weighted, report


# --- FINE_TUNE under AUTO ---------------------------------------------------------------------------


def auto_fine_tunes(modality: str, options: TrainingOptions, counts: Sequence[int], min_examples: int) -> bool:
    """AUTO also fine-tunes tasks whose every label has `min_examples` examples (0: never), unless the
    modality's policy for FINE_TUNE can never keep the tuned head (z infinite): then tuning would be wasted."""
    return (options.strategy == "auto" and not options.tap and min_examples > 0 and min(counts) >= min_examples
            and not math.isinf(FINE_TUNE_RULES[modality].rule.z))


def auto_fine_tune(
    backbone,
    items: Sequence[str | bytes],
    labels: Sequence[str],
    features: Mapping[str, np.ndarray],
    feature_head: TrainedHead,
    options: TrainingOptions,
    progress: Progress = no_progress,
    sample_ids: Sequence[str] | None = None,
    trunk=None,
    rule: Rule | None = None,
    feature_rule: Rule = RULE,
    tuned_first: bool | None = None,
) -> tuple[TrainedHead, dict[str, np.ndarray] | None]:
    """AUTO's last step for tasks with enough examples: fine-tunes, and keeps the tuned head when tuning
    beat its own linear-probe start (best epoch > 0) and the modality's policy (`FINE_TUNE_RULES`; `rule`
    and `tuned_first` override it) says so, paired on the same holdout (`prefer_complex`): the tuned head
    clearly better, or, tuned first, the feature head not clearly better.

    The feature-head side reruns AUTO's whole procedure (its cross-validated choice of strategy, tap
    and regularisation) on FINE_TUNE's training split, so both sides are trained on the same examples
    and scored on the same held-out ones. A tuned head that wins is then tuned again on every example
    (see `finetune.fine_tune`), as the feature head already is. Returns the kept head, and the tuned
    head's feeds for the export check (None when the feature head is kept)."""
    from adapters.finetune import fine_tune, holdout_split

    policy = FINE_TUNE_RULES[backbone.modality]
    rule = policy.rule if rule is None else rule
    tuned_first = policy.tuned_first if tuned_first is None else tuned_first
    names = sorted(set(labels))
    y = np.array([names.index(label) for label in labels], dtype=np.int64)
    train_idx, val_idx = holdout_split(y, options.validation_fraction or 0.2, options.seed)
    progress({"phase": "validating", "message": "scoring the feature head on the fine-tuning holdout"})
    rival = train_head({tap: x[train_idx] for tap, x in features.items()}, [labels[i] for i in train_idx],
                       dataclasses.replace(options, strategy="auto"), rule=feature_rule)
    feeds_val = {TAP_OUTPUTS[tap][0]: x[val_idx] for tap, x in features.items() if tap in TAP_OUTPUTS}
    rival_pred = np.asarray(rival.labels)[rival.head.reference(feeds_val).argmax(axis=1)]
    rival_correct = (rival_pred == np.asarray(labels)[val_idx]).astype(np.float64)
    verdict: dict = {}

    def wins(tuned: dict, tuned_correct: np.ndarray) -> bool:
        if tuned_first:  # kept unless the feature head is clearly better: the bound of its gain over tuned
            worse, bound = prefer_complex(rival_correct, tuned_correct, rule)
            verdict["prefer"], verdict["bound"] = not worse, -bound
        else:
            verdict["prefer"], verdict["bound"] = prefer_complex(tuned_correct, rival_correct, rule)
        return tuned["best_epoch"] > 0 and verdict["prefer"]

    tuned, feeds = fine_tune(backbone, items, labels, dataclasses.replace(options, strategy="fine_tune"),
                             progress, sample_ids, trunk, refit_if=wins)
    tuned_acc, rival_acc = tuned.evaluation["validation_accuracy"], float(rival_correct.mean())
    ev = feature_head.evaluation
    feature_name = ev["strategy"] + (f"@{ev['tap']}" if ev["tap"] != "last" else "")
    bound_of = "upper bound of the feature head's loss" if tuned_first else "lower bound of the gain"
    comparison = (f"on the same holdout of {len(val_idx)} examples: fine_tune@{tuned.evaluation['tap']} "
                  f"{tuned_acc:.3f} (best epoch {tuned.evaluation['best_epoch']}), {feature_name} {rival_acc:.3f}, "
                  f"{bound_of} {verdict.get('bound', float('nan')):+.3f} (z = {rule.z:g}, margin {rule.margin:g})")
    scores = {**ev.get("candidate_scores", {}), "fine_tune (holdout)": tuned_acc,
              f"{feature_name} (holdout)": rival_acc}
    if tuned.evaluation["refit"]:
        why = ("the feature head was not clearly better" if tuned_first
               else "fine-tuning beat the feature head clearly")
        tuned.evaluation.update(strategy_reason=f"{why} {comparison}", candidate_scores=scores)
        return tuned, feeds
    why = ("fine-tuning did not beat its linear-probe start, or the feature head was clearly better"
           if tuned_first else "fine-tuning did not beat it clearly")
    ev.update(strategy_reason=f"{ev['strategy_reason']}; {why} {comparison}", candidate_scores=scores)
    return feature_head, None
