"""SIGTERM under load: a real `headserve serve` process with 16 clients calling Predict and training jobs
queued behind one that runs. The calls it had accepted finish OK, calls after shutdown began get UNAVAILABLE
(never INTERNAL or UNKNOWN), the process exits 0 within its grace period, and the jobs it had not finished run
after a restart on the same data directory, each publishing one version."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from conftest import HELD_OUT, TOPICS, Client, text_examples, unique_id

from service.gen import headserve_pb2 as pb
from service.gen import headserve_pb2_grpc as pb_grpc

CLIENTS = 16
GRACE = 5.0  # service.server.Running.stop's grace period
EXIT_SLACK = 3.0  # closing the batchers, the store and the interpreter
INPUTS = [pb.Input(text=t) for texts in HELD_OUT.values() for t in texts][:4]


class Server:
    """`python -m service serve` on port 0 whose log is read all along (a full pipe would block it)."""

    def __init__(self, data_dir) -> None:
        env = {**os.environ, "HEADSERVE_BUILTIN_BACKBONES": '["minilm-l6"]', "HEADSERVE_DEVICE": "cpu",
               "PYTHONUNBUFFERED": "1", "HEADSERVE_AUTO_FINE_TUNE_MIN_EXAMPLES": "0"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--address", "127.0.0.1:0", "--data-dir", str(data_dir),
             "--log-level", "INFO"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        self.log: list[str] = []
        self._port = threading.Event()
        self.address = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._port.wait(180) or not self.address:
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + self.text())

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            match = re.search(r"listening on \S+ \(port (\d+)\)", line)
            if match and not self.address:
                self.address = f"127.0.0.1:{match.group(1)}"
                self._port.set()
        self._port.set()  # exited

    def text(self) -> str:
        return "".join(self.log)

    def terminate(self) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds it took to exit."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(GRACE + EXIT_SLACK + 30)
        took = time.monotonic() - start
        self._reader.join(10)
        return code, took

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def small_examples(seed: int) -> list[pb.Example]:
    """3 labels x 4 sentences, a different cut per seed (tiny: trains in a second or two)."""
    return [pb.Example(input=pb.Input(text=t), label=label)
            for label, texts in TOPICS.items() for t in (texts[seed:] + texts[:seed])[:4]]


def hammer(address: str, task_id: str, stop: threading.Event, calls: list, lock: threading.Lock) -> None:
    """Calls Predict until told to stop, or until the server has refused it three times in a row."""
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.HeadServeStub(channel)
    refused = 0
    deadline = time.monotonic() + 90
    try:
        while not stop.is_set() and refused < 3 and time.monotonic() < deadline:
            start = time.monotonic()
            try:
                stub.Predict(pb.PredictRequest(task_id=task_id, inputs=INPUTS), timeout=30)
                code, detail = grpc.StatusCode.OK, ""
            except grpc.RpcError as exc:
                code, detail = exc.code(), exc.details()
            end = time.monotonic()
            with lock:
                calls.append((start, end, code, detail))
            if code == grpc.StatusCode.UNAVAILABLE:
                refused += 1
                time.sleep(0.05)
            else:
                refused = 0
    finally:
        channel.close()


def watch(client: Client, task_id: str, seen: list) -> None:
    """Watches the task's job until the stream ends; the last item is how it ended (a status code)."""
    try:
        seen.extend(client.stub.WatchJob(pb.WatchJobRequest(task_id=task_id), timeout=60))
        seen.append(grpc.StatusCode.OK)
    except grpc.RpcError as exc:
        seen.append(exc.code())


