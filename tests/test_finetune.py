"""FINE_TUNE in adapters/: the tuned blocks really train, the shared trunk does not move, and the head's
ONNX export reads the trunk's block outputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import TOPICS

from adapters.backbones import LoadOptions, builtin_spec, load_backbone
from adapters.finetune import fine_tune
from adapters.heads import TrainingOptions, export_checked

TEXTS = [t for texts in TOPICS.values() for t in texts]
LABELS = [label for label, texts in TOPICS.items() for _ in texts]


@pytest.fixture(scope="module")
def minilm():
    return load_backbone(builtin_spec("minilm-l6"), LoadOptions())


@pytest.mark.slow
def test_top_block_is_tuned_and_trunk_stays_frozen(minilm):
    digest = minilm.digest
    frozen = {k: v.clone() for k, v in minilm.module.encoder.encoder.layer[-1].state_dict().items()}
    options = TrainingOptions(strategy="fine_tune", epochs=3, learning_rate=1e-3, validation_fraction=0.25)
    trained, feeds = fine_tune(minilm, TEXTS, LABELS, options)
    tuned = trained.head.module.top.layers[0].state_dict()
    moved = [k for k in frozen if not torch.equal(frozen[k], tuned[k])]
    assert moved, "no parameter of the unfrozen block changed"
    assert all(torch.equal(v, minilm.module.encoder.encoder.layer[-1].state_dict()[k]) for k, v in frozen.items())
    from adapters.backbones import _state_digest

    assert _state_digest(minilm.module) == digest
    assert set(feeds) == {"blocks_1", "attention_mask"}
    assert trained.evaluation["validation_method"].startswith("holdout 6 of 24")

    data = export_checked(trained, feeds, {"task_id": "t"})
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["blocks_1", "attention_mask"]
    probs = session.run(None, feeds)[0]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
