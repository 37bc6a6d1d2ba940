"""headserve.v1.HeadServe and headserve.v1.Admin: each method translates, delegates to the use cases
(HeadServeApp, TenantAdmin) with the caller that the pipeline authenticated, and translates back.
Errors, request ids and logging are the pipeline's (service/pipeline.py)."""

from __future__ import annotations

import contextvars
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from adapters.errors import InvalidInput, ResourceExhausted
from service import codec
from service.app import HeadServeApp
from service.pipeline import CallContext
from service.tenants import TenantAdmin
from service.gen import headserve_pb2 as pb
from service.gen import headserve_pb2_grpc as pb_grpc


class HeadServeServicer(pb_grpc.HeadServeServicer):
    def __init__(self, app: HeadServeApp) -> None:
        self.app = app

    def ListBackbones(self, request, context):
        return pb.ListBackbonesResponse(backbones=[codec.backbone_pb(e) for e in self.app.list_backbones()])

    def CreateTask(self, request, context):
        options = codec.options(request.config)
        view = self.app.create_task(
            context.caller, request.task_id, request.backbone, codec.examples(request.examples), list(request.labels), options
        )
        return codec.task_pb(view)

    def AddExamples(self, request_iterator, context):
        """The stream is stored all or nothing, so it is held in memory until it ends: it is bounded as it is
        read (its task must exist, at most max_examples_per_task examples and max_upload_bytes bytes), not
        after a client has sent gigabytes."""
        task_id, batch, size = "", [], 0
        settings = self.app.settings
        for request in request_iterator:
            if request.task_id and task_id and request.task_id != task_id:
                raise InvalidInput(
                    f"one AddExamples stream serves one task; got {request.task_id!r} after {task_id!r}"
                )
            if not task_id:
                task_id = request.task_id
                if not task_id:
                    raise InvalidInput("the first AddExamples message must name the task_id")
                self.app.get_task(context.caller, task_id)  # NOT_FOUND before the rest is read
            size += request.ByteSize()
            if size > settings.max_upload_bytes:
                raise ResourceExhausted(
                    f"this AddExamples stream is over {settings.max_upload_bytes} bytes (setting max_upload_bytes); "
                    "nothing of it is stored: send the examples in several streams")
            batch.extend(codec.examples(request.examples))
            if len(batch) > settings.max_examples_per_task:
                raise ResourceExhausted(
                    f"this AddExamples stream carries over {settings.max_examples_per_task} examples, more than a "
                    "task may hold (setting max_examples_per_task); nothing of it is stored")
        if not task_id:
            raise InvalidInput("the AddExamples stream was empty; name a task_id and send examples")
        # All or nothing: the whole stream is validated and stored in one transaction.
        context.task_id = task_id
        ended = threading.Event()  # the call was cancelled or ran past its deadline
        if not context.add_callback(ended.set):
            ended.set()
        added, duplicates, counts = self.app.add_examples(
            context.caller, task_id, batch, lambda: context.is_active() and not ended.is_set())
        return pb.AddExamplesResponse(
            task_id=task_id, added=added, duplicates=duplicates, num_examples=sum(counts.values()),
            examples_per_label=counts,
        )

    def TrainTask(self, request, context):
        options = codec.options(request.config) if request.HasField("config") else None
        return codec.job_pb(self.app.train(context.caller, request.task_id, options))

    def WatchJob(self, request, context):
        job = self.app.job(context.caller, request.job_id, request.task_id)
        for snapshot in self.app.runner.watch(job.job_id, context.is_active):
            yield codec.job_pb(snapshot)

    def GetTask(self, request, context):
        return codec.task_pb(self.app.get_task(context.caller, request.task_id))

    def ListTasks(self, request, context):
        """A page ends early, with a next_page_token, where one more task would take it past half of
        max_message_bytes: a task's evaluation grows with its labels squared (the confusion matrix; 1,000
        labels is about 1 MB), and a page over the message limit would fail as a whole, every time."""
        views, token = self.app.list_tasks(context.caller, request.page_size, request.page_token, request.backbone)
        budget, size, page = self.app.settings.max_message_bytes // 2, 0, []
        for view in views:
            task = codec.task_pb(view)
            size += task.ByteSize() + 8  # the field's tag and length
            if page and size > budget:
                token = page[-1].task_id
                break
            page.append(task)
        return pb.ListTasksResponse(tasks=page, next_page_token=token)

    def DeleteTask(self, request, context):
        self.app.delete_task(context.caller, request.task_id)
        return pb.DeleteTaskResponse()

    def _submit(self, request, caller, deadline: float | None):
        task_ids, multi = codec.predict_tasks(request)
        codec.check_top_k(request.top_k)
        return self.app.predict(caller, task_ids, codec.items(request.inputs), deadline), multi

    def Predict(self, request, context):
        remaining = _time_remaining(context)
        ticket, multi = self._submit(request, context.caller,
                                     None if remaining is None else time.monotonic() + remaining)
        if not ticket.done():  # an idle server ran it inline already; else a cancelled call leaves its batch
            context.add_callback(ticket.cancel)
        return codec.predict_pb(ticket.result(remaining), multi, request.top_k, request.request_id)

    def PredictStream(self, request_iterator, context):
        """Answers in order, reading up to STREAM_WINDOW requests ahead, so that the requests of one
        stream are batched together."""
        remaining = _time_remaining(context)
        deadline = None if remaining is None else time.monotonic() + remaining
        caller = context.caller
        # A started request keeps what its answer needs, not its message (inputs of up to max_message_bytes).
        started = _read_ahead(request_iterator, lambda r: (r.top_k, r.request_id, *self._submit(r, caller, deadline)),
                              STREAM_WINDOW, cancel=lambda item: item[2].cancel())
        for top_k, request_id, ticket, multi in started:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            yield codec.predict_pb(ticket.result(timeout), multi, top_k, request_id)

    def ExportTask(self, request, context):
        if request.format not in (pb.EXPORT_FORMAT_UNSPECIFIED, pb.HEAD_ONNX, pb.FUSED_ONNX):
            raise InvalidInput(f"unknown export format {request.format}")
        export = self.app.export(context.caller, request.task_id, request.format == pb.FUSED_ONNX, request.version)
        size, step = len(export.data), self.app.settings.export_chunk_bytes
        for offset in range(0, size, step):
            chunk = pb.ExportChunk(data=export.data[offset : offset + step], offset=offset, total_size=size)
            if offset == 0:
                chunk.metadata_json = json.dumps(export.metadata, sort_keys=True)
                chunk.sha256 = export.metadata["sha256"]
            yield chunk


