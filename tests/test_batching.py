"""Dynamic batching across tasks: the batcher on its own, then through a real server.

Server tests hold the trunk (a gate in front of the backbone's trunk pass) so that requests queue up
deterministically, then release it; no test asserts on timing.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import re
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from conftest import TINY_TEXT, HELD_OUT, TOPICS, Client, image_examples, make_settings, make_tenant, text_examples, unique_id

from adapters.errors import DeadlineExceeded, ResourceExhausted
from service.batcher import Batcher
from service.gen import headserve_pb2 as pb
from service.predictor import _Lane, _Work
from service.server import build_server

TEXTS = [t for texts in HELD_OUT.values() for t in texts]

# --- the batcher alone ---------------------------------------------------------------------------------


class Recorder:
    """A batch function that records each batch's payloads, optionally held at a gate."""

    def __init__(self, hold: bool = False) -> None:
        self.batches: list[list] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        if not hold:
            self.gate.set()

    def __call__(self, batch) -> None:
        self.entered.set()
        assert self.gate.wait(10)
        self.batches.append([p.payload for p in batch])
        for p in batch:
            p.future.set_result(p.payload)


def wait_for(condition, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.002)


@contextlib.contextmanager
def batcher(run, **kw):
    b = Batcher("test", run, **{"max_size": 4, "max_delay": 0.0, "max_queue": 100, **kw})
    try:
        yield b
    finally:
        b.close()


def plug(b: Batcher, rec: Recorder) -> None:
    """Occupies the worker with a first request held at the recorder's gate."""
    b.submit("plug", 1)
    assert rec.entered.wait(10)


def test_a_lone_request_does_not_wait_for_the_queue_delay():
    rec = Recorder()
    with batcher(rec, max_delay=600.0) as b:  # a 10-minute delay that must not apply to an idle server
        assert b.submit("a", 1).future.result(timeout=30) == "a"
    assert rec.batches == [["a"]]


def test_an_idle_batcher_runs_a_lone_request_on_the_callers_thread_and_a_busy_one_queues_it():
    threads = []

    def run(batch):
        threads.append(threading.current_thread())
        for p in batch:
            p.future.set_result(p.payload)

    with batcher(run, max_delay=600.0) as b:
        with b.arriving() as arrival:
            pending = arrival.submit("alone", 1)
        assert pending.future.done() and threads == [threading.current_thread()]
        assert b.stats.inline == 1

    rec = Recorder(hold=True)
    with batcher(rec) as b:
        plug(b, rec)
        with b.arriving() as arrival:
            queued = arrival.submit("queued", 1)
        assert not queued.future.done()
        rec.gate.set()
        assert queued.future.result(10) == "queued" and b.stats.inline == 0


def test_queued_requests_form_batches_in_order_without_splitting_a_request():
    rec = Recorder(hold=True)
    with batcher(rec, max_size=4) as b:
        plug(b, rec)
        sizes = {"a": 1, "b": 2, "c": 1, "d": 3, "e": 1, "f": 5, "g": 1}
        pending = [b.submit(name, rows) for name, rows in sizes.items()]
        rec.gate.set()
        assert [p.future.result(10) for p in pending] == list(sizes)
    # a+b+c = 4 rows; d+e = 4; f (5 rows) runs alone; g follows.
    assert rec.batches == [["plug"], ["a", "b", "c"], ["d", "e"], ["f"], ["g"]]
    assert b.stats.largest == 5 and b.stats.requests == 8


def test_a_forming_batch_waits_for_requests_being_prepared():
    rec = Recorder()
    with batcher(rec, max_delay=600.0) as b:
        with b.arriving():
            first = b.submit("first", 1)
            with b.arriving():  # a second request is being prepared: the batch waits for it
                time.sleep(0.05)
                second = b.submit("second", 1)
        assert first.future.result(10) == "first" and second.future.result(10) == "second"
    assert rec.batches == [["first", "second"]]


def test_under_steady_load_a_batch_waits_for_the_callers_just_answered():
    """Callers answered together come back together: the next batch waits for them (up to max_delay)
    rather than leaving with whatever is queued, which would make batches alternate large and small."""
    rec = Recorder(hold=True)
    with batcher(rec, max_delay=600.0) as b:
        plug(b, rec)
        first = [b.submit(x, 1) for x in "abc"]  # queued while the plug runs
        rec.gate.set()
        time.sleep(0.05)  # a, b, c wait for the plug's caller, who comes back
        first.append(b.submit("p", 1))
        assert [p.future.result(10) for p in first] == list("abcp")
        second = [b.submit("d", 1)]
        time.sleep(0.05)  # d waits for the three others answered with it
        second += [b.submit(x, 1) for x in "efg"]
        assert [p.future.result(10) for p in second] == list("defg")
    assert rec.batches == [["plug"], ["a", "b", "c", "p"], ["d", "e", "f", "g"]]


def drive(tuner, cost_per_row, batches=400):
    """Runs `batches` batches as large as the tuner allows, each costing cost_per_row(size) per row."""
    sizes = []
    for _ in range(batches):
        rows = tuner.limit()
        tuner.observe(rows, cost_per_row(tuner.bucket(rows)) * rows)
        sizes.append(rows)
    return sizes


