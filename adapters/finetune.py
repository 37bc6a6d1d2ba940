"""FINE_TUNE: the top blocks of the backbone, tuned for one task, become part of its head.

The shared trunk stays frozen. It already outputs the input of each of its last blocks ("blocks_1"
feeds the last block, "blocks_N" the last N); a fine-tuned head holds its own copy of those blocks
plus a classifier. Training starts from a linear probe (LP-FT), uses a low learning rate for the
blocks (a higher one for the classifier) with cosine decay, frozen normalisation statistics, augmented
views for images, and early stopping on a stratified holdout. Images train on cross-entropy with label
smoothing; text on SetFit's pair loss, its classifier refitted by logistic regression (`TRAIN_BATCH`,
`CE_WEIGHT`, `PAIR_WEIGHT`). The head is
exported to ONNX like any other and served through the same path: trunk session -> head session,
the head reading `blocks_N` (and `attention_mask` for text).

AUTO fine-tunes text tasks that have enough examples per label (the service's threshold) and keeps
the tuned head unless the feature head is clearly better on their shared holdout
(`selection.auto_fine_tune`; image tasks are not fine-tuned by AUTO: `selection.FINE_TUNE_RULES`).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from adapters.backbones import Backbone, TrunkRun
from adapters.errors import InvalidInput
from adapters.evaluation import NOT_VALIDATED, classification_metrics, validation_report, warnings_for
from adapters.heads import HEAD_OUTPUT, TrainedHead, class_weights, torch_threads, train_linear
from adapters.options import Progress, TrainingOptions, no_progress
from adapters.onnx_utils import OPSET

BATCH = 32  # inputs per call of the frozen trunk
# The objective per modality. Text: SetFit's pair loss on batches of 16, the classifier refitted by logistic
# regression after each epoch; chosen leave-one-dataset-out on the six text sets at N = 8 (bench/finetune_recipe.py,
# docs/benchmarks.md: chosen on all six folds, mean 68.4 against 66.8 for cross-entropy). Images: cross-entropy.
TRAIN_BATCH = {"image": 32, "text": 16}  # examples per optimiser step
CE_WEIGHT = {"image": 1.0, "text": 0.0}
PAIR_WEIGHT = {"image": 0.0, "text": 1.0}
PATIENCE = 5
# Blocks tuned when `unfreeze_blocks` is 0. Images: on MobileNetV2 + clothing10 (all 1,000 examples),
# tuning the last 5 blocks reached 85.9% where the last 2 reached 83.2% and the frozen features 81.4%.
# Text: every block the trunk exposes (MAX_UNFREEZE = 6: all of MiniLM-L6, the top half of MPNet): at
# N = 8 on the six text sets it beat tuning the last block on five (TREC 75.3 against 57.3 over 3 draws;
# MPQA 64.8 against 68.3; docs/benchmarks.md, "AUTO and FINE_TUNE on text"), as SetFit's tuning of the
# whole encoder does.
DEFAULT_BLOCKS = {"image": 5, "text": 6}
DEFAULT_EPOCHS = 8
DEFAULT_LR = 1e-4  # the tuned blocks; the classifier learns at 10x (at least 1e-3)
DEFAULT_VIEWS = 3  # augmented views per image example
LABEL_SMOOTHING = 0.1


def pair_loss(pooled: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SetFit's contrastive objective on every pair of a batch: the squared error between two examples'
    cosine similarity and 1 (same label) or 0 (different labels), positive and negative pairs weighted
    alike."""
    z = torch.nn.functional.normalize(pooled, dim=-1)
    sim = z @ z.T
    same = (y[:, None] == y[None, :]).to(sim.dtype)
    off = 1.0 - torch.eye(len(y), dtype=sim.dtype, device=sim.device)
    err = (sim - same) ** 2
    pos, neg = same * off, (1.0 - same)
    loss = torch.zeros((), dtype=sim.dtype, device=sim.device)
    if pos.sum() > 0:
        loss = loss + (err * pos).sum() / pos.sum()
    if neg.sum() > 0:
        loss = loss + (err * neg).sum() / neg.sum()
    return loss / 2


