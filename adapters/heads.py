"""Per-task heads trained on trunk features, their honest evaluation, and their ONNX graphs.

Every head is a small stack of dense layers on the trunk's pooled features:

    [L2-normalise] -> Dense -> (ReLU -> Dense)* -> Softmax  =  probabilities over the task's labels

- linear:    multinomial logistic regression (standardisation folded into the weights), L-BFGS, L2,
             balanced class weights.
- mlp:       one hidden ReLU layer with dropout, Adam (the Teachable Machine head).
- prototype: nearest class mean in cosine space with a fitted scale; trains from one example per label.
- auto:      cross-validates the candidates that the data allows and keeps the best.

Text tasks also learn from their labels' own words ("Sports", "very negative", or a description the
client gives). Each label's text, embedded by the trunk, joins training as extra examples of its
label, weighted by how well those words alone sort the task's own examples (label_text_weight).

The same arrays give the reference probabilities (numpy) and the exported ONNX graph; the two are
checked against each other before a head is accepted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from adapters.backbones import MAX_UNFREEZE, POOLED_TAPS
from adapters.errors import InvalidInput
from adapters.onnx_utils import OPSET, check_model_bytes, create_session

STRATEGIES = ("auto", "linear", "mlp", "prototype", "fine_tune")
# Which trunk outputs a feature head reads: the pooled final features, the same pooling one to three
# blocks earlier (for domains far from the pretraining data), or several side by side.
TAP_OUTPUTS = {
    **{tap: (name,) for tap, name in POOLED_TAPS.items()},
    "last+last-1": ("features", "features_last_1"),
    "last+last-1+last-2+last-3": tuple(POOLED_TAPS.values()),
}
TAPS = tuple(TAP_OUTPUTS)
HEAD_INPUT = "features"
HEAD_OUTPUT = "probabilities"
LABEL_TEXT_MODES = ("auto", "on", "off")
MAX_DESCRIPTION_CHARS = 1000


@dataclasses.dataclass(frozen=True)
class TrainingOptions:
    """Validated, frozen per-job options. Zero means "the strategy's default"."""

    strategy: str = "auto"
    epochs: int = 0
    learning_rate: float = 0.0
    l2: float = 0.0
    seed: int = 0
    validation_fraction: float = 0.0  # 0: k-fold cross-validation
    hidden_units: int = 128
    unfreeze_blocks: int = 0  # fine_tune; 0: the modality's default (finetune.DEFAULT_BLOCKS)
    tap: str = ""  # "" = "last", or the better of the taps under auto
    augment_views: int = 0  # images: augmented views per example
    reject_threshold: float = 0.0
    label_text: str = "auto"  # text tasks: learn from the labels' words (see label_text_weight)
    label_descriptions: Mapping[str, str] = dataclasses.field(default_factory=dict)  # label -> its words

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InvalidInput(f"unknown strategy {self.strategy!r}; use one of {', '.join(STRATEGIES)}")
        checks = [
            (0 <= self.epochs <= 10_000, "epochs must be between 0 (default) and 10000"),
            (0 <= self.learning_rate <= 10, "learning_rate must be between 0 (default) and 10"),
            (0 <= self.l2 <= 100, "l2 must be between 0 (default) and 100"),
            (0 <= self.validation_fraction < 0.9, "validation_fraction must be in [0, 0.9)"),
            (1 <= self.hidden_units <= 8192, "hidden_units must be between 1 and 8192"),
            (0 <= self.unfreeze_blocks <= MAX_UNFREEZE,
             f"unfreeze_blocks must be between 0 (default) and {MAX_UNFREEZE}"),
            (self.tap in ("", *TAPS), f"tap must be one of {', '.join(TAPS)} (or empty)"),
            (0 <= self.augment_views <= 16, "augment_views must be between 0 and 16"),
            (0 <= self.reject_threshold < 1, "reject_threshold must be in [0, 1)"),
            (self.label_text in LABEL_TEXT_MODES, f"label_text must be one of {', '.join(LABEL_TEXT_MODES)}"),
            (not (self.label_descriptions and self.label_text == "off"),
             "label_descriptions are given but label_text is OFF; drop one of them"),
            (all(label and text.strip() for label, text in self.label_descriptions.items()),
             "label_descriptions holds an empty label or description; describe each label in words"),
            (all(len(text) <= MAX_DESCRIPTION_CHARS for text in self.label_descriptions.values()),
             f"label_descriptions holds a description longer than {MAX_DESCRIPTION_CHARS} characters"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInput(message)


# --- the head as arrays ---------------------------------------------------------------------------


@dataclasses.dataclass
class DenseHead:
    """[normalise] -> Dense (-> ReLU -> Dense)* -> softmax, as float32 arrays (W: [out, in])."""

    strategy: str
    layers: list[tuple[np.ndarray, np.ndarray]]
    normalize: bool = False
    inputs: tuple[tuple[str, int], ...] = ((HEAD_INPUT, 0),)  # (trunk output, width), concatenated in order

    def scale_logits(self, factor: float) -> None:
        """Multiplies the logits by `factor` (temperature scaling: factor = 1 / T)."""
        w, b = self.layers[-1]
        self.layers[-1] = ((w * factor).astype(np.float32), (b * factor).astype(np.float32))

    @property
    def input_dim(self) -> int:
        return int(self.layers[0][0].shape[1])

    @property
    def input_names(self) -> list[str]:
        return [name for name, _ in self.inputs]

    @property
    def input_name(self) -> str:
        return self.inputs[0][0]

    @property
    def num_classes(self) -> int:
        return int(self.layers[-1][0].shape[0])

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        for i, (w, b) in enumerate(self.layers):
            if i:
                x = np.maximum(x, 0.0)
            x = x @ w.T + b
        return x

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.logits(x))

    def reference(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """Probabilities computed without ONNX, from the head's named inputs."""
        return self.predict_proba(np.hstack([feeds[name] for name in self.input_names]))

    def parameter_count(self) -> int:
        return int(sum(w.size + b.size for w, b in self.layers))

    def to_onnx(self, metadata: dict[str, str] | None = None) -> bytes:
        nodes, inits = [], []
        x = self.input_name
        widths = [w or self.input_dim for _, w in self.inputs]
        if len(self.inputs) > 1:
            nodes.append(helper.make_node("Concat", self.input_names, ["concatenated"], axis=1))
            x = "concatenated"
        if self.normalize:
            inits.append(numpy_helper.from_array(np.array([1e-12], np.float32), "eps"))
            nodes += [
                helper.make_node("ReduceL2", [x], ["norm"], axes=[1], keepdims=1),
                helper.make_node("Max", ["norm", "eps"], ["norm_clamped"]),
                helper.make_node("Div", [x, "norm_clamped"], ["normalized"]),
            ]
            x = "normalized"
        for i, (w, b) in enumerate(self.layers):
            if i:
                nodes.append(helper.make_node("Relu", [x], [f"relu{i}"]))
                x = f"relu{i}"
            inits += [
                numpy_helper.from_array(np.ascontiguousarray(w, np.float32), f"W{i}"),
                numpy_helper.from_array(np.ascontiguousarray(b, np.float32), f"b{i}"),
            ]
            nodes.append(helper.make_node("Gemm", [x, f"W{i}", f"b{i}"], [f"dense{i}"], transB=1))
            x = f"dense{i}"
        nodes.append(helper.make_node("Softmax", [x], [HEAD_OUTPUT], axis=1))
        graph = helper.make_graph(
            nodes,
            f"headserve_{self.strategy}_head",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", w]) for n, w in zip(self.input_names, widths)],
            [helper.make_tensor_value_info(HEAD_OUTPUT, TensorProto.FLOAT, ["batch", self.num_classes])],
            inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="headserve"
        )
        model.ir_version = 8  # readable by onnxruntime >= 1.14
        onnx.helper.set_model_props(model, metadata or {})
        data = model.SerializeToString()
        check_model_bytes(data)
        return data


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


