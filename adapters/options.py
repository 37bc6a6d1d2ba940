"""What a training job may ask for: the strategies, the taps a head can read, and the validated, frozen
per-job options (`TrainingOptions`). Everything else in adapters/ reads its settings from here."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from adapters.backbones import MAX_UNFREEZE, POOLED_TAPS
from adapters.errors import InvalidInput

STRATEGIES = ("auto", "linear", "mlp", "prototype", "fine_tune")
# Which trunk outputs a feature head reads: the pooled final features, the same pooling one to three
# blocks earlier (for domains far from the pretraining data), or several side by side.
TAP_OUTPUTS = {
    **{tap: (name,) for tap, name in POOLED_TAPS.items()},
    "last+last-1": ("features", "features_last_1"),
    "last+last-1+last-2+last-3": tuple(POOLED_TAPS.values()),
}
TAPS = tuple(TAP_OUTPUTS)
LABEL_TEXT_MODES = ("auto", "on", "off")
MAX_DESCRIPTION_CHARS = 1000

Progress = Callable[[dict], None]


def no_progress(_: dict) -> None:
    pass


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
    label_text: str = "auto"  # text tasks: learn from the labels' words (see label_words.label_text_weight)
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
