"""What a stream may hold. Threads: the server is synchronous, an open stream (AddExamples, WatchJob,
ExportTask, PredictStream) holds one of `grpc_workers` threads for as long as it is open, idle or not, and
grpc queues every new call behind them; streams get `stream_slots` threads and a tenant
`stream_slots_per_tenant` of those, and the health service's Watch holds none. Memory: an AddExamples
stream is stored all or nothing, so it is bounded as it is read. Real servers with few workers or small
limits, real channels."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from conftest import TINY_TEXT, Client, make_settings, make_tenant, text_examples, unique_id
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.gen import headserve_pb2 as pb
from service.server import build_server


class IdleStream:
    """A PredictStream whose client sends nothing until closed: it holds a server thread while open."""

    def __init__(self, stub, first: pb.PredictRequest | None = None) -> None:
        self.closed = threading.Event()
        self.call = stub.PredictStream(self._requests(first), timeout=60)

    def _requests(self, first):
        if first is not None:
            yield first
        self.closed.wait(60)

    def error(self, timeout: float = 10) -> grpc.RpcError:
        """The RpcError that ended the stream (every stream here ends in one: refused, or an unknown task)."""
        result: list = []

        def read():
            try:
                result.append(next(self.call))
            except grpc.RpcError as exc:
                result.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        assert result and isinstance(result[0], grpc.RpcError), result
        return result[0]

    def close(self) -> None:
        self.closed.set()
        self.call.cancel()


def unknown_task() -> pb.PredictRequest:
    return pb.PredictRequest(task_id=unique_id("nobody"), inputs=[pb.Input(text="a sentence")])


def held(running, expected: int, timeout: float = 10) -> None:
    """Waits until the server counts `expected` open streams."""
    end = time.monotonic() + timeout
    while running.slots.open_streams() != expected:
        assert time.monotonic() < end, f"{running.slots.open_streams()} streams open, expected {expected}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """No auth, 4 worker threads: 2 for streams (one tenant: all of them its own)."""
    running = build_server(make_settings(tmp_path_factory.mktemp("data"), with_minilm=False, grpc_workers=4))
    yield running
    running.stop()


def test_idle_streams_leave_threads_for_other_calls_and_a_stream_over_the_limit_is_refused(small) -> None:
    client = Client(small.address)
    streams = [IdleStream(client.stub) for _ in range(2)]
    try:
        held(small, 2)
        refused = IdleStream(client.stub).error()
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "stream_slots" in refused.details()
        # The other half of the threads still answers at once.
        started = time.monotonic()
        assert client.stub.ListBackbones(pb.ListBackbonesRequest(), timeout=5).backbones
        assert time.monotonic() - started < 2
        assert health_pb2_grpc.HealthStub(client.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for stream in streams:
            stream.close()
    # Slots come back when streams end, however they end: a new stream is served (its task is unknown).
    held(small, 0)
    answer = IdleStream(client.stub, unknown_task())
    try:
        assert answer.error().code() == grpc.StatusCode.NOT_FOUND
    finally:
        answer.close()
        client.close()


def test_health_watchers_hold_no_thread(small) -> None:
    """A dozen health watchers (no key needed) on a 4-thread server: each gets SERVING, and calls still run."""
    channels = [grpc.insecure_channel(small.address) for _ in range(12)]
    watches = [health_pb2_grpc.HealthStub(c).Watch(health_pb2.HealthCheckRequest(), timeout=30) for c in channels]
    client = Client(small.address)
    try:
        for watch in watches:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        assert client.stub.ListBackbones(pb.ListBackbonesRequest(), timeout=5).backbones
        assert time.monotonic() - started < 2
        assert small.slots.open_streams() == 0
    finally:
        for watch in watches:
            watch.cancel()
        for channel in channels:
            channel.close()
        client.close()


def test_one_tenant_cannot_take_the_other_tenants_stream_slots(tmp_path) -> None:
    """API keys, 8 worker threads: 4 for streams, 2 for any one tenant."""
    running = build_server(make_settings(tmp_path / "data", with_minilm=False, auth="api_key", grpc_workers=8))
    a, b = make_tenant(running), make_tenant(running)
    ca, cb = Client(running.address, a.api_key), Client(running.address, b.api_key)
    streams = [IdleStream(ca.stub) for _ in range(2)]
    try:
        held(running, 2)
        refused = IdleStream(ca.stub).error()
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "stream_slots_per_tenant" in refused.details()
        served = IdleStream(cb.stub, unknown_task())
        outcome = served.error()
        served.close()
        assert outcome.code() == grpc.StatusCode.NOT_FOUND, outcome.details()
    finally:
        for stream in streams:
            stream.close()
        ca.close()
        cb.close()
        running.stop()


class Upload:
    """An AddExamples request stream of `messages` messages (`make(i)`: the i-th one's examples) that counts
    how many of them the server read."""

    def __init__(self, task_id: str, messages: int, make) -> None:
        self.task_id, self.messages, self.make, self.sent = task_id, messages, make, 0

    def __iter__(self):
        for i in range(self.messages):
            self.sent += 1
            yield pb.AddExamplesRequest(task_id=self.task_id, examples=self.make(i))


def upload_error(client: Client, upload: Upload) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.AddExamples(iter(upload), timeout=60)
    return caught.value


@pytest.fixture(scope="module")
def bounded(tmp_path_factory):
    """A server whose AddExamples streams may carry 1 MiB and a task 40 examples, with one trained task."""
    running = build_server(make_settings(tmp_path_factory.mktemp("data"), with_minilm=False,
                                         max_upload_bytes=1 << 20, max_examples_per_task=40))
    client = Client(running.address)
    client.stub.CreateTask(pb.CreateTaskRequest(task_id="kept", backbone=TINY_TEXT, examples=text_examples()),
                           timeout=60)
    assert client.wait_ready("kept").state == pb.Job.SUCCEEDED
    yield running, client
    client.close()
    running.stop()


def stored(client: Client) -> int:
    return client.stub.GetTask(pb.GetTaskRequest(task_id="kept"), timeout=10).num_examples


@pytest.mark.parametrize("case", ["bytes", "examples", "unknown task"])
def test_an_upload_is_refused_as_soon_as_it_is_over_a_limit_and_nothing_of_it_is_stored(bounded, case) -> None:
    """The server stops reading at the limit instead of holding all of it: the client's 200 messages are
    not all read (gRPC's flow control lets a few run ahead), and the task keeps what it had."""
    running, client = bounded
    before = stored(client)
    label = ["sports", "cooking"]
    if case == "bytes":  # one 100 KB example a message (an image's bytes): 1 MiB after 11
        upload = Upload("kept", 200, lambda i: [pb.Example(input=pb.Input(image=b"\x89" * 100_000), label="sports")])
    elif case == "examples":  # 4 a message: over 40 after 11
        upload = Upload("kept", 200, lambda i: [pb.Example(input=pb.Input(text=f"sentence {i}.{j}"), label=label[j % 2])
                                                for j in range(4)])
    else:
        upload = Upload(unique_id("nobody"), 200, lambda i: [pb.Example(input=pb.Input(text="x" * 10_000), label="a")])
    error = upload_error(client, upload)
    expected = {"bytes": (grpc.StatusCode.RESOURCE_EXHAUSTED, "max_upload_bytes"),
                "examples": (grpc.StatusCode.RESOURCE_EXHAUSTED, "max_examples_per_task"),
                "unknown task": (grpc.StatusCode.NOT_FOUND, "does not exist")}[case]
    assert (error.code(), expected[1] in error.details()) == (expected[0], True), (error.code(), error.details())
    assert upload.sent < 150, upload.sent
    assert stored(client) == before
    if case == "examples":  # within the limits, a stream of the same shape is stored
        small = Upload("kept", 2, lambda i: [pb.Example(input=pb.Input(text=f"kept sentence {i}.{j}"),
                                                        label=label[j % 2]) for j in range(4)])
        answer = client.stub.AddExamples(iter(small), timeout=60)
        assert answer.added == 8 and stored(client) == before + 8