# --- training -------------------------------------------------------------------------------------

Progress = Callable[[dict], None]
C_GRID = (0.3, 1.0, 3.0)  # linear: inverse L2 strength as scikit-learn's C, chosen by cross-validation


def _noop(_: dict) -> None:
    pass


def _class_weights(y: np.ndarray, k: int) -> torch.Tensor:
    counts = np.bincount(y, minlength=k).astype(np.float64)
    w = len(y) / (k * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)


def _standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = x.mean(axis=0)
    sigma = x.std(axis=0)
    sigma = np.where(sigma > 0, sigma, 1.0)  # only constant dimensions are left unscaled
    return mu.astype(np.float32), sigma.astype(np.float32)


def _fold_standardizer(w: np.ndarray, b: np.ndarray, mu: np.ndarray, sigma: np.ndarray):
    """Dense on (x - mu) / sigma == Dense' on x, with W' = W / sigma and b' = b - W' mu."""
    w2 = w / sigma[None, :]
    return w2.astype(np.float32), (b - w2 @ mu).astype(np.float32)


def train_linear(x, y, k, opts: TrainingOptions, progress: Progress = _noop, C: float = 1.0) -> DenseHead:
    """Multinomial logistic regression with an L2 penalty: scikit-learn's objective with C, divided by
    C * n, on features divided by their mean norm (one scalar, so the grid of C means the same for
    every backbone while directions keep their relative scales)."""
    torch.manual_seed(opts.seed)
    scale = float(np.linalg.norm(x, axis=1).mean()) or 1.0
    xt = torch.from_numpy(x / scale)
    yt = torch.from_numpy(y).long()
    w = torch.zeros(k, x.shape[1], requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    l2 = opts.l2 or 1.0 / (C * len(x))
    epochs = opts.epochs or 100
    cw = _class_weights(y, k)
    optim = torch.optim.LBFGS([w, b], lr=opts.learning_rate or 1.0, max_iter=epochs,
                              tolerance_grad=1e-5, tolerance_change=1e-7, history_size=20,
                              line_search_fn="strong_wolfe")
    steps, last = [0], [float("nan")]
    state = optim.state[w]  # LBFGS keeps its iteration count here

    def closure():
        optim.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w.T + b, yt, weight=cw) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        steps[0] += 1
        last[0] = loss.item()
        if steps[0] % 10 == 0:
            progress({"epoch": min(state.get("n_iter", 0), epochs), "epochs": epochs, "loss": loss.item()})
        return loss

    optim.step(closure)
    # LBFGS stops once it has converged, mostly well before `epochs` iterations: the last report says how
    # many ran, and that the fit is complete (not "epoch 10/100" forever).
    ran = max(1, min(state.get("n_iter", 0), epochs))
    progress({"epoch": ran, "epochs": ran, "loss": last[0]})
    return DenseHead("linear", [((w.detach().numpy() / scale).astype(np.float32), b.detach().numpy().astype(np.float32))])