@pytest.mark.slow
def test_sigterm_under_load_drains_refuses_and_resumes(tmp_path):
    server = Server(tmp_path)
    try:
        client = Client(server.address)
        stub = client.stub
        serving = unique_id("serving")
        stub.CreateTask(pb.CreateTaskRequest(task_id=serving, backbone="minilm-l6", examples=text_examples()))
        assert client.wait_ready(serving).state == pb.Job.SUCCEEDED
        # Tasks with examples and no job yet, trained just before the signal: one fine-tuning job (several
        # seconds) runs when it comes and two wait behind it. Queued jobs may still start while the calls
        # drain; whatever runs at the end of the grace period is left (the server must not wait for it).
        training = [unique_id(f"train{i}") for i in range(3)]
        for i, task_id in enumerate(training):
            stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="minilm-l6"))
            added = stub.AddExamples(iter([pb.AddExamplesRequest(task_id=task_id, examples=small_examples(i))]))
            assert added.added == 12

        calls: list = []
        lock = threading.Lock()
        stop = threading.Event()
        threads = [threading.Thread(target=hammer, args=(server.address, serving, stop, calls, lock), daemon=True)
                   for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(2.0)  # under load
        config = pb.TrainingConfig(strategy=pb.FINE_TUNE, epochs=100, unfreeze_blocks=1)  # one block: seconds
        jobs = {task_id: stub.TrainTask(pb.TrainTaskRequest(task_id=task_id, config=config)) for task_id in training}
        assert all(job.state == pb.Job.QUEUED for job in jobs.values())
        watched: list = []
        watcher = threading.Thread(target=watch, args=(client, training[0], watched), daemon=True)
        watcher.start()
        time.sleep(1.0)
        with lock:
            before = len(calls)
        sigterm = time.monotonic()
        code, took = server.terminate()
        for t in threads:
            t.join(60)
        stop.set()
        watcher.join(30)
        client.close()
        assert not any(t.is_alive() for t in [*threads, watcher])
        log = server.text()

        assert code == 0, log[-3000:]
        assert took < GRACE + EXIT_SLACK, f"exit took {took:.1f}s\n{log[-3000:]}"
        assert before >= CLIENTS, f"only {before} calls before SIGTERM"
        # CANCELLED is right in two cases only. A call still running when the grace period ends is cancelled
        # by grpc (on a loaded machine a Predict queued behind the training job can take that long). A call
        # sent just before the signal that grpc's core had received but not yet handed to the server's
        # threads is cancelled when shutdown begins (the core drops calls no handler has taken): it started
        # within a second of the signal and ended within a second after it. Any other failure is wrong.
        def cancelled_rightly(s: float, e: float) -> bool:
            return e >= sigterm + GRACE - 0.5 or (s > sigterm - 1.0 and e < sigterm + 1.0)

        codes = {c for _, _, c, _ in calls}
        assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, \
            sorted({(c.name, d) for _, _, c, d in calls if c not in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)})
        early = [(round(s - sigterm, 3), round(e - sigterm, 3), d) for s, e, c, d in calls
                 if c == grpc.StatusCode.CANCELLED and not cancelled_rightly(s, e)]
        assert not early, f"calls were cancelled before the grace period ended (start, end after SIGTERM): {early[:5]}"
        # Calls that ended before the signal, and calls that had been running for a while when it came
        # (the server had them): OK. Calls running across the signal that finished OK: the drain happened.
        failed = [(round(s - sigterm, 2), round(e - sigterm, 2), c.name, d) for s, e, c, d in calls
                  if s < sigterm - 1.0 and c != grpc.StatusCode.OK
                  and not (c == grpc.StatusCode.CANCELLED and e >= sigterm + GRACE - 0.5)]
        assert not failed, f"accepted calls failed: {failed[:5]}"
        drained = [1 for s, e, c, _ in calls if s < sigterm < e and c == grpc.StatusCode.OK]
        assert drained, "no call was in flight across the signal"
        unavailable = [s - sigterm for s, _, c, _ in calls if c == grpc.StatusCode.UNAVAILABLE]
        dropped = sum(1 for s, e, c, _ in calls if c == grpc.StatusCode.CANCELLED and e < sigterm + 1.0)
        print(f"exit {took:.2f}s, {len(calls)} calls, {before} before the signal, {len(drained)} drained, "
              f"{dropped} not yet taken and cancelled at shutdown, "
              f"{len(unavailable)} UNAVAILABLE from +{min(unavailable or [0]):.2f}s, last OK ended "
              f"+{max(e for _, e, c, _ in calls if c == grpc.StatusCode.OK) - sigterm:.2f}s")
        # Shutdown began: new calls are refused (UNAVAILABLE), by the stopping server or the closed port;
        # every client saw it, and nothing that started later succeeded.
        assert len(unavailable) >= 3 * CLIENTS
        first_refusal = sigterm + min(unavailable)
        assert all(c == grpc.StatusCode.UNAVAILABLE for s, _, c, _ in calls if s > first_refusal + 0.5)
        assert "Traceback" not in log, log[-5000:]
        # A watcher of the running job sees it finish in the grace period, or is cut off at its end (then it
        # reconnects and watches again); never INTERNAL or UNKNOWN.
        assert isinstance(watched[0], pb.Job) and watched[0].state in (pb.Job.QUEUED, pb.Job.RUNNING), watched[:1]
        assert watched[-1] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) or (
            watched[-1] == grpc.StatusCode.OK and watched[-2].state == pb.Job.SUCCEEDED), watched[-3:]
        print("watcher ended with", watched[-1])
        assert "shutting down" in log
    finally:
        server.kill()

    # The same data directory: the jobs the first process did not finish run now; each publishes one version.
    second = Server(tmp_path)
    try:
        client = Client(second.address)
        resumed = int(re.search(r"(\d+) job\(s\) resumed", second.text()).group(1))
        for task_id, job in jobs.items():
            final = client.wait_ready(task_id, timeout=300)  # (a worker process starts first: its backbones load)
            assert final.job_id == job.job_id and final.state == pb.Job.SUCCEEDED, (final, second.text()[-3000:])
            assert final.version == 1
            task = client.stub.GetTask(pb.GetTaskRequest(task_id=task_id))
            assert task.state == pb.Task.READY and task.version == 1
            assert len(client.stub.Predict(pb.PredictRequest(task_id=task_id, inputs=INPUTS)).predictions) == 4
        # Left for this process: the jobs that had not finished (queued, or running at the end of the grace).
        finished_first = [t for t in training if re.search(rf"task {t} version 1 live", log)]
        assert resumed == len(training) - len(finished_first) >= 1, (resumed, finished_first, second.text()[-3000:])
        client.close()
        code, _ = second.terminate()
        assert code == 0
    finally:
        second.kill()