def test_the_adaptive_size_limit_settles_on_the_cheapest_batch_per_input():
    from service.batcher import SizeTuner

    cpu = {1: 10.0, 2: 6.0, 4: 5.0, 8: 7.0, 16: 9.0, 32: 12.0}  # padded text on a busy CPU
    tuner = SizeTuner(32, explore_every=16)
    sizes = drive(tuner, cpu.get)
    assert tuner.cap == 4
    assert sizes[-100:].count(4) >= 90 and {2, 8} <= set(sizes[-100:])  # mostly 4, still exploring around it

    gpu = SizeTuner(32)
    drive(gpu, lambda size: 10.0 / size)  # larger batches nearly free
    assert gpu.cap == 32

    odd = SizeTuner(24)  # max_size need not be a power of two
    assert odd.sizes == [1, 2, 4, 8, 16, 24] and odd.bucket(20) == 16 and odd.bucket(24) == 24


def test_a_full_queue_is_resource_exhausted():
    rec = Recorder(hold=True)
    with batcher(rec, max_queue=3) as b:
        plug(b, rec)
        queued = [b.submit("a", 2), b.submit("b", 1)]
        with pytest.raises(ResourceExhausted, match="queue .* is full"):
            b.submit("c", 1)
        with pytest.raises(ResourceExhausted):
            b.check_room(1)
        rec.gate.set()
        assert [p.future.result(10) for p in queued] == ["a", "b"]
        assert b.submit("d", 1).future.result(10) == "d"  # room again
    assert b.stats.rejected == 2


def test_batches_take_requests_round_robin_across_groups():
    """One tenant's flood delays another tenant's request by at most one batch; each group keeps its
    own arrival order."""
    rec = Recorder(hold=True)
    with batcher(rec, max_size=4) as b:
        plug(b, rec)
        flood = [b.submit(f"a{i}", 1, group="A") for i in range(10)]
        late = [b.submit("b0", 1, group="B"), b.submit("b1", 2, group="B"), b.submit("c0", 1, group="C")]
        rec.gate.set()
        for p in flood + late:
            p.future.result(10)
    # Round 1 takes a0, b0, c0; round 2 a1 and then b1 would overflow (1+1+1+1+2 > 4): B waits, A goes on.
    assert rec.batches[1] == ["a0", "b0", "c0", "a1"]
    # The next batch starts with B, served less recently than A.
    assert rec.batches[2] == ["b1", "a2", "a3"]
    assert [x for batch in rec.batches for x in batch if x.startswith("a")] == [f"a{i}" for i in range(10)]


def test_a_flooding_group_whose_request_fills_a_batch_does_not_keep_another_waiting():
    """A's requests each fill the batch limit; B's lone request must run in the very next batch, not
    after every earlier request of A."""
    rec = Recorder(hold=True)
    with batcher(rec, max_size=4) as b:
        plug(b, rec)
        flood = [b.submit(f"a{i}", 4, group="A") for i in range(5)]
        lone = b.submit("b", 1, group="B")
        rec.gate.set()
        for p in [*flood, lone]:
            p.future.result(10)
    # a0 came first; then B, served less recently than A, goes before the rest of A's flood.
    assert rec.batches[1:4] == [["a0"], ["b"], ["a1"]]


def test_a_group_under_its_share_is_admitted_to_a_full_queue():
    rec = Recorder(hold=True)
    with batcher(rec, max_queue=8) as b:
        plug(b, rec)
        flood = [b.submit(f"a{i}", 2, group="A") for i in range(4)]  # A fills the queue
        with pytest.raises(ResourceExhausted):
            b.submit("a-more", 1, group="A")
        # B holds nothing of the queue: its share (8 / 2 groups) is 4 rows.
        fair = [b.submit("b0", 3, group="B"), b.submit("b1", 1, group="B")]
        with pytest.raises(ResourceExhausted):
            b.submit("b2", 1, group="B")
        b.check_room(2, group="C")  # a third group's share: 8 // 3 = 2 rows
        with pytest.raises(ResourceExhausted):
            b.check_room(3, group="C")
        rec.gate.set()
        assert [p.future.result(10) for p in flood + fair] == ["a0", "a1", "a2", "a3", "b0", "b1"]
    assert b.stats.rejected == 3


