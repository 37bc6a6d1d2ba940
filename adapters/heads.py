"""Dense heads: the arrays, their ONNX graphs, and the three trainers that fit them on trunk features.

Every feature head is a small stack of dense layers on the trunk's pooled features:

    [L2-normalise] -> Dense -> (ReLU -> Dense)* -> Softmax  =  probabilities over the task's labels

- linear:    multinomial logistic regression (standardisation folded into the weights), L-BFGS, L2,
             balanced class weights.
- mlp:       one hidden ReLU layer with dropout, AdamW (the Teachable Machine head).
- prototype: nearest class mean in cosine space with a fitted scale; trains from one example per label.

The same arrays give the reference probabilities (numpy) and the exported ONNX graph; the two are
checked against each other before a head is accepted (`export_checked`). Which head a task gets, and how
it is validated, is adapters/selection.py; the registry of strategies is adapters/strategies.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator, Mapping

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from adapters.onnx_utils import HEAD_OUTPUT, OPSET, check_model_bytes, create_session
from adapters.options import Progress, TrainingOptions, no_progress
from adapters.runtime import DENSE_IR_VERSION, dense_logits, softmax

HEAD_INPUT = "features"


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
        return dense_logits(x, self.layers, self.normalize)  # what serving runs (adapters.runtime.DenseArrays)

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
        model.ir_version = DENSE_IR_VERSION  # readable by onnxruntime >= 1.14
        onnx.helper.set_model_props(model, metadata or {})
        data = model.SerializeToString()
        check_model_bytes(data)
        return data



@dataclasses.dataclass
class TrainedHead:
    """A trained head (DenseHead or finetune.FineTunedHead), its labels in output order, and its evaluation."""

    head: object
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


def generator(seed: int) -> torch.Generator:
    """A job's own random stream: no training touches torch's global generator."""
    return torch.Generator().manual_seed(seed)


def nll(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


# --- training -------------------------------------------------------------------------------------


def class_weights(y: np.ndarray, k: int) -> torch.Tensor:
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


def train_linear(x, y, k, opts: TrainingOptions, progress: Progress = no_progress, C: float = 1.0) -> DenseHead:
    """Multinomial logistic regression with an L2 penalty: scikit-learn's objective with C, divided by
    C * n, on features divided by their mean norm (one scalar, so the grid of C means the same for
    every backbone while directions keep their relative scales). Labels are weighted inversely to their
    counts. The objective is convex: it is solved to convergence by scipy's L-BFGS on its exact gradient
    (at most `epochs` iterations), in float64. AUTO fits this head about ninety times per task (its
    cross-validated grid), so each fit costs a millisecond or two, not the ten of torch's LBFGS with
    autograd (docs/design.md, "Time to a first answer")."""
    from scipy.optimize import minimize

    scale = float(np.linalg.norm(x, axis=1).mean()) or 1.0
    xs = np.asarray(x, dtype=np.float64) / scale
    n, d = xs.shape
    l2 = opts.l2 or 1.0 / (C * n)
    epochs = opts.epochs or 100
    weight = class_weights(y, k).numpy().astype(np.float64)[y]
    weight /= weight.sum()  # cross-entropy's weighted mean: sum(w_i * nll_i) / sum(w_i)
    rows = np.arange(n)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: k * d].reshape(k, d), theta[k * d :]
        z = xs @ w.T + b
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        total = p.sum(axis=1)
        p /= total[:, None]
        loss = float(weight @ (np.log(total) - z[rows, y])) + 0.5 * l2 * float((w * w).sum())
        p[rows, y] -= 1.0
        g = p * weight[:, None]
        return loss, np.concatenate([(g.T @ xs + l2 * w).ravel(), g.sum(axis=0)])

    ran = [0]

    def report(intermediate_result) -> None:
        ran[0] += 1
        if ran[0] % 10 == 0:
            progress({"epoch": ran[0], "epochs": epochs, "loss": float(intermediate_result.fun)})

    result = minimize(objective, np.zeros(k * (d + 1)), jac=True, method="L-BFGS-B", callback=report,
                      options={"maxiter": epochs, "maxcor": 20, "gtol": 1e-5, "ftol": 1e-10})
    # L-BFGS stops once it has converged, mostly well before `epochs` iterations: the last report says how
    # many ran, and that the fit is complete (not "epoch 10/100" forever).
    done = max(1, min(int(result.nit), epochs))
    progress({"epoch": done, "epochs": done, "loss": float(result.fun)})
    w, b = result.x[: k * d].reshape(k, d), result.x[k * d :]
    return DenseHead("linear", [((w / scale).astype(np.float32), b.astype(np.float32))])


def train_mlp(x, y, k, opts: TrainingOptions, progress: Progress = no_progress) -> DenseHead:
    """One hidden ReLU layer, dropout 0.5, AdamW, on standardised inputs (folded into the first layer).
    Initialisation and dropout masks come from the job's own generator (`opts.seed`)."""
    g = generator(opts.seed)
    mu, sigma = _standardizer(x)
    xt = torch.from_numpy((x - mu) / sigma)
    yt = torch.from_numpy(y).long()
    h, d = opts.hidden_units, x.shape[1]

    def dense(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        bound = 1.0 / math.sqrt(n_in)  # torch.nn.Linear's default initialisation
        w = torch.nn.init.uniform_(torch.empty(n_out, n_in), -bound, bound, generator=g).requires_grad_()
        b = torch.nn.init.uniform_(torch.empty(n_out), -bound, bound, generator=g).requires_grad_()
        return w, b

    (w1, b1), (w2, b2) = dense(d, h), dense(h, k)
    epochs = opts.epochs or 200
    optim = torch.optim.AdamW([w1, b1, w2, b2], lr=opts.learning_rate or 1e-3, weight_decay=opts.l2 or 1e-2)
    cw = class_weights(y, k)
    for epoch in range(1, epochs + 1):
        optim.zero_grad()
        keep = (torch.rand(len(xt), h, generator=g) >= 0.5).float() * 2.0  # dropout 0.5
        hidden = torch.relu(xt @ w1.T + b1) * keep
        loss = torch.nn.functional.cross_entropy(hidden @ w2.T + b2, yt, weight=cw)
        loss.backward()
        optim.step()
        if epoch % 10 == 0 or epoch == epochs:
            progress({"epoch": epoch, "epochs": epochs, "loss": loss.item()})
    w1f, b1f = _fold_standardizer(w1.detach().numpy(), b1.detach().numpy(), mu, sigma)
    return DenseHead("mlp", [(w1f, b1f), (w2.detach().numpy().astype(np.float32), b2.detach().numpy().astype(np.float32))])


def train_prototype(x, y, k, opts: TrainingOptions, progress: Progress = no_progress) -> DenseHead:
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    protos = np.stack([xn[y == c].mean(axis=0) for c in range(k)])
    protos /= np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
    cos = xn @ protos.T
    # The scale turns cosines into probabilities; pick the one with the best training likelihood
    # (calibration on held-out data refines it afterwards).
    best_scale, best_nll = 10.0, np.inf
    for scale in (1, 2, 5, 10, 15, 20, 30, 50):
        loss = nll(scale * cos, y)
        if loss < best_nll:
            best_scale, best_nll = float(scale), loss
    progress({"epoch": 1, "epochs": 1, "loss": best_nll})
    return DenseHead("prototype", [((best_scale * protos).astype(np.float32), np.zeros(k, np.float32))], normalize=True)


TRAINERS = {"linear": train_linear, "mlp": train_mlp, "prototype": train_prototype}


# --- ONNX parity ---------------------------------------------------------------------------------


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
