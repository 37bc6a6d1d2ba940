"""What a training job does: load the task's examples, compute (or reuse cached) trunk features, train a
head with the job's options, and export and check its ONNX. The job runner (service/jobs.py) claims the job,
calls `Trainer.run`, and stores the result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from adapters.backbones import POOLED_TAPS, pooled_taps
from adapters.errors import InvalidInput
from adapters.finetune import auto_fine_tune, fine_tune
from adapters.heads import Augmented, LabelText, TrainingOptions, export_checked, train_head
from service.registry import BackboneRegistry
from service.store import HeadRecord, JobRecord, Store, TaskRecord

log = logging.getLogger(__name__)

FEATURE_CHUNK = 32

Publish = Callable[..., None]  # publish(job, persist=False, **status): a progress update of the job


def _progress(update: dict) -> dict:
    """Training's 0..1 progress sits between features (0-0.5) and export (0.9-1)."""
    if update.get("epochs"):
        return {**update, "progress": 0.5 + 0.4 * update["epoch"] / update["epochs"]}
    return update


class Trainer:
    def __init__(self, store: Store, registry: BackboneRegistry, publish: Publish,
                 auto_fine_tune_min_examples: int = 0) -> None:
        self.store = store
        self.registry = registry
        self._publish = publish
        self.auto_fine_tune_min_examples = auto_fine_tune_min_examples

    def run(self, job: JobRecord) -> tuple[HeadRecord, str]:
        """Trains the job's task: its new head (version 0 until stored) and the backbone it reads."""
        return self._train(job)

    def _train(self, job: JobRecord) -> tuple[HeadRecord, str]:
        task = self.store.get_task(job.task_key)
        entry = self.registry.get(task.backbone)
        refs = self.store.example_refs(task.key)
        counts: dict[str, int] = {}
        for _, label in refs:
            counts[label] = counts.get(label, 0) + 1
        missing = [label for label in task.declared_labels if label not in counts]
        if missing:
            raise InvalidInput(
                f"label {missing[0]!r} has no examples; each label needs at least 1 (add examples, then train)"
            )
        if len(counts) < 2:
            raise InvalidInput(f"a task needs examples for at least 2 labels; it has {len(counts)}")

        self._publish(job, persist=True, phase="features", progress=0.0, message=f"embedding {len(refs)} examples")
        shas = [sha for sha, _ in refs]
        labels = [label for _, label in refs]
        options = TrainingOptions(**job.config)
        meta = {"backbone": entry.spec.name, "backbone_digest": entry.backbone.digest, "task_id": task.task_id}
        if options.strategy == "fine_tune":
            trained, feeds = fine_tune(entry.backbone, self._items(task, shas), labels, options,
                                       lambda update: self._publish(job, **_progress(update)), shas,
                                       entry.training_trunk())
            return self._export(job, task, trained, feeds, meta)
        xs = self._features(job, task, entry, shas)
        augmented = self._augmented(job, task, entry, shas, options) if options.augment_views else None
        label_text = self._label_text(entry, sorted(counts), options)

        self._publish(job, persist=True, phase="validating", progress=0.5, message=f"training ({options.strategy})")

        trained = train_head(xs, labels, options, lambda update: self._publish(job, **_progress(update)),
                             sample_ids=shas, augmented=augmented, label_text=label_text)
        if self._auto_fine_tunes(entry, options, counts):
            self._publish(job, persist=True, phase="features", progress=0.0,
                          message=f"AUTO: fine-tuning too ({min(counts.values())}+ examples per label)")
            trained, tuned_feeds = auto_fine_tune(
                entry.backbone, self._items(task, shas), labels, xs, trained, options,
                lambda update: self._publish(job, **_progress(update)), shas, entry.training_trunk())
            if tuned_feeds is not None:
                return self._export(job, task, trained, tuned_feeds, meta)
        tap = trained.evaluation["tap"]
        feeds = {name: xs[tap] for tap, name in POOLED_TAPS.items()}
        return self._export(job, task, trained, feeds, {**meta, "tap": tap})

    def _auto_fine_tunes(self, entry, options: TrainingOptions, counts: dict[str, int]) -> bool:
        threshold = self.auto_fine_tune_min_examples
        return (options.strategy == "auto" and not options.tap and entry.spec.modality == "image"
                and threshold > 0 and min(counts.values()) >= threshold)

    def _export(self, job, task, trained, feeds, meta) -> tuple[HeadRecord, str]:
        self._publish(job, persist=True, phase="exporting", progress=0.9, message="exporting ONNX",
                      validation_accuracy=trained.evaluation["validation_accuracy"])
        onnx_bytes = export_checked(trained, feeds, meta)
        trained.evaluation["head_bytes"] = len(onnx_bytes)
        return HeadRecord(task.key, 0, onnx_bytes, trained.labels, trained.evaluation), task.backbone

    def _features(self, job: JobRecord, task: TaskRecord, entry, shas: list[str]) -> dict[str, np.ndarray]:
        """Pooled trunk features of every tap for the examples (Entry.training_trunk), cached in the store
        (per tenant, like the examples)."""
        unique = list(dict.fromkeys(shas))
        tenant = task.tenant_id
        cached = {tap: self.store.cached_features(tenant, entry.trunk_key(tap), unique) for tap in POOLED_TAPS}
        for tap in POOLED_TAPS:  # a damaged row (cut short, or not numbers) is computed again, not trained on
            dim = entry.backbone.tap_dims[tap]
            bad = [sha for sha, v in cached[tap].items() if v.shape != (dim,) or not np.isfinite(v).all()]
            if bad:
                log.warning("job %s: %d cached %s feature row(s) of tenant %s are damaged (expected %d floats); "
                            "recomputing them", job.job_id, len(bad), tap, tenant, dim)
                self.store.drop_features(tenant, entry.trunk_key(tap), bad)
                for sha in bad:
                    del cached[tap][sha]
        todo = [sha for sha in unique if any(sha not in cached[tap] for tap in POOLED_TAPS)]
        for start in range(0, len(todo), FEATURE_CHUNK):
            chunk = todo[start : start + FEATURE_CHUNK]
            taps = pooled_taps(entry.training_trunk(), entry.backbone.preprocess(self._items(task, chunk)))
            for tap in POOLED_TAPS:
                fresh = dict(zip(chunk, taps[tap]))
                self.store.put_features(tenant, entry.trunk_key(tap), fresh)
                cached[tap].update(fresh)
            done = start + len(chunk)
            self._publish(job, progress=0.5 * done / len(todo), message=f"embedded {done}/{len(todo)} new examples")
        return {tap: np.stack([cached[tap][sha] for sha in shas]).astype(np.float32) for tap in POOLED_TAPS}

    def _items(self, task: TaskRecord, shas: list[str]) -> list[str | bytes]:
        raw = self.store.blobs(task.tenant_id, shas)
        return [raw[sha][1].decode() if raw[sha][0] == "text" else raw[sha][1] for sha in shas]

    def _augmented(
        self, job: JobRecord, task: TaskRecord, entry, shas: list[str], options: TrainingOptions
    ) -> Augmented | None:
        """Features of random augmented views of image examples (not cached: new views each job)."""
        if entry.spec.modality != "image":
            return None
        self._publish(job, message=f"embedding {options.augment_views} augmented views per example")
        batch, origin = entry.backbone.preprocess.augmented(self._items(task, shas), options.augment_views,
                                                            options.seed)
        return Augmented(pooled_taps(entry.training_trunk(), batch, FEATURE_CHUNK), origin)

    def _label_text(self, entry, names: list[str], options: TrainingOptions) -> LabelText | None:
        """Text tasks: the trunk's features of each label's words (its description, else its name).
        The descriptions were checked against the task's labels when the job was submitted."""
        if entry.spec.modality != "text" or options.label_text == "off":
            return None
        texts = [options.label_descriptions.get(name, name) for name in names]
        batch = entry.backbone.preprocess(texts)
        return LabelText(pooled_taps(entry.training_trunk(), batch, FEATURE_CHUNK), texts)
