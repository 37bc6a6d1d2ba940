"""Label words: a text task's labels are evidence too. Each label's text (its name, or the description the
client gives), embedded by the trunk, joins training as `weight` copies of an example of that label; the
weight is how well those words alone sort the task's own examples (`label_text_quality`).

A zero-shot task (adapters/zeroshot.py) is served from its labels' words alone. There a label's words,
which are not a sentence, are written into each of a few sentence templates (`TEMPLATES`) and the label is
the mean of their embeddings (`label_embeddings`), as CLIP's zero-shot classifiers average over prompts.
Trained heads keep the bare words: with the templates they gained on minilm-l6 but not on mpnet-base at
N = 8 (TREC −4.1). docs/design.md, "Label words in sentence templates", has the evidence."""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from adapters.backbones import Backbone, TrunkRun, pooled_taps
from adapters.options import TrainingOptions


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
# label_text_quality kept the gains and the losses within 0.5 points (docs/design.md, "Training").
LABEL_TEXT_MAX_WEIGHT = 16
WORD = re.compile(r"[^\W\d_]{2}")  # two letters in a row


TEMPLATES = ("{}.", "This is {}.", "This text is about {}.", "A sentence about {}.", "It is {}.")
SENTENCE_TAP = "last"  # the sentence embedding (normalised by the model): its features are compared by cosine


def label_embeddings(embed: Callable[[list[str]], Mapping[str, np.ndarray]],
                     texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Per tap, one row per text: the mean of the features of the text written into every template (`embed`
    maps sentences to {tap: [n, d]}). The sentence tap's rows are normalised before and after the mean."""
    out = {}
    for tap, rows in embed([t.format(text) for text in texts for t in TEMPLATES]).items():
        rows = np.asarray(rows, dtype=np.float32)
        if tap == SENTENCE_TAP:
            rows = _unit(rows)
        mean = rows.reshape(len(texts), len(TEMPLATES), -1).mean(axis=1)
        out[tap] = _unit(mean) if tap == SENTENCE_TAP else mean
    return out


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


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


def embed_label_words(backbone: Backbone, trunk: TrunkRun, names: Sequence[str],
                      options: TrainingOptions) -> LabelText | None:
    """Text tasks: the trunk's features of each label's words (its description, else its name), weight
    still 0 (set from the examples at training). None for image tasks and under label_text OFF."""
    if backbone.modality != "text" or options.label_text == "off":
        return None
    texts = [options.label_descriptions.get(name, name) for name in names]
    return LabelText(pooled_taps(trunk, backbone.preprocess(texts), 32), texts)


def look_alike_warnings(labels: Iterable[str]) -> list[str]:
    """A warning naming labels spelled two ways, if any (at most three groups shown)."""
    alike = _alike_labels(labels)
    if not alike:
        return []
    shown = "; ".join(" and ".join(repr(_cut(label)) for label in group) for group in alike[:3])
    return [f"look-alike labels: {shown} differ only in case, spacing or Unicode form, and are separate labels; "
            "use one spelling if they mean the same"]


def _alike_labels(labels) -> list[list[str]]:
    """Groups of labels that are one label to a reader ('Sports', 'sports ', 'ｓｐｏｒｔｓ'): equal after NFKC,
    case folding and collapsing whitespace. A client that spells a label two ways splits its examples
    between two labels that compete for the same inputs."""
    groups: dict[str, list[str]] = {}
    for label in sorted(labels):
        groups.setdefault(" ".join(unicodedata.normalize("NFKC", label).casefold().split()), []).append(label)
    return [g for g in groups.values() if len(g) > 1]


def _cut(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
