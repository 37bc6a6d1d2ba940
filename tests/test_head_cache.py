"""The LRU of loaded heads: its rules on fake heads, then eviction, reload and version swaps through a
real server."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import HELD_OUT, TOPICS, Client, make_settings, make_tenant, text_examples, unique_id

from adapters.errors import NotFound
from service.gen import headserve_pb2 as pb
from service.predictor import HeadCache
from service.server import build_server
from service.store import DEFAULT_TENANT, task_key

TEXTS = [t for texts in HELD_OUT.values() for t in texts]

# --- the cache's rules ------------------------------------------------------------------------------------


class FakeHead:
    def __init__(self, task_id: str, version: int = 1, size: int = 100) -> None:
        self.task_id, self.version, self.memory_bytes, self.backbone = task_id, version, size, "b"


class Loader:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.versions: dict[str, int] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.fail: set[str] = set()

    def __call__(self, task_id: str) -> FakeHead:
        self.calls.append(task_id)
        assert self.gate.wait(10)
        if task_id in self.fail:
            raise NotFound(f"task {task_id!r} does not exist")
        return FakeHead(task_id, self.versions.get(task_id, 1))


def wait_for(condition, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.002)


def cache(budget=300, exists=lambda t: True):
    loader = Loader()
    return HeadCache(loader, budget, exists), loader


def test_least_recently_used_heads_go_first_and_hot_heads_stay():
    c, loader = cache(budget=300)
    for t in "abc":
        c.get(t)
    c.get("a")  # a is hot again
    c.get("d")  # over budget: b, the least recently used, goes
    assert [t for t in "abcd" if t in c] == ["a", "c", "d"]
    assert c.stats.evictions == 1 and c.stats.bytes == 300 and c.stats.heads == 3
    c.get("a")
    assert loader.calls == ["a", "b", "c", "d"]  # a was served from memory both times
    c.get("b")  # reloads, evicting c
    assert [t for t in "abcd" if t in c] == ["a", "b", "d"] and loader.calls[-1] == "b"


def test_a_tenant_cycling_through_more_heads_than_fit_evicts_its_own_first():
    sizes = {"b/1": 10, "b/2": 10, "b/3": 10}  # tenant b: small heads; tenant a: heads of 100
    loaded: list[str] = []

    def load(task_id: str) -> FakeHead:
        loaded.append(task_id)
        return FakeHead(task_id, size=sizes.get(task_id, 100))

    c = HeadCache(load, 330, lambda t: True, lambda t: t.partition("/")[0])
    for t in ("b/1", "b/2", "b/3", "a/1", "a/2", "a/3"):
        c.get(t)
    for cycle in range(3):  # a uses five heads in turn: two more than fit beside b's
        for i in range(1, 6):
            c.get(f"a/{i}")
    assert all(t in c for t in ("b/1", "b/2", "b/3")), c.keys()  # plain LRU would have evicted all three
    assert loaded.count("b/1") == 1
    assert sum(t.startswith("a/") for t in c.keys()) == 3 and c.stats.bytes == 330
    # b grows past a: now b's least recently used heads go first, a keeps what it holds
    sizes.update({f"b/{i}": 60 for i in range(4, 9)})
    for i in range(4, 9):
        c.get(f"b/{i}")
    held = {g: sum(sizes.get(t, 100) for t in c.keys() if t.startswith(g)) for g in ("a/", "b/")}
    assert held["a/"] >= 100 and held["a/"] + held["b/"] <= 330, (held, c.keys())
    assert "b/1" not in c and "b/8" in c
    # a head over the whole budget stays alone, though its tenant is the largest holder
    sizes["c/1"] = 500
    c.get("c/1")
    assert c.keys() == ["c/1"] and c.stats.bytes == 500
    # one tenant alone: least recently used first, as before
    solo = HeadCache(lambda t: FakeHead(t), 300, lambda t: True, lambda t: t.partition("/")[0])
    for t in ("x/a", "x/b", "x/c", "x/a", "x/d"):
        solo.get(t)
    assert solo.keys() == ["x/c", "x/a", "x/d"]


def test_the_latest_head_stays_even_when_it_alone_is_over_budget():
    c, _ = cache(budget=50)
    c.get("a")
    assert "a" in c and len(c) == 1
    c.get("b")
    assert "b" in c and "a" not in c


def test_concurrent_requests_for_a_cold_task_load_it_once():
    c, loader = cache()
    loader.gate.clear()
    got = []
    threads = [threading.Thread(target=lambda: got.append(c.get("a"))) for _ in range(8)]
    for th in threads:
        th.start()
    wait_for(lambda: loader.calls == ["a"])
    time.sleep(0.05)  # let the other threads reach the cache (any that come later find the head loaded)
    loader.gate.set()
    for th in threads:
        th.join(10)
    assert loader.calls == ["a"] and len(got) == 8 and all(h is got[0] for h in got)


def test_a_failed_load_is_reported_and_not_remembered():
    c, loader = cache()
    loader.fail.add("a")
    with pytest.raises(NotFound):
        c.get("a")
    loader.fail.clear()
    assert c.get("a").task_id == "a" and loader.calls == ["a", "a"]


def test_a_task_forgotten_while_loading_is_not_cached():
    c, loader = cache()
    loader.gate.clear()
    th = threading.Thread(target=c.get, args=("a",))
    th.start()
    wait_for(lambda: loader.calls == ["a"])  # the load has started
    c.forget("a")  # deleted meanwhile
    loader.gate.set()
    th.join(10)
    assert "a" not in c


def test_forgetting_one_task_keeps_other_loads_in_flight_and_a_new_load_starts_afresh():
    c, loader = cache()
    loader.gate.clear()
    loads = [threading.Thread(target=c.get, args=(t,)) for t in ("a", "b")]
    for th in loads:
        th.start()
    wait_for(lambda: sorted(loader.calls) == ["a", "b"])
    c.forget("a")  # another replica changed task a: its load in flight is stale, b's is not
    loader.gate.set()
    for th in loads:
        th.join(10)
    assert "a" not in c and "b" in c
    assert c.get("a").task_id == "a" and loader.calls.count("a") == 2 and "a" in c


def test_install_swaps_in_a_newer_version_and_never_an_older_one():
    c, loader = cache()
    assert c.get("a").version == 1
    c.install("a", FakeHead("a", 2))
    assert c.get("a").version == 2
    c.install("a", FakeHead("a", 1))  # a late, older install loses
    assert c.get("a").version == 2
    # A lazy load that read the old version while v3 was installed keeps v3.
    c.forget("b")
    loader.gate.clear()
    th = threading.Thread(target=c.get, args=("b",))
    th.start()
    wait_for(lambda: loader.calls[-1:] == ["b"])  # the load (of version 1) has started
    c.install("b", FakeHead("b", 3))
    loader.gate.set()
    th.join(10)
    assert c.get("b").version == 3


def test_install_for_a_deleted_task_is_ignored():
    c, _ = cache(exists=lambda t: t != "gone")
    c.install("gone", FakeHead("gone", 1))
    assert "gone" not in c


# --- through a real server --------------------------------------------------------------------------------


def all_scores(resp):
    return [[(s.label, s.score) for s in p.top] for p in resp.predictions]


def same_scores(a, b, atol=2e-6):
    assert [[label for label, _ in row] for row in a] == [[label for label, _ in row] for row in b]
    np.testing.assert_allclose(
        [[s for _, s in row] for row in a], [[s for _, s in row] for row in b], atol=atol
    )


def test_eviction_and_reload_keep_serving(tmp_path):
    # A server of its own, whose change feed is read once a minute and whose usage is flushed once an hour:
    # a change to a task seen while its head is loading marks that load stale (Predictor.refresh: the load may
    # have read the version before the change), so it serves the call and is not cached, and the cache would
    # still hold the task before it. That is right for serving and would make this check of the cache's
    # contents flaky (it failed twice in clean-clone runs, on the shared server and on one of its own).
    running = build_server(make_settings(tmp_path / "data", sync_interval_seconds=60, usage_flush_seconds=3600))
    client = Client(running.address)
    try:
        stub = client.stub
        tasks = [unique_id("evict") for _ in range(3)]
        for task_id in tasks:
            stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="minilm-l6", examples=text_examples(),
                                                 config=pb.TrainingConfig(strategy=pb.PROTOTYPE)))
        for task_id in tasks:
            assert client.wait_ready(task_id).state == pb.Job.SUCCEEDED
        req = {t: pb.PredictRequest(task_id=t, inputs=[pb.Input(text=x) for x in TEXTS[:4]]) for t in tasks}
        reference = {t: all_scores(stub.Predict(req[t])) for t in tasks}

        heads = running.app.predictor.heads
        budget, before = heads.budget_bytes, (heads.stats.loads, heads.stats.evictions)
        heads.set_budget(1)  # room for one head: every switch of task evicts and reloads
        try:
            for _ in range(3):
                for t in tasks:
                    same_scores(all_scores(stub.Predict(req[t])), reference[t])
                    assert heads.keys() == [task_key(DEFAULT_TENANT, t)], (t, heads.keys(), heads.stats)
        finally:
            heads.set_budget(budget)
        assert heads.stats.loads - before[0] >= 8 and heads.stats.evictions - before[1] >= 8
    finally:
        client.close()
        running.stop()


def test_one_tenants_heads_cannot_push_another_tenants_out(tmp_path):
    # A server of its own (as above: no change-feed reads during the check), with API keys.
    running = build_server(make_settings(tmp_path / "data", auth="api_key", sync_interval_seconds=60,
                                         usage_flush_seconds=3600))
    a, b = make_tenant(running), make_tenant(running)
    clients = {a: Client(running.address, a.api_key), b: Client(running.address, b.api_key)}
    try:
        def use(tenant, task_id: str) -> None:  # a zero-shot task: READY at once, its head loaded by a Predict
            stub = clients[tenant].stub
            if task_id not in created:
                created.add(task_id)
                assert stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="minilm-l6",
                                                            labels=["sports", "cooking"])).state == pb.Task.READY
            assert stub.Predict(pb.PredictRequest(task_id=task_id, inputs=[pb.Input(text="goal")])).predictions

        created: set[str] = set()
        b_tasks, a_tasks = [unique_id("b") for _ in range(2)], [unique_id("a") for _ in range(6)]
        for task_id in b_tasks:
            use(b, task_id)
        heads = running.app.predictor.heads
        budget = heads.budget_bytes
        heads.set_budget(5 * heads.peek(b.key(b_tasks[0])).memory_bytes)  # B's two heads and three more
        try:
            for _ in range(2):  # A cycles through twice as many heads as fit beside B's
                for task_id in a_tasks:
                    use(a, task_id)
            held = heads.keys()
            assert all(b.key(t) in held for t in b_tasks), held  # plain LRU had evicted both
            assert sum(k.startswith(f"{a.tenant_id}/") for k in held) == 3, held
        finally:
            heads.set_budget(budget)
    finally:
        for c in clients.values():
            c.close()
        running.stop()


def test_version_swap_under_load_never_mixes_versions_inside_a_response(client, text_task):
    stub = client.stub
    task_id = unique_id("swap")
    stub.CreateTask(
        pb.CreateTaskRequest(
            task_id=task_id,
            backbone="minilm-l6",
            examples=text_examples(),
            config=pb.TrainingConfig(strategy=pb.LINEAR),
        )
    )
    assert client.wait_ready(task_id).state == pb.Job.SUCCEEDED
    inputs = [pb.Input(text=t) for t in TEXTS[:6]]
    single = pb.PredictRequest(task_id=task_id, inputs=inputs)
    multi = pb.PredictRequest(task_ids=[text_task, task_id], inputs=inputs)
    reference = {1: all_scores(stub.Predict(single))}

    seen: list[pb.PredictResponse] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def hammer(req):
        try:
            while not stop.is_set():
                resp = stub.Predict(req)
                seen.append(resp.results[1] if resp.results else resp)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(r,)) for r in (single, single, multi)]
    for th in threads:
        th.start()
    try:
        music = {
            "music": [
                "The orchestra played a symphony.",
                "She sang the chorus beautifully.",
                "The guitarist tuned his strings.",
                "The band released a new album.",
            ]
        }
        stub.AddExamples(iter([pb.AddExamplesRequest(task_id=task_id, examples=text_examples(music))]))
        stub.TrainTask(pb.TrainTaskRequest(task_id=task_id))
        assert client.wait_ready(task_id).state == pb.Job.SUCCEEDED
        deadline = time.monotonic() + 60
        while sum(r.version == 2 for r in seen) < 10 and time.monotonic() < deadline and not errors:
            time.sleep(0.01)
    finally:
        stop.set()
        for th in threads:
            th.join(60)
    assert not errors, errors
    reference[2] = all_scores(stub.Predict(single))
    labels = {1: sorted(TOPICS), 2: sorted([*TOPICS, "music"])}
    versions = {r.version for r in seen}
    assert versions == {1, 2}, versions
    for resp in seen:
        assert len(resp.predictions) == len(inputs)
        for p in resp.predictions:
            assert sorted(s.label for s in p.top) == labels[resp.version]
        same_scores(all_scores(resp), reference[resp.version])
