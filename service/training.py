"""What a training job does: load the task's examples, hand them to `adapters.strategies.train` with the job's
options, and return the stored form of the head it trained. Trunk features are cached in the store per
tenant (a retrain embeds only new examples). The job runner (service/jobs.py) claims the job, calls
`Trainer.run`, and stores the result.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np

from adapters.backbones import POOLED_TAPS, pooled_taps
from adapters.errors import InvalidInput
from adapters.options import TrainingOptions
from adapters.strategies import Policy, Trained, TrainingData, Trunk, train
from service.registry import BackboneRegistry
from service.store import HeadRecord, JobRecord, Store, TaskRecord

log = logging.getLogger(__name__)

FEATURE_CHUNK = 32

Publish = Callable[..., None]  # publish(job, persist=False, **status): a progress update of the job
# interim(job, head, backbone): a servable head published while the job goes on (AUTO's feature head)
Interim = Callable[[JobRecord, HeadRecord, str], None]
INTERIM_WARNING = ("interim head: AUTO's feature head serves while the backbone's top blocks are fine-tuned; "
                   "when the job ends, the tuned head replaces it or this head is kept")
# Where each phase sits on the job's 0..1 progress: features 0-0.5, training 0.5-0.9, export 0.9-1.
PHASE_START = {"features": 0.0, "validating": 0.5, "training": 0.5, "exporting": 0.9}


class Trainer:
    def __init__(self, store: Store, registry: BackboneRegistry, publish: Publish,
                 auto_fine_tune_min_examples: int = 0, interim: Interim | None = None,
                 auto_fine_tune_max_examples: int = 0) -> None:
        self.store = store
        self.registry = registry
        self._publish = publish
        self._interim = interim
        self.policy = Policy(auto_fine_tune_min_examples, auto_fine_tune_max_examples)

    def run(self, job: JobRecord) -> tuple[HeadRecord, str]:
        """Trains the job's task: its new head (version 0 until stored) and the backbone it reads."""
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
        data = TrainingData(labels=[label for _, label in refs], sample_ids=shas,
                            items=lambda: self._items(task, shas),
                            features=lambda: self._features(job, task, entry, shas))
        meta = {**entry.head_metadata(), "task_id": task.task_id}  # backbone, digest and trunk precision

        def interim(result: Trained) -> None:
            if self._interim is None or job.status.get("interim_version"):
                return  # no one to publish to, or an earlier run of this job published it already
            ev = result.head.evaluation
            evaluation = {**ev, "precision": entry.precision, "interim": True,
                          "warnings": [*ev.get("warnings", []), INTERIM_WARNING]}
            self._interim(job, HeadRecord(task.key, 0, result.onnx, result.head.labels, evaluation), task.backbone)

        trained = train(data, TrainingOptions(**job.config), Trunk(entry.backbone, entry.training_trunk()),
                        lambda update: self._progress(job, update), self.policy, meta, interim)
        evaluation = {**trained.head.evaluation, "precision": entry.precision}
        return HeadRecord(task.key, 0, trained.onnx, trained.head.labels, evaluation), task.backbone

    def _progress(self, job: JobRecord, update: dict) -> None:
        """Training's updates as job status: a new phase is stored; epochs map onto 0.5-0.9."""
        status = dict(update)
        if status.get("epochs"):
            status["progress"] = 0.5 + 0.4 * status["epoch"] / status["epochs"]
        elif status.get("phase") in PHASE_START:
            status["progress"] = PHASE_START[status["phase"]]
        persist = "phase" in status and status["phase"] != job.status.get("phase")
        self._publish(job, persist=persist, **status)

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


def warm_up(registry: BackboneRegistry, auto_fine_tune_min_examples: int) -> threading.Thread | None:
    """Readies a training worker before its first job: pays torch's and onnxruntime's first-call costs, then
    builds, in a thread it returns (None when there is nothing to build), the torch trunk of every text backbone
    that AUTO fine-tunes: a few seconds for minilm-l6 that the first task would otherwise wait for (it waits
    only for what is left; serving never needs the trunk). Jobs may be claimed meanwhile."""
    from adapters.heads import export_checked
    from adapters.options import TrainingOptions
    from adapters.selection import train_head

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 16)).astype(np.float32)
    trained = train_head(x, ["a", "b"] * 4, TrainingOptions(strategy="auto"))
    export_checked(trained, x, {})
    entries = [e for e in registry.entries.values() if e.available and e.spec.modality == "text"]
    if auto_fine_tune_min_examples <= 0 or not entries:
        return None

    def build() -> None:
        for entry in entries:
            try:
                entry.backbone.module
            except Exception:  # the job that needs it reports why
                log.exception("backbone %s: its torch trunk could not be built", entry.spec.name)

    thread = threading.Thread(target=build, daemon=True, name="build-trunks")
    thread.start()
    return thread
