"""A typed Python client for headserve.v1.HeadServe, for services that import it.

    with HeadServeClient("127.0.0.1:50051") as client:
        task = client.create_task("minilm-l6", [("great match", "sports"), ("add salt", "cooking")])
        client.wait(task.job_id)
        print(client.predict(task.task_id, ["who won the game?"]).predictions[0].label)

Inputs: a `str` is text, `bytes` an encoded image, a `pathlib.Path` an image file (read when sent); an
`Input` message passes through. Examples are `(input, label)` pairs or `Example` messages. Server errors
surface unchanged as `grpc.RpcError`, so callers can branch on `.code()`.

Security: `api_key` (default: $HEADSERVE_API_KEY) travels as `authorization: Bearer <key>` metadata on
every call; `tls_ca` (PEM, or True for the system's roots) turns TLS on, and `tls_cert` + `tls_key` add a
client certificate for servers that ask for one (mTLS).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any, TypeAlias

import grpc

from service.gen import headserve_pb2 as pb
from service.gen import headserve_pb2_grpc as pb_grpc

InputLike: TypeAlias = str | bytes | pathlib.Path | pb.Input
ExampleLike: TypeAlias = tuple[InputLike, str] | pb.Example

STRATEGIES = {name.lower(): value for name, value in pb.Strategy.items() if value}  # "auto", "linear", ...
EXPORT_FORMATS = {"head": pb.HEAD_ONNX, "fused": pb.FUSED_ONNX}
FINAL_JOB_STATES = (pb.Job.SUCCEEDED, pb.Job.FAILED)

# Uploads stay within gRPC's default 4 MiB message limit; an export chunk carries up to 4 MiB of data
# plus metadata, so the client accepts larger messages than that default.
MAX_BATCH_BYTES = 4 << 20
MAX_RECEIVE_BYTES = 64 << 20


class ExportError(Exception):
    """An exported file failed its integrity check (sha256, size or chunk offsets)."""


def to_input(value: InputLike) -> pb.Input:
    """Converts `str` (text), `bytes` (encoded image) or `pathlib.Path` (image file) to an `Input`."""
    if isinstance(value, pb.Input):
        return value
    if isinstance(value, str):
        return pb.Input(text=value)
    if isinstance(value, (bytes, bytearray)):
        return pb.Input(image=bytes(value))
    if isinstance(value, pathlib.Path):
        return pb.Input(image=value.read_bytes())
    raise TypeError(f"an input is str (text), bytes or pathlib.Path (image), not {type(value).__name__}")


def to_example(item: ExampleLike) -> pb.Example:
    """Converts an `(input, label)` pair to an `Example`."""
    if isinstance(item, pb.Example):
        return item
    value, label = item
    return pb.Example(input=to_input(value), label=label)


def training_config(strategy: str | pb.Strategy = "auto", **fields: Any) -> pb.TrainingConfig:
    """Builds a `TrainingConfig`; `strategy` is an enum value or a name from `STRATEGIES` ("linear", ...).

    Other keyword arguments are `TrainingConfig` fields (epochs, learning_rate, seed, ...); zero or empty
    means the server's default. `label_text` may also be a name: "auto", "on" or "off".
    """
    if isinstance(fields.get("label_text"), str):
        fields["label_text"] = "LABEL_TEXT_" + fields["label_text"].upper()
    if isinstance(strategy, str):
        try:
            strategy = STRATEGIES[strategy.lower().replace("-", "_")]
        except KeyError:
            raise ValueError(
                f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}"
            ) from None
    return pb.TrainingConfig(strategy=strategy, **fields)


def predict_request(
    task_id: str, inputs: Iterable[InputLike], top_k: int = 0, request_id: str = ""
) -> pb.PredictRequest:
    """Builds a `PredictRequest`, e.g. for `HeadServeClient.predict_stream`."""
    return pb.PredictRequest(
        task_id=task_id, inputs=[to_input(v) for v in inputs], top_k=top_k, request_id=request_id
    )


def example_batches(
    examples: Iterable[ExampleLike], batch_size: int = 64, max_bytes: int = MAX_BATCH_BYTES
) -> Iterator[list[pb.Example]]:
    """Converts examples lazily and groups them into lists of at most `batch_size` examples and, unless a
    single example is larger, at most `max_bytes` serialized bytes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    batch: list[pb.Example] = []
    size = 0
    for item in examples:
        example = to_example(item)
        example_size = example.ByteSize()
        if batch and (len(batch) == batch_size or size + example_size > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(example)
        size += example_size
    if batch:
        yield batch


def write_export(chunks: Iterable[pb.ExportChunk], file: IO[bytes]) -> dict[str, Any]:
    """Writes streamed export chunks to `file`, checks offsets, total size and sha256, and returns the
    metadata of the first chunk. Raises `ExportError` when the stream does not add up."""
    digest = hashlib.sha256()
    written = 0
    first: pb.ExportChunk | None = None
    for chunk in chunks:
        if first is None:
            first = chunk
        if chunk.offset != written:
            raise ExportError(f"chunk at offset {chunk.offset}, expected {written}")
        file.write(chunk.data)
        digest.update(chunk.data)
        written += len(chunk.data)
    if first is None:
        raise ExportError("the export stream was empty")
    if written != first.total_size:
        raise ExportError(f"received {written} bytes, expected {first.total_size}")
    if digest.hexdigest() != first.sha256.lower():
        raise ExportError(f"sha256 mismatch: received {digest.hexdigest()}, expected {first.sha256}")
    return json.loads(first.metadata_json) if first.metadata_json else {}


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata (the API key) to every call of a channel, TLS or not."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _details(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self.metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


# UNAVAILABLE is what a server answers while its store is briefly unreachable, and what a channel gets while
# a replica restarts: calls that change nothing are tried again by grpc itself, up to five attempts with
# jittered backoff (about 4 s in all at most), within the call's own deadline. Writes are not: a refused write
# may or may not have been applied, and the caller decides (service/errors.py, STORE_UNAVAILABLE).
RETRIED = {
    "headserve.v1.HeadServe": ("ListBackbones", "GetTask", "ListTasks", "WatchJob", "Predict", "ExportTask"),
    "headserve.v1.Admin": ("ListTenants", "GetTenant", "ListKeys", "GetUsage"),
}
SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": service, "method": method} for service, methods in RETRIED.items() for method in methods],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.25s", "maxBackoff": "2s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]},
}]})