def train_mlp(x, y, k, opts: TrainingOptions, progress: Progress = _noop) -> DenseHead:
    torch.manual_seed(opts.seed)
    mu, sigma = _standardizer(x)
    xt = torch.from_numpy((x - mu) / sigma)
    yt = torch.from_numpy(y).long()
    h = opts.hidden_units
    net = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], h), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(h, k)
    )
    epochs = opts.epochs or 200
    optim = torch.optim.AdamW(net.parameters(), lr=opts.learning_rate or 1e-3, weight_decay=opts.l2 or 1e-2)
    cw = _class_weights(y, k)
    net.train()
    for epoch in range(1, epochs + 1):
        optim.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(xt), yt, weight=cw)
        loss.backward()
        optim.step()
        if epoch % 10 == 0 or epoch == epochs:
            progress({"epoch": epoch, "epochs": epochs, "loss": loss.item()})
    first, last = net[0], net[3]
    w1, b1 = _fold_standardizer(first.weight.detach().numpy(), first.bias.detach().numpy(), mu, sigma)
    w2, b2 = last.weight.detach().numpy().astype(np.float32), last.bias.detach().numpy().astype(np.float32)
    return DenseHead("mlp", [(w1, b1), (w2, b2)])


def train_prototype(x, y, k, opts: TrainingOptions, progress: Progress = _noop) -> DenseHead:
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    protos = np.stack([xn[y == c].mean(axis=0) for c in range(k)])
    protos /= np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
    cos = xn @ protos.T
    # The scale turns cosines into probabilities; pick the one with the best training likelihood
    # (calibration on held-out data refines it afterwards).
    best_scale, best_nll = 10.0, np.inf
    for scale in (1, 2, 5, 10, 15, 20, 30, 50):
        nll = _nll(scale * cos, y)
        if nll < best_nll:
            best_scale, best_nll = float(scale), nll
    progress({"epoch": 1, "epochs": 1, "loss": best_nll})
    return DenseHead("prototype", [((best_scale * protos).astype(np.float32), np.zeros(k, np.float32))], normalize=True)


