"""FINE_TUNE in adapters/: the tuned blocks really train, the shared trunk does not move, the head's
ONNX export reads the trunk's block outputs, and AUTO keeps a tuned head only when it wins."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import COLOURS, TOPICS, png

from adapters.backbones import LoadOptions, builtin_spec, load_backbone
from adapters.finetune import fine_tune
from adapters.heads import export_checked, train_linear
from adapters.options import TrainingOptions
from adapters.selection import Rule, auto_fine_tune, train_head

TEXTS = [t for texts in TOPICS.values() for t in texts]
LABELS = [label for label, texts in TOPICS.items() for _ in texts]


@pytest.fixture(scope="module")
def minilm():
    return load_backbone(builtin_spec("minilm-l6"), LoadOptions())


@pytest.mark.slow
def test_top_block_is_tuned_and_trunk_stays_frozen(minilm):
    digest = minilm.digest
    frozen = {k: v.clone() for k, v in minilm.module.encoder.encoder.layer[-1].state_dict().items()}
    options = TrainingOptions(strategy="fine_tune", epochs=3, learning_rate=1e-3, validation_fraction=0.25,
                              unfreeze_blocks=1)
    trained, feeds = fine_tune(minilm, TEXTS, LABELS, options)
    tuned = trained.head.module.top.layers[0].state_dict()
    moved = [k for k in frozen if not torch.equal(frozen[k], tuned[k])]
    assert moved, "no parameter of the unfrozen block changed"
    assert all(torch.equal(v, minilm.module.encoder.encoder.layer[-1].state_dict()[k]) for k, v in frozen.items())
    from adapters.trunks import state_digest

    assert state_digest(minilm.module) == digest
    assert set(feeds) == {"blocks_1", "attention_mask"}
    assert trained.evaluation["validation_method"].startswith("holdout 6 of 24")

    # Text tunes the blocks with the pair loss alone: the classifier learns nothing from the loss and is,
    # after the last epoch, exactly the logistic-regression probe on the tuned blocks' pooled features of
    # every example. A classifier trained by cross-entropy would be somewhere else.
    assert trained.evaluation["objective"] == "pair loss, classifier by logistic regression"
    assert trained.evaluation["best_epoch"] > 0 and trained.evaluation["refit"]
    model = trained.head.module
    with torch.inference_mode():
        pooled = model.top(*[torch.from_numpy(feeds[n]) for n in trained.head.input_names]).numpy()
    probe = train_linear(pooled, np.array([trained.labels.index(label) for label in LABELS]), len(trained.labels),
                         TrainingOptions(strategy="linear"))
    np.testing.assert_allclose(model.classifier.weight.detach().numpy(), probe.layers[0][0], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(model.classifier.bias.detach().numpy(), probe.layers[0][1], rtol=1e-3, atol=1e-4)

    data = export_checked(trained, feeds, {"task_id": "t"})
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["blocks_1", "attention_mask"]
    probs = session.run(None, feeds)[0]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_text_batches_cut_to_their_longest_member_pool_the_same_features():
    """Tuning runs each text batch cut to its longest member (`_trimmed`), not padded to the task's longest
    example: the tuned blocks' pooled features must be those of the padded batch."""
    from conftest import TINY_TEXT, tiny_text_folder

    from adapters.backbones import custom_spec
    from adapters.finetune import _maps, _trimmed
    from adapters.preprocessing import ImageTransform

    backbone = load_backbone(custom_spec(TINY_TEXT, "bert", tiny_text_folder(), ImageTransform()), LoadOptions())
    texts = ["short", "a somewhat longer sentence than that", " ".join(["many words"] * 40)]
    feeds = _maps(backbone, backbone.torch_outputs, texts, 6, lambda _: None)
    top = backbone.module.top(6).eval()
    hidden, mask = (torch.from_numpy(feeds[n]) for n in ("blocks_6", "attention_mask"))
    assert mask[:2].sum(dim=1).max() < mask.shape[1]  # the two short ones are padded to the long one
    with torch.inference_mode():
        padded = top(hidden[:2], mask[:2])
        cut = _trimmed({"blocks_6": hidden[:2], "attention_mask": mask[:2]})
        assert cut["blocks_6"].shape[1] == cut["attention_mask"].shape[1] == int(mask[:2].sum(dim=1).max())
        torch.testing.assert_close(top(*cut.values()), padded, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(top(*_trimmed({"blocks_6": hidden, "attention_mask": mask}).values()),
                                   top(hidden, mask))


@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory):
    opts = LoadOptions(torch_home=tmp_path_factory.mktemp("torch"), random_weights=True)
    return load_backbone(builtin_spec("mobilenet_v3_small"), opts)


def colour_images(per_label: int) -> tuple[list[bytes], list[str]]:
    items = [png(rgb, noise=25, seed=i) for rgb in COLOURS.values() for i in range(per_label)]
    return items, [label for label in COLOURS for _ in range(per_label)]