class _Head(torch.nn.Module):
    """Tuned top blocks -> pooled features -> linear classifier (-> softmax when exported)."""

    def __init__(self, top: torch.nn.Module, dim: int, k: int) -> None:
        super().__init__()
        self.top = top
        self.classifier = torch.nn.Linear(dim, k)
        self.register_buffer("inv_temperature", torch.ones(()))

    def logits(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.top(*inputs)) * self.inv_temperature

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(*inputs), dim=-1)


@dataclasses.dataclass
class FineTunedHead:
    """A trained fine-tune head; `to_onnx` and `reference` mirror DenseHead's."""

    module: _Head
    input_names: list[str]
    sample_shape: tuple[int, ...]  # of the first input, without the batch axis
    strategy: str = "fine_tune"

    @property
    def input_name(self) -> str:
        return self.input_names[0]

    def parameter_count(self) -> int:
        return int(sum(p.numel() for p in self.module.parameters()))

    @torch.inference_mode()
    def reference(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        self.module.eval()
        return self.module(*[torch.from_numpy(np.asarray(feeds[n])) for n in self.input_names]).numpy()

    def to_onnx(self, metadata: dict[str, str] | None = None) -> bytes:
        import onnx

        from adapters.onnx_utils import check_model_bytes

        self.module.eval()
        sample = [torch.zeros(2, *self.sample_shape)]
        axes = {self.input_name: {0: "batch"}, HEAD_OUTPUT: {0: "batch"}}
        if "attention_mask" in self.input_names:  # text: hidden states [batch, sequence, dim]
            sample.append(torch.ones(2, self.sample_shape[0], dtype=torch.int64))
            axes = {**axes, self.input_name: {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
        buf = io.BytesIO()
        with warnings.catch_warnings(), torch_threads(1):
            warnings.simplefilter("ignore")
            torch.onnx.export(self.module, tuple(sample), buf, input_names=self.input_names,
                              output_names=[HEAD_OUTPUT], dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        model = onnx.load_model_from_string(buf.getvalue())
        onnx.helper.set_model_props(model, metadata or {})
        data = model.SerializeToString()
        check_model_bytes(data)
        return data


def _maps(backbone: Backbone, trunk: TrunkRun, items: Sequence[str | bytes], blocks: int, progress: Progress,
          batch=None) -> dict[str, np.ndarray]:
    """The trunk's `blocks_N` output for every item (text: padded to the longest, with its mask)."""
    name = f"blocks_{blocks}"
    pre = backbone.preprocess
    parts, masks = [], []
    n = len(items) if batch is None else len(next(iter(batch.values())))
    for start in range(0, n, BATCH):
        chunk = pre(items[start : start + BATCH]) if batch is None else {k: v[start : start + BATCH] for k, v in batch.items()}
        parts.append(trunk(chunk, (name,))[name])
        if "attention_mask" in chunk:
            masks.append(chunk["attention_mask"])
        progress({"message": f"trunk features {min(start + BATCH, n)}/{n}"})
    if not masks:
        return {name: np.concatenate(parts)}
    length = max(p.shape[1] for p in parts)
    hidden = np.concatenate([np.pad(p, ((0, 0), (0, length - p.shape[1]), (0, 0))) for p in parts])
    mask = np.concatenate([np.pad(m, ((0, 0), (0, length - m.shape[1]))) for m in masks])
    return {name: hidden, "attention_mask": mask}


def _trimmed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A text batch cut to its longest member (positions past it are padding in every row: masked out of
    attention and pooling, so the result is the same); other batches as they are."""
    if "attention_mask" not in batch:
        return batch
    length = max(1, int(batch["attention_mask"].sum(dim=1).max()))
    return {n: v[:, :length] for n, v in batch.items()}


def holdout_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(int(y.max()) + 1):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = int(round(len(idx) * fraction)) if len(idx) >= 2 else 0
        n_val = min(max(n_val, 1 if len(idx) >= 2 else 0), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.concatenate(train), np.concatenate(val)


def fine_tune(
    backbone: Backbone,
    items: Sequence[str | bytes],
    labels: Sequence[str],
    options: TrainingOptions = TrainingOptions(strategy="fine_tune"),
    progress: Progress = no_progress,
    sample_ids: Sequence[str] | None = None,
    trunk: TrunkRun | None = None,
    refit_if: Callable[[dict, np.ndarray], bool] = lambda evaluation, holdout_correct: True,
) -> tuple[TrainedHead, dict[str, np.ndarray]]:
    """Tunes the top `options.unfreeze_blocks` blocks + a classifier; returns the head and the feeds
    (trunk outputs of the examples) for the export parity check. `trunk` runs the frozen trunk
    (default: the backbone's torch module).

    A first pass tunes on a stratified holdout's complement with early stopping; its best epoch's
    holdout score is the evaluation (slightly optimistic: the same holdout picked the epoch). Then,
    when `refit_if(evaluation, holdout_correct)` (by default always; `holdout_correct[i]` says whether the
    first pass got the i-th holdout example right, in `holdout_split` order), the head is tuned again from the start on every
    example for the whole cosine schedule (or is the linear probe it started from, when no epoch of
    tuning matched that on the holdout): the holdout's examples are too valuable to leave out of a
    few-shot head, and on a holdout of two per label which epoch was best is noise (clothing10 at 10
    per label: best epochs 0 to 5 across draws, and retraining for those scored 70.5%; the whole
    schedule scored 72.9% on other draws). AUTO passes its comparison with the feature head, so
    that a tuned head it is about to discard is not retrained."""
    start = time.perf_counter()
    names = sorted(set(labels))
    if len(names) < 2:
        raise InvalidInput(f"a task needs at least 2 labels with examples; got {len(names)}")
    y = np.array([names.index(label) for label in labels], dtype=np.int64)
    k, blocks = len(names), options.unfreeze_blocks or DEFAULT_BLOCKS[backbone.modality]

    progress({"phase": "features", "message": f"running the frozen trunk up to block -{blocks}"})
    trunk = trunk or backbone.torch_outputs
    feeds = _maps(backbone, trunk, items, blocks, progress)
    input_names = list(feeds)
    device = torch.device(backbone.device)  # tuning runs where the trunk runs; the head is returned on the CPU
    tensors = {n: torch.from_numpy(v).to(device) for n, v in feeds.items()}
    train_idx, val_idx = holdout_split(y, options.validation_fraction or 0.2, options.seed)
    views = options.augment_views or (DEFAULT_VIEWS if backbone.modality == "image" else 0)
    extra, origin = None, np.zeros(0, np.int64)  # augmented views of every example, and whose they are
    if views and backbone.modality == "image":
        progress({"message": f"embedding {views} augmented views per example"})
        batch, origin = backbone.preprocess.augmented(items, views, options.seed)
        maps = _maps(backbone, trunk, [], blocks, progress, batch=batch)
        extra = {n: torch.from_numpy(v).to(device) for n, v in maps.items()}
    head_lr = options.learning_rate or DEFAULT_LR
    epochs = options.epochs or DEFAULT_EPOCHS

    lengths = feeds["attention_mask"].sum(axis=1) if "attention_mask" in feeds else None

    def pooled_of(model: _Head, rows: np.ndarray) -> torch.Tensor:
        """The top's pooled features of `rows`, in that order. Text runs in chunks of similar length, each cut
        to its longest member: the block inputs are padded to the longest example of the task."""
        order = np.arange(len(rows)) if lengths is None else np.argsort(lengths[rows], kind="stable")
        parts = [model.top(*_trimmed({n: tensors[n][rows[order[i : i + 64]]] for n in input_names}).values())
                 for i in range(0, len(rows), 64)]
        pooled = torch.cat(parts) if parts else torch.zeros((0, backbone.feature_dim), device=device)
        return pooled[torch.from_numpy(np.argsort(order)).to(device)]

    def logits_of(model: _Head, idx: np.ndarray) -> np.ndarray:
        model.eval()
        with torch.inference_mode():
            return (model.classifier(pooled_of(model, idx)) * model.inv_temperature).cpu().numpy()

    def fit_classifier(model: _Head, rows: np.ndarray) -> None:
        """The classifier as a linear probe (logistic regression) on the top's pooled features of `rows`."""
        model.eval()
        with torch.inference_mode(), torch_threads(max(1, torch.get_num_threads())):
            pooled = pooled_of(model, rows).cpu().numpy()
        probe = train_linear(pooled, y[rows], k, TrainingOptions(strategy="linear"))
        with torch.no_grad():
            model.classifier.weight.copy_(torch.from_numpy(probe.layers[0][0]))
            model.classifier.bias.copy_(torch.from_numpy(probe.layers[0][1]))

    modality = backbone.modality
    batch_size, ce_weight, pair_weight = TRAIN_BATCH[modality], CE_WEIGHT[modality], PAIR_WEIGHT[modality]

    def tune(train: np.ndarray, val: np.ndarray, n_epochs: int,
             shown: tuple[int, int]) -> tuple[_Head, int, int]:
        """Tunes a fresh copy of the top on `train` (+ its augmented views) for `n_epochs` of cosine
        decay. With a `val` holdout, keeps the latest epoch of best accuracy on it (epoch 0: the linear
        probe; on a tie the later epoch, further down the schedule) and stops when accuracy has not
        risen for PATIENCE epochs. Progress shows epoch `shown[0] + i` of `shown[1]`. Returns the model,
        the epoch kept and the epochs run."""
        # The tuned blocks' dropout draws from torch's global generator (modules take none of their own):
        # seeded here, and restored afterwards, so the job leaves the process's random state as it was.
        rng_state = torch.random.get_rng_state()
        torch.manual_seed(options.seed)
        model = _Head(backbone.module.top(blocks), backbone.feature_dim, k).to(device)
        # LP-FT: start the classifier from a linear probe on the frozen top's features, so tuning starts
        # from the feature-extraction solution instead of a random classifier that distorts the blocks.
        fit_classifier(model, train)
        optim = torch.optim.AdamW([
            {"params": model.top.parameters(), "lr": head_lr},
            {"params": model.classifier.parameters(), "lr": max(head_lr * 10, 1e-3)},
        ], weight_decay=options.l2 or 0.01)
        x_train = {n: t[train] for n, t in tensors.items()}
        y_train = torch.from_numpy(y[train])
        rows = np.flatnonzero(np.isin(origin, train))  # augmented views of the training examples
        if extra is not None:
            x_train = {n: torch.cat([x_train[n], extra[n][rows]]) for n in input_names}
            y_train = torch.cat([y_train, torch.from_numpy(y[origin[rows]])])
        weights = class_weights(y_train.numpy(), k).to(device)
        y_train = y_train.to(device)
        steps = max(1, n_epochs * -(-len(y_train) // batch_size))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optim, lambda step: 0.5 * (1 + np.cos(np.pi * min(step, steps) / steps)))  # cosine decay to 0

        def train_mode() -> None:
            """Dropout on, but normalisation statistics frozen: a few examples cannot re-estimate them."""
            model.train()
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()

        def score() -> float:
            return float((logits_of(model, val).argmax(1) == y[val]).mean())

        best, best_state = (score() if len(val) else None), copy.deepcopy(model.state_dict())
        best_epoch, stale, epoch = 0, 0, 0
        rng = np.random.default_rng(options.seed)
        with torch_threads(max(1, torch.get_num_threads())):
            for epoch in range(1, n_epochs + 1):
                order = rng.permutation(len(y_train))
                total = 0.0
                train_mode()
                for s in range(0, len(order), batch_size):
                    idx = torch.from_numpy(order[s : s + batch_size])
                    optim.zero_grad()
                    pooled = model.top(*_trimmed({n: x_train[n][idx] for n in input_names}).values())
                    loss = torch.zeros((), device=device)
                    if ce_weight:
                        loss = loss + ce_weight * torch.nn.functional.cross_entropy(
                            model.classifier(pooled) * model.inv_temperature, y_train[idx], weight=weights,
                            label_smoothing=LABEL_SMOOTHING)
                    if pair_weight:
                        loss = loss + pair_weight * pair_loss(pooled, y_train[idx])
                    loss.backward()
                    optim.step()
                    schedule.step()
                    total += loss.item() * len(idx)
                if not ce_weight and (len(val) or epoch == n_epochs):
                    fit_classifier(model, train)  # it does not learn from the loss: refitted where it is read
                update = {"phase": "training", "epoch": shown[0] + epoch, "epochs": shown[1],
                          "loss": total / len(order)}
                if len(val):
                    current = score()
                    update["validation_accuracy"] = current
                    stale = 0 if current > best else stale + 1
                    if current >= best:
                        best, best_state, best_epoch = current, copy.deepcopy(model.state_dict()), epoch
                else:
                    update["message"] = f"tuning on all {len(train)} examples"
                progress(update)
                if len(val) and stale >= PATIENCE:
                    break
        if len(val):
            model.load_state_dict(best_state)  # epoch 0 is the linear probe
        else:
            best_epoch = n_epochs
        model.eval()
        torch.random.set_rng_state(rng_state)
        return model, best_epoch, epoch

    # With a holdout, a second pass on every example may follow: progress counts both.
    model, best_epoch, ran = tune(train_idx, val_idx, epochs, (0, 2 * epochs if len(val_idx) else epochs))
    rows = np.isin(origin, train_idx)
    evaluation = {
        "strategy": "fine_tune",
        "strategy_reason": "requested",
        "tap": input_names[0],
        "unfreeze_blocks": blocks,
        "best_epoch": best_epoch,
        "learning_rate": head_lr,
        "objective": ("pair loss, classifier by logistic regression" if not ce_weight else
                      "cross-entropy" + (" + pair loss" if pair_weight else "")),
        "validation_method": f"holdout {len(val_idx)} of {len(y)} (early stopping on the same holdout)",
        "examples_per_label": {name: int(n) for name, n in zip(names, np.bincount(y, minlength=k))},
        "num_examples": len(y),
        "augmented_rows": int(rows.sum()),
        "feature_dim": backbone.feature_dim,
        "reject_threshold": options.reject_threshold,
    }
    trained_on, evaluation["refit"] = train_idx, False
    if len(val_idx):
        held_logits = logits_of(model, val_idx)
        evaluation.update(validation_report(held_logits, y[val_idx], names))
        if refit_if(evaluation, (held_logits.argmax(axis=1) == y[val_idx]).astype(np.float64)):
            progress({"phase": "training", "message": f"tuning again on all {len(y)} examples"})
            trained_on, evaluation["refit"] = np.arange(len(y)), True
            again = epochs if best_epoch else 0  # the linear probe, when no epoch of tuning matched it
            model, _, ran_again = tune(trained_on, val_idx[:0], again, (ran, ran + again))
            ran += ran_again
            evaluation["augmented_rows"] = len(origin)
            evaluation["validation_method"] += (
                f"; then tuned again on all {len(y)} examples for {epochs} epochs" if again else
                f"; no epoch of tuning matched the linear probe: that probe, refitted on all {len(y)} examples")
        model.inv_temperature.fill_(1.0 / evaluation["temperature"])
    else:
        evaluation.update(NOT_VALIDATED, baseline_accuracy=float(np.bincount(y).max() / len(y)))
    # Progress counted 2 x epochs while a holdout left room for the second pass; early stopping, or no
    # second pass, ends sooner: the last report says how many epochs ran in all, and that tuning is over.
    progress({"phase": "training", "epoch": max(ran, 1), "epochs": max(ran, 1)})
    train_logits = logits_of(model, trained_on)
    train_report = classification_metrics(y[trained_on], train_logits.argmax(1), names)
    evaluation["train_accuracy"] = train_report["accuracy"]
    head = FineTunedHead(model.cpu(), input_names, tuple(feeds[input_names[0]].shape[1:]))
    evaluation["parameters"] = head.parameter_count()
    evaluation["warnings"] = warnings_for(evaluation, labels, sample_ids)
    evaluation["train_seconds"] = time.perf_counter() - start
    json.dumps(evaluation)
    sample = {n: v[:64] for n, v in feeds.items()}
    return TrainedHead(head, names, evaluation), sample
