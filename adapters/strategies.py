"""The registry of training strategies, and `train`: the one entry point a training job calls.

Like a model registry, each strategy is registered by name with its trainer, the options it reads and
the inputs it needs (pooled features per tap, augmented views, the labels' words, the raw items and
the trunk for fine-tuning). `train` gives a strategy only what it declared, trains, exports the head to
ONNX and checks the export against the trained head. The job runner knows no strategy by name.

    trained = train(data, options, trunk, progress)   # -> Trained(head, onnx)

A strategy that trains in stages may hand `interim` a servable head before it ends: AUTO does with its
feature head (about a second) before it fine-tunes (seconds to minutes), so that the task answers at once.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from adapters.backbones import POOLED_TAPS, Backbone, TrunkRun, pooled_taps
from adapters.errors import InvalidInput
from adapters.finetune import fine_tune
from adapters.heads import TrainedHead, export_checked
from adapters.label_words import LabelText, embed_label_words
from adapters.options import STRATEGIES, Progress, TrainingOptions, no_progress
from adapters.selection import Augmented, auto_fine_tune, auto_fine_tunes, train_head

INPUTS = ("features", "augmented", "label_text", "items", "trunk")
FEATURE_CHUNK = 32


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """A task's examples: labels and ids in one order, and the ways to get their inputs. `features()`
    returns the pooled trunk features of every tap (the caller may cache them); `items()` the raw
    inputs (texts, image bytes). Each is called only when the strategy needs it."""

    labels: Sequence[str]
    items: Callable[[], Sequence[str | bytes]]
    features: Callable[[], Mapping[str, np.ndarray]]
    sample_ids: Sequence[str] | None = None


@dataclasses.dataclass(frozen=True)
class Trunk:
    """The task's backbone and how training runs its frozen trunk (TrunkRun)."""

    backbone: Backbone
    run: TrunkRun


@dataclasses.dataclass(frozen=True)
class Policy:
    """Service-wide training policy: AUTO also fine-tunes text tasks with at least `auto_fine_tune_min_examples`
    examples per label (0: never) and at most `auto_fine_tune_max_examples` in all (0: any number)."""

    auto_fine_tune_min_examples: int = 0
    auto_fine_tune_max_examples: int = 0


@dataclasses.dataclass
class Trained:
    head: TrainedHead
    onnx: bytes


@dataclasses.dataclass
class Context:
    """What a trainer is handed: the inputs it declared (the others are None), options and progress."""

    labels: Sequence[str]
    sample_ids: Sequence[str] | None
    options: TrainingOptions
    progress: Progress
    policy: Policy
    load_items: Callable[[], Sequence[str | bytes]]
    features: Mapping[str, np.ndarray] | None = None
    augmented: Augmented | None = None
    label_text: LabelText | None = None
    trunk: Trunk | None = None
    interim: Callable[[TrainedHead, Mapping[str, np.ndarray], dict[str, str]], None] | None = None
    _items: Sequence[str | bytes] | None = None

    def items(self) -> Sequence[str | bytes]:
        """The raw inputs, loaded on first use (AUTO needs them only when it fine-tunes)."""
        if self._items is None:
            self._items = self.load_items()
        return self._items


# A trainer returns the head, the feeds (its inputs by name) to check the export with, and metadata.
Trainer = Callable[[Context], tuple[TrainedHead, Mapping[str, np.ndarray], dict[str, str]]]


@dataclasses.dataclass(frozen=True)
class Strategy:
    name: str
    trainer: Trainer
    options: tuple[str, ...]  # the TrainingOptions fields it reads
    inputs: frozenset[str]  # of INPUTS
    description: str


REGISTRY: dict[str, Strategy] = {}


def register(name: str, options: Sequence[str], inputs: Sequence[str], description: str):
    unknown = set(inputs) - set(INPUTS)
    fields = {f.name for f in dataclasses.fields(TrainingOptions)}
    if unknown or set(options) - fields:
        raise ValueError(f"strategy {name!r}: unknown inputs {sorted(unknown)} or options "
                         f"{sorted(set(options) - fields)}")

    def wrap(fn: Trainer) -> Trainer:
        REGISTRY[name] = Strategy(name, fn, tuple(options), frozenset(inputs), description)
        return fn

    return wrap


