"""Per-task heads trained on trunk features, their honest evaluation, and their ONNX graphs.

Every head is a small stack of dense layers on the trunk's pooled features:

    [L2-normalise] -> Dense -> (ReLU -> Dense)* -> Softmax  =  probabilities over the task's labels

- linear:    multinomial logistic regression (standardisation folded into the weights), L-BFGS, L2,
             balanced class weights.
- mlp:       one hidden ReLU layer with dropout, Adam (the Teachable Machine head).
- prototype: nearest class mean in cosine space with a fitted scale; trains from one example per label.
- auto:      cross-validates the candidates that the data allows and keeps the best.

The same arrays give the reference probabilities (numpy) and the exported ONNX graph; the two are
checked against each other before a head is accepted.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from adapters.errors import InvalidInput
from adapters.onnx_utils import OPSET, check_model_bytes, create_session

STRATEGIES = ("auto", "linear", "mlp", "prototype")
HEAD_INPUT = "features"
HEAD_OUTPUT = "probabilities"


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

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InvalidInput(f"unknown strategy {self.strategy!r}; use one of {', '.join(STRATEGIES)}")
        checks = [
            (0 <= self.epochs <= 10_000, "epochs must be between 0 (default) and 10000"),
            (0 <= self.learning_rate <= 10, "learning_rate must be between 0 (default) and 10"),
            (0 <= self.l2 <= 100, "l2 must be between 0 (default) and 100"),
            (0 <= self.validation_fraction < 0.9, "validation_fraction must be in [0, 0.9)"),
            (1 <= self.hidden_units <= 8192, "hidden_units must be between 1 and 8192"),
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

    @property
    def input_dim(self) -> int:
        return int(self.layers[0][0].shape[1])

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

    def parameter_count(self) -> int:
        return int(sum(w.size + b.size for w, b in self.layers))

    def to_onnx(self, metadata: dict[str, str] | None = None) -> bytes:
        nodes, inits = [], []
        x = HEAD_INPUT
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
            [helper.make_tensor_value_info(HEAD_INPUT, TensorProto.FLOAT, ["batch", self.input_dim])],
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


def _noop(_: dict) -> None:
    pass


def _class_weights(y: np.ndarray, k: int) -> torch.Tensor:
    counts = np.bincount(y, minlength=k).astype(np.float64)
    w = len(y) / (k * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)


def _standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = x.mean(axis=0)
    sigma = x.std(axis=0)
    sigma = np.where(sigma < 1e-6, 1.0, sigma)
    return mu.astype(np.float32), sigma.astype(np.float32)


def _fold_standardizer(w: np.ndarray, b: np.ndarray, mu: np.ndarray, sigma: np.ndarray):
    """Dense on (x - mu) / sigma == Dense' on x, with W' = W / sigma and b' = b - W' mu."""
    w2 = w / sigma[None, :]
    return w2.astype(np.float32), (b - w2 @ mu).astype(np.float32)


def train_linear(x, y, k, opts: TrainingOptions, progress: Progress = _noop) -> DenseHead:
    torch.manual_seed(opts.seed)
    mu, sigma = _standardizer(x)
    xt = torch.from_numpy((x - mu) / sigma)
    yt = torch.from_numpy(y).long()
    w = torch.zeros(k, x.shape[1], requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    l2 = opts.l2 or 1.0 / len(x)  # sklearn's C=1 on the mean loss
    epochs = opts.epochs or 100
    cw = _class_weights(y, k)
    optim = torch.optim.LBFGS([w, b], lr=opts.learning_rate or 1.0, max_iter=epochs,
                              tolerance_grad=1e-6, tolerance_change=1e-9, history_size=20,
                              line_search_fn="strong_wolfe")
    steps = [0]

    def closure():
        optim.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w.T + b, yt, weight=cw) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        steps[0] += 1
        if steps[0] % 10 == 0:
            progress({"epoch": min(steps[0], epochs), "epochs": epochs, "loss": loss.item()})
        return loss

    optim.step(closure)
    wf, bf = _fold_standardizer(w.detach().numpy(), b.detach().numpy(), mu, sigma)
    return DenseHead("linear", [(wf, bf)])


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
    # The scale turns cosines into probabilities; pick the one with the best training likelihood.
    best_scale, best_nll = 10.0, np.inf
    for scale in (1, 2, 5, 10, 15, 20, 30, 50):
        p = softmax(scale * cos)
        nll = -np.log(np.maximum(p[np.arange(len(y)), y], 1e-12)).mean()
        if nll < best_nll:
            best_scale, best_nll = float(scale), float(nll)
    progress({"epoch": 1, "epochs": 1, "loss": best_nll})
    return DenseHead("prototype", [((best_scale * protos).astype(np.float32), np.zeros(k, np.float32))], normalize=True)


TRAINERS = {"linear": train_linear, "mlp": train_mlp, "prototype": train_prototype}


def _folds(y: np.ndarray, opts: TrainingOptions) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """Stratified validation: a holdout when asked, else k-fold with k = min(5, smallest class)."""
    rng = np.random.default_rng(opts.seed)
    min_count = int(np.bincount(y).min())
    if min_count < 2:
        return [], "none (a label has a single example)"
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(int(y.max()) + 1)]
    if opts.validation_fraction > 0:
        val = np.concatenate([idx[: max(1, int(round(len(idx) * opts.validation_fraction)))] for idx in by_class])
        train = np.setdiff1d(np.arange(len(y)), val)
        return [(train, val)], f"holdout {opts.validation_fraction:.0%}"
    k = min(5, min_count)
    folds = []
    for f in range(k):
        val = np.concatenate([idx[f::k] for idx in by_class])
        folds.append((np.setdiff1d(np.arange(len(y)), val), val))
    return folds, f"{k}-fold"


def _cross_validate(strategy, x, y, k, opts, folds) -> tuple[float, np.ndarray]:
    """Accuracy over the pooled held-out predictions, and those predictions."""
    pred = np.full(len(y), -1)
    for train, val in folds:
        head = TRAINERS[strategy](x[train], y[train], k, opts)
        pred[val] = head.predict_proba(x[val]).argmax(axis=1)
    seen = pred >= 0
    return float((pred[seen] == y[seen]).mean()), pred


@dataclasses.dataclass
class TrainedHead:
    head: DenseHead
    labels: list[str]
    evaluation: dict


def train_head(
    features: np.ndarray,
    labels: Sequence[str],
    options: TrainingOptions = TrainingOptions(),
    progress: Progress = _noop,
) -> TrainedHead:
    """Trains a head on (features, labels) and evaluates it honestly (held-out accuracy).

    Label order in the head's output is sorted label order.
    """
    start = time.perf_counter()
    names = sorted(set(labels))
    if len(names) < 2:
        raise InvalidInput(f"a task needs at least 2 labels with examples; got {len(names)}")
    index = {name: i for i, name in enumerate(names)}
    x = np.ascontiguousarray(features, dtype=np.float32)
    y = np.array([index[label] for label in labels], dtype=np.int64)
    k = len(names)
    folds, method = _folds(y, options)

    candidates = [options.strategy] if options.strategy != "auto" else (
        ["linear", "prototype"] if folds else ["prototype"]
    )
    scores: dict[str, float] = {}
    for strategy in candidates:
        if folds:
            progress({"phase": "validating", "message": f"{method} cross-validation of {strategy}"})
            scores[strategy], _ = _cross_validate(strategy, x, y, k, options, folds)
    chosen = max(candidates, key=lambda s: (scores.get(s, 0.0), -candidates.index(s)))
    if options.strategy == "auto":
        reason = (
            f"best {method} accuracy among {', '.join(candidates)}: "
            + ", ".join(f"{s} {scores[s]:.3f}" for s in candidates)
            if folds else "a label has a single example: prototype needs no validation data"
        )
    else:
        reason = "requested"

    progress({"phase": "training", "message": f"fitting {chosen} on all {len(y)} examples"})
    head = TRAINERS[chosen](x, y, k, options, lambda p: progress({"phase": "training", **p}))
    train_acc = float((head.predict_proba(x).argmax(axis=1) == y).mean())
    counts = Counter(labels)
    evaluation = {
        "strategy": chosen,
        "strategy_reason": reason,
        "train_accuracy": train_acc,
        "validation_accuracy": scores.get(chosen, 0.0),
        "validation_method": method,
        "candidate_scores": scores,
        "examples_per_label": {name: counts[name] for name in names},
        "num_examples": len(y),
        "feature_dim": int(x.shape[1]),
        "parameters": head.parameter_count(),
        "train_seconds": time.perf_counter() - start,
        "warnings": _warnings(train_acc, scores.get(chosen), counts, method),
    }
    return TrainedHead(head, names, evaluation)


def _warnings(train_acc: float, val_acc: float | None, counts: Counter, method: str) -> list[str]:
    out = []
    if val_acc is not None and train_acc - val_acc > 0.2:
        out.append(
            f"overfitting: train accuracy {train_acc:.2f} is far above validation accuracy {val_acc:.2f}; "
            "add examples or use a simpler strategy"
        )
    few = sorted(label for label, n in counts.items() if n < 3)
    if few:
        out.append(f"too few examples for {', '.join(map(repr, few))}: fewer than 3; predictions will be unreliable")
    if max(counts.values()) >= 5 * min(counts.values()):
        out.append(
            f"imbalanced labels: {max(counts.values())} vs {min(counts.values())} examples; "
            "class weights compensate, but add examples to the small labels"
        )
    return out


# --- ONNX parity --------------------------------------------------------------------------------


def export_checked(trained: TrainedHead, features: np.ndarray, metadata: dict[str, str], atol: float = 1e-4) -> bytes:
    """Exports the head to ONNX and checks onnxruntime reproduces the reference probabilities."""
    meta = {"labels": json.dumps(trained.labels), "strategy": trained.head.strategy, **metadata}
    data = trained.head.to_onnx(meta)
    sample = np.ascontiguousarray(features[:256], dtype=np.float32)
    got = create_session(data, threads=1).run(None, {HEAD_INPUT: sample})[0]
    want = trained.head.predict_proba(sample)
    diff = float(np.abs(got - want).max()) if len(sample) else 0.0
    if diff > atol:
        raise RuntimeError(f"exported head disagrees with the trained head (max |diff| {diff:.2e} > {atol})")
    return data