TRAINERS = {"linear": train_linear, "mlp": train_mlp, "prototype": train_prototype}


def _nll(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature T in [0.25, 20] minimising held-out NLL of softmax(logits / T) (golden-section on log T)."""
    lo, hi = np.log(0.25), np.log(20.0)  # tiny validation sets must not make heads overconfident
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = _nll(logits / np.exp(a), y), _nll(logits / np.exp(b), y)
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = _nll(logits / np.exp(a), y)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = _nll(logits / np.exp(b), y)
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
    k = len(names)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    per_label, f1s = [], []
    for c, name in enumerate(names):
        tp = cm[c, c]
        precision = tp / cm[:, c].sum() if cm[:, c].sum() else 0.0
        recall = tp / cm[c, :].sum() if cm[c, :].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        f1s.append(f1)
        per_label.append({"label": name, "precision": float(precision), "recall": float(recall),
                          "f1": float(f1), "support": int(cm[c, :].sum())})
    return {"accuracy": float(np.trace(cm) / max(cm.sum(), 1)), "macro_f1": float(np.mean(f1s)),
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


def _folds(y: np.ndarray, opts: TrainingOptions) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """Stratified validation: a holdout when asked, else k-fold with k = min(5, smallest class)."""
    rng = np.random.default_rng(opts.seed)
    min_count = int(np.bincount(y).min())
    if min_count < 2:
        return [], "none (a label has a single example)"
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(int(y.max()) + 1)]
    if opts.validation_fraction > 0:
        # At least one example of each label is held out, and at least one stays in training.
        val = np.concatenate([idx[: min(max(1, round(len(idx) * opts.validation_fraction)), len(idx) - 1)]
                              for idx in by_class])
        train = np.setdiff1d(np.arange(len(y)), val)
        return [(train, val)], f"holdout {opts.validation_fraction:.0%}"
    k = min(5, min_count)
    folds = []
    for f in range(k):
        val = np.concatenate([idx[f::k] for idx in by_class])
        folds.append((np.setdiff1d(np.arange(len(y)), val), val))
    return folds, f"{k}-fold"


@dataclasses.dataclass(frozen=True)
class Augmented:
    """Extra training rows (augmented views): per tap, features; `origin[i]` indexes the example each
    row was made from, so a view joins training only when its example is in the training fold."""

    features: Mapping[str, np.ndarray]
    origin: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Candidate:
    strategy: str
    tap: str
    C: float = 0.0  # linear only

    @property
    def name(self) -> str:
        return self.strategy + (f"(C={self.C:g})" if self.C else "") + (f"@{self.tap}" if self.tap != "last" else "")

    def trainer(self) -> Callable[..., DenseHead]:
        return functools.partial(train_linear, C=self.C) if self.C else TRAINERS[self.strategy]


@dataclasses.dataclass(frozen=True)
class LabelText:
    """The trunk's features of each label's words, per tap: row i is label i in sorted label order.
    Each row joins training as `weight` examples of its label (0: not at all)."""

    features: Mapping[str, np.ndarray]
    texts: Sequence[str]
    weight: int = 0


# How many examples a label's words are worth when they sort the task's examples perfectly. On the six
# shared text sets at N = 8 (10 draws), a fixed weight helped where labels are plain words (AG News +3.0,
# MPQA +3.4 with 4) and hurt where they are not (TREC's "ABBR", "HUM": -0.9; SST-5: -0.7); scaling it by
# label_text_quality kept the gains and the losses within 0.5 points (docs/benchmarks.md).
LABEL_TEXT_MAX_WEIGHT = 16
WORD = re.compile(r"[^\W\d_]{2}")  # two letters in a row


def label_text_quality(last: np.ndarray, y: np.ndarray, label_last: np.ndarray) -> float:
    """How well the labels' words alone sort the examples: the accuracy of nearest label text in cosine
    space (the sentence-embedding space, tap "last"), rescaled so that chance is 0 and perfect is 1."""
    k = len(label_last)
    accuracy = float(((last @ label_last.T).argmax(axis=1) == y).mean())
    return max(0.0, (accuracy - 1 / k) / (1 - 1 / k))


def label_text_weight(quality: float, mode: str, texts: Sequence[str] = ()) -> int:
    """Examples each label's words count as: LABEL_TEXT_MAX_WEIGHT scaled by quality under "auto",
    and nothing when a label's text holds no word of two letters or more ("0", "A", "L7"). On the
    shared text sets, labels renamed 1..k or A, B, ... still sorted examples above chance now and then,
    and the weight that got them cost up to 1.9 and 2.8 points."""
    if mode == "auto" and not all(WORD.search(text) for text in texts):
        return 0
    return {"off": 0, "on": LABEL_TEXT_MAX_WEIGHT}.get(mode, round(LABEL_TEXT_MAX_WEIGHT * quality))


def _training_rows(x, y, train_idx, tap, augmented: Augmented | None, label_text: LabelText | None):
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


def _out_of_fold_logits(c: _Candidate, xs, y, k, opts, folds, augmented, label_text) -> np.ndarray:
    logits = np.zeros((len(y), k), dtype=np.float32)
    for train, val in folds:
        xt, yt = _training_rows(xs[c.tap], y, train, c.tap, augmented, label_text)
        logits[val] = c.trainer()(xt, yt, k, opts).logits(xs[c.tap][val])
    return logits


# What AUTO reads: the first of these the features allow. The last four layers' pooled features side by
# side gave +0.5 (MPQA) to +2.2 points (TREC) over the last two on the six shared text sets at N = 8
# (10 draws, logistic regression).
AUTO_TAPS = ("last+last-1+last-2+last-3", "last+last-1")


def _candidates(opts: TrainingOptions, taps: Sequence[str], min_count: int, has_folds: bool) -> list[_Candidate]:
    """What AUTO compares, from the number of examples per label; a named strategy alone otherwise.

    Linear heads also compare their regularisation (C_GRID) unless `l2` is given."""
    if opts.tap:
        if opts.tap not in taps:
            raise InvalidInput(f"tap {opts.tap!r} is not available; use one of {', '.join(taps)}")
        taps = [opts.tap]
    elif opts.strategy == "auto":
        taps = [next((t for t in AUTO_TAPS if t in taps), "last")]
    else:
        taps = ["last"]
    if opts.strategy == "auto":
        if not has_folds:
            strategies = ["prototype"]
        elif min_count >= 16:
            strategies = ["linear", "prototype", "mlp"]
        else:
            strategies = ["linear", "prototype"]
    else:
        strategies = [opts.strategy]
    grid = C_GRID if has_folds and not opts.l2 else (0.0,)
    return [_Candidate(s, tap, c if s == "linear" else 0.0) for tap in taps for s in strategies
            for c in (grid if s == "linear" else (0.0,))]


@dataclasses.dataclass
class TrainedHead:
    head: DenseHead
    labels: list[str]
    evaluation: dict


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Small problems run fastest on one thread; more threads spin and stall on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_head(
    features: np.ndarray | Mapping[str, np.ndarray],
    labels: Sequence[str],
    options: TrainingOptions = TrainingOptions(),
    progress: Progress = _noop,
    sample_ids: Sequence[str] | None = None,
    augmented: Augmented | None = None,
    label_text: LabelText | None = None,
) -> TrainedHead:
    """Trains a head on trunk features and evaluates it honestly on held-out data.

    `features` maps tap -> [n, d] (a bare array is the "last" tap). Validation is stratified k-fold
    (or a holdout); the chosen candidate's out-of-fold logits give the reported metrics and the
    temperature that calibrates the final head, which is then fit on all examples.
    `label_text` holds the trunk's features of each label's words (weight 0: set here from
    `options.label_text` and label_text_quality). Label order in the head's output, and the row order
    of `label_text`, is sorted label order.
    """
    with torch_threads(1):
        return _train_head(features, labels, options, progress, sample_ids, augmented, label_text)


def _join_taps(features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds every joined tap ("last+last-1", ...) whose parts are present."""
    out = dict(features)
    for joined in [t for t in TAPS if "+" in t and all(part in out for part in t.split("+"))]:
        out[joined] = np.hstack([out[part] for part in joined.split("+")])
    return out


def _train_head(features, labels, options, progress, sample_ids, augmented, label_text) -> TrainedHead:
    start = time.perf_counter()
    xs = {"last": features} if isinstance(features, np.ndarray) else dict(features)
    xs = {tap: np.ascontiguousarray(v, dtype=np.float32) for tap, v in xs.items()}
    widths = {tap: (int(v.shape[1]),) for tap, v in xs.items()}
    xs = _join_taps(xs)
    widths.update({t: sum((widths[part] for part in t.split("+")), ()) for t in xs if "+" in t})
    if augmented is not None:
        augmented = Augmented(_join_taps(augmented.features), augmented.origin)
    names = sorted(set(labels))
    if len(names) < 2:
        raise InvalidInput(f"a task needs at least 2 labels with examples; got {len(names)}")
    index = {name: i for i, name in enumerate(names)}
    y = np.array([index[label] for label in labels], dtype=np.int64)
    k = len(names)
    counts = np.bincount(y, minlength=k)
    label_text_report = None
    if label_text is not None:
        if len(label_text.texts) != k:
            raise ValueError(f"label_text has {len(label_text.texts)} rows for {k} labels")
        # Measured once on every example (a single scalar, shared by the folds: far less noisy than
        # per-fold estimates, at the cost of the folds' validation rows having a say in it).
        sentence = "last" if "last" in xs else next(iter(xs))  # the sentence-embedding space
        quality = label_text_quality(xs[sentence], y, label_text.features[sentence])
        weight = label_text_weight(quality, options.label_text, label_text.texts)
        label_text = LabelText(_join_taps(label_text.features), label_text.texts, weight)
        label_text_report = {"mode": options.label_text, "quality": quality, "weight": weight,
                             "described": sum(text != name for name, text in zip(names, label_text.texts))}
    folds, method = _folds(y, options)
    candidates = _candidates(options, list(xs), int(counts.min()), bool(folds))

    scores: dict[str, float] = {}
    oof: dict[_Candidate, np.ndarray] = {}  # logits of the held-out rows, in `held` order
    held = np.concatenate([val for _, val in folds]) if folds else np.zeros(0, np.int64)
    if folds:
        for i, c in enumerate(candidates):
            progress({"phase": "validating", "message": f"{method} cross-validation of {c.name} ({i + 1}/{len(candidates)})"})
            oof[c] = _out_of_fold_logits(c, xs, y, k, options, folds, augmented, label_text)[held]
            scores[c.name] = float((oof[c].argmax(axis=1) == y[held]).mean())
    # Best held-out accuracy; ties go to the earlier (simpler) candidate.
    chosen = max(candidates, key=lambda c: (scores.get(c.name, 0.0), -candidates.index(c)))
    if options.strategy != "auto" and len(candidates) == 1:
        reason = "requested"
    elif folds:
        reason = f"best {method} accuracy among {len(candidates)} candidates: " + ", ".join(
            f"{name} {score:.3f}" for name, score in scores.items())
    else:
        reason = "a label has a single example: prototype needs no validation data"

    progress({"phase": "training", "message": f"fitting {chosen.name} on all {len(y)} examples"})
    x_all, y_all = _training_rows(xs[chosen.tap], y, np.arange(len(y)), chosen.tap, augmented, label_text)
    head = chosen.trainer()(x_all, y_all, k, options, lambda p: progress({"phase": "training", **p}))
    head.inputs = tuple(zip(TAP_OUTPUTS[chosen.tap], widths[chosen.tap]))

    evaluation = {
        "strategy": chosen.strategy,
        "strategy_reason": reason,
        "candidate_scores": scores,
        "tap": chosen.tap,
        "C": chosen.C or None,
        "validation_method": method + (" (model selection on the same folds)" if len(candidates) > 1 else ""),
        "examples_per_label": {name: int(n) for name, n in zip(names, counts)},
        "num_examples": len(y),
        "augmented_rows": 0 if augmented is None else len(augmented.origin),
        "label_text": label_text_report,
        "feature_dim": int(xs[chosen.tap].shape[1]),
        "parameters": head.parameter_count(),
        "temperature": 1.0,
        "reject_threshold": options.reject_threshold,
    }
    if folds:
        evaluation.update(validation_report(oof[chosen], y[held], names))
        head.scale_logits(1.0 / evaluation["temperature"])
        proto = next((s for n, s in scores.items() if n.startswith("prototype")), None)
        if proto is None and chosen.strategy != "prototype":
            proto_logits = _out_of_fold_logits(_Candidate("prototype", chosen.tap), xs, y, k, options, folds,
                                               None, label_text)
            proto = float((proto_logits[held].argmax(axis=1) == y[held]).mean())
        evaluation["prototype_accuracy"] = proto
    else:
        evaluation.update(NOT_VALIDATED, baseline_accuracy=float(counts.max() / counts.sum()))
    evaluation["train_accuracy"] = float((head.predict_proba(xs[chosen.tap]).argmax(axis=1) == y).mean())
    evaluation["warnings"] = warnings_for(evaluation, labels, sample_ids)
    evaluation["train_seconds"] = time.perf_counter() - start
    return TrainedHead(head, names, evaluation)


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
    if sample_ids is not None:
        seen: dict[str, set[str]] = {}
        for sid, label in zip(sample_ids, labels):
            seen.setdefault(sid, set()).add(label)
        conflicts = [sorted(ls) for ls in seen.values() if len(ls) > 1]
        if conflicts:
            shown = "; ".join(" vs ".join(map(repr, ls)) for ls in conflicts[:3])
            out.append(f"conflicting labels: {len(conflicts)} input(s) were given with two or more labels ({shown})")
    return out


# --- ONNX parity --------------------------------------------------------------------------------


def export_checked(
    trained: TrainedHead, feeds: np.ndarray | Mapping[str, np.ndarray], metadata: dict[str, str], atol: float = 1e-4
) -> bytes:
    """Exports the head to ONNX and checks that onnxruntime reproduces the reference probabilities.

    `feeds` are the head's inputs by name (a bare array feeds a dense head's single input)."""
    meta = {"labels": json.dumps(trained.labels), "strategy": trained.evaluation["strategy"],
            "reject_threshold": str(trained.evaluation.get("reject_threshold", 0.0)), **metadata}
    data = trained.head.to_onnx(meta)
    if isinstance(feeds, np.ndarray):
        feeds = {trained.head.input_name: feeds}
    feeds = {k: np.ascontiguousarray(feeds[k][:256]) for k in trained.head.input_names}
    got = create_session(data, threads=1).run(None, feeds)[0]
    want = trained.head.reference(feeds)
    diff = float(np.abs(got - want).max()) if len(got) else 0.0
    if diff > atol:
        raise RuntimeError(f"exported head disagrees with the trained head (max |diff| {diff:.2e} > {atol})")
    return data