def test_expired_and_cancelled_requests_leave_their_batch():
    rec = Recorder(hold=True)
    with batcher(rec) as b:
        plug(b, rec)
        expired = b.submit("expired", 1, deadline=time.monotonic() + 0.01)
        cancelled = b.submit("cancelled", 1)
        kept = b.submit("kept", 1)
        assert cancelled.future.cancel()
        time.sleep(0.02)
        rec.gate.set()
        assert kept.future.result(10) == "kept"
        with pytest.raises(DeadlineExceeded, match="deadline passed"):
            expired.future.result(10)
    assert rec.batches[1] == ["kept"]
    assert (b.stats.expired, b.stats.cancelled) == (1, 1)


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on():
    calls = []

    def run(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("boom")
        for p in batch:
            p.future.set_result("ok")

    with batcher(run) as b:
        with pytest.raises(RuntimeError, match="boom"):
            b.submit("x", 1).future.result(10)
        assert b.submit("y", 1).future.result(10) == "ok"


class Gated:
    """A batch function that holds a batch holding a payload in `held` at its own gate until it is opened,
    and records each batch's payloads and thread."""

    def __init__(self, *held: str) -> None:
        self.gates = {name: threading.Event() for name in held}
        self.entered = {name: threading.Event() for name in held}
        self.batches: list[tuple[list, threading.Thread]] = []

    def __call__(self, batch) -> None:
        for p in batch:
            if p.payload in self.gates:
                self.entered[p.payload].set()
                assert self.gates[p.payload].wait(10)
        self.batches.append(([p.payload for p in batch], threading.current_thread()))
        for p in batch:
            p.future.set_result(p.payload)


def arrive(b: Batcher, payload: str, group: str):
    """A request as an RPC thread brings it: prepared, then submitted (and run here, if it may)."""
    with b.arriving() as arrival:
        return arrival.submit(payload, 1, group=group)


def test_a_group_with_nothing_in_the_running_batch_runs_beside_it_at_once():
    run = Gated("a0", "b0")
    with batcher(run, fair_lane=True) as b:
        flood = b.submit("a0", 2, group="A")
        assert run.entered["a0"].wait(10)  # A's batch runs (held)
        more = arrive(b, "a1", "A")  # A is in the running batch: its next request waits for it
        lone = arrive(b, "b0", "B")
        assert run.entered["b0"].wait(10)  # B did not wait for A's batch: it runs beside it (held too)
        late = arrive(b, "c0", "C")  # one fair-lane batch at a time: C queues
        time.sleep(0.05)
        assert not late.future.done() and not more.future.done() and b.stats.fair == 1
        run.gates["b0"].set()
        # C's request runs next, still beside A's batch; A's own requests wait for A's batch.
        assert lone.future.result(10) == "b0" and late.future.result(10) == "c0" and not more.future.done()
        assert [batch for batch, _ in run.batches] == [["b0"], ["c0"]] and b.stats.fair == 2
        assert {thread.name for _, thread in run.batches} == {"fair-test"}  # not the callers' threads
        run.gates["a0"].set()
        assert flood.future.result(10) == "a0" and more.future.result(10) == "a1"
    assert [batch for batch, _ in run.batches][2:] == [["a0"], ["a1"]]


def test_without_the_fair_lane_or_between_requests_of_one_group_everything_waits_for_the_running_batch():
    for fair_lane, groups in ((False, ("A", "B")), (True, ("", ""))):
        run = Gated("first")
        with batcher(run, fair_lane=fair_lane) as b:
            first = b.submit("first", 1, group=groups[0])
            assert run.entered["first"].wait(10)
            other = arrive(b, "other", groups[1])
            time.sleep(0.05)
            assert not other.future.done() and b.stats.fair == 0
            run.gates["first"].set()
            assert first.future.result(10) == "first" and other.future.result(10) == "other"
        assert [batch for batch, _ in run.batches] == [["first"], ["other"]]


def test_a_tenants_predict_is_not_held_behind_another_tenants_running_batch(tmp_path):
    """Through a server with API keys: while tenant A's batch is held in the trunk, tenant B's Predict is
    answered, with the scores it gets alone; A's next request waits for A's batch, as before."""
    running = build_server(make_settings(tmp_path, with_minilm=False, auth="api_key", metrics_address="127.0.0.1:0"))
    tenants = [make_tenant(running) for _ in range(2)]
    clients = [Client(running.address, t.api_key) for t in tenants]
    pool = concurrent.futures.ThreadPoolExecutor(4)
    try:
        task_id = unique_id("fair")
        for c in clients:
            c.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone=TINY_TEXT, examples=text_examples(),
                                                   config=pb.TrainingConfig(strategy=pb.LINEAR)))
            assert c.wait_ready(task_id).state == pb.Job.SUCCEEDED
        a, b = (c.stub for c in clients)
        alone = [scores(p) for p in b.Predict(request(task_id, TEXTS[:3])).predictions]
        lane = running.app.predictor.lane(TINY_TEXT)
        trunk = lane.entry.trunk
        gate, entered, calls = threading.Event(), threading.Event(), []
        original = trunk.outputs

        def outputs(batch, names):  # holds the first trunk pass only
            calls.append(threading.current_thread().name)
            if len(calls) == 1:
                entered.set()
                assert gate.wait(60)
            return original(batch, names)

        trunk.outputs = outputs
        try:
            held = pool.submit(a.Predict, request(task_id, TEXTS[3:5]), timeout=60)
            assert entered.wait(30)
            queued = pool.submit(a.Predict, request(task_id, TEXTS[5:6]), timeout=60)
            answered = b.Predict(request(task_id, TEXTS[:3]), timeout=30)  # while A's batch is held
            assert len(answered.predictions) == len(alone)
            for got, want in zip((scores(p) for p in answered.predictions), alone):
                assert got == pytest.approx(want, abs=1e-5)
            assert not held.done() and not queued.done() and lane.batcher.stats.fair >= 1
        finally:
            gate.set()
            del trunk.outputs
        assert len(held.result(30).predictions) == 2 and len(queued.result(30).predictions) == 1
        # Operators see it: the fair lane's batches are counted per backbone.
        with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        counted = re.search(rf'^headserve_batch_fair_lane_total{{backbone="{TINY_TEXT}"}} (\S+)$', text, re.M)
        assert counted and float(counted.group(1)) == lane.batcher.stats.fair >= 1
    finally:
        pool.shutdown()
        for c in clients:
            c.close()
        running.stop()