def open_channel(
    address: str,
    *,
    api_key: str | None = None,
    tls_ca: str | os.PathLike[str] | bool | None = None,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A channel to `address`: TLS when `tls_ca` is set (a PEM file, or True for the system's roots) or a
    client certificate is given; the API key, when given, on every call; calls that change nothing retried
    on UNAVAILABLE (RETRIED; `options` may set another "grpc.service_config")."""
    ours = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES), ("grpc.service_config", SERVICE_CONFIG)]
    given = {name for name, _ in options}
    options = [*(o for o in ours if o[0] not in given), *options]
    if tls_ca or tls_cert or tls_key:
        from service.tls import channel_credentials

        ca = None if tls_ca is True else tls_ca
        channel = grpc.secure_channel(address, channel_credentials(ca, tls_cert, tls_key), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    if api_key:
        if any(c in api_key for c in "\r\n"):
            raise ValueError("the API key has a line break; check how it was read")
        channel = grpc.intercept_channel(channel, _Metadata((("authorization", f"Bearer {api_key}"),)))
    return channel


class HeadServeClient:
    """A connection to a headserve server.

    `timeout` (seconds) bounds each unary call; streaming calls (add_examples, watch, wait,
    predict_stream, export) take their own optional `timeout` and are unbounded by default. A `channel`
    passed in is used as is and left open by `close()`. `api_key` defaults to $HEADSERVE_API_KEY; for
    TLS see `open_channel`.
    """

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        timeout: float | None = 30.0,
        channel: grpc.Channel | None = None,
        api_key: str | None = None,
        tls_ca: str | os.PathLike[str] | bool | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._owns_channel = channel is None
        if channel is None:
            key = api_key if api_key is not None else os.environ.get("HEADSERVE_API_KEY") or None
            channel = open_channel(address, api_key=key, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
        self._channel = channel
        self._stub = pb_grpc.HeadServeStub(self._channel)
        self._admin = pb_grpc.AdminStub(self._channel)

    def __enter__(self) -> HeadServeClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel if this client created it."""
        if self._owns_channel:
            self._channel.close()

    def list_backbones(self) -> list[pb.Backbone]:
        return list(self._stub.ListBackbones(pb.ListBackbonesRequest(), timeout=self.timeout).backbones)

    def create_task(
        self,
        backbone: str,
        examples: Iterable[ExampleLike] = (),
        *,
        task_id: str = "",
        labels: Iterable[str] = (),
        config: pb.TrainingConfig | None = None,
    ) -> pb.Task:
        """Registers a task; with examples the server also starts training (the returned `job_id`).

        All examples travel in one message: use `add_examples` for large sets.
        """
        request = pb.CreateTaskRequest(
            task_id=task_id,
            backbone=backbone,
            examples=[to_example(e) for e in examples],
            config=config,
            labels=list(labels),
        )
        return self._stub.CreateTask(request, timeout=self.timeout)

    def add_examples(
        self,
        task_id: str,
        examples: Iterable[ExampleLike],
        batch_size: int = 64,
        *,
        timeout: float | None = None,
    ) -> pb.AddExamplesResponse:
        """Streams examples in batches; they are stored (not trained on) once this returns.

        `examples` may be a lazy iterable: images are read batch by batch. An exception raised while
        reading or converting them (say, a missing file) is re-raised as is, not as a cancelled call.
        """
        failure: list[Exception] = []

        def requests() -> Iterator[pb.AddExamplesRequest]:
            try:
                sent = False
                for batch in example_batches(examples, batch_size):
                    yield pb.AddExamplesRequest(task_id=task_id, examples=batch)
                    sent = True
                if not sent:
                    yield pb.AddExamplesRequest(task_id=task_id)
            except Exception as exc:
                failure.append(exc)
                raise

        try:
            return self._stub.AddExamples(requests(), timeout=timeout)
        except grpc.RpcError:
            if failure:
                raise failure[0] from None
            raise

    def train(self, task_id: str, config: pb.TrainingConfig | None = None) -> pb.Job:
        """Starts a training job; `config` unset means the task's own config."""
        request = pb.TrainTaskRequest(task_id=task_id, config=config)
        return self._stub.TrainTask(request, timeout=self.timeout)

    def watch(self, job_id: str = "", task_id: str = "", *, timeout: float | None = None) -> Iterator[pb.Job]:
        """Yields a job's progress (by id, or the task's latest job) until it reaches a final state."""
        yield from self._stub.WatchJob(pb.WatchJobRequest(job_id=job_id, task_id=task_id), timeout=timeout)

    def wait(self, job_id: str = "", task_id: str = "", *, timeout: float | None = None) -> pb.Job:
        """Blocks until the job ends and returns its final state (SUCCEEDED or FAILED)."""
        last: pb.Job | None = None
        for last in self.watch(job_id, task_id, timeout=timeout):
            if last.state in FINAL_JOB_STATES:
                return last
        raise RuntimeError(f"WatchJob ended before job {last.job_id if last else job_id or task_id} finished")

    def get_task(self, task_id: str) -> pb.Task:
        return self._stub.GetTask(pb.GetTaskRequest(task_id=task_id), timeout=self.timeout)

    def list_tasks(self, backbone: str = "", *, page_size: int = 0) -> list[pb.Task]:
        """Returns every task (optionally of one backbone), following the pages."""
        return _every_page(lambda token: self._stub.ListTasks(
            pb.ListTasksRequest(page_size=page_size, page_token=token, backbone=backbone), timeout=self.timeout),
            "tasks")

    def delete_task(self, task_id: str) -> None:
        self._stub.DeleteTask(pb.DeleteTaskRequest(task_id=task_id), timeout=self.timeout)

    def predict(
        self, task_id: str, inputs: Iterable[InputLike], top_k: int = 0, *, request_id: str = ""
    ) -> pb.PredictResponse:
        """Classifies a batch of inputs (one prediction per input, in order); `top_k` 0 means all labels."""
        request = predict_request(task_id, inputs, top_k, request_id)
        return self._stub.Predict(request, timeout=self.timeout)

    def predict_many(
        self, task_ids: Sequence[str], inputs: Iterable[InputLike], top_k: int = 0, *, request_id: str = ""
    ) -> pb.PredictResponse:
        """Classifies the same inputs with several tasks of one backbone: one trunk pass, every head.
        The answers are in `.results`, one `TaskPredictions` per task, in `task_ids` order."""
        request = pb.PredictRequest(
            task_ids=list(task_ids), inputs=[to_input(v) for v in inputs], top_k=top_k, request_id=request_id
        )
        return self._stub.Predict(request, timeout=self.timeout)

    def predict_stream(
        self, requests: Iterable[pb.PredictRequest], *, timeout: float | None = None
    ) -> Iterator[pb.PredictResponse]:
        """One response per request, in order, over a single open stream (see `predict_request`)."""
        yield from self._stub.PredictStream(iter(requests), timeout=timeout)

    def export(
        self,
        task_id: str,
        path_or_file: str | os.PathLike[str] | IO[bytes],
        format: str = "head",
        version: int = 0,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Downloads a task's head ("head") or trunk+head ("fused") ONNX model; `version` 0 is the live one.

        Returns the model's metadata (labels, input names, preprocessing, opset, version). A path is only
        replaced once the whole file has arrived and matches its sha256; a file object is written as is.
        """
        try:
            request = pb.ExportTaskRequest(task_id=task_id, format=EXPORT_FORMATS[format], version=version)
        except KeyError:
            raise ValueError(
                f"unknown format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}"
            ) from None
        chunks = self._stub.ExportTask(request, timeout=timeout)
        if not isinstance(path_or_file, (str, os.PathLike)):
            return write_export(chunks, path_or_file)
        path = pathlib.Path(path_or_file)
        partial = path.with_name(path.name + ".part")
        try:
            with partial.open("wb") as file:
                metadata = write_export(chunks, file)
            partial.replace(path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return metadata

    # --- Admin (keys with the admin scope) ---------------------------------------------------------------

    def create_tenant(
        self, name: str, scopes: Sequence[str] = (), *, expires_at_ms: int = 0
    ) -> pb.CreateTenantResponse:
        """A new tenant and its first key (`.api_key`, shown only here); scopes default to predict, train."""
        request = pb.CreateTenantRequest(name=name, scopes=list(scopes), expires_at_ms=expires_at_ms)
        return self._admin.CreateTenant(request, timeout=self.timeout)

    def list_tenants(self, *, page_size: int = 0) -> list[pb.Tenant]:
        """Returns every tenant, following the pages."""
        return _every_page(lambda token: self._admin.ListTenants(
            pb.ListTenantsRequest(page_size=page_size, page_token=token), timeout=self.timeout), "tenants")

    def get_tenant(self, tenant: str) -> pb.Tenant:
        return self._admin.GetTenant(pb.GetTenantRequest(tenant=tenant), timeout=self.timeout)

    def delete_tenant(self, tenant: str) -> int:
        """Deletes a tenant (by id or name) and everything it owns; returns how many tasks went with it."""
        return self._admin.DeleteTenant(pb.DeleteTenantRequest(tenant=tenant), timeout=self.timeout).tasks_deleted

    def set_quotas(self, tenant: str, quotas: pb.Quotas) -> pb.Tenant:
        return self._admin.SetQuotas(pb.SetQuotasRequest(tenant=tenant, quotas=quotas), timeout=self.timeout)

    def create_key(
        self, tenant: str, scopes: Sequence[str], *, description: str = "", expires_at_ms: int = 0
    ) -> pb.CreateKeyResponse:
        request = pb.CreateKeyRequest(tenant=tenant, scopes=list(scopes), description=description,
                                      expires_at_ms=expires_at_ms)
        return self._admin.CreateKey(request, timeout=self.timeout)

    def list_keys(self, tenant: str = "", *, page_size: int = 0) -> list[pb.ApiKey]:
        """Returns every key (of one tenant, by id or name, when given), following the pages."""
        return _every_page(lambda token: self._admin.ListKeys(
            pb.ListKeysRequest(tenant=tenant, page_size=page_size, page_token=token), timeout=self.timeout), "keys")

    def get_usage(self, tenant: str) -> pb.UsageReport:
        """Predict traffic of a tenant's tasks (stored every few seconds by each replica)."""
        return self._admin.GetUsage(pb.GetUsageRequest(tenant=tenant), timeout=self.timeout)

    def revoke_key(self, key_id: str) -> pb.ApiKey:
        return self._admin.RevokeKey(pb.RevokeKeyRequest(key_id=key_id), timeout=self.timeout)


def _every_page(call: Callable[[str], Any], field: str) -> list:
    """Every item of a List call: `call(page_token)` answers one page; follows next_page_token to the end."""
    items: list = []
    token = ""
    while True:
        page = call(token)
        items.extend(getattr(page, field))
        token = page.next_page_token
        if not token:
            return items
