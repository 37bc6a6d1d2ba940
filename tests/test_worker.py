"""Training outside the serving process: worker processes that die and come back, a serving replica that
trains nothing beside `headserve worker`, and a stopping server that puts its job back in the queue."""

from __future__ import annotations

import os
import signal
import threading
import time

from conftest import TINY_TEXT, TOPICS, Client, make_settings, make_tenant, unique_id

from service.gen import headserve_pb2 as pb
from service.server import build_server
from service.jobs import Worker, worker_name
from service.worker import WORKER_NICE, run_worker


def examples(copies: int = 1) -> list[pb.Example]:
    return [pb.Example(input=pb.Input(text=f"{t} ({i})" if i else t), label=label)
            for label, texts in TOPICS.items() for t in texts for i in range(copies)]


def create(client: Client, task_id: str, copies: int = 1) -> None:
    client.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone=TINY_TEXT, examples=examples(copies),
                                                config=pb.TrainingConfig(strategy=pb.LINEAR)), timeout=60)


def wait_for(condition, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "not in time"
        time.sleep(step)
    return value


def thread_policies(pid: int) -> dict[int, int]:
    """Each live thread of process pid: its scheduling policy."""
    out = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(task)] = os.sched_getscheduler(int(task))
        except ProcessLookupError:  # ended meanwhile
            pass
    return out


def test_training_threads_of_a_server_run_below_its_serving_threads(tmp_path):
    running = build_server(make_settings(tmp_path, with_minilm=False, training_workers=2,
                                         training_isolation="thread"))
    client = Client(running.address)
    try:
        task_id = unique_id("idle")
        create(client, task_id)
        assert client.wait_ready(task_id, timeout=120).state == pb.Job.SUCCEEDED  # training still gets the CPU
        trainers = running.app.runner._threads  # this server's (other tests' servers may be running too)
        assert len(trainers) == 2 and all(t.is_alive() for t in trainers)
        policies = thread_policies(os.getpid())
        assert {policies[t.native_id] for t in trainers} == {os.SCHED_IDLE}
        # The rest of the server's Python threads (gRPC's, the batchers', the change feed's, the main thread)
        # keep the normal policy; only threads that training started (its lease heartbeats) inherit SCHED_IDLE.
        others = {t.name: policies.get(t.native_id) for t in threading.enumerate()
                  if not t.name.startswith(("train-", "lease-")) and t.native_id in policies}
        assert len(others) > 3 and set(others.values()) == {os.SCHED_OTHER}, others
        assert client.stub.Predict(pb.PredictRequest(task_id=task_id, inputs=[pb.Input(text="goal")])).version == 1
    finally:
        client.close()
        running.stop()


def test_a_killed_worker_process_is_replaced_and_its_job_taken_over(tmp_path):
    running = build_server(make_settings(tmp_path, with_minilm=False, auth="api_key", training_workers=1,
                                         training_isolation="process", job_lease_seconds=2))
    tenant = make_tenant(running)
    client = Client(running.address, tenant.api_key)
    store = running.app.store
    try:
        processes = running.app.runner.processes
        wait_for(lambda: processes.alive() == 1, 60)
        task_id = unique_id("killed")
        create(client, task_id, copies=12)
        job = wait_for(lambda: next((j for j in store.unfinished_jobs() if j.owner), None), 120, step=0.002)
        pid = int(job.owner.split(":")[1])
        # Training yields the CPU to serving: the worker process runs at a lower priority than its server, and
        # every thread it runs (the loop, torch's and onnxruntime's pools, the lease heartbeat) is SCHED_IDLE.
        assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + WORKER_NICE)
        policies = thread_policies(pid)
        assert len(policies) > 2 and set(policies.values()) == {os.SCHED_IDLE}, policies
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
        os.kill(pid, signal.SIGKILL)  # the worker process, mid-job
        last = client.wait_ready(task_id, timeout=180)
        assert last.state == pb.Job.SUCCEEDED and last.version == 1
        ended = store.get_job(job.job_id)
        assert ended.attempts == 2  # taken over by the process started in the dead one's place
        assert processes.alive() == 1 and processes.problems() == []
        assert client.stub.Predict(pb.PredictRequest(task_id=task_id, inputs=[pb.Input(text="goal")])).version == 1
    finally:
        client.close()
        running.stop()
    assert processes.alive() == 0  # the worker processes stop with their server