STREAM_WINDOW = 32  # requests of one PredictStream queued at once


def _read_ahead(items: Iterator, start: Callable, window: int, cancel: Callable) -> Iterator:
    """Yields start(item) for each item in order, while a reader thread calls `start` on up to `window`
    items ahead. An error (from `items` or `start`) is raised after the results before it; results
    started but not taken when the consumer stops are passed to `cancel`."""
    ahead: queue.Queue = queue.Queue(window)
    done = threading.Event()

    def offer(item) -> bool:
        while not done.is_set():
            try:
                ahead.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for item in items:
                if not offer(("ok", start(item))):
                    return
        except BaseException as exc:  # re-raised in order by the consumer
            offer(("error", exc))
            return
        offer(("end", None))

    # In the request's context, so that its log lines and spans carry the request id, tenant and task.
    threading.Thread(target=contextvars.copy_context().run, args=(read,), name="read-ahead", daemon=True).start()
    try:
        while True:
            kind, value = ahead.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        done.set()
        while True:
            try:
                kind, value = ahead.get_nowait()
            except queue.Empty:
                break
            if kind == "ok":
                cancel(value)


def _time_remaining(context) -> float | None:
    """Seconds until the call's deadline; None without one (gRPC reports "no deadline" as a huge number)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e6 else remaining


class AdminServicer(pb_grpc.AdminServicer):
    """Tenants, keys and quotas; the pipeline lets only keys with the admin scope in."""

    def __init__(self, admin: TenantAdmin, forget_tasks: Callable[[list[str]], None]) -> None:
        self.admin = admin
        self.forget_tasks = forget_tasks

    def CreateTenant(self, request, context: CallContext):
        tenant, key, secret = self.admin.create_tenant(
            request.name, list(request.scopes) or codec.DEFAULT_SCOPES, expires_at_ms=request.expires_at_ms)
        return pb.CreateTenantResponse(tenant=codec.tenant_pb(self.admin.tenant(tenant.tenant_id)),
                                       key=codec.key_pb(key), api_key=secret)

    def ListTenants(self, request, context: CallContext):
        views, token = self.admin.list_tenants(request.page_size, request.page_token)
        return pb.ListTenantsResponse(tenants=[codec.tenant_pb(v) for v in views], next_page_token=token)

    def GetTenant(self, request, context: CallContext):
        return codec.tenant_pb(self.admin.tenant(request.tenant))

    def DeleteTenant(self, request, context: CallContext):
        _, keys = self.admin.delete_tenant(request.tenant)
        self.forget_tasks(keys)
        return pb.DeleteTenantResponse(tasks_deleted=len(keys))

    def SetQuotas(self, request, context: CallContext):
        return codec.tenant_pb(self.admin.set_quotas(request.tenant, codec.quotas(request.quotas)))

    def CreateKey(self, request, context: CallContext):
        key, secret = self.admin.create_key(request.tenant, list(request.scopes), request.description,
                                            request.expires_at_ms)
        return pb.CreateKeyResponse(key=codec.key_pb(key), api_key=secret)

    def ListKeys(self, request, context: CallContext):
        keys, token = self.admin.list_keys(request.tenant, request.page_size, request.page_token)
        return pb.ListKeysResponse(keys=[codec.key_pb(k) for k in keys], next_page_token=token)

    def RevokeKey(self, request, context: CallContext):
        return codec.key_pb(self.admin.revoke_key(request.key_id))

    def GetUsage(self, request, context: CallContext):
        view, rows = self.admin.task_usage(request.tenant)
        tasks = [pb.TaskUsage(task_id=t, requests=r, inputs=i, last_used_ms=ms) for t, r, i, ms in rows]
        return pb.UsageReport(tenant=codec.tenant_pb(view), tasks=tasks, requests=sum(t.requests for t in tasks),
                              inputs=sum(t.inputs for t in tasks))


def add_to_server(app: HeadServeApp, admin: TenantAdmin, server: grpc.Server) -> None:
    pb_grpc.add_HeadServeServicer_to_server(HeadServeServicer(app), server)
    pb_grpc.add_AdminServicer_to_server(AdminServicer(admin, app.forget_tasks), server)
