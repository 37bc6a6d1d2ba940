"""Zero-shot heads: a text task with labels and no examples, served from its labels' own words.

Each label's text (its description, else its name) is written into a few sentence templates and the
label's embedding is the mean of theirs (adapters/label_words.py, `label_embeddings`); the head scores an
input by the cosine similarity of its sentence embedding to each label's embedding, divided by a
temperature:

    L2-normalise(features) -> Dense(W = label embeddings / T, b = 0) -> Softmax

It is an ordinary dense head (adapters/heads.py DenseHead): exported to ONNX and checked against its numpy
reference like the trained ones, served by the same runtime, replaced by the next trained version.

T = 0.05 is the temperature the sentence-transformers models were trained with (their in-batch ranking
loss multiplies cosine similarities by 20); it is not fitted on any benchmark set.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence

import numpy as np

from adapters.backbones import Backbone, TrunkRun, pooled_taps
from adapters.heads import HEAD_INPUT, DenseHead, TrainedHead, export_checked
from adapters.label_words import TEMPLATES, label_embeddings, look_alike_warnings

STRATEGY = "zero_shot"
TEMPERATURE = 0.05
VALIDATION = "zero-shot: no validation"
WORD = re.compile(r"[^\W\d_]{2}")  # two letters in a row: what a label's text needs to be read as words


def label_texts(labels: Sequence[str], descriptions: Mapping[str, str]) -> list[str]:
    """Each label's words, in sorted label order: its description, else its name."""
    return [descriptions.get(name, name) for name in sorted(labels)]


def can_zero_shot(labels: Sequence[str], descriptions: Mapping[str, str], label_text: str = "auto") -> bool:
    """Whether a task with these labels can start zero-shot: 2+ labels, each with words of its own
    ("sports", "a question about a person"; not "0", "A" or "L7"), and label_text not OFF."""
    texts = label_texts(labels, descriptions)
    return label_text != "off" and len(texts) >= 2 and all(WORD.search(t) for t in texts)


def zero_shot_head(label_features: np.ndarray, temperature: float = TEMPERATURE) -> DenseHead:
    """The head over label embeddings [k, d] (normalised here): cosine similarity / temperature."""
    e = np.asarray(label_features, dtype=np.float32)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    w = (e / temperature).astype(np.float32)
    return DenseHead(STRATEGY, [(w, np.zeros(len(w), np.float32))], normalize=True,
                     inputs=((HEAD_INPUT, int(w.shape[1])),))


def build(backbone: Backbone, trunk: TrunkRun, labels: Sequence[str], descriptions: Mapping[str, str],
          reject_threshold: float = 0.0, metadata: Mapping[str, str] | None = None) -> tuple[TrainedHead, bytes]:
    """Embeds the labels' words with `trunk`, builds the head and its checked ONNX export."""
    start = time.perf_counter()
    names = sorted(labels)
    texts = label_texts(names, descriptions)
    features = label_embeddings(lambda sentences: pooled_taps(trunk, backbone.preprocess(sentences)), texts)["last"]
    head = zero_shot_head(features)
    k = len(names)
    evaluation = {
        "strategy": STRATEGY,
        "strategy_reason": (f"no examples yet: cosine similarity to each label's words, embedded in "
                            f"{len(TEMPLATES)} sentence templates and averaged; temperature {TEMPERATURE}"),
        "candidate_scores": {},
        "tap": "last",
        "C": None,
        "validation_method": VALIDATION,
        "examples_per_label": {name: 0 for name in names},
        "num_examples": 0,
        "augmented_rows": 0,
        "label_text": {"mode": "zero-shot", "texts": dict(zip(names, texts)), "templates": list(TEMPLATES),
                       "described": sum(text != name for name, text in zip(names, texts))},
        "feature_dim": int(features.shape[1]),
        "parameters": head.parameter_count(),
        "temperature": TEMPERATURE,
        "reject_threshold": reject_threshold,
        "validation_accuracy": 0.0,
        "macro_f1": 0.0,
        "per_label": [],
        "confusion_matrix": [],
        "expected_calibration_error": 0.0,
        "baseline_accuracy": 1.0 / k,
        "train_accuracy": 0.0,
        "warnings": [f"{VALIDATION}: the head compares inputs with the labels' words only; add examples and "
                     "train to get a validated head", *look_alike_warnings(names)],
    }
    trained = TrainedHead(head, names, evaluation)
    data = export_checked(trained, {HEAD_INPUT: features}, {**(metadata or {}), "tap": "last"})
    evaluation["head_bytes"] = len(data)
    evaluation["train_seconds"] = time.perf_counter() - start
    return trained, data
