"""Soak: a real `headserve serve` process under a steady mixed load for --minutes (default 20), watched for
errors and for anything that grows.

The server runs as its own process with `auth = "api_key"` on a fresh data directory (the tenant is made with
`headserve tenants create soak --data-dir DIR --json` before it starts), text backbone `minilm-l6`. --clients
(16) client threads, each on its own channel (connection), run a weighted mix over --tasks (200) task slots:

- Predict (1-8 new sentences) and PredictStream (2-4 requests, each on a random task) on trained tasks;
- ExportTask (HEAD_ONNX), checking that the chunks add up to total_size and hash to the sha256 announced;
- GetTask and ListTasks (every page);
- churn: DeleteTask a slot's task, CreateTask a new one, AddExamples (two messages, 9-12 tiny examples over 3
  labels), TrainTask, WatchJob until it ends; the slot keeps serving its new task (~200 tasks stay live);
- retrain: AddExamples (1-3 more) to a slot's task and TrainTask again (a new version, the old one serves).

Mutations are paced (--churn-per-minute, --retrain-per-minute), so training keeps up. A slot is mutated by
one client at a time; any client may read it. Expected answers: OK, and NOT_FOUND or FAILED_PRECONDITION only
for a call that raced a churn of its task (the slot changed between picking the task and the answer). Every
other code, a job that does not SUCCEED, a short answer or an export that does not check out is an
unexpected error, recorded with its time, method, code and message.

Every --sample-seconds (10) it records the server's RSS (psutil when installed, else /proc/PID/status VmRSS),
open file descriptors (/proc/PID/fd), threads (/proc/PID/status Threads), the SQLite WAL's size and
salt-1 (DATA_DIR/headserve.sqlite3-wal: the number in its header that goes up by one each time a checkpoint
restarts the log), the database's size, the load average and the calls of the window. After the
load it stops the server with SIGTERM and records the exit code and time; the server's log is scanned for
ERROR lines and tracebacks.

Targets (after a warm-up, --warmup-fraction of the run, at least until the 200 tasks are trained): 0
unexpected errors; RSS growth < 5% (the median of the last 3 samples over that of the first 3 after warm-up);
open fds and threads flat (the maximum of the last third of the samples after warm-up at most --fd-slack /
--thread-slack above the maximum of the first third); the WAL bounded (checkpoints happen, and its size after
warm-up stays under --wal-limit-mb).

Writes bench/results/soak.json (--out) and prints a table (rich).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import os
import pathlib
import platform
import random
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc

from service.client import open_channel
from service.gen import headserve_pb2 as pb
from service.gen import headserve_pb2_grpc as pb_grpc

OK = grpc.StatusCode.OK
RACE_CODES = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}
CALL_TIMEOUT = 60.0
JOB_TIMEOUT = 300.0

# Tiny text tasks: three topics, sentences made of each topic's words plus a number, so examples and inputs
# are (almost always) new: features are computed, blobs stored, and deleted again with their tasks.
WORDS = {
    "sports": (["the striker", "our keeper", "the coach", "the referee", "the sprinter", "the captain"],
               ["scored", "saved", "won", "lost", "trained for", "was sent off in"],
               ["the final", "the derby", "extra time", "the relay", "the second half", "the league match"]),
    "cooking": (["the chef", "my aunt", "the baker", "our cook", "the recipe", "the kitchen"],
                ["simmered", "baked", "roasted", "seasoned", "whisked", "chopped"],
                ["the tomato sauce", "the bread", "the onions", "the soup", "the eggs", "the dough"]),
    "computing": (["the server", "the compiler", "my laptop", "the database", "the script", "the network"],
                  ["crashed during", "compiled", "rebooted after", "leaked memory in", "timed out on", "parsed"],
                  ["the update", "the build", "the query", "the kernel patch", "the unicode input", "the backup"]),
}
LABELS = sorted(WORDS)


def sentence(rng: random.Random, label: str) -> str:
    who, did, what = WORDS[label]
    return f"{rng.choice(who)} {rng.choice(did)} {rng.choice(what)} {rng.randrange(1_000_000)}"


def examples(rng: random.Random, per_label: int) -> list[pb.Example]:
    return [pb.Example(input=pb.Input(text=sentence(rng, label)), label=label)
            for label in LABELS for _ in range(per_label)]


# --- the server ---------------------------------------------------------------------------------------------


def headserve_command() -> list[str]:
    script = pathlib.Path(sys.executable).parent / "headserve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "service"]


class ServerProcess:
    """`headserve serve` on 127.0.0.1:0 with API keys; its log goes to a file, whose "listening" line names
    the port."""

    def __init__(self, data_dir: pathlib.Path, log_path: pathlib.Path, backbone: str) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        # One tenant whose 16 clients may all be in a stream at once (PredictStream, ExportTask, WatchJob):
        # its stream slots are the server's (16 of the 32 threads), not a quarter of the threads.
        env = {**os.environ, "HEADSERVE_AUTH": "api_key", "HEADSERVE_BUILTIN_BACKBONES": json.dumps([backbone]),
               "HEADSERVE_STREAM_SLOTS_PER_TENANT": "16", "PYTHONUNBUFFERED": "1"}
        self._log = open(log_path, "w")  # noqa: SIM115 - the server's stdout/stderr for its lifetime
        self.proc = subprocess.Popen(
            [*headserve_command(), "serve", "--address", "127.0.0.1:0", "--data-dir", str(data_dir),
             "--log-level", "INFO"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )
        self.pid = self.proc.pid
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            match = re.search(r"listening on \S+ \(port (\d+)\)", log_path.read_text(errors="replace"))
            if match:
                self.address = f"127.0.0.1:{match.group(1)}"
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log_tail()}")
            time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError("the server did not start in 300 s:\n" + self.log_tail())

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def terminate(self, timeout: float = 60.0) -> tuple[int | None, float]:
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            code = None
        self._log.close()
        return code, time.monotonic() - start

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        if not self._log.closed:
            self._log.close()


def create_tenant(data_dir: pathlib.Path) -> dict:
    out = subprocess.run([*headserve_command(), "tenants", "create", "soak", "--data-dir", str(data_dir), "--json"],
                         capture_output=True, text=True, check=True, cwd=ROOT, timeout=120)
    return json.loads(out.stdout)


# --- what the server holds ----------------------------------------------------------------------------------


def _status_field(pid: int, name: str) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def rss_bytes(pid: int) -> int:
    try:
        import psutil
    except ImportError:
        return _status_field(pid, "VmRSS") * 1024
    return psutil.Process(pid).memory_info().rss


def wal_state(path: pathlib.Path) -> tuple[int, int | None]:
    """The WAL's size and its header's salt-1, which each restart of the log (after a checkpoint) increments
    (None while the file is empty)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(32)
    except FileNotFoundError:
        return 0, None
    if len(header) < 16:
        return size, None
    return size, struct.unpack(">I", header[16:20])[0]