def train(data: TrainingData, options: TrainingOptions, trunk: Trunk, progress: Progress = no_progress,
          policy: Policy = Policy(), metadata: Mapping[str, str] | None = None,
          interim: Callable[[Trained], None] | None = None) -> Trained:
    """Trains the head `options.strategy` names on `data`, exports it to ONNX and checks the export.
    `interim`, when given, hears of a servable head exported before training ends (see above)."""
    strategy = REGISTRY[options.strategy]
    if len(set(data.labels)) < 2:
        raise InvalidInput(f"a task needs at least 2 labels with examples; got {len(set(data.labels))}")
    needs = strategy.inputs
    ctx = Context(data.labels, data.sample_ids, options, progress, policy,
                  data.items if "items" in needs else _undeclared(strategy.name, "items"))
    if interim is not None:
        def publish(head: TrainedHead, feeds: Mapping[str, np.ndarray], extra: dict[str, str]) -> None:
            copy = TrainedHead(head.head, list(head.labels), dict(head.evaluation))
            onnx_bytes = export_checked(copy, feeds, {**(metadata or {}), **extra})
            copy.evaluation["head_bytes"] = len(onnx_bytes)
            interim(Trained(copy, onnx_bytes))

        ctx.interim = publish
    if "trunk" in needs:
        ctx.trunk = trunk
    if "features" in needs:
        ctx.features = data.features()
    if "augmented" in needs and options.augment_views and trunk.backbone.modality == "image":
        progress({"message": f"embedding {options.augment_views} augmented views per example"})
        ctx._items = ctx._items if ctx._items is not None else data.items()
        batch, origin = trunk.backbone.preprocess.augmented(ctx._items, options.augment_views, options.seed)
        ctx.augmented = Augmented(pooled_taps(trunk.run, batch, FEATURE_CHUNK), origin)
    if "label_text" in needs:
        ctx.label_text = embed_label_words(trunk.backbone, trunk.run, sorted(set(data.labels)), options)
    progress({"phase": "validating", "message": f"training ({options.strategy})"})
    trained, feeds, extra = strategy.trainer(ctx)
    progress({"phase": "exporting", "message": "exporting ONNX",
              "validation_accuracy": trained.evaluation["validation_accuracy"]})
    onnx_bytes = export_checked(trained, feeds, {**(metadata or {}), **extra})
    trained.evaluation["head_bytes"] = len(onnx_bytes)
    return Trained(trained, onnx_bytes)


def _undeclared(strategy: str, what: str) -> Callable[[], Sequence[str | bytes]]:
    def refuse() -> Sequence[str | bytes]:
        raise RuntimeError(f"strategy {strategy!r} did not declare the input {what!r}")

    return refuse


# --- the strategies -------------------------------------------------------------------------------

FEATURE_INPUTS = ("features", "augmented", "label_text")
COMMON = ("seed", "validation_fraction", "reject_threshold", "tap", "augment_views", "label_text",
          "label_descriptions")


def _feature_head(ctx: Context) -> tuple[TrainedHead, Mapping[str, np.ndarray], dict[str, str]]:
    trained = train_head(ctx.features, ctx.labels, ctx.options, ctx.progress, ctx.sample_ids, ctx.augmented,
                         ctx.label_text)
    return trained, _feature_feeds(ctx.features), {"tap": trained.evaluation["tap"]}


def _feature_feeds(features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: features[tap] for tap, name in POOLED_TAPS.items() if tap in features}


for _name, _options, _description in [
    ("linear", ("epochs", "l2"), "multinomial logistic regression, C chosen by cross-validation"),
    ("mlp", ("epochs", "learning_rate", "l2", "hidden_units"), "one hidden ReLU layer with dropout"),
    ("prototype", (), "nearest class mean in cosine space; trains from one example per label"),
]:
    register(_name, COMMON + _options, FEATURE_INPUTS, _description)(_feature_head)


@register("fine_tune", ("seed", "validation_fraction", "reject_threshold", "epochs", "learning_rate", "l2",
                        "unfreeze_blocks", "augment_views"), ("items", "trunk"),
          "the top blocks of the backbone tuned with a classifier (LP-FT)")
def _fine_tune(ctx: Context):
    trained, feeds = fine_tune(ctx.trunk.backbone, ctx.items(), ctx.labels, ctx.options, ctx.progress,
                               ctx.sample_ids, ctx.trunk.run)
    return trained, feeds, {}


@register("auto", COMMON + ("epochs", "learning_rate", "l2", "hidden_units", "unfreeze_blocks"),
          (*FEATURE_INPUTS, "items", "trunk"),
          "cross-validated choice among the feature heads (and FINE_TUNE for text tasks with enough "
          "examples); a complex candidate only on strong paired evidence (adapters/selection.py)")
def _auto(ctx: Context):
    trained, feeds, extra = _feature_head(ctx)
    counts = list(Counter(ctx.labels).values())
    policy = ctx.policy
    if auto_fine_tunes(ctx.trunk.backbone.modality, ctx.options, counts, policy.auto_fine_tune_min_examples):
        if 0 < policy.auto_fine_tune_max_examples < len(ctx.labels):
            trained.evaluation["fine_tune_skipped"] = (
                f"{len(ctx.labels)} examples, more than auto_fine_tune_max_examples "
                f"({policy.auto_fine_tune_max_examples}): AUTO kept to the feature heads; FINE_TUNE tunes on all")
            return trained, feeds, extra
        if ctx.interim is not None:  # the feature head serves while the trunk's top blocks are tuned
            ctx.interim(trained, feeds, extra)
        ctx.progress({"phase": "features", "message": f"AUTO: fine-tuning too ({min(counts)}+ examples per label)"})
        kept, tuned_feeds = auto_fine_tune(ctx.trunk.backbone, ctx.items(), ctx.labels, ctx.features, trained,
                                           ctx.options, ctx.progress, ctx.sample_ids, ctx.trunk.run)
        if tuned_feeds is not None:
            return kept, tuned_feeds, {}
    return trained, feeds, extra


assert set(REGISTRY) == set(STRATEGIES), "every strategy TrainingOptions accepts is registered"
