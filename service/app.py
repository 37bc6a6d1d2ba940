"""The use cases behind the API: validate, then call the store, the job runner and the predictor.

Everything here speaks domain types; service/codec.py translates to and from protobuf.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import unicodedata
import uuid
from collections.abc import Sequence

from adapters.errors import FailedPrecondition, InvalidInput, NotFound, ResourceExhausted
from adapters.options import TrainingOptions
from adapters.runtime import fuse, graph_inputs
from service.config import Settings
from service.jobs import JobRunner, new_job
from service.predictor import Predictor, Ticket
from service.registry import BackboneRegistry, Entry
from service.store import ExampleIn, HeadRecord, JobRecord, Store, TaskRecord
from service.tenants import Caller, page_limit, quote
from service.usage import UsageRecorder

TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
Item = str | bytes  # text or an encoded image


@dataclasses.dataclass
class TaskView:
    record: TaskRecord
    counts: dict[str, int]
    evaluation: dict

    @property
    def labels(self) -> list[str]:
        return sorted(set(self.record.declared_labels) | set(self.counts))


@dataclasses.dataclass
class Export:
    data: bytes
    metadata: dict


class HeadServeApp:
    def __init__(
        self, settings: Settings, store: Store, registry: BackboneRegistry, runner: JobRunner, predictor: Predictor,
        usage: UsageRecorder | None = None,
    ) -> None:
        self.usage = usage
        self.settings = settings
        self.store = store
        self.registry = registry
        self.runner = runner
        self.predictor = predictor

    # --- validation ---------------------------------------------------------------------------------

    def _check_label(self, label: str) -> None:
        limit = self.settings.max_label_length
        if not label.strip():
            raise InvalidInput("label is empty; every example needs a non-blank label")
        if len(label) > limit:
            raise InvalidInput(f"label {label[:40]!r}... has {len(label)} characters; the limit is {limit}")
        if any(unicodedata.category(c) == "Cc" for c in label):
            raise InvalidInput(f"label {label!r} contains control characters")

    def _examples(self, entry: Entry, examples: Sequence[tuple[Item, str]], declared: Sequence[str]) -> list[ExampleIn]:
        for item, label in examples:
            self._check_label(label)
            if declared and label not in declared:
                raise InvalidInput(f"label {label!r} is not one of the task's labels ({', '.join(declared)})")
        items = [item for item, _ in examples]
        entry.backbone.preprocess.check(items)
        return [
            ExampleIn("text", item.encode(), label) if isinstance(item, str) else ExampleIn("image", item, label)
            for item, label in examples
        ]

    def _check_capacity(self, key: str, new: Sequence[ExampleIn], declared: Sequence[str] = ()) -> None:
        counts = self.store.label_counts(key) if key else {}
        total = sum(counts.values()) + len(new)
        if total > self.settings.max_examples_per_task:
            raise ResourceExhausted(
                f"task would hold {total} examples; the limit is {self.settings.max_examples_per_task}"
            )
        labels = set(counts) | {ex.label for ex in new} | set(declared)
        if len(labels) > self.settings.max_labels_per_task:
            raise ResourceExhausted(f"task would have {len(labels)} labels; the limit is {self.settings.max_labels_per_task}")

    def _check_label_text(self, entry: Entry, options: TrainingOptions, labels: set[str]) -> None:
        if entry.spec.modality != "text" and (options.label_descriptions or options.label_text == "on"):
            raise InvalidInput(f"label_text ON and label_descriptions need a text backbone; "
                               f"{entry.spec.name!r} reads images")
        unknown = sorted(set(options.label_descriptions) - labels)
        if unknown:
            raise InvalidInput(f"label_descriptions names {unknown[0]!r}, which is not one of the task's "
                               f"labels ({', '.join(sorted(labels)) or 'none yet'})")

    # --- use cases --------------------------------------------------------------------------------

    def list_backbones(self) -> list[Entry]:
        return list(self.registry.entries.values())

    def create_task(
        self,
        caller: Caller,
        task_id: str,
        backbone: str,
        examples: Sequence[tuple[Item, str]],
        declared_labels: Sequence[str],
        options: TrainingOptions,
    ) -> TaskView:
        task_id = task_id or f"task-{uuid.uuid4().hex[:12]}"
        if not TASK_ID.fullmatch(task_id):
            raise InvalidInput(
                f"task_id {quote(task_id)} is not valid: use 1-128 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        entry = self.registry.get(backbone)
        for label in declared_labels:
            self._check_label(label)
        if len(set(declared_labels)) != len(declared_labels):
            raise InvalidInput("labels are declared more than once")
        if declared_labels and len(declared_labels) < 2:
            raise InvalidInput("a task needs at least 2 labels; declare 2 or more")
        new = self._examples(entry, examples, declared_labels)
        if new:
            labels = {ex.label for ex in new} | set(declared_labels)
            if len(labels) < 2:
                raise InvalidInput(f"a task needs at least 2 labels; the examples use only {sorted(labels)}")
            missing = sorted(set(declared_labels) - {ex.label for ex in new})
            if missing:
                raise InvalidInput(f"label {missing[0]!r} has no examples; each label needs at least 1")
        self._check_capacity("", new, declared_labels)
        self._check_label_text(entry, options, {ex.label for ex in new} | set(declared_labels))
        record = TaskRecord.new(caller.tenant_id, task_id, backbone, list(declared_labels),
                                dataclasses.asdict(options))
        zero_shot = None if new else self._zero_shot_head(entry, task_id, declared_labels, options)
        if new:  # the task and its job, or neither
            job = new_job(record.key, options)
            self.store.create_task(record, new, caller.quotas, job=job)
            self.runner.queued()
        elif zero_shot is not None:  # the task and its zero-shot head, READY at once, or neither
            trained, data = zero_shot
            ev = trained.evaluation
            job = new_job(record.key, options)
            job.status = {"phase": "done", "progress": 1.0, "message": "ready (zero-shot)",
                          "seconds": ev["train_seconds"], "evaluation": ev}
            self.store.create_task(record, [], caller.quotas, job=job,
                                   head=HeadRecord(record.key, 0, data, trained.labels, ev))
        else:
            self.store.create_task(record, [], caller.quotas)
        return self.get_task(caller, task_id)

    # Zero-shot: a text task created with its labels and no examples is READY at once, with a head built from
    # the labels' words (adapters/zeroshot.py), stored as version 1 with the task, by a job recorded as done.
    # The next trained version replaces it. label_text OFF, or labels without words ("0", "A"), opt out.

    def _zero_shot_head(self, entry: Entry, task_id: str, labels: Sequence[str], options: TrainingOptions):
        from adapters.zeroshot import build, can_zero_shot

        if entry.spec.modality != "text" or not can_zero_shot(labels, options.label_descriptions,
                                                               options.label_text):
            return None
        meta = {**entry.head_metadata(), "task_id": task_id}  # backbone, digest and trunk precision
        return build(entry.backbone, entry.training_trunk(), labels, options.label_descriptions,
                     options.reject_threshold, meta)

    def add_examples(
        self, caller: Caller, task_id: str, examples: Sequence[tuple[Item, str]], still_wanted=lambda: True
    ) -> tuple[int, int, dict[str, int]]:
        """Validates and stores the examples in one transaction, unless `still_wanted()` (the call is still
        active) is false when it commits: an upload the client gave up on is not stored."""
        key = caller.key(task_id)
        task = self.store.get_task(key)
        entry = self.registry.get(task.backbone)
        new = self._examples(entry, examples, task.declared_labels)
        self._check_capacity(key, new)
        added, duplicates = self.store.add_examples(key, new, caller.quotas, still_wanted)
        return added, duplicates, self.store.label_counts(key)

    def train(self, caller: Caller, task_id: str, options: TrainingOptions | None) -> JobRecord:
        key = caller.key(task_id)
        task = self.store.get_task(key)
        entry = self.registry.get(task.backbone)
        counts = self.store.label_counts(key)
        if len(counts) < 2:
            raise InvalidInput(
                f"task {task_id!r} has examples for {len(counts)} label(s); add examples for at least 2 labels"
            )
        missing = sorted(set(task.declared_labels) - set(counts))
        if missing:
            raise InvalidInput(f"label {missing[0]!r} has no examples; each label needs at least 1")
        options = options or TrainingOptions(**task.config)
        self._check_label_text(entry, options, set(counts))
        return self.runner.submit(key, options, caller.quotas)

    def get_task(self, caller: Caller, task_id: str) -> TaskView:
        return TaskView(*self.store.task_view(caller.key(task_id)))

    def _view(self, record: TaskRecord) -> TaskView:
        evaluation = self.store.head_evaluation(record.key, record.live_version) if record.live_version else {}
        return TaskView(record, self.store.label_counts(record.key), evaluation)

    def list_tasks(
        self, caller: Caller, page_size: int, page_token: str, backbone: str = ""
    ) -> tuple[list[TaskView], str]:
        size = page_limit(page_size)
        records = self.store.list_tasks(caller.tenant_id, page_token, size + 1, backbone)
        more = len(records) > size
        records = records[:size]
        return [self._view(r) for r in records], (records[-1].task_id if more else "")

    def delete_task(self, caller: Caller, task_id: str) -> None:
        key = caller.key(task_id)
        self.store.delete_task(key)
        self.predictor.forget(key)

    def forget_tasks(self, keys: Sequence[str]) -> None:
        """Unloads the heads of tasks deleted with their tenant."""
        for key in keys:
            self.predictor.forget(key)

    def job(self, caller: Caller, job_id: str, task_id: str) -> JobRecord:
        """A job of the caller's tenant; another tenant's job is NotFound, as if it did not exist."""
        if not job_id:
            if not task_id:
                raise InvalidInput("give a job_id or a task_id")
            job_id = self.store.get_task(caller.key(task_id)).job_id
            if not job_id:
                raise NotFound(f"task {task_id!r} has no training job yet")
        job = self.runner.get(job_id)
        if job.tenant_id != caller.tenant_id:
            raise NotFound(f"job {job_id[:64]!r} does not exist")
        return job

    def predict(
        self, caller: Caller, task_ids: Sequence[str], items: Sequence[Item], deadline: float | None = None
    ) -> Ticket:
        """Queues a prediction of `items` by each task's live head (tasks on one backbone, one trunk pass).

        `deadline` is a time.monotonic() value; the ticket's result() gives one Scored per task, in order."""
        if not items:
            raise InvalidInput("no inputs; send at least one")
        limit = self.settings.max_inputs_per_request
        if len(items) > limit:
            raise ResourceExhausted(f"{len(items)} inputs in one request; the limit is {limit}")
        if not task_ids or not all(task_ids):
            raise InvalidInput("task_id is empty")
        if len(task_ids) > self.settings.max_tasks_per_request:
            raise ResourceExhausted(
                f"{len(task_ids)} tasks in one request; the limit is {self.settings.max_tasks_per_request}"
            )
        if len(set(task_ids)) != len(task_ids):
            twice = next(t for t in task_ids if task_ids.count(t) > 1)
            raise InvalidInput(f"task {quote(twice)} is named more than once; name each task once")
        keys = [caller.key(t) for t in task_ids]
        ticket = self.predictor.submit(keys, items, deadline)
        if self.usage is not None:
            self.usage.record(keys, len(items))
        return ticket

    def export(self, caller: Caller, task_id: str, fused: bool, version: int) -> Export:
        task = self.store.get_task(caller.key(task_id))
        version = version or task.live_version
        if not version:
            raise FailedPrecondition(f"task {task_id!r} has no trained version to export yet")
        head = self.store.get_head(task.key, version)
        entry = self.registry.get(task.backbone)
        backbone = entry.backbone
        metadata = {
            "task_id": task_id,
            "version": version,
            "backbone": backbone.name,
            "backbone_digest": backbone.digest,
            "labels": head.labels,
            "format": "fused" if fused else "head",
            "inputs": list(backbone.preprocess.input_names) if fused else graph_inputs(head.onnx),
            "output": "probabilities",
            "preprocessing": backbone.preprocess.describe(),
            "evaluation": head.evaluation,
        }
        # What a client needs in the model itself (ONNX metadata_props): which version of which task and
        # labels, which inputs, and how to preprocess what the fused model reads.
        from adapters.runtime import PREPROCESSING_KEY, preprocessing_metadata, with_metadata

        props = {
            "task_id": task_id,
            "version": str(version),
            "backbone": backbone.name,
            "backbone_digest": backbone.digest,
            "labels": json.dumps(head.labels),
            "format": metadata["format"],
            "inputs": json.dumps(metadata["inputs"]),
            "output": "probabilities",
        }
        metadata["preprocessing"] = preprocessing_metadata(metadata["preprocessing"])
        props[PREPROCESSING_KEY] = json.dumps(metadata["preprocessing"], sort_keys=True)
        if fused:
            data = fuse(entry.trunk.model(), head.onnx, props)
        else:
            data = with_metadata(head.onnx, props)
        metadata["sha256"] = hashlib.sha256(data).hexdigest()
        metadata["size"] = len(data)
        json.dumps(metadata)  # fail here, not mid-stream, if something is not serialisable
        return Export(data, metadata)