@pytest.mark.parametrize("modality", ["text", "image"])
def test_tenants_predicting_at_once_each_get_their_own_answers(tmp_path, modality):
    """Four tenants, each with its own task, call Predict from 16 threads at once with 1-5 inputs, some with
    deadlines too short to meet and some cancelled: the fair lane runs batches beside the main one, and every
    answer is the one the same request gets alone (its own task's scores, its inputs' order). Images are
    collated into reused buffers, text is tokenised per batch: both paths run on two threads at once."""
    running = build_server(make_settings(tmp_path, with_minilm=False, auth="api_key"))
    tenants = [make_tenant(running) for _ in range(4)]
    clients = [Client(running.address, t.api_key) for t in tenants]
    if modality == "text":
        backbone = TINY_TEXT
        texts = [pb.Input(text=t) for ts in HELD_OUT.values() for t in ts]
        examples = [text_examples(t) for t in (dict(list(TOPICS.items())[:2]), dict(list(TOPICS.items())[1:]),
                                               TOPICS, {"a": TOPICS["sports"], "b": TOPICS["cooking"]})]
    else:
        backbone = "mobilenet_v3_small"
        pool = image_examples(6)
        texts = [ex.input for ex in pool[1::2]]
        examples = [pool[k::2] for k in range(2)] * 2
        examples[2] = [pb.Example(input=ex.input, label=ex.label + "-x") for ex in pool[::3]]
    try:
        task_id = unique_id("crowd")
        for c, ex in zip(clients, examples):  # one task id, four tenants: different heads
            c.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone=backbone, examples=ex,
                                                   config=pb.TrainingConfig(strategy=pb.LINEAR)))
            assert c.wait_ready(task_id).state == pb.Job.SUCCEEDED
        alone = {(i, j): scores(c.stub.Predict(pb.PredictRequest(task_id=task_id, inputs=[x])).predictions[0])
                 for i, c in enumerate(clients) for j, x in enumerate(texts)}
        stats = running.app.predictor.lane(backbone).batcher.stats
        fair_before = stats.fair
        problems: list = []
        stop = time.monotonic() + 3.0

        def caller(k: int) -> int:
            rng = np.random.default_rng(k)
            i = k % 4
            stub = clients[i].stub
            calls = 0
            while time.monotonic() < stop:
                picked = [int(j) for j in rng.choice(len(texts), size=int(rng.integers(1, 6)))]
                call = pb.PredictRequest(task_id=task_id, inputs=[texts[j] for j in picked])
                kind = rng.random()
                try:
                    if kind < 0.1:  # a deadline too short to meet
                        stub.Predict(call, timeout=0.0005)
                    elif kind < 0.2:  # abandoned by its caller
                        stub.Predict.future(call, timeout=30).cancel()
                    else:
                        got = stub.Predict(call, timeout=30).predictions
                        if [scores(p) for p in got] != [pytest.approx(alone[(i, j)], abs=1e-5) for j in picked]:
                            problems.append((i, picked))
                except grpc.RpcError as exc:
                    if exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                        problems.append((i, exc.code(), exc.details()))
                calls += 1
            return calls

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            calls = sum(pool.map(caller, range(16)))
        assert not problems, problems[:5]
        assert calls > 50 and stats.fair > fair_before  # the fair lane ran
        # Still serving, each tenant its own head.
        for i, c in enumerate(clients):
            first = c.stub.Predict(pb.PredictRequest(task_id=task_id, inputs=texts[:1])).predictions[0]
            assert scores(first) == pytest.approx(alone[(i, 0)], abs=1e-5)
    finally:
        for c in clients:
            c.close()
        running.stop()


# --- routing rows to heads, exactly ----------------------------------------------------------------------


class RowwiseTrunk:
    """A deterministic stand-in trunk whose rows do not depend on the rest of the batch."""

    input_names = ("input_ids", "attention_mask")

    def outputs(self, batch, names):
        ids = batch["input_ids"].astype(np.float32) * batch["attention_mask"]
        features = np.stack([np.sin(ids.sum(1) * (k + 1) / 997.0) for k in range(8)], axis=1).astype(
            np.float32
        )
        return {"features": features}