@pytest.mark.slow
def test_fine_tune_tunes_again_on_every_example_after_the_holdout_picks_the_epochs(small_cnn):
    items, labels = colour_images(6)
    options = TrainingOptions(strategy="fine_tune", epochs=2, unfreeze_blocks=1, augment_views=2)
    refit, feeds = fine_tune(small_cnn, items, labels, options)
    ev = refit.evaluation
    # The second pass runs the whole schedule, or is the linear probe when no epoch of tuning matched it.
    again = ("then tuned again on all 18 examples for 2 epochs" if ev["best_epoch"] else
             "no epoch of tuning matched the linear probe: that probe, refitted on all 18 examples")
    assert ev["refit"] and ev["validation_method"] == f"holdout 3 of 18 (early stopping on the same holdout); {again}"
    assert ev["augmented_rows"] == 18 * 2  # the holdout's examples and their views joined the training
    # Only when refit_if says so (AUTO: when the tuned head wins) is it tuned again.
    held, _ = fine_tune(small_cnn, items, labels, options, refit_if=lambda evaluation, holdout_correct: False)
    assert not held.evaluation["refit"] and held.evaluation["augmented_rows"] == 15 * 2
    assert held.evaluation["validation_accuracy"] == ev["validation_accuracy"]  # the same first pass
    changed = [k for k, v in refit.head.module.state_dict().items()
               if not torch.equal(v, held.head.module.state_dict()[k])]
    assert "classifier.weight" in changed
    export_checked(refit, feeds, {"task_id": "t"})


@pytest.mark.slow
def test_auto_fine_tune_keeps_whichever_head_wins_the_shared_holdout(minilm, small_cnn):
    options = TrainingOptions(epochs=3)
    rng = np.random.default_rng(0)
    # Feature head on noise: near chance on the holdout, so the tuned head (the topics are easy) wins.
    noise = {"last": rng.normal(size=(24, 16)).astype(np.float32), "last-1": rng.normal(size=(24, 8)).astype(np.float32)}
    feature_head = train_head(noise, LABELS, options)
    kept, feeds = auto_fine_tune(minilm, TEXTS, LABELS, noise, feature_head, options, rule=Rule(z=1.0),
                                 tuned_first=False)
    # Text tasks tune every block the trunk exposes by default (finetune.DEFAULT_BLOCKS).
    assert kept.evaluation["strategy"] == "fine_tune" and set(feeds) == {"blocks_6", "attention_mask"}
    scores = kept.evaluation["candidate_scores"]
    assert scores["fine_tune (holdout)"] == 1.0 > max(v for k, v in scores.items() if k.endswith("(holdout)")
                                                       and not k.startswith("fine_tune"))
    assert kept.evaluation["strategy_reason"].startswith("fine-tuning beat the feature head clearly on the same holdout of 6")
    assert kept.evaluation["best_epoch"] > 0 and kept.evaluation["refit"]  # then tuned again on all 24

    items, labels = colour_images(10)
    # Labels that have nothing to do with the images, but that the features give away: the feature head
    # is perfect, tuning the blocks cannot be, and the feature head is kept.
    shuffled = list(np.asarray(labels)[rng.permutation(len(labels))])
    onehot = np.eye(3, dtype=np.float32)[[sorted(COLOURS).index(label) for label in shuffled]]
    perfect = {"last": onehot + 0.01 * rng.normal(size=onehot.shape).astype(np.float32), "last-1": onehot}
    feature_head = train_head(perfect, shuffled, options)
    kept, feeds = auto_fine_tune(small_cnn, items, shuffled, perfect, feature_head, options, rule=Rule(z=1.0))
    assert kept is feature_head and feeds is None
    assert "fine-tuning did not beat it clearly on the same holdout of 6 examples" in kept.evaluation["strategy_reason"]
    scores = kept.evaluation["candidate_scores"]
    (rival,) = [v for k, v in scores.items() if k.endswith("(holdout)") and not k.startswith("fine_tune")]
    assert scores["fine_tune (holdout)"] < 1.0 == rival
    # Tuned first (text's policy), the holdout still vetoes a tuned head the feature head clearly beats.
    feature_head = train_head(perfect, shuffled, options)
    kept, feeds = auto_fine_tune(small_cnn, items, shuffled, perfect, feature_head, options, rule=Rule(z=1.0),
                                 tuned_first=True)
    assert kept is feature_head and feeds is None
    assert "or the feature head was clearly better on the same holdout of 6 examples" in \
        kept.evaluation["strategy_reason"]


def test_pair_loss_is_zero_for_separated_labels_and_grows_as_they_mix():
    from adapters.finetune import pair_loss

    y = torch.tensor([0, 0, 1, 1])
    separated = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert float(pair_loss(separated, y)) == pytest.approx(0.0, abs=1e-7)
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    # positives at cosine 0 (error 1); half the negatives at cosine 1 (error 1), half at 0: (1 + 0.5) / 2
    assert float(pair_loss(mixed, y)) == pytest.approx(0.75)
    halfway = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    assert 0.0 < float(pair_loss(halfway, y)) < 1.0