def test_a_serving_replica_without_workers_leaves_training_to_headserve_worker(tmp_path):
    settings = make_settings(tmp_path, with_minilm=False, auth="api_key", training_workers=0,
                             sync_interval_seconds=0.2)
    running = build_server(settings)
    tenant = make_tenant(running)
    client = Client(running.address, tenant.api_key)
    stop = threading.Event()
    worker = None
    try:
        task_id = unique_id("queued")
        create(client, task_id)
        time.sleep(1.0)
        job = running.app.store.get_job(client.stub.GetTask(pb.GetTaskRequest(task_id=task_id)).job_id)
        assert job.state == "QUEUED"  # nobody trains on the serving replica

        ready = threading.Event()
        result: list[int] = []
        worker = threading.Thread(target=lambda: result.append(
            run_worker(settings.model_copy(update={"training_workers": 1}), ready=ready.set, stop=stop)))
        worker.start()
        assert ready.wait(120)
        last = client.wait_ready(task_id, timeout=120)
        assert last.state == pb.Job.SUCCEEDED and last.version == 1
        assert client.stub.Predict(pb.PredictRequest(task_id=task_id, inputs=[pb.Input(text="goal")])).version == 1
        client.stub.TrainTask(pb.TrainTaskRequest(task_id=task_id))
        assert client.wait_ready(task_id, timeout=120).version == 2
        # The serving replica learns of version 2 from the store's change feed.
        wait_for(lambda: client.stub.Predict(pb.PredictRequest(
            task_id=task_id, inputs=[pb.Input(text="goal")])).version == 2, 5)
    finally:
        stop.set()
        if worker is not None:
            worker.join(60)
        client.close()
        running.stop()
    assert result == [0]


def test_a_stopped_worker_puts_its_job_back_in_the_queue_at_its_next_progress_report(tmp_path):
    running = build_server(make_settings(tmp_path, with_minilm=False, auth="api_key", training_workers=0))
    tenant = make_tenant(running)
    client = Client(running.address, tenant.api_key)
    try:
        task_id = unique_id("stopped")
        create(client, task_id)
        app = running.app
        worker = Worker(app.store, app.registry, worker_name(), lease_seconds=30)
        worker.on_progress = worker.stop.set  # stopped (SIGTERM) while it trains
        job = app.store.claim_job(worker.name, 30_000)
        worker.run_job(job)
        back = app.store.get_job(job.job_id)
        assert (back.state, back.owner, back.attempts) == ("QUEUED", "", 1)
        again = Worker(app.store, app.registry, worker_name(1), lease_seconds=30)
        taken = app.store.claim_job(again.name, 30_000)
        assert (taken.job_id, taken.attempts) == (job.job_id, 2)  # claimed again at once, no lease to wait for
        again.run_job(taken)
        assert app.store.get_job(job.job_id).state == "SUCCEEDED"
    finally:
        client.close()
        running.stop()


def test_a_job_that_finished_while_its_head_is_installed_is_not_reported_lost(tmp_path, caplog):
    running = build_server(make_settings(tmp_path, with_minilm=False, auth="api_key", training_workers=0))
    tenant = make_tenant(running)
    client = Client(running.address, tenant.api_key)
    try:
        create(client, unique_id("slow-install"))
        app = running.app
        # A large head takes a while to load after the job is stored; meanwhile the lease falls due.
        worker = Worker(app.store, app.registry, worker_name(), lease_seconds=2,
                        on_success=lambda key, runtime: time.sleep(2.5))
        job = app.store.claim_job(worker.name, 2_000)
        with caplog.at_level("WARNING", logger="service.jobs"):
            worker.run_job(job)
        assert job.state == "SUCCEEDED" and app.store.get_job(job.job_id).state == "SUCCEEDED"
        assert "no longer holds it" not in caplog.text and not worker._lost.is_set()
    finally:
        client.close()
        running.stop()