class RowwiseHead:
    def __init__(self, version: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.w = rng.normal(size=(8, 3)).astype(np.float32)
        self.version, self.labels, self.inputs = version, ["a", "b", "c"], ["features"]
        self.reject_threshold = 0.0

    def run(self, feeds):
        z = (feeds["features"][:, :, None] * self.w[None]).sum(1)  # no BLAS: the same sums for any batch
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


class FakeEntry:
    class spec:
        name = "fake"

    class backbone:
        class preprocess:
            modality = "image"  # preprocessed per request, then padded and stacked by the batch (collate)
            tokenizer = None

    trunk = RowwiseTrunk()


def test_mixed_task_batch_routes_every_row_to_its_head_exactly():
    """Rows of several requests (ragged lengths, several tasks, a multi-task request) in one batch get
    exactly the scores each request gets alone."""
    from service.config import Settings

    lane = _Lane(FakeEntry(), Settings(batch_max_size=64))
    try:
        heads = {name: RowwiseHead(1, seed) for seed, name in enumerate("xyz")}
        rng = np.random.default_rng(1)

        def work(task_ids, n, length):
            ids = rng.integers(1, 500, size=(n, length))
            return _Work(
                list(task_ids),
                [heads[t] for t in task_ids],
                {"input_ids": ids, "attention_mask": np.ones_like(ids)},
                n,
            )

        works = [work("x", 1, 5), work("y", 3, 9), work("x", 2, 3), work("zx", 2, 7), work("z", 1, 4)]

        class P:
            def __init__(self, w):
                from concurrent.futures import Future

                self.payload, self.future = w, Future()

        together = [P(w) for w in works]
        lane.run(together)
        for w, p in zip(works, together):
            alone = P(w)
            lane.run([alone])
            for a, b in zip(p.future.result(), alone.future.result()):
                assert (a.task_id, a.version) == (b.task_id, b.version)
                np.testing.assert_array_equal(a.probabilities, b.probabilities)
    finally:
        lane.batcher.close()


# --- through a real server --------------------------------------------------------------------------------


@contextlib.contextmanager
def held_trunk(server, backbone="minilm-l6"):
    """Holds the backbone's trunk pass at a gate; yields (batcher, gate, entered). Batches may hold up to
    batch_max_size meanwhile (the adaptive size limit is set aside, so what queued forms one batch)."""
    lane = server.app.predictor.lane(backbone)
    trunk = lane.entry.trunk
    gate, entered = threading.Event(), threading.Event()
    original = trunk.outputs
    tuner, lane.batcher.tuner = lane.batcher.tuner, None

    def outputs(batch, names):
        entered.set()
        assert gate.wait(60)
        return original(batch, names)

    trunk.outputs = outputs
    try:
        yield lane.batcher, gate, entered
    finally:
        gate.set()
        del trunk.outputs
        lane.batcher.tuner = tuner


def request(task, texts, **kw):
    if isinstance(task, (list, tuple)):
        return pb.PredictRequest(task_ids=list(task), inputs=[pb.Input(text=t) for t in texts], **kw)
    return pb.PredictRequest(task_id=task, inputs=[pb.Input(text=t) for t in texts], **kw)


def scores(prediction):
    return {s.label: s.score for s in prediction.top}


@pytest.fixture(scope="module")
def three_tasks(client, text_task):
    """Three READY text tasks on minilm-l6 with different label sets and heads."""
    other = {"food": TOPICS["cooking"], "other": TOPICS["sports"] + TOPICS["computing"]}
    ids = [unique_id("food"), unique_id("proto")]
    client.stub.CreateTask(
        pb.CreateTaskRequest(
            task_id=ids[0],
            backbone="minilm-l6",
            examples=text_examples(other),
            config=pb.TrainingConfig(strategy=pb.LINEAR),
        )
    )
    client.stub.CreateTask(
        pb.CreateTaskRequest(
            task_id=ids[1],
            backbone="minilm-l6",
            examples=text_examples(),
            config=pb.TrainingConfig(strategy=pb.PROTOTYPE),
        )
    )
    for task_id in ids:
        assert client.wait_ready(task_id).state == pb.Job.SUCCEEDED
    return [text_task, *ids]


def test_mixed_task_batch_gives_the_scores_of_one_by_one_calls(server, stub, three_tasks):
    a, b, c = three_tasks
    calls = [
        request(a, TEXTS[0:1]),
        request(b, TEXTS[1:4]),
        request(c, TEXTS[4:5]),
        request(a, TEXTS[5:7]),
        request([b, c, a], TEXTS[7:9]),
        request(c, ["short"]),
        request(b, [TEXTS[9] + " " + TEXTS[10]]),
    ]
    alone = [stub.Predict(r) for r in calls]
    with held_trunk(server) as (batcher, gate, entered):
        plug = stub.Predict.future(request(a, ["plug"]))
        assert entered.wait(30)
        batcher.reset_stats()
        futures = [stub.Predict.future(r) for r in calls]
        rows = sum(len(r.inputs) for r in calls)
        wait_for(lambda: batcher.queued_rows == rows)
        gate.set()
        together = [f.result(timeout=60) for f in futures]
        plug.result(timeout=60)
    stats = batcher.reset_stats()
    assert (stats.batches, stats.rows, stats.largest) == (1, rows, rows)  # one trunk pass for all of them
    for x, y in zip(alone, together):
        pairs = (
            [(p, q) for r, s in zip(x.results, y.results) for p, q in zip(r.predictions, s.predictions)]
            if x.results
            else list(zip(x.predictions, y.predictions))
        )
        assert [(r.task_id, r.version) for r in x.results] == [(r.task_id, r.version) for r in y.results]
        assert (x.task_id, x.version) == (y.task_id, y.version)
        for p, q in pairs:
            assert p.label == q.label and [s.label for s in p.top] == [s.label for s in q.top]
            # Float32 sums over a longer padded batch round differently in the last bit; nothing more.
            np.testing.assert_allclose([s.score for s in p.top], [s.score for s in q.top], rtol=0, atol=2e-6)


def test_multi_task_predict_runs_the_trunk_once_for_all_heads(server, stub, three_tasks):
    batcher = server.app.predictor.lane("minilm-l6").batcher
    texts = TEXTS[:3]
    batcher.reset_stats()
    multi = stub.Predict(request(three_tasks, texts, request_id="m1", top_k=2))
    stats = batcher.reset_stats()
    assert (stats.batches, stats.rows) == (1, len(texts))
    assert multi.request_id == "m1" and not multi.predictions and not multi.task_id
    assert [r.task_id for r in multi.results] == three_tasks
    for result in multi.results:
        single = stub.Predict(request(result.task_id, texts, top_k=2))
        assert result.version == single.version and len(result.predictions) == len(texts)
        for p, q in zip(result.predictions, single.predictions):
            assert p.label == q.label and len(p.top) == 2
            np.testing.assert_allclose(list(scores(p).values()), list(scores(q).values()), atol=2e-6)


def test_multi_task_predict_rejects_bad_task_lists(stub, three_tasks, image_task):
    def expect(req, *fragments):
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        for fragment in fragments:
            assert fragment in err.value.details()

    a = three_tasks[0]
    expect(request([a, image_task], ["x"]), "different backbones")
    expect(request([a, a], ["x"]), "more than once")
    both = request([a], ["x"])
    both.task_id = a
    expect(both, "not both")
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(request([a, unique_id("missing")], ["x"]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_full_queue_is_resource_exhausted_and_the_queued_requests_complete(server, stub, text_task):
    with held_trunk(server) as (batcher, gate, entered):
        limit = batcher.max_queue
        batcher.max_queue = 3
        try:
            plug = stub.Predict.future(request(text_task, ["plug"]))
            assert entered.wait(30)
            queued = [
                stub.Predict.future(request(text_task, TEXTS[:2])),
                stub.Predict.future(request(text_task, TEXTS[2:3])),
            ]
            wait_for(lambda: batcher.queued_rows == 3)
            with pytest.raises(grpc.RpcError) as err:
                stub.Predict(request(text_task, TEXTS[3:4]))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue" in err.value.details() and "retry" in err.value.details()
        finally:
            batcher.max_queue = limit
        gate.set()
        assert [len(f.result(timeout=60).predictions) for f in queued] == [2, 1]
        plug.result(timeout=60)


def test_a_deadline_exceeded_request_is_dropped_from_its_batch(server, stub, text_task):
    with held_trunk(server) as (batcher, gate, entered):
        plug = stub.Predict.future(request(text_task, ["plug"]))
        assert entered.wait(30)
        batcher.reset_stats()
        late = stub.Predict.future(request(text_task, TEXTS[:3]), timeout=0.5)
        kept = stub.Predict.future(request(text_task, TEXTS[3:4]))
        wait_for(lambda: batcher.queued_rows == 4)
        with pytest.raises(grpc.RpcError) as err:
            late.result(timeout=60)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.set()
        assert len(kept.result(timeout=60).predictions) == 1
        plug.result(timeout=60)
    stats = batcher.reset_stats()
    assert (
        stats.rows == 1 and stats.expired + stats.cancelled == 1
    )  # the late request never reached the trunk


def test_a_cancelled_request_leaves_its_batch(server, stub, text_task):
    with held_trunk(server) as (batcher, gate, entered):
        plug = stub.Predict.future(request(text_task, ["plug"]))
        assert entered.wait(30)
        batcher.reset_stats()
        gone = stub.Predict.future(request(text_task, TEXTS[:2]))
        kept = stub.Predict.future(request(text_task, TEXTS[2:3]))
        wait_for(lambda: batcher.queued_rows == 3)
        gone.cancel()
        wait_for(lambda: any(p.future.cancelled() for p in list(batcher._queue)))  # the server learnt of it
        gate.set()
        assert len(kept.result(timeout=60).predictions) == 1
        plug.result(timeout=60)
    stats = batcher.reset_stats()
    assert stats.cancelled == 1 and stats.rows == 1


def test_predict_stream_reads_ahead_and_answers_in_order(stub, three_tasks):
    requests = [request(three_tasks[i % 3], TEXTS[i : i + 1 + i % 2], request_id=f"r{i}") for i in range(12)]
    responses = list(stub.PredictStream(iter(requests)))
    assert [r.request_id for r in responses] == [f"r{i}" for i in range(12)]
    for req, resp in zip(requests, responses):
        single = stub.Predict(req)
        assert resp.task_id == req.task_id and [p.label for p in resp.predictions] == [
            p.label for p in single.predictions
        ]


def test_predict_stream_error_comes_after_the_earlier_answers(stub, text_task):
    requests = [
        request(text_task, ["a pie"], request_id="ok"),
        request(unique_id("missing"), ["x"], request_id="bad"),
        request(text_task, ["a goal"], request_id="never"),
    ]
    call = stub.PredictStream(iter(requests))
    assert next(call).request_id == "ok"
    with pytest.raises(grpc.RpcError) as err:
        next(call)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_image_requests_are_batched_across_tasks(server, stub, image_task, client):
    other = unique_id("img")
    stub.CreateTask(
        pb.CreateTaskRequest(
            task_id=other,
            backbone="mobilenet_v3_small",
            examples=image_examples(3),
            config=pb.TrainingConfig(strategy=pb.PROTOTYPE),
        )
    )
    assert client.wait_ready(other).state == pb.Job.SUCCEEDED
    inputs = [ex.input for ex in image_examples(2)]
    calls = [
        pb.PredictRequest(task_id=t, inputs=inputs[i : i + 2])
        for i, t in enumerate([image_task, other, image_task])
    ]
    alone = [stub.Predict(r) for r in calls]
    with held_trunk(server, "mobilenet_v3_small") as (batcher, gate, entered):
        plug = stub.Predict.future(pb.PredictRequest(task_id=other, inputs=inputs[:1]))
        assert entered.wait(30)
        batcher.reset_stats()
        futures = [stub.Predict.future(r) for r in calls]
        wait_for(lambda: batcher.queued_rows == 6)
        gate.set()
        together = [f.result(timeout=60) for f in futures]
        plug.result(timeout=60)
    assert batcher.reset_stats().batches == 1
    for x, y in zip(alone, together):
        for p, q in zip(x.predictions, y.predictions):
            assert p.label == q.label
            np.testing.assert_allclose([s.score for s in p.top], [s.score for s in q.top], atol=2e-6)


# --- the GPU-side session plumbing, checked on the CPU ---------------------------------------------------


def test_io_binding_path_gives_the_outputs_of_run():
    """TrunkRuntime binds outputs to host memory on a GPU; the same code path runs on the CPU here."""
    from adapters.heads import DenseHead
    from adapters.onnx_utils import create_session
    from adapters.runtime import TrunkRuntime

    rng = np.random.default_rng(0)
    model = DenseHead(
        "linear", [(rng.normal(size=(3, 8)).astype(np.float32), np.zeros(3, np.float32))]
    ).to_onnx()
    trunk = object.__new__(TrunkRuntime)
    trunk.session = create_session(model, threads=1)
    x = rng.normal(size=(5, 8)).astype(np.float32)
    trunk.io_binding = False
    plain = trunk._run_on(trunk.session, ["probabilities"], {"features": x})[0]
    trunk.io_binding = True
    bound = trunk._run_on(trunk.session, ["probabilities"], {"features": x})[0]
    np.testing.assert_array_equal(plain, bound)


def test_graph_replay_buffers_pad_and_clear_rows_and_fall_back_when_busy_or_too_large():
    """CudaGraphs' buffers, bindings, padding and checks, on the CPU provider (no capture there): each batch
    size runs in the bucket above it, a smaller batch after a larger one sees none of its rows, a batch past
    the largest bucket or one that finds the graphs busy runs plain (None), and a plain session that
    disagrees with the graph session stops the capture."""
    from adapters.heads import DenseHead
    from adapters.onnx_utils import create_session
    from adapters.runtime import GRAPH_BATCHES, CudaGraphs

    rng = np.random.default_rng(0)

    def model(seed: int) -> bytes:
        r = np.random.default_rng(seed)
        layers = [(r.normal(size=(6, 8)).astype(np.float32), np.zeros(6, np.float32)),
                  (r.normal(size=(3, 6)).astype(np.float32), np.zeros(3, np.float32))]
        return DenseHead("mlp", layers).to_onnx()

    plain = create_session(model(1), threads=1)
    sample = {"features": np.zeros((2, 8), np.float32)}
    graphs = CudaGraphs(model(1), "cpu", plain, sample, atol=1e-5, threads=1)
    assert graphs.captured() == list(GRAPH_BATCHES)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    for rows in (1, 3, 1, 8, 2, 9, 33, 3, 32):
        got = graphs.run(["probabilities"], {"features": x[:rows]})
        if rows > GRAPH_BATCHES[-1]:
            assert got is None
            continue
        want = plain.run(["probabilities"], {"features": x[:rows]})[0]
        assert got[0].shape == want.shape
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)
        bucket = graphs._graphs[next(b for b in GRAPH_BATCHES if b >= rows)]
        assert not bucket.host["features"][rows:].any()  # padding is zero, whatever ran before
    with graphs._lock:  # another batch is replaying: this one runs plain
        assert graphs.run(["probabilities"], {"features": x[:2]}) is None
    with pytest.raises(RuntimeError, match="no batch size could be captured"):
        CudaGraphs(model(2), "cpu", plain, sample, atol=1e-5, threads=1)


def test_gpu_providers_put_tensorrt_then_cuda_first_and_keep_the_cpu(tmp_path, monkeypatch):
    import onnxruntime as ort

    from adapters import onnx_utils

    monkeypatch.setattr(
        ort,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    names = [
        p[0] if isinstance(p, tuple) else p for p in onnx_utils.providers_for("cuda:1", tmp_path / "trt")
    ]
    assert names == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_utils.providers_for("cuda", None)[0][0] == "CUDAExecutionProvider"
    assert onnx_utils.providers_for("cpu", tmp_path) == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert onnx_utils.providers_for("cuda", tmp_path) == ["CPUExecutionProvider"]


# --- length-aware passes for text --------------------------------------------------------------------------


def test_length_passes_sort_by_length_and_cut_at_the_token_budget():
    from service.predictor import length_passes

    lengths = np.array([10, 150, 12, 11, 150, 40, 10, 600, 30, 25])
    passes = length_passes(lengths, 128)
    assert sorted(int(i) for p in passes for i in p) == list(range(len(lengths)))  # every row, once
    for p in passes:
        assert len(p) == 1 or len(p) * lengths[p].max() <= 128  # a longer row than the budget runs alone
        assert lengths[p].max() <= 2 * lengths[p].min()
    assert [list(p) for p in passes] == [[0, 6, 3, 2], [9, 8, 5], [1], [4], [7]]
    assert [list(p) for p in length_passes(np.array([7, 7, 7]), 1000)] == [[0, 1, 2]]


LONG = (
    "The central bank raised interest rates for the third time this year on Tuesday, citing stubborn inflation "
    "in services and a labour market that has barely cooled, while officials signalled that further increases "
    "were possible if wage growth failed to slow in the coming months and energy prices stayed high through "
    "the winter, a decision that sent the currency to a two-year high against the dollar and weighed on shares "
    "of house builders and retailers across the continent."
)


def test_length_aware_passes_give_the_outputs_of_one_padded_pass(server):
    """Every trunk output, pooled and per token (what tuned heads read), is what one pass padded to the
    longest input gives, for a batch of short and long texts in several passes."""
    from adapters.backbones import TRUNK_OUTPUTS

    lane = server.app.predictor.lane("minilm-l6")
    texts = [TEXTS[0], LONG, "short", TEXTS[3], LONG[:200], TEXTS[5]] * 4
    inputs = lane.entry.backbone.preprocess(texts)
    names = [*TRUNK_OUTPUTS, "attention_mask"]
    one = lane.entry.trunk.outputs(inputs, names)
    calls = []
    original = lane.entry.trunk.outputs

    def counted(batch, wanted):
        calls.append(batch["input_ids"].shape)
        return original(batch, wanted)

    lane.entry.trunk.outputs = counted
    try:
        passes = lane.by_length(inputs, names)
    finally:
        del lane.entry.trunk.outputs
    assert len(calls) > 1 and min(shape[1] for shape in calls) < inputs["input_ids"].shape[1]
    mask = inputs["attention_mask"].astype(bool)
    for name in names:
        assert passes[name].shape == one[name].shape, name
        if passes[name].ndim > 2:  # per-token outputs: equal on tokens, padding is masked out
            np.testing.assert_allclose(passes[name][mask], one[name][mask], rtol=0, atol=2e-4, err_msg=name)
        else:
            np.testing.assert_allclose(passes[name], one[name], rtol=0, atol=2e-5, err_msg=name)


def test_length_aware_batch_answers_each_request_in_order_with_its_alone_scores(server, stub, three_tasks):
    a, b, c = three_tasks
    mixed = [LONG, "short", TEXTS[2], LONG[:150], TEXTS[6], "a", LONG[:300], TEXTS[11]]
    calls = [
        request(a, mixed[0:3]),
        request(b, mixed[3:4]),
        request([c, a], mixed[4:8]),
        request(c, [mixed[5], mixed[0], mixed[5]]),
        request(b, list(reversed(mixed))),
    ]
    alone = [stub.Predict(r) for r in calls]
    with held_trunk(server) as (batcher, gate, entered):
        plug = stub.Predict.future(request(a, ["plug"]))
        assert entered.wait(30)
        batcher.reset_stats()
        futures = [stub.Predict.future(r) for r in calls]
        rows = sum(len(r.inputs) for r in calls)
        wait_for(lambda: batcher.queued_rows == rows)
        gate.set()
        together = [f.result(timeout=60) for f in futures]
        plug.result(timeout=60)
    assert batcher.reset_stats().batches == 1
    for x, y in zip(alone, together):
        xs = [p for r in x.results for p in r.predictions] or list(x.predictions)
        ys = [p for r in y.results for p in r.predictions] or list(y.predictions)
        assert len(xs) == len(ys)
        for p, q in zip(xs, ys):  # in the request's order
            assert p.label == q.label
            np.testing.assert_allclose([s.score for s in p.top], [s.score for s in q.top], rtol=0, atol=2e-6)
