"""Protobuf <-> domain conversion at the edge. The only module besides the servicer and server that
touches generated types."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from adapters.errors import InvalidInput
from adapters.options import TrainingOptions
from service.app import Item, TaskView
from service.gen import headserve_pb2 as pb
from service.predictor import Scored
from service.registry import Entry
from service import tenants
from service.store import JobRecord, KeyRecord, Quotas

STRATEGY_NAMES = {pb.STRATEGY_UNSPECIFIED: "auto", pb.AUTO: "auto", pb.LINEAR: "linear", pb.MLP: "mlp",
                  pb.PROTOTYPE: "prototype", pb.FINE_TUNE: "fine_tune"}
STRATEGY_ENUMS = {name: value for value, name in STRATEGY_NAMES.items() if value != pb.STRATEGY_UNSPECIFIED}
LABEL_TEXT_NAMES = {pb.LABEL_TEXT_UNSPECIFIED: "auto", pb.LABEL_TEXT_AUTO: "auto", pb.LABEL_TEXT_ON: "on",
                    pb.LABEL_TEXT_OFF: "off"}
LABEL_TEXT_ENUMS = {name: value for value, name in LABEL_TEXT_NAMES.items()
                    if value != pb.LABEL_TEXT_UNSPECIFIED}


def item(inp: pb.Input, index: int) -> Item:
    kind = inp.WhichOneof("kind")
    if kind == "text":
        return inp.text
    if kind == "image":
        return inp.image
    raise InvalidInput(f"input {index} is empty; set Input.text or Input.image")


def items(inputs) -> list[Item]:
    return [item(inp, i) for i, inp in enumerate(inputs)]


def examples(exs) -> list[tuple[Item, str]]:
    return [(item(ex.input, i), ex.label) for i, ex in enumerate(exs)]


def options(config: pb.TrainingConfig) -> TrainingOptions:
    if config.strategy not in STRATEGY_NAMES:
        raise InvalidInput(f"unknown strategy {config.strategy}")
    if config.label_text not in LABEL_TEXT_NAMES:
        raise InvalidInput(f"unknown label_text {config.label_text}")
    return TrainingOptions(
        strategy=STRATEGY_NAMES[config.strategy],
        epochs=config.epochs,
        learning_rate=config.learning_rate,
        l2=config.l2,
        seed=config.seed,
        validation_fraction=config.validation_fraction,
        hidden_units=config.hidden_units or 128,
        unfreeze_blocks=config.unfreeze_blocks,
        tap=config.tap,
        augment_views=config.augment_views,
        reject_threshold=config.reject_threshold,
        label_text=LABEL_TEXT_NAMES[config.label_text],
        label_descriptions=dict(config.label_descriptions),
    )


def config_pb(cfg: dict) -> pb.TrainingConfig:
    o = TrainingOptions(**cfg)
    return pb.TrainingConfig(
        strategy=STRATEGY_ENUMS[o.strategy], epochs=o.epochs, learning_rate=o.learning_rate, l2=o.l2,
        seed=o.seed, validation_fraction=o.validation_fraction, hidden_units=o.hidden_units,
        unfreeze_blocks=o.unfreeze_blocks, tap=o.tap, augment_views=o.augment_views,
        reject_threshold=o.reject_threshold, label_text=LABEL_TEXT_ENUMS[o.label_text],
        label_descriptions=o.label_descriptions,
    )


EVALUATION_FIELDS = {"strategy", "train_accuracy", "validation_accuracy", "validation_method", "examples_per_label",
                     "num_examples", "warnings", "train_seconds", "macro_f1", "per_label", "confusion_matrix",
                     "expected_calibration_error", "temperature", "tap", "head_bytes", "baseline_accuracy"}


def evaluation_pb(ev: dict) -> pb.Evaluation:
    if not ev:
        return pb.Evaluation()
    return pb.Evaluation(
        strategy=ev["strategy"],
        train_accuracy=ev["train_accuracy"],
        validation_accuracy=ev["validation_accuracy"],
        validation_method=ev["validation_method"],
        examples_per_label=ev["examples_per_label"],
        num_examples=ev["num_examples"],
        warnings=ev["warnings"],
        train_seconds=ev["train_seconds"],
        macro_f1=ev.get("macro_f1", 0.0),
        per_label=[pb.LabelMetrics(**m) for m in ev.get("per_label", [])],
        confusion_matrix=[n for row in ev.get("confusion_matrix", []) for n in row],
        expected_calibration_error=ev.get("expected_calibration_error", 0.0),
        temperature=ev.get("temperature", 1.0),
        tap=ev.get("tap", "last"),
        head_bytes=ev.get("head_bytes", 0),
        baseline_accuracy=ev.get("baseline_accuracy", 0.0),
        details_json=json.dumps({k: v for k, v in ev.items() if k not in EVALUATION_FIELDS}, sort_keys=True),
    )


def task_pb(view: TaskView) -> pb.Task:
    r = view.record
    return pb.Task(
        task_id=r.task_id,
        backbone=r.backbone,
        labels=view.labels,
        state=pb.Task.State.Value(r.state),
        version=r.live_version,
        evaluation=evaluation_pb(view.evaluation),
        error=r.error,
        job_id=r.job_id,
        num_examples=sum(view.counts.values()),
        examples_per_label=view.counts,
        created_at_ms=r.created_at_ms,
        updated_at_ms=r.updated_at_ms,
        config=config_pb(r.config),
    )


def job_pb(job: JobRecord) -> pb.Job:
    s = job.status
    return pb.Job(
        job_id=job.job_id,
        task_id=job.task_id,
        state=pb.Job.State.Value(job.state),
        phase=s.get("phase", ""),
        progress=s.get("progress", 0.0),
        epoch=s.get("epoch", 0),
        epochs=s.get("epochs", 0),
        loss=s.get("loss", 0.0),
        validation_accuracy=s.get("validation_accuracy", 0.0),
        error=job.error,
        version=job.version,
        message=s.get("message", ""),
        evaluation=evaluation_pb(s.get("evaluation", {})),
    )


def backbone_pb(entry: Entry) -> pb.Backbone:
    spec, b = entry.spec, entry.backbone
    return pb.Backbone(
        name=spec.name,
        modality=pb.TEXT if spec.modality == "text" else pb.IMAGE,
        feature_dim=b.feature_dim if b else 0,
        weights_source=b.weights_source if b else "",
        available=entry.available,
        unavailable_reason=entry.unavailable_reason,
        preprocessing_json=json.dumps(b.preprocess.describe(), sort_keys=True) if b else "",
        architecture=spec.arch,
        device=str(b.device) if b else "",
        taps=list(spec.taps),
    )


def predict_tasks(request: pb.PredictRequest) -> tuple[list[str], bool]:
    """The tasks a PredictRequest names, and whether it is a multi-task request (task_ids)."""
    if request.task_ids:
        if request.task_id:
            raise InvalidInput("set task_id (one task) or task_ids (several), not both")
        return list(request.task_ids), True
    return [request.task_id], False


def check_top_k(top_k: int) -> None:
    if top_k < 0:
        raise InvalidInput("top_k must be 0 (all labels) or positive")


def predictions_pb(scored: Scored, top_k: int) -> list[pb.Prediction]:
    """One Prediction per input: the top_k labels (all for 0) by descending probability."""
    p = scored.probabilities
    k = min(top_k or p.shape[1], p.shape[1])
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(p, order, axis=1).tolist()
    labels = scored.labels
    out = []
    for row, row_scores in zip(order.tolist(), scores):
        top = [pb.LabelScore(label=labels[i], score=s) for i, s in zip(row, row_scores)]
        if row_scores[0] < scored.reject_threshold:  # unknown: no label; `top` still shows the guesses
            out.append(pb.Prediction(label="", score=row_scores[0], top=top, rejected=True))
        else:
            out.append(pb.Prediction(label=labels[row[0]], score=row_scores[0], top=top))
    return out


def predict_pb(results: list[Scored], multi: bool, top_k: int, request_id: str) -> pb.PredictResponse:
    """A single-task request fills predictions/version/task_id; a multi-task one fills results."""
    if multi:
        return pb.PredictResponse(request_id=request_id, results=[
            pb.TaskPredictions(task_id=s.task_id, version=s.version, predictions=predictions_pb(s, top_k))
            for s in results
        ])
    s = results[0]
    return pb.PredictResponse(predictions=predictions_pb(s, top_k), version=s.version, request_id=request_id,
                              task_id=s.task_id)


# --- Admin ---------------------------------------------------------------------------------------------

DEFAULT_SCOPES = list(tenants.DEFAULT_SCOPES)


def quotas(q: pb.Quotas) -> Quotas:
    return Quotas(
        tasks=q.tasks, examples=q.examples, stored_bytes=q.stored_bytes, training_jobs=q.training_jobs,
        predict_requests_per_second=q.predict_requests_per_second,
        predict_inputs_per_second=q.predict_inputs_per_second,
    )


def tenant_pb(view: tenants.TenantView) -> pb.Tenant:
    t = view.tenant
    return pb.Tenant(
        tenant_id=t.tenant_id, name=t.name, created_at_ms=t.created_at_ms,
        quotas=pb.Quotas(**dataclasses.asdict(t.quotas)), usage=pb.Usage(**dataclasses.asdict(view.usage)),
    )


def key_pb(k: KeyRecord) -> pb.ApiKey:
    return pb.ApiKey(
        key_id=k.key_id, tenant_id=k.tenant_id, scopes=k.scopes, description=k.description,
        created_at_ms=k.created_at_ms, expires_at_ms=k.expires_at_ms, revoked_at_ms=k.revoked_at_ms,
    )