def probe(pid: int, data_dir: pathlib.Path) -> dict:
    db = data_dir / "headserve.sqlite3"
    wal_bytes, wal_seq = wal_state(data_dir / "headserve.sqlite3-wal")
    return {
        "rss_bytes": rss_bytes(pid),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": _status_field(pid, "Threads"),
        "wal_bytes": wal_bytes,
        "wal_salt": wal_seq,
        "db_bytes": db.stat().st_size if db.exists() else 0,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# --- the load -----------------------------------------------------------------------------------------------


class Slot:
    """One of the --tasks places: its task now, whether it has a trained version, and a generation that goes
    up each time its task is replaced."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.task_id = ""
        self.ready = False
        self.generation = 0
        self.busy = threading.Lock()  # held by the client that mutates the slot


class Pacer:
    """At most `per_minute` tokens a minute, one at a time (no burst)."""

    def __init__(self, per_minute: float) -> None:
        self.interval = 60.0 / per_minute if per_minute > 0 else float("inf")
        self.next = time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            now = time.monotonic()
            if now < self.next:
                return False
            self.next = now + self.interval
            return True


# The mix: weights of each operation a client draws (churn and retrain are paced; see Pacer).
OPS = {"Predict": 55, "PredictStream": 15, "ExportTask": 8, "GetTask": 3, "ListTasks": 1, "churn": 12, "retrain": 6}


class Soak:

    def __init__(self, args, address: str, api_key: str) -> None:
        self.args = args
        self.address = address
        self.api_key = api_key
        self.slots = [Slot(i) for i in range(args.tasks)]
        self.lock = threading.Lock()
        self.calls: dict[str, int] = {}  # method -> answered calls
        self.codes: dict[str, dict[str, int]] = {}  # method -> code -> count
        self.races = 0
        self.unexpected: list[dict] = []
        self.unexpected_count = 0
        self.window_predict_ms: list[float] = []
        self.jobs = {"SUCCEEDED": 0, "FAILED": 0, "other": 0}
        self.churn = Pacer(args.churn_per_minute)
        self.retrain = Pacer(args.retrain_per_minute)
        self.started = time.monotonic()
        self.stop_at = self.started + args.minutes * 60

    # bookkeeping

    def count(self, method: str, code: grpc.StatusCode, ms: float | None = None) -> None:
        with self.lock:
            self.calls[method] = self.calls.get(method, 0) + 1
            per = self.codes.setdefault(method, {})
            per[code.name] = per.get(code.name, 0) + 1
            if ms is not None and method == "Predict" and code == OK:
                self.window_predict_ms.append(ms)

    def error(self, method: str, code: str, message: str, task: str = "") -> None:
        with self.lock:
            self.unexpected_count += 1
            if len(self.unexpected) < 1000:
                self.unexpected.append({"t": round(time.monotonic() - self.started, 1), "method": method,
                                        "code": code, "task": task, "message": message[:300]})

    def call(self, method: str, fn, picked: list[tuple[Slot, int]] = ()):
        """Runs `fn()`; counts its answer; an unexpected error is recorded. Returns (ok, result)."""
        start = time.perf_counter()
        try:
            result = fn()
        except grpc.RpcError as exc:
            code = exc.code()
            self.count(method, code)
            raced = any(slot.generation != generation or not slot.ready for slot, generation in picked)
            if code in RACE_CODES and raced:
                with self.lock:
                    self.races += 1
            else:
                self.error(method, code.name, exc.details() or "",
                           ",".join(slot.task_id for slot, _ in picked))
            return False, None
        self.count(method, OK, (time.perf_counter() - start) * 1000)
        return True, result

    def pick(self, rng: random.Random) -> tuple[Slot, int] | None:
        for _ in range(20):
            slot = rng.choice(self.slots)
            generation, task_id, ready = slot.generation, slot.task_id, slot.ready
            if ready and task_id:
                return slot, generation
        return None

    # the clients

    def client(self, index: int, setup: list[Slot], ready: threading.Barrier) -> None:
        rng = random.Random(self.args.seed * 1000 + index)
        channel = open_channel(self.address, api_key=self.api_key)
        stub = pb_grpc.HeadServeStub(channel)
        try:
            for slot in setup:  # this client's share of the first tasks
                if time.monotonic() > self.stop_at:
                    break
                with slot.busy:
                    self.replace(stub, rng, slot)
            try:
                ready.wait(timeout=max(1.0, self.stop_at - time.monotonic()))
            except threading.BrokenBarrierError:
                pass
            names, weights = zip(*OPS.items())
            while time.monotonic() < self.stop_at:
                op = rng.choices(names, weights)[0]
                if op == "churn" and not self.churn.take():
                    op = "Predict"
                if op == "retrain" and not self.retrain.take():
                    op = "Predict"
                getattr(self, "op_" + op)(stub, rng)
        except Exception as exc:  # noqa: BLE001 - a bug of the soak itself: recorded, and this client stops
            ready.abort()
            self.error("client", type(exc).__name__, repr(exc))
        finally:
            channel.close()

    def op_Predict(self, stub, rng: random.Random) -> None:
        picked = self.pick(rng)
        if picked is None:
            time.sleep(0.05)
            return
        slot, _ = picked
        n = rng.randint(1, 8)
        texts = [sentence(rng, rng.choice(LABELS)) for _ in range(n)]
        ok, resp = self.call("Predict", lambda: stub.Predict(
            pb.PredictRequest(task_id=slot.task_id, inputs=[pb.Input(text=t) for t in texts]), timeout=CALL_TIMEOUT),
            [picked])
        if ok and (len(resp.predictions) != n or any(not p.top for p in resp.predictions)):
            self.error("Predict", "SHORT_ANSWER", f"{len(resp.predictions)} predictions for {n} inputs", slot.task_id)

    def op_PredictStream(self, stub, rng: random.Random) -> None:
        picked = [p for p in (self.pick(rng) for _ in range(rng.randint(2, 4))) if p is not None]
        if not picked:
            time.sleep(0.05)
            return
        requests = [pb.PredictRequest(task_id=slot.task_id, inputs=[pb.Input(text=sentence(rng, rng.choice(LABELS)))
                                                                     for _ in range(rng.randint(1, 4))])
                    for slot, _ in picked]
        ok, answers = self.call("PredictStream", lambda: list(stub.PredictStream(iter(requests),
                                                                                  timeout=CALL_TIMEOUT)), picked)
        if ok and [len(a.predictions) for a in answers] != [len(r.inputs) for r in requests]:
            self.error("PredictStream", "SHORT_ANSWER", f"{len(answers)} answers for {len(requests)} requests")

    def op_ExportTask(self, stub, rng: random.Random) -> None:
        picked = self.pick(rng)
        if picked is None:
            return
        slot, _ = picked
        ok, chunks = self.call("ExportTask", lambda: list(stub.ExportTask(
            pb.ExportTaskRequest(task_id=slot.task_id, format=pb.HEAD_ONNX), timeout=CALL_TIMEOUT)), [picked])
        if ok:
            data = b"".join(c.data for c in chunks)
            if not chunks or len(data) != chunks[0].total_size or hashlib.sha256(data).hexdigest() != chunks[0].sha256:
                self.error("ExportTask", "BAD_EXPORT", f"{len(data)} bytes in {len(chunks)} chunks", slot.task_id)

    def op_GetTask(self, stub, rng: random.Random) -> None:
        picked = self.pick(rng)
        if picked is not None:
            self.call("GetTask", lambda: stub.GetTask(pb.GetTaskRequest(task_id=picked[0].task_id),
                                                      timeout=CALL_TIMEOUT), [picked])

    def op_ListTasks(self, stub, rng: random.Random) -> None:
        token, seen = "", 0
        for _ in range(100):
            ok, resp = self.call("ListTasks", lambda token=token: stub.ListTasks(
                pb.ListTasksRequest(page_size=100, page_token=token), timeout=CALL_TIMEOUT))
            if not ok:
                return
            seen += len(resp.tasks)
            token = resp.next_page_token
            if not token:
                break
        if seen > len(self.slots) + self.args.clients:  # deleted tasks that are still listed
            self.error("ListTasks", "TOO_MANY", f"{seen} tasks listed for {len(self.slots)} slots")

    def mutable_slot(self, rng: random.Random) -> Slot | None:
        for _ in range(10):
            slot = rng.choice(self.slots)
            if slot.task_id and slot.busy.acquire(blocking=False):
                return slot
        return None

    def op_churn(self, stub, rng: random.Random) -> None:
        slot = self.mutable_slot(rng)
        if slot is None:
            return
        try:
            self.replace(stub, rng, slot)
        finally:
            slot.busy.release()

    def op_retrain(self, stub, rng: random.Random) -> None:
        slot = self.mutable_slot(rng)
        if slot is None:
            return
        try:
            task_id = slot.task_id
            more = [pb.Example(input=pb.Input(text=sentence(rng, label)), label=label)
                    for label in rng.sample(LABELS, rng.randint(1, 3))]
            ok, _ = self.call("AddExamples", lambda: stub.AddExamples(
                iter([pb.AddExamplesRequest(task_id=task_id, examples=more)]), timeout=CALL_TIMEOUT))
            if ok:
                self.train(stub, slot, task_id)
        finally:
            slot.busy.release()

    def replace(self, stub, rng: random.Random, slot: Slot) -> None:
        """Deletes the slot's task (if any) and makes a new one: CreateTask, AddExamples in two messages,
        TrainTask, WatchJob."""
        old = slot.task_id
        with self.lock:
            slot.ready = False
            slot.generation += 1
        if old:
            self.call("DeleteTask", lambda: stub.DeleteTask(pb.DeleteTaskRequest(task_id=old), timeout=CALL_TIMEOUT))
        task_id = f"soak-{slot.index}-{slot.generation}-{rng.randrange(1 << 30):08x}"
        slot.task_id = task_id
        ok, _ = self.call("CreateTask", lambda: stub.CreateTask(
            pb.CreateTaskRequest(task_id=task_id, backbone=self.args.backbone, labels=LABELS), timeout=CALL_TIMEOUT))
        if not ok:
            slot.task_id = ""
            return
        batch = examples(rng, rng.randint(3, 4))
        rng.shuffle(batch)
        half = len(batch) // 2
        ok, _ = self.call("AddExamples", lambda: stub.AddExamples(iter([
            pb.AddExamplesRequest(task_id=task_id, examples=batch[:half]),
            pb.AddExamplesRequest(task_id=task_id, examples=batch[half:]),
        ]), timeout=CALL_TIMEOUT))
        if ok and self.train(stub, slot, task_id):
            slot.ready = True

    def train(self, stub, slot: Slot, task_id: str) -> bool:
        ok, job = self.call("TrainTask", lambda: stub.TrainTask(pb.TrainTaskRequest(task_id=task_id),
                                                                timeout=CALL_TIMEOUT))
        if not ok:
            return False
        last = None

        def watch():
            nonlocal last
            for update in stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=JOB_TIMEOUT):
                last = update
        ok, _ = self.call("WatchJob", watch)
        if not ok or last is None:
            return False
        state = pb.Job.State.Name(last.state)
        with self.lock:
            self.jobs[state if state in self.jobs else "other"] += 1
        if last.state != pb.Job.SUCCEEDED:
            self.error("TrainTask", f"JOB_{state}", last.error or last.message, task_id)
            return False
        return True


# --- the run ------------------------------------------------------------------------------------------------


def environment() -> dict:
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=30,
                                  check=False).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    cpu = next((line.split(":", 1)[1].strip() for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "")
    return {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain") else ""),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def run(args) -> dict:
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="headserve-soak-"))
    data_dir = pathlib.Path(args.data_dir) if args.data_dir else tmp / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = tmp / "server.log"
    report = {"environment": environment(), "settings": {k: v for k, v in vars(args).items() if k != "docs"}}
    print(f"data dir {data_dir}, server log {log_path}", flush=True)
    tenant = create_tenant(data_dir)
    server = ServerProcess(data_dir, log_path, args.backbone)
    print(f"server pid {server.pid} on {server.address}; {args.clients} clients for {args.minutes} min", flush=True)
    soak = Soak(args, server.address, tenant["api_key"])
    samples: list[dict] = []
    setup_done: list[float] = []
    ready = threading.Barrier(args.clients, action=lambda: setup_done.append(time.monotonic() - soak.started))
    shares = [soak.slots[i::args.clients] for i in range(args.clients)]
    clients = [threading.Thread(target=soak.client, args=(i, shares[i], ready), name=f"client-{i}", daemon=True)
               for i in range(args.clients)]
    try:
        for t in clients:
            t.start()
        last_calls: dict[str, int] = {}
        next_sample = soak.started
        while True:
            now = time.monotonic()
            if now >= next_sample:
                sample = {"t": round(now - soak.started, 1), **probe(server.pid, data_dir)}
                with soak.lock:
                    calls = dict(soak.calls)
                    window, soak.window_predict_ms = soak.window_predict_ms, []
                    sample["unexpected"] = soak.unexpected_count
                sample["calls"] = {m: n - last_calls.get(m, 0) for m, n in calls.items()}
                sample["live_tasks"] = sum(1 for s in soak.slots if s.task_id)
                if window:
                    window.sort()
                    sample["predict_p50_ms"] = round(window[len(window) // 2], 1)
                    sample["predict_p99_ms"] = round(window[min(len(window) - 1, int(len(window) * 0.99))], 1)
                last_calls = calls
                samples.append(sample)
                if args.verbose or len(samples) % 6 == 1:
                    print(f"  t={sample['t']:7.1f}s rss {sample['rss_bytes'] / 2**20:7.1f} MiB  fds {sample['fds']:4d}"
                          f"  threads {sample['threads']:3d}  wal {sample['wal_bytes'] / 2**20:6.2f} MiB"
                          f" (salt {sample['wal_salt']})  calls {sum(sample['calls'].values()):5d}"
                          f"  unexpected {sample['unexpected']}", flush=True)
                next_sample += args.sample_seconds
            if server.proc.poll() is not None:
                soak.error("server", "EXITED", f"the server exited with {server.proc.returncode}")
                break
            if now >= soak.stop_at and not any(t.is_alive() for t in clients):
                break
            if now >= soak.stop_at + 120:  # a client stuck in a call past its deadline
                soak.error("client", "STUCK", f"{sum(t.is_alive() for t in clients)} clients still busy 120 s after the end")
                break
            time.sleep(min(0.5, max(0.0, next_sample - time.monotonic())))
        samples.append({"t": round(time.monotonic() - soak.started, 1), **probe(server.pid, data_dir),
                        "unexpected": soak.unexpected_count, "calls": {}, "final": True})
        code, took = server.terminate()
    finally:
        server.kill()
    log_text = log_path.read_text(errors="replace")
    error_lines = [line for line in log_text.splitlines() if " ERROR " in line or " CRITICAL " in line]
    report.update({
        "duration_s": round(time.monotonic() - soak.started, 1),
        "setup_s": round(setup_done[0], 1) if setup_done else None,
        "calls": soak.calls,
        "codes": soak.codes,
        "races": soak.races,
        "jobs": soak.jobs,
        "unexpected_count": soak.unexpected_count,
        "unexpected": soak.unexpected,
        "server_log": {"error_lines": len(error_lines), "tracebacks": log_text.count("Traceback"),
                       "first_errors": error_lines[:20], "bytes": len(log_text)},
        "sigterm": {"exit_code": code, "seconds": round(took, 2)},
        "samples": samples,
    })
    report["environment"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report["targets"] = targets(report, args)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        report["kept"] = str(tmp)
    return report


def targets(report: dict, args) -> dict:
    samples = [s for s in report["samples"] if not s.get("final")]
    warm_t = max(report["setup_s"] or 0.0, args.minutes * 60 * args.warmup_fraction)
    after = [s for s in samples if s["t"] >= warm_t]
    out: dict = {"warmup_s": round(warm_t, 1), "samples_after_warmup": len(after)}
    if len(after) < 6:
        out["note"] = "too few samples after warm-up to judge growth (run longer)"
        return out
    third = max(2, len(after) // 3)
    first, last = after[:third], after[-third:]
    rss0 = statistics.median(s["rss_bytes"] for s in after[:3])
    rss1 = statistics.median(s["rss_bytes"] for s in after[-3:])
    ts = [s["t"] / 60 for s in after]
    ys = [s["rss_bytes"] / 2**20 for s in after]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    slope = sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / (sum((t - mt) ** 2 for t in ts) or 1)
    growth = 100 * (rss1 - rss0) / rss0
    fd0, fd1 = max(s["fds"] for s in first), max(s["fds"] for s in last)
    th0, th1 = max(s["threads"] for s in first), max(s["threads"] for s in last)
    wal_max = max(s["wal_bytes"] for s in after)
    # Restarts of the WAL: the increments of its salt-1 between samples (a new random salt, when SQLite made
    # the file again, counts as one).
    salts = [s["wal_salt"] for s in samples if s["wal_salt"] is not None]
    checkpoints = sum((b - a) % 2**32 if (b - a) % 2**32 < 1 << 20 else 1 for a, b in itertools.pairwise(salts))
    p50s = [s["predict_p50_ms"] for s in after if "predict_p50_ms" in s]
    p99s = [s["predict_p99_ms"] for s in after if "predict_p99_ms" in s]
    out.update({
        "unexpected_errors": {"value": report["unexpected_count"], "target": "0",
                              "met": report["unexpected_count"] == 0},
        "rss_growth_pct": {"value": round(growth, 2), "from_mib": round(rss0 / 2**20, 1),
                           "to_mib": round(rss1 / 2**20, 1), "slope_mib_per_min": round(slope, 2),
                           "peak_mib": round(max(s["rss_bytes"] for s in samples) / 2**20, 1),
                           "target": "< 5", "met": growth < 5},
        "fds": {"first_third_max": fd0, "last_third_max": fd1, "min": min(s["fds"] for s in after),
                "max": max(s["fds"] for s in after), "target": f"last <= first + {args.fd_slack}",
                "met": fd1 <= fd0 + args.fd_slack},
        "threads": {"first_third_max": th0, "last_third_max": th1, "min": min(s["threads"] for s in after),
                    "max": max(s["threads"] for s in after), "target": f"last <= first + {args.thread_slack}",
                    "met": th1 <= th0 + args.thread_slack},
        "wal": {"max_mib": round(wal_max / 2**20, 2),
                "first_third_max_mib": round(max(s["wal_bytes"] for s in first) / 2**20, 2),
                "last_third_max_mib": round(max(s["wal_bytes"] for s in last) / 2**20, 2),
                "checkpoints": checkpoints, "target": f"restarts > 0, max < {args.wal_limit_mb:g} MiB",
                "met": checkpoints > 0 and wal_max < args.wal_limit_mb * 2**20},
        "predict_ms": {"p50_first_third": _median(p50s[:third]), "p50_last_third": _median(p50s[-third:]),
                       "p99_first_third": _median(p99s[:third]), "p99_last_third": _median(p99s[-third:])},
        "db_mib": {"after_warmup": round(after[0]["db_bytes"] / 2**20, 2),
                   "end": round(after[-1]["db_bytes"] / 2**20, 2)},
        "sigterm": {"value": report["sigterm"], "target": "exit 0", "met": report["sigterm"]["exit_code"] == 0},
    })
    return out


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    env = report["environment"]
    console.print(f"soak at commit {env['commit']}, {env['when']}, {env['cores']} cores; load average "
                  f"{env['load_average_start']} -> {env['load_average_end']}")
    calls = Table(title=f"soak: {report['settings']['clients']} clients, {report['settings']['tasks']} tasks, "
                        f"{report['duration_s'] / 60:.1f} min")
    for col in ("method", "calls", "codes"):
        calls.add_column(col)
    for method, n in sorted(report["calls"].items(), key=lambda kv: -kv[1]):
        codes = ", ".join(f"{c} {k}" for c, k in sorted(report["codes"][method].items(), key=lambda kv: -kv[1]))
        calls.add_row(method, str(n), codes)
    console.print(calls)
    console.print(f"jobs {report['jobs']}; NOT_FOUND/FAILED_PRECONDITION from races with churn: {report['races']}; "
                  f"server log: {report['server_log']['error_lines']} ERROR lines, "
                  f"{report['server_log']['tracebacks']} tracebacks; SIGTERM: exit {report['sigterm']['exit_code']} "
                  f"in {report['sigterm']['seconds']} s")
    t = report["targets"]
    table = Table(title=f"targets (after a {t['warmup_s']} s warm-up, {t['samples_after_warmup']} samples)")
    for col in ("target", "measured", "goal", "met"):
        table.add_column(col)
    if "note" in t:
        console.print(t["note"])
    else:
        table.add_row("unexpected errors", str(t["unexpected_errors"]["value"]), "0", _met(t["unexpected_errors"]))
        r = t["rss_growth_pct"]
        table.add_row("RSS growth", f"{r['value']:+.2f}% ({r['from_mib']} -> {r['to_mib']} MiB, "
                      f"{r['slope_mib_per_min']:+.2f} MiB/min, peak {r['peak_mib']})", "< 5%", _met(r))
        for name in ("fds", "threads"):
            v = t[name]
            table.add_row(name, f"{v['first_third_max']} -> {v['last_third_max']} (range {v['min']}-{v['max']})",
                          v["target"], _met(v))
        w = t["wal"]
        table.add_row("SQLite WAL", f"max {w['max_mib']} MiB ({w['first_third_max_mib']} -> "
                      f"{w['last_third_max_mib']}), {w['checkpoints']} restarts", w["target"], _met(w))
        lat = t["predict_ms"]
        table.add_row("Predict latency", f"p50 {lat['p50_first_third']} -> {lat['p50_last_third']} ms, p99 "
                      f"{lat['p99_first_third']} -> {lat['p99_last_third']} ms (medians of the windows)", "", "")
        table.add_row("database", f"{t['db_mib']['after_warmup']} -> {t['db_mib']['end']} MiB", "", "")
        table.add_row("SIGTERM", f"exit {t['sigterm']['value']['exit_code']}", "exit 0", _met(t["sigterm"]))
        console.print(table)
    for err in report["unexpected"][:10]:
        console.print(f"  unexpected at {err['t']}s: {err['method']} {err['code']} {err['task']} {err['message']}")


def _met(entry: dict) -> str:
    return "yes" if entry.get("met") else "NO"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0, help="how long the load runs")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--tasks", type=int, default=200, help="task slots (tasks kept live)")
    p.add_argument("--backbone", default="minilm-l6")
    p.add_argument("--churn-per-minute", type=float, default=30.0, help="tasks deleted and created again")
    p.add_argument("--retrain-per-minute", type=float, default=15.0, help="tasks given examples and trained again")
    p.add_argument("--sample-seconds", type=float, default=10.0)
    p.add_argument("--warmup-fraction", type=float, default=0.25,
                   help="of the run, before growth is judged (at least until the first tasks are trained)")
    p.add_argument("--fd-slack", type=int, default=8)
    p.add_argument("--thread-slack", type=int, default=4)
    p.add_argument("--wal-limit-mb", type=float, default=64.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="default: a fresh temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the data directory and the server log")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"))
    p.add_argument("--report", help="print the tables of a results file, run nothing")
    p.add_argument("--verbose", action="store_true", help="print every sample")
    args = p.parse_args(argv)
    if args.report:
        print_report(json.loads(pathlib.Path(args.report).read_text()))
        return 0
    report = run(args)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print_report(report)
    print(f"wrote {out}")
    t = report["targets"]
    return 0 if all(v.get("met", True) for v in t.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
