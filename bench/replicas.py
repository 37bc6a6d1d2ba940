#!/usr/bin/env python
"""Replicas: what PostgreSQL, a second replica and training out of the serving process cost, in one run.

    python bench/replicas.py            # the full run, under 10 minutes (what `make bench-replicas` runs)
    python bench/replicas.py --quick    # a short look, under 3 minutes
    python bench/replicas.py --docs     # ... and rewrite the Replicas results in docs/benchmarks.md

Every server is a real `python -m service serve` process on 127.0.0.1 port 0 (its ports read from its log),
on `minilm-l6`, with its Prometheus endpoint on 127.0.0.1 port 0; every load generator is a separate process
(bench/serving_client.py's closed loop, one input per request). PostgreSQL 15 is a throwaway cluster
(tests/postgres.py, socket only), run here with fsync on, as SQLite runs with synchronous=FULL. Servers:

    sqlite    SQLite in its own data dir, training in a thread of the server
    pg-1      PostgreSQL, training in a thread of the server
    pg-2      the same PostgreSQL database, trains nothing (training_workers = 0): a serving replica
    sqlite-p  SQLite in its own data dir, training in a worker process (training_isolation = "process")

1. SQLite vs PostgreSQL on the predict path: the same LINEAR task (3 labels x 8 sentences) on `sqlite` and
   `pg-1`, Predict at concurrency 1 and 8 in rounds that alternate which store goes first; p50/p99 and the
   per-round ratio PG/SQLite (median over rounds). Each level also diffs the servers' store-operation
   counters (`headserve_store_operation_duration_seconds_count`), so a store call on the predict path shows
   per request. Then create->READY: CreateTask (AUTO, 3 labels x 8 new sentences) until WatchJob says
   SUCCEEDED, alternating the two servers; medians and their ratio.
2. One vs two replicas: concurrency 16 against `pg-1` alone, and against `pg-1` + `pg-2` through one channel to
   `ipv4:127.0.0.1:P1,127.0.0.1:P2` with the `round_robin` policy in its service config, in alternating
   rounds; throughput, p99, the Predict calls each replica answered (from its `headserve_rpcs_total`), the
   CPU each process used and PostgreSQL's connections (pg_stat_activity, sampled).
3. Serving p99 while a FINE_TUNE job trains, against p99 idle, on `sqlite` (thread) and `sqlite-p` (worker
   process): per round, idle then during training (the client starts once WatchJob reports the training
   phase; a window the job did not cover to its end is flagged), concurrency --train-concurrency.
4. What a 10-replica, 100,000-task deployment needs: RSS of each process after start, RSS and the head
   cache's estimate per loaded head (--heads zero-shot tasks created and predicted once on `pg-1`), the
   PostgreSQL bytes per task (pg_database_size and row bytes, zero-shot and trained tasks), the change-feed
   rows per change, and the connections measured above, scaled by the settings' pool sizes.

Results: bench/results/replicas.json (+ .md); --docs writes the Markdown between the replicas markers of
docs/benchmarks.md. The machine's load average and the commit are recorded; figures from a shared 2-core
machine are noisy, which is why every comparison is made inside one round.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import datetime
import json
import logging
import math
import os
import pathlib
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import grpc

from bench.serving import TOPICS, busy_jiffies, create_task, load_texts, pct
from bench.serving_client import write_requests
from bench.tenants import git, source_digest
from service.gen import headserve_pb2 as pb
from service.gen import headserve_pb2_grpc as pb_grpc

log = logging.getLogger("bench.replicas")

DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- replicas:begin -->", "<!-- replicas:end -->"
BACKBONE = "minilm-l6"
TASK = "bench-topics"
TARGETS = {"predict_ratio": 1.1, "ready_ratio": 1.3, "train_p99_ratio": 1.5}
ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
# What service/store.py gives each Store on PostgreSQL (pool_size 5, max_overflow 2 x pool_size).
POOL_SIZE, POOL_OVERFLOW = 5, 10
# Deployment the figures are scaled to.
REPLICAS, TASKS = 10, 100_000
MAX_JOBS = 12  # FINE_TUNE jobs queued for one measured window, at most
SETTLE_S = 6.0  # past the change feed's 5 s re-read window (service/changes.py WINDOW_MS)


# --- PostgreSQL ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres_cluster():
    """tests/postgres.py's throwaway cluster, with fsync on: the tests turn it off for speed, but a benchmark
    that compares PostgreSQL with SQLite (synchronous=FULL) must let both reach the disk."""
    sys.path.insert(0, str(ROOT / "tests"))
    import postgres

    class DurableCluster(postgres.Cluster):
        def _run(self, *args: str, check: bool = True):
            if args and args[0] == "pg_ctl":
                args = tuple(a.replace("fsync=off", "fsync=on") for a in args)
            return super()._run(*args, check=check)

    postgres.Cluster = DurableCluster  # running_cluster builds its Cluster from the module's name
    with postgres.running_cluster() as cluster:
        yield cluster


class Database:
    """The bench's own connection to the replicas' database: sizes, connections, change-feed rows."""

    def __init__(self, cluster, url: str) -> None:
        import psycopg
        import sqlalchemy as sa

        self.name = sa.make_url(url).database
        self.conn = psycopg.connect(host=str(cluster.socket_dir), user=cluster.superuser, dbname=self.name,
                                    autocommit=True)

    def scalar(self, sql: str, *params):
        return self.conn.execute(sql, params).fetchone()[0]

    def connections(self) -> int:
        return self.scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                           self.name)

    def size(self) -> int:
        self.conn.execute("CHECKPOINT")
        return self.scalar("SELECT pg_database_size(%s)", self.name)

    def row_bytes(self) -> dict[str, int]:
        tables = [r[0] for r in self.conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'")]
        return {t: int(self.scalar(f'SELECT coalesce(sum(pg_column_size(t.*)), 0) FROM "{t}" t')) for t in tables}

    def changes(self) -> int:
        return self.scalar("SELECT coalesce(max(seq), 0) FROM changes")

    def close(self) -> None:
        self.conn.close()


class ConnectionSampler:
    """Samples the database's connection count every `interval` s while it runs; keeps the largest."""

    def __init__(self, db: Database | None, interval: float = 0.1) -> None:
        self.db, self.interval = db, interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="bench-connections")

    def _loop(self) -> None:
        for _ in range(20_000):  # bounded
            with contextlib.suppress(Exception):
                self.samples.append(self.db.connections())
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        if self.db is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


# --- servers ---------------------------------------------------------------------------------------------


def proc_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out = []
    for path in pathlib.Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out += [int(x) for x in path.read_text().split()]
    return out


class Replica:
    """`python -m service serve` on 127.0.0.1:0, its gRPC and metrics ports read from its log file."""

    def __init__(self, name: str, workdir: pathlib.Path, env: dict[str, str]) -> None:
        self.name = name
        self.data_dir = workdir / name
        self.log_path = workdir / f"{name}.log"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
                    "HEADSERVE_BUILTIN_BACKBONES": json.dumps([BACKBONE]), "HEADSERVE_DEVICE": "cpu",
                    "HEADSERVE_METRICS_ADDRESS": "127.0.0.1:0", **env}
        self.settings = env
        self.address = ""
        self.metrics_url = ""
        self.started_s = 0.0
        self._log = open(self.log_path, "w")  # noqa: SIM115 (open for the life of the process)
        self._t0 = time.perf_counter()
        # Logs at INFO, as a deployed server does (one access line per RPC, into a file here).
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--address", "127.0.0.1:0", "--data-dir", str(self.data_dir),
             "--log-level", "INFO"], cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            metrics = re.search(r"metrics on http://([\d.]+):(\d+)/metrics", text)
            grpc_port = re.search(r"listening on \S+ \(port (\d+)\)", text)
            if metrics:
                self.metrics_url = f"http://{metrics.group(1)}:{metrics.group(2)}/metrics"
            if grpc_port:
                self.address = f"127.0.0.1:{grpc_port.group(1)}"
                self.started_s = time.perf_counter() - self._t0
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server {self.name} did not start:\n{self.log_path.read_text(errors='replace')[-3000:]}")

    def pids(self) -> list[int]:
        """The server and every process under it (its training worker processes)."""
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += children(pid)
        return out

    def rss(self) -> dict[str, int]:
        """RSS of the server and of each process under it (training workers; multiprocessing's helper)."""
        pids = self.pids()
        out = {"server": proc_rss(pids[0])}
        workers = 0
        for pid in pids[1:]:
            with contextlib.suppress(OSError):
                cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"resource_tracker" in cmdline:
                    name = "resource-tracker"
                else:
                    name, workers = f"worker-{workers}", workers + 1
                out[name] = proc_rss(pid)
        return out

    def cpu(self) -> float:
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += proc_cpu(pid)
        return total

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of the metrics endpoint: (name, sorted labels) -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def job_lines(self, limit: int = 60) -> list[str]:
        """The last lines its job runner and worker processes logged (not the access lines)."""
        lines = [line.rstrip() for line in self.log_path.read_text(errors="replace").splitlines()
                 if " service.jobs " in line or " service.worker " in line or " service.training " in line]
        return lines[-limit:]

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._log.close()


def predict_calls(metrics: dict) -> float:
    return sum(v for (name, labels), v in metrics.items()
               if name == "headserve_rpcs_total" and dict(labels).get("method") == "Predict")


def store_ops(metrics: dict) -> dict[str, float]:
    return {dict(labels)["operation"]: v for (name, labels), v in metrics.items()
            if name == "headserve_store_operation_duration_seconds_count"}


def gauge(metrics: dict, name: str) -> float:
    """A gauge's value, or a counter's (`name` without the `_total` its samples carry)."""
    return sum(v for (n, _), v in metrics.items() if n in (name, f"{name}_total"))


# --- load generators ---------------------------------------------------------------------------------------


def client_main(path: str) -> None:
    """A load generator process: bench/serving_client.py's closed loop, on a channel that balances over the
    target's addresses when the spec names a service config."""
    from bench import serving_client

    spec = json.loads(pathlib.Path(path).read_text())
    if spec.get("service_config"):
        plain = grpc.aio.insecure_channel

        def balanced(target, options=None, *args, **kwargs):  # serving_client opens its channel with this
            return plain(target, [*(options or []), ("grpc.service_config", spec["service_config"])],
                         *args, **kwargs)

        grpc.aio.insecure_channel = balanced
    print(json.dumps(asyncio.run(serving_client.run(spec))))


class Load:
    """Runs client processes (this file with --client SPEC) and measures what the servers did meanwhile."""

    def __init__(self, workdir: pathlib.Path) -> None:
        self.workdir = workdir
        self.count = 0

    def start(self, target: str, requests: pathlib.Path, concurrency: int, warmup: float, duration: float,
              balanced: bool = False) -> subprocess.Popen:
        self.count += 1
        spec = {"address": target, "concurrency": concurrency, "warmup_s": warmup, "duration_s": duration,
                "requests": str(requests), "timeout_s": 60, "service_config": ROUND_ROBIN if balanced else ""}
        path = self.workdir / f"client-{self.count}.json"
        path.write_text(json.dumps(spec))
        return subprocess.Popen([sys.executable, str(HERE / "replicas.py"), "--client", str(path)], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    @staticmethod
    def finish(proc: subprocess.Popen, limit: float) -> dict:
        try:
            out, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise RuntimeError(f"client process ran past {limit:.0f} s: {err[-2000:]}") from None
        if proc.returncode:
            raise RuntimeError(f"client process failed ({proc.returncode}): {err[-2000:]}")
        return json.loads(out.strip().splitlines()[-1])

    def level(self, replicas: list[Replica], requests: pathlib.Path, concurrency: int, warmup: float,
              duration: float, db: Database | None = None, balanced: bool = False) -> dict:
        """One measured window against `replicas` (one: its address; several: round robin over them)."""
        target = (replicas[0].address if len(replicas) == 1
                  else "ipv4:" + ",".join(r.address for r in replicas))
        before = [r.metrics() for r in replicas]
        cpu0 = [r.cpu() for r in replicas]
        jiffies0, wall0 = busy_jiffies(), time.perf_counter()
        with ConnectionSampler(db) as sampled:
            proc = self.start(target, requests, concurrency, warmup, duration, balanced or len(replicas) > 1)
            result = self.finish(proc, warmup + duration + 120)
        wall = time.perf_counter() - wall0
        busy = (busy_jiffies() - jiffies0) / os.sysconf("SC_CLK_TCK")
        after = [r.metrics() for r in replicas]
        server_cpu = [r.cpu() - c for r, c in zip(replicas, cpu0)]
        lat = result["latencies_s"]
        calls = [predict_calls(a) - predict_calls(b) for a, b in zip(after, before)]
        ops: dict[str, float] = {}
        for a, b in zip(after, before):
            for op, n in store_ops(a).items():
                delta = n - store_ops(b).get(op, 0.0)
                if delta:
                    ops[op] = ops.get(op, 0.0) + delta
        return {
            "concurrency": concurrency,
            "replicas": [r.name for r in replicas],
            "requests": len(lat),
            "p50_ms": pct(lat, 50) * 1e3,
            "p99_ms": pct(lat, 99) * 1e3,
            "throughput": len(lat) / result["elapsed_s"],
            "errors": result["errors"],
            "predict_calls_by_replica": dict(zip([r.name for r in replicas], calls)),
            # store operations over the whole window (warm-up included), with the calls they were made for
            "store_ops": ops,
            "store_ops_calls": sum(calls),
            "window_s": wall,
            "server_cpu_cores": {r.name: c / wall for r, c in zip(replicas, server_cpu)},
            "client_cpu_cores": result["cpu_s"] / result["elapsed_s"],
            "other_cpu_cores": max(0.0, busy - sum(server_cpu) - result["cpu_s"]) / wall,
            "pg_connections_max": max(sampled.samples) if sampled.samples else None,
        }


# --- tasks -------------------------------------------------------------------------------------------------


def stub_of(replica: Replica):
    channel = grpc.insecure_channel(replica.address)
    return channel, pb_grpc.HeadServeStub(channel)


def topic_examples(tag: str = "") -> list[tuple[str, str]]:
    return [(f"{t[:-1]}{tag}." if tag else t, label) for label, texts in TOPICS.items() for t in texts]


class JobWatch:
    """Follows a task's job from WatchJob in a thread: when each phase was first seen and when it ended."""

    def __init__(self, stub, task_id: str) -> None:
        self.phases: dict[str, float] = {}
        self.ended = 0.0
        self.last: pb.Job | None = None
        self.running = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(stub, task_id), daemon=True)
        self._thread.start()

    def _watch(self, stub, task_id: str) -> None:
        try:
            for job in stub.WatchJob(pb.WatchJobRequest(task_id=task_id), timeout=600):
                self.last = job
                self.phases.setdefault(job.phase, time.perf_counter())
                if job.state != pb.Job.QUEUED:
                    self.running.set()
        finally:
            self.ended = time.perf_counter()
            self.running.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


# --- the parts -----------------------------------------------------------------------------------------------


def ratio_rounds(rounds: list[dict], key: str, num: str, den: str) -> float:
    return statistics.median(r[num][key] / r[den][key] for r in rounds)


def part_stores(args, load: Load, sqlite: Replica, pg: Replica, db: Database, requests: pathlib.Path) -> dict:
    out: dict = {"predict": [], "ready": {}}
    for c in args.store_concurrency:
        rounds = []
        for k in range(args.rounds):
            order = [(sqlite, "sqlite"), (pg, "postgresql")]
            if k % 2:
                order.reverse()
            row = {}
            for replica, kind in order:
                row[kind] = load.level([replica], requests, c, args.warmup, args.duration,
                                       db if kind == "postgresql" else None)
            rounds.append(row)
            log.info("stores c=%d round %d: p50 sqlite %.2f pg %.2f ms; p99 sqlite %.2f pg %.2f ms", c, k + 1,
                     row["sqlite"]["p50_ms"], row["postgresql"]["p50_ms"], row["sqlite"]["p99_ms"],
                     row["postgresql"]["p99_ms"])
        level = {"concurrency": c, "rounds": rounds}
        for kind in ("sqlite", "postgresql"):
            level[kind] = {k: statistics.median(r[kind][k] for r in rounds)
                           for k in ("p50_ms", "p99_ms", "throughput")}
            level[kind]["requests"] = sum(r[kind]["requests"] for r in rounds)
            level[kind]["errors"] = sum(sum(r[kind]["errors"].values()) for r in rounds)
            calls = sum(r[kind]["store_ops_calls"] for r in rounds)
            window = sum(r[kind]["window_s"] for r in rounds)
            ops: dict[str, float] = {}
            for r in rounds:
                for op, n in r[kind]["store_ops"].items():
                    ops[op] = ops.get(op, 0.0) + n
            level[kind]["store_ops_per_1000_calls"] = {op: n / calls * 1000 for op, n in ops.items()}
            level[kind]["store_ops_per_s"] = {op: n / window for op, n in ops.items()}
        for q in ("p50_ms", "p99_ms"):
            level[f"{q[:3]}_ratio"] = ratio_rounds(rounds, q, "postgresql", "sqlite")
        level["throughput_ratio"] = ratio_rounds(rounds, "throughput", "postgresql", "sqlite")
        out["predict"].append(level)

    # create -> READY, alternating; the same new sentences on both stores at repetition k (both cold)
    times: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
    channels = []
    stubs = {}
    for replica, kind in ((sqlite, "sqlite"), (pg, "postgresql")):
        channel, stubs[kind] = stub_of(replica)
        channels.append(channel)
    changes0, rows0, size0 = db.changes(), db.row_bytes(), db.size()
    stamp = int(time.time())
    try:
        for k in range(args.ready_reps):
            order = ["sqlite", "postgresql"] if k % 2 == 0 else ["postgresql", "sqlite"]
            for kind in order:
                times[kind].append(create_task(stubs[kind], f"ready-{stamp}-{k}", BACKBONE,
                                               topic_examples(f", take {stamp}-{k}")))
            log.info("create->READY %d: sqlite %.2f s, pg %.2f s", k + 1, times["sqlite"][-1],
                     times["postgresql"][-1])
    finally:
        for channel in channels:
            channel.close()
    rows1 = db.row_bytes()
    out["ready"] = {
        "examples": len(topic_examples()),
        "times_s": times,
        "sqlite_median_s": statistics.median(times["sqlite"]),
        "postgresql_median_s": statistics.median(times["postgresql"]),
        "ratio": statistics.median(times["postgresql"]) / statistics.median(times["sqlite"]),
        "paired_ratio": statistics.median(p / s for p, s in zip(times["postgresql"], times["sqlite"])),
        # what one trained task (24 examples, its features, one head, one job) adds to PostgreSQL
        "pg_changes_per_task": (db.changes() - changes0) / args.ready_reps,
        "pg_row_bytes_per_task": {t: (rows1[t] - rows0.get(t, 0)) / args.ready_reps for t in rows1
                                  if rows1[t] != rows0.get(t, 0)},
        "pg_database_bytes_per_task": (db.size() - size0) / args.ready_reps,
    }
    return out


def part_replicas(args, load: Load, one: Replica, two: Replica, db: Database, requests: pathlib.Path) -> dict:
    rounds = []
    for k in range(args.rounds):
        order = [("one", [one]), ("two", [one, two])]
        if k % 2:
            order.reverse()
        row = {}
        for kind, replicas in order:
            row[kind] = load.level(replicas, requests, args.replica_concurrency, args.warmup, args.duration, db)
        rounds.append(row)
        log.info("replicas round %d: one %.0f req/s p99 %.1f ms; two %.0f req/s p99 %.1f ms (calls %s)", k + 1,
                 row["one"]["throughput"], row["one"]["p99_ms"], row["two"]["throughput"], row["two"]["p99_ms"],
                 row["two"]["predict_calls_by_replica"])
    out = {"concurrency": args.replica_concurrency, "rounds": rounds}
    for kind in ("one", "two"):
        rs = [r[kind] for r in rounds]
        calls: dict[str, float] = {}
        for r in rs:
            for name, n in r["predict_calls_by_replica"].items():
                calls[name] = calls.get(name, 0) + n
        cpu: dict[str, float] = {}
        for r in rs:
            for name, c in r["server_cpu_cores"].items():
                cpu[name] = cpu.get(name, 0.0) + c / len(rs)
        out[kind] = {
            "p50_ms": statistics.median(r["p50_ms"] for r in rs),
            "p99_ms": statistics.median(r["p99_ms"] for r in rs),
            "throughput": statistics.median(r["throughput"] for r in rs),
            "requests": sum(r["requests"] for r in rs),
            "errors": sum(sum(r["errors"].values()) for r in rs),
            "predict_calls_by_replica": calls,
            "server_cpu_cores": cpu,
            "client_cpu_cores": statistics.fmean(r["client_cpu_cores"] for r in rs),
            "other_cpu_cores": statistics.fmean(r["other_cpu_cores"] for r in rs),
            "pg_connections_max": max((r["pg_connections_max"] or 0) for r in rs),
        }
    out["throughput_ratio"] = ratio_rounds(rounds, "throughput", "two", "one")
    out["p99_ratio"] = ratio_rounds(rounds, "p99_ms", "two", "one")
    return out


def fine_tune(stub, task_id: str, tag: str) -> JobWatch:
    """CreateTask with FINE_TUNE (3 labels x 8 new sentences, the strategy's defaults); returns the watch on
    its job."""
    stub.CreateTask(pb.CreateTaskRequest(
        task_id=task_id, backbone=BACKBONE, config=pb.TrainingConfig(strategy=pb.FINE_TUNE),
        examples=[pb.Example(input=pb.Input(text=t), label=y) for t, y in topic_examples(tag)]), timeout=60)
    return JobWatch(stub, task_id)


def part_training(args, load: Load, servers: list[tuple[str, Replica]], requests: pathlib.Path) -> dict:
    """Per round and server: p99 idle, then p99 while FINE_TUNE jobs train there.

    A FINE_TUNE job of 24 sentences takes seconds and stops early on its holdout, so its length cannot be
    set; instead a warm-up job (not measured) times one on each server, and each measured window gets a
    queue of enough such jobs (one worker trains them one after another) to keep training going from the
    client's start to its end. A window the jobs did not cover to its end is flagged."""
    out: dict = {"concurrency": args.train_concurrency, "window_s": args.train_window, "servers": {}}
    stamp = int(time.time())
    channels, stubs, warm, jobs = [], {}, {}, {}
    for isolation, replica in servers:
        channel, stubs[isolation] = stub_of(replica)
        channels.append(channel)
    try:
        for isolation, _ in servers:
            warm[isolation] = (time.perf_counter(), fine_tune(stubs[isolation], f"tune-warm-{stamp}",
                                                              f", warm {stamp}"))
        for isolation, (t0, watch) in warm.items():
            watch.join(600)
            job_s = watch.ended - t0
            # the client needs about warmup + window + its start-up (a few seconds on a busy machine)
            jobs[isolation] = max(1, min(MAX_JOBS, math.ceil((args.warmup + args.train_window + 4.0) / job_s) + 1))
            out["servers"][isolation] = {"warm_job_s": job_s, "jobs_per_window": jobs[isolation],
                                         "warm_phases_s": {p: at - t0 for p, at in watch.phases.items()}}
            log.info("training (%s): a warm-up FINE_TUNE job took %.1f s; each window gets %d jobs", isolation,
                     job_s, jobs[isolation])
        rounds: dict[str, list[dict]] = {iso: [] for iso, _ in servers}
        for k in range(args.train_rounds):
            order = servers if k % 2 == 0 else servers[::-1]
            for isolation, replica in order:
                idle = load.level([replica], requests, args.train_concurrency, args.warmup, args.train_window)
                t0 = time.perf_counter()
                watches = [fine_tune(stubs[isolation], f"tune-{stamp}-{k}-{j}", f", tune {stamp}-{k}-{j}")
                           for j in range(jobs[isolation])]
                if not watches[0].running.wait(300):
                    raise RuntimeError(f"tune-{stamp}-{k}-0: not running within 300 s")
                started = time.perf_counter()
                busy = load.level([replica], requests, args.train_concurrency, args.warmup, args.train_window)
                w1 = time.perf_counter()
                for watch in watches:
                    watch.join(600)
                states = [pb.Job.State.Name(w.last.state) if w.last is not None else "?" for w in watches]
                # the trainer's own time per job (the task's evaluation), apart from queueing and features
                train_s = [stubs[isolation].GetTask(pb.GetTaskRequest(task_id=f"tune-{stamp}-{k}-{j}"),
                                                    timeout=30).evaluation.train_seconds for j in range(len(watches))]
                ended = max(w.ended for w in watches)
                covered = ended >= w1
                row = {"idle": idle, "training": busy, "jobs": len(watches), "job_states": states, "train_s": train_s,
                       "jobs_s": ended - t0, "first_running_after_s": started - t0, "window_covered": covered,
                       "p99_ratio": busy["p99_ms"] / idle["p99_ms"], "p50_ratio": busy["p50_ms"] / idle["p50_ms"]}
                rounds[isolation].append(row)
                log.info("training (%s) round %d: p99 idle %.1f ms, training %.1f ms (%.2fx); %d jobs %s in %.0f s%s",
                         isolation, k + 1, idle["p99_ms"], busy["p99_ms"], row["p99_ratio"], len(watches),
                         "/".join(sorted(set(states))), row["jobs_s"],
                         "" if covered else " (they ended inside the window)")
    finally:
        for channel in channels:
            channel.close()
    for isolation, rs in rounds.items():
        out["servers"][isolation].update({
            "rounds": rs,
            "idle_p99_ms": statistics.median(r["idle"]["p99_ms"] for r in rs),
            "training_p99_ms": statistics.median(r["training"]["p99_ms"] for r in rs),
            "idle_p50_ms": statistics.median(r["idle"]["p50_ms"] for r in rs),
            "training_p50_ms": statistics.median(r["training"]["p50_ms"] for r in rs),
            "p99_ratio": statistics.median(r["p99_ratio"] for r in rs),
            "p50_ratio": statistics.median(r["p50_ratio"] for r in rs),
            "throughput_idle": statistics.median(r["idle"]["throughput"] for r in rs),
            "throughput_training": statistics.median(r["training"]["throughput"] for r in rs),
            "server_cpu_cores_idle": statistics.median(sum(r["idle"]["server_cpu_cores"].values()) for r in rs),
            "server_cpu_cores_training": statistics.median(
                sum(r["training"]["server_cpu_cores"].values()) for r in rs),
            "other_cpu_cores": statistics.median(r["training"]["other_cpu_cores"] for r in rs),
            "job_s": statistics.median(r["jobs_s"] / r["jobs"] for r in rs),
            "train_s": statistics.median(t for r in rs for t in r["train_s"]),
            "windows_covered": sum(r["window_covered"] for r in rs),
            "failed_jobs": sum(st != "SUCCEEDED" for r in rs for st in r["job_states"]),
            "errors": sum(sum(r["training"]["errors"].values()) + sum(r["idle"]["errors"].values()) for r in rs),
        })
    return out


def create_zero_shot(replica: Replica, ids: list[str]) -> float:
    channel, stub = stub_of(replica)
    t0 = time.perf_counter()
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda t: stub.CreateTask(
                pb.CreateTaskRequest(task_id=t, backbone=BACKBONE, labels=list(TOPICS)), timeout=120), ids))
    finally:
        channel.close()
    return time.perf_counter() - t0


def predict_once(replica: Replica, ids: list[str]) -> float:
    channel, stub = stub_of(replica)
    t0 = time.perf_counter()
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda t: stub.Predict(
                pb.PredictRequest(task_id=t, inputs=[pb.Input(text="A quick note.")]), timeout=60), ids))
    finally:
        channel.close()
    return time.perf_counter() - t0


def part_memory(args, replicas: dict[str, Replica], creator: Replica, loader: Replica, db: Database) -> dict:
    """RSS after start; what creating --heads zero-shot tasks on `creator` costs the store and the other
    replica `loader`; then `loader` predicts each task once (loading its head from the store).

    In three steps: A. create the first half; B. create the second half while `loader` predicts the first
    half (cold heads loaded while changes arrive, as in a deployment that trains while it serves); C. after
    the change feed's window, `loader` predicts every task. Memory per head is measured over B + C."""
    out: dict = {"started_rss": {name: r.rss() for name, r in replicas.items()}}
    n = args.heads
    ids = [f"zs-{i:05d}" for i in range(n)]
    first, second = ids[: n // 2], ids[n // 2:]
    rss_c0 = creator.rss()["server"]
    changes0, size0, rows0 = db.changes(), db.size(), db.row_bytes()
    m0 = loader.metrics()
    create_s = create_zero_shot(creator, first)
    time.sleep(SETTLE_S)  # the change feed's poll re-reads the last 5 s
    m1, rss1 = loader.metrics(), loader.rss()["server"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        creating = pool.submit(create_zero_shot, creator, second)
        churn_load_s = predict_once(loader, first)
        m2 = loader.metrics()
        create_s += creating.result()
    time.sleep(SETTLE_S)
    size1, rows1, changes1 = db.size(), db.row_bytes(), db.changes()
    rss_c1 = creator.rss()["server"]
    load_s = predict_once(loader, ids)
    m3, rss3 = loader.metrics(), loader.rss()["server"]

    def delta(a: dict, b: dict, name: str) -> float:
        return gauge(b, name) - gauge(a, name)

    heads = delta(m1, m3, "headserve_head_cache_heads")
    get_task_a = store_ops(m1).get("get_task", 0.0) - store_ops(m0).get("get_task", 0.0)
    out.update({
        "heads": n,
        "creator": creator.name,
        "loader": loader.name,
        "heads_loaded": heads,
        "zero_shot_create_s": create_s,
        "predict_first_s": load_s,
        # step A: the store reads one replica makes for changes it does not hold (per task created elsewhere)
        "loader_get_task_per_change": get_task_a / max(len(first), 1),
        # step B: head loads while changes arrive, and how many of them stayed in the cache
        "churn": {"predicts": len(first), "seconds": churn_load_s,
                  "loads": delta(m1, m2, "headserve_head_cache_misses"),
                  "heads_cached": delta(m1, m2, "headserve_head_cache_heads")},
        "loads_total": delta(m1, m3, "headserve_head_cache_misses"),
        "rss_per_created_task_bytes": (rss_c1 - rss_c0) / n,
        "rss_per_loaded_head_bytes": (rss3 - rss1) / max(heads, 1),
        "cache_bytes_per_head": delta(m1, m3, "headserve_head_cache_bytes") / max(heads, 1),
        "pg_database_bytes_per_zero_shot_task": (size1 - size0) / n,
        "pg_row_bytes_per_zero_shot_task": {t: (rows1[t] - rows0.get(t, 0)) / n for t in rows1
                                            if rows1[t] != rows0.get(t, 0)},
        "pg_changes_per_zero_shot_task": (changes1 - changes0) / n,
        "after_rss": {name: r.rss() for name, r in replicas.items()},
    })
    log.info("memory: %d zero-shot tasks in %.1f s; %s reads %.2f get_task per change elsewhere; while changes "
             "arrived it loaded %.0f heads for %d predicts and kept %.0f; in the end %.0f heads: %.0f KiB RSS "
             "per head (cache estimate %.0f KiB)", n, create_s, loader.name, out["loader_get_task_per_change"],
             out["churn"]["loads"], len(first), out["churn"]["heads_cached"], heads,
             out["rss_per_loaded_head_bytes"] / 1024, out["cache_bytes_per_head"] / 1024)
    return out


def deployment(report: dict) -> dict:
    """The figures scaled to REPLICAS serving replicas and TASKS tasks (see the Markdown for the reasoning)."""
    mem, ready = report["memory"], report["stores"]["ready"]
    started = mem["started_rss"]
    serving_rss = started["pg-2"]["server"]
    worker_rss = max((v for k, v in started["sqlite-p"].items() if k.startswith("worker")), default=0)
    head = max(mem["rss_per_loaded_head_bytes"], mem["cache_bytes_per_head"])
    cache_budget = report["environment"]["head_cache_mb"] << 20
    trained_bytes = ready["pg_database_bytes_per_task"]
    zero_bytes = mem["pg_database_bytes_per_zero_shot_task"]
    per_replica_max = POOL_SIZE + POOL_OVERFLOW + 1
    return {
        "replicas": REPLICAS,
        "tasks": TASKS,
        "connections_per_serving_replica_max": per_replica_max,
        "connections_per_worker_process_max": POOL_SIZE + POOL_OVERFLOW,
        "connections_serving_only_max": REPLICAS * per_replica_max,
        "connections_with_one_worker_each_max": REPLICAS * (per_replica_max + POOL_SIZE + POOL_OVERFLOW),
        "connections_measured": {"one_replica_c16": report["replicas"]["one"]["pg_connections_max"],
                                 "two_replicas_c16": report["replicas"]["two"]["pg_connections_max"]},
        "changes_per_trained_task": ready["pg_changes_per_task"],
        "changes_per_zero_shot_task": mem["pg_changes_per_zero_shot_task"],
        "get_task_per_change": mem["loader_get_task_per_change"],
        "poll_queries_per_s": REPLICAS / report["environment"]["sync_interval_seconds"],
        "serving_replica_rss_bytes": serving_rss,
        "worker_process_rss_bytes": worker_rss,
        "head_bytes": head,
        "heads_in_budget": cache_budget // max(int(head), 1),
        "all_heads_bytes": TASKS * head,
        "replica_rss_full_cache_bytes": serving_rss + min(cache_budget, TASKS * head),
        "store_bytes_trained": TASKS * trained_bytes,
        "store_bytes_zero_shot": TASKS * zero_bytes,
    }


# --- report ----------------------------------------------------------------------------------------------------


def environment(args, sync_interval: float, head_cache_mb: int) -> dict:
    import onnxruntime

    cpu = next((line.split(":", 1)[1].strip() for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "")
    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "--short", "HEAD") + ("+dirty" if changed else ""),
        "changed_files": changed,
        "source_digest": source_digest(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "grpcio": grpc.__version__,
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "mode": "quick" if args.quick else "full",
        "sync_interval_seconds": sync_interval,
        "head_cache_mb": head_cache_mb,
        "postgresql": "",
    }


def check_targets(report: dict) -> list[dict]:
    out = []
    for lv in report["stores"]["predict"]:
        r = lv["p50_ratio"]
        out.append({"target": f"Predict c={lv['concurrency']}: p50 PostgreSQL / SQLite",
                    "limit": f"<= {TARGETS['predict_ratio']} (noise)", "measured": r,
                    "met": r <= TARGETS["predict_ratio"]})
    ready = report["stores"]["ready"]
    out.append({"target": "create->READY: median PostgreSQL / median SQLite", "limit": f"<= {TARGETS['ready_ratio']}",
                "measured": ready["ratio"], "met": ready["ratio"] <= TARGETS["ready_ratio"]})
    for iso, s in report["training"]["servers"].items():
        out.append({"target": f"Predict p99 while FINE_TUNE trains / idle, training in a {iso}",
                    "limit": f"<= {TARGETS['train_p99_ratio']}", "measured": s["p99_ratio"],
                    "met": s["p99_ratio"] <= TARGETS["train_p99_ratio"]})
    return out


def train_s(server: dict) -> str:
    return f"{server['train_s']:.1f}" if "train_s" in server else "-"


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def render_markdown(report: dict) -> str:
    env = report["environment"]
    st, rp, tr, mem, dep = (report[k] for k in ("stores", "replicas", "training", "memory", "deployment"))
    la0 = tuple(round(x, 2) for x in report["load_average_start"])
    la1 = tuple(round(x, 2) for x in report["load_average_end"])
    lines = [
        (f"Measured {env['when']} at commit `{env['commit']}` (service source digest `{env['source_digest']}`), "
        f"{env['mode']} run ({report['seconds']:.0f} s), on {env['cores']} cores ({env['cpu']}), onnxruntime "
        f"{env['onnxruntime']}, grpcio {env['grpcio']}, {env['postgresql']} (fsync on). **Load average (1/5/15 "
        f"min) at start {la0}, at end {la1}** on a 2-core machine shared with other work: absolute figures are "
        "slow and noisy; the ratios are taken inside each round."),
        "",
        "```bash",
        report["command"],
        "```",
        "",
        (f"**SQLite vs PostgreSQL, Predict** (one short sentence per request; {len(st['predict'][0]['rounds'])} "
        "rounds alternating which store goes first; medians over rounds, ratios are medians of the per-round "
        "ratios):"),
        "",
        ("| concurrency | SQLite p50 ms | PG p50 ms | p50 PG/SQLite | SQLite p99 ms | PG p99 ms | p99 PG/SQLite | "
        "SQLite req/s | PG req/s | errors |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in st["predict"]:
        s, p = lv["sqlite"], lv["postgresql"]
        lines.append(f"| {lv['concurrency']} | {s['p50_ms']:.2f} | {p['p50_ms']:.2f} | {lv['p50_ratio']:.2f}x | "
                     f"{s['p99_ms']:.2f} | {p['p99_ms']:.2f} | {lv['p99_ratio']:.2f}x | {s['throughput']:.0f} | "
                     f"{p['throughput']:.0f} | {s['errors'] + p['errors']} |")
    lines += ["", "Store operations during those windows (per 1,000 Predict calls; per second in brackets):", ""]
    for lv in st["predict"]:
        for kind in ("sqlite", "postgresql"):
            ops = lv[kind]["store_ops_per_1000_calls"]
            per_s = lv[kind]["store_ops_per_s"]
            text = ", ".join(f"`{op}` {n:.2f} ({per_s[op]:.2f}/s)" for op, n in sorted(ops.items())) or "none"
            lines.append(f"- c={lv['concurrency']}, {kind}: {text}")
    worst = max(((n / 1000, op, f"c={lv['concurrency']}, {kind}") for lv in st["predict"]
                 for kind in ("sqlite", "postgresql") for op, n in lv[kind]["store_ops_per_1000_calls"].items()),
                default=(0.0, "none", ""))
    lines += ["", (f"The most frequent, per Predict call: `{worst[1]}` {worst[0]:.3f} per call ({worst[2]}). A store "
              "call on the predict path would show at 1 or more per call; rates that stay the same per second "
              "at both concurrencies are the servers' background work (change-feed poll every 0.5 s, job queue "
              "poll, health checks, usage flush) and the first head load after training; `get_tenant` is the caller's quotas, re-read when its `auth_cache_seconds` (2 s) cache expires.")]
    ready = st["ready"]
    lines += [
        "",
        f"**create->READY** (CreateTask, AUTO, {ready['examples']} short sentences, new ones each time, until "
        f"WatchJob says SUCCEEDED; {len(ready['times_s']['sqlite'])} alternating repetitions): SQLite "
        + ", ".join(f"{t:.2f}" for t in ready["times_s"]["sqlite"]) + f" s (median {ready['sqlite_median_s']:.2f}); "
        "PostgreSQL " + ", ".join(f"{t:.2f}" for t in ready["times_s"]["postgresql"])
        + f" s (median {ready['postgresql_median_s']:.2f}); ratio of medians **{ready['ratio']:.2f}x** (median of "
        f"paired ratios {ready['paired_ratio']:.2f}x).",
        "",
    ]
    one, two = rp["one"], rp["two"]
    calls = two["predict_calls_by_replica"]
    total = sum(calls.values()) or 1
    lines += [
        (f"**One vs two replicas on one PostgreSQL** (c={rp['concurrency']}; two = one channel to both addresses "
        f"with the `round_robin` policy; {len(rp['rounds'])} alternating rounds):"),
        "",
        ("| replicas | req/s | p50 ms | p99 ms | Predict calls per replica | server CPU (cores) | client CPU | "
        "other load | PG connections (max) | errors |"),
        "|---|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for kind, v in (("one", one), ("two", two)):
        share = ", ".join(f"{n} {c:,.0f}" + (f" ({c / total:.0%})" if kind == "two" else "")
                          for n, c in v["predict_calls_by_replica"].items())
        cpu = ", ".join(f"{n} {c:.2f}" for n, c in v["server_cpu_cores"].items())
        lines.append(f"| {kind} | {v['throughput']:.0f} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | {share} | {cpu} | "
                     f"{v['client_cpu_cores']:.2f} | {v['other_cpu_cores']:.2f} | {v['pg_connections_max']} | "
                     f"{v['errors']} |")
    lines += [
        "",
        (f"Two replicas / one: throughput **{rp['throughput_ratio']:.2f}x**, p99 **{rp['p99_ratio']:.2f}x**. Both "
        f"replicas run on the same {env['cores']} cores, each with an onnxruntime pool as large as the machine: "
        "a second replica adds no CPU here, only a second process competing for it, so this measures the cost "
        "of spreading calls (and that they do spread), not the gain of a second machine."),
        "",
        (f"**Serving while a FINE_TUNE job trains** (Predict at c={tr['concurrency']}, {tr['window_s']:.0f} s "
        "windows; per round p99 idle, then p99 while FINE_TUNE jobs of 24 sentences run, same server, SQLite "
        "store; each window gets a queue of as many jobs as it takes to outlast it, from a warm-up job's time):"),
        "",
        ("| training runs in | jobs per window | s per job (training alone) | p50 idle ms | p50 training ms | p99 idle ms | "
         "p99 training ms | p99 ratio | "
        "req/s idle | req/s training | server CPU idle / training | other load | windows inside the jobs | errors |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for iso, s in tr["servers"].items():
        lines.append(
            f"| a {iso} | {s['jobs_per_window']} | {s['job_s']:.1f} ({train_s(s)}) | {s['idle_p50_ms']:.1f} | {s['training_p50_ms']:.1f} | "
            f"{s['idle_p99_ms']:.1f} | {s['training_p99_ms']:.1f} | **{s['p99_ratio']:.2f}x** | "
            f"{s['throughput_idle']:.0f} | {s['throughput_training']:.0f} | {s['server_cpu_cores_idle']:.2f} / "
            f"{s['server_cpu_cores_training']:.2f} | {s['other_cpu_cores']:.2f} | "
            f"{s['windows_covered']}/{len(s['rounds'])} | {s['errors']} |")
    by_round = "; ".join(f"{iso}: " + ", ".join(f"{r['p99_ratio']:.2f}" for r in s["rounds"])
                         for iso, s in tr["servers"].items())
    started = mem["started_rss"]
    churn = mem["churn"]
    lines += [
        "",
        f"p99 ratio by round: {by_round}.",
        "",
        "**Memory and store size.** RSS after start: " + "; ".join(
            f"{name} " + ", ".join(f"{k} {mib(v)}" for k, v in r.items()) for name, r in started.items())
        + f". {mem['heads']:,} zero-shot tasks (3 labels) created on {mem['creator']} "
        f"({mem['zero_shot_create_s']:.1f} s) and predicted once each on {mem['loader']}, which loads their heads "
        f"from the store ({mem['heads_loaded']:.0f} heads in its cache in the end): "
        f"**{mem['rss_per_loaded_head_bytes'] / 1024:.0f} KiB of RSS per loaded head** (the head cache's estimate: "
        f"{mem['cache_bytes_per_head'] / 1024:.0f} KiB); {mem['rss_per_created_task_bytes'] / 1024:.1f} KiB of RSS "
        f"per task on {mem['creator']}. PostgreSQL: {ready['pg_database_bytes_per_task'] / 1024:.0f} KiB per "
        "trained task (24 examples, their features, a head, a job; pg_database_size, indexes included), "
        f"{mem['pg_database_bytes_per_zero_shot_task'] / 1024:.1f} KiB per zero-shot task; row bytes per trained "
        "task: " + ", ".join(f"{t} {b / 1024:.1f} KiB" for t, b in sorted(ready["pg_row_bytes_per_task"].items()))
        + f". Change-feed rows: {ready['pg_changes_per_task']:.1f} per trained task, "
        f"{mem['pg_changes_per_zero_shot_task']:.1f} per zero-shot task. A replica reads "
        f"**{mem['loader_get_task_per_change']:.2f} `get_task` per change** to a task it does not hold. While the "
        f"second half of the tasks was created, {mem['loader']} predicted the first half ({churn['predicts']} cold "
        f"heads): {churn['loads']:.0f} loads, {churn['heads_cached']:.0f} of them kept in its cache.",
        "",
        f"**What {dep['replicas']} replicas and {dep['tasks']:,} tasks need**, from these figures:",
        "",
        "| | need | from |",
        "|---|---:|---|",
        (f"| PostgreSQL connections, serving replicas (`training_workers = 0`) | up to {dep['connections_serving_only_max']} "
        f"| {dep['replicas']} x (pool {POOL_SIZE} + overflow {POOL_OVERFLOW} + 1 LISTEN); measured, all of "
        "pg-1's and pg-2's connections, the most at any sample at c=16: "
        f"{dep['connections_measured']['one_replica_c16']} while pg-1 took the calls, "
        f"{dep['connections_measured']['two_replicas_c16']} while both did |"),
        (f"| ... with one worker process per replica | up to {dep['connections_with_one_worker_each_max']} | + "
        f"{dep['replicas']} x {dep['connections_per_worker_process_max']} (each worker process opens its own store) |"),
        (f"| change-feed polls | {dep['poll_queries_per_s']:.0f} queries/s | {dep['replicas']} replicas / "
        f"`sync_interval_seconds` {env['sync_interval_seconds']} |"),
        (f"| LISTEN fan-out | {dep['replicas']} notifications per change, "
         f"{dep['replicas'] * dep['get_task_per_change']:.0f} `get_task` reads | a new version or a new task is "
         f"{dep['changes_per_trained_task']:.1f} change; every replica reads the task for every change, held or "
         f"not (measured: {dep['get_task_per_change']:.2f} reads per change per replica, from NOTIFY and again "
         f"from the poll's re-read); 10 versions/s: {10 * dep['replicas']:.0f} notifications/s, "
         f"{10 * dep['replicas'] * dep['get_task_per_change']:.0f} reads/s |"),
        (f"| memory per serving replica | {mib(dep['serving_replica_rss_bytes'])} + {dep['head_bytes'] / 1024:.0f} KiB per "
        f"hot head; {mib(dep['replica_rss_full_cache_bytes'])} with a full {env['head_cache_mb']} MiB head cache "
        f"({dep['heads_in_budget']:,} heads) | round robin sends every task to every replica: each replica caches "
        f"every hot head; all {dep['tasks']:,} would be {mib(dep['all_heads_bytes'])} per replica |"),
        f"| memory per worker process | {mib(dep['worker_process_rss_bytes'])} | RSS of sqlite-p's worker after start |",
        (f"| store | {dep['store_bytes_trained'] / 2**30:.1f} GiB (trained tasks of 24 examples), "
        f"{dep['store_bytes_zero_shot'] / 2**30:.2f} GiB (zero-shot) | bytes per task above x {dep['tasks']:,} |"),
        "",
        "| target | limit | measured | met |",
        "|---|---|---:|---|",
    ]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['limit']} | {t['measured']:.2f} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def update_docs(markdown: str) -> None:
    text = DOCS.read_text() if DOCS.is_file() else "# Benchmarks\n"
    block = f"{BEGIN}\n{markdown.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + f"\n\n## Replicas\n\n### Results (CPU)\n\n{block}\n"
    DOCS.write_text(text)


# --- the run ---------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run (< 3 min)")
    p.add_argument("--rounds", type=int, help="rounds of the store and replica comparisons [4, quick 2]")
    p.add_argument("--duration", type=float, help="seconds measured per window [4, quick 2]")
    p.add_argument("--warmup", type=float, help="seconds of load before each window [1, quick 0.5]")
    p.add_argument("--store-concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--replica-concurrency", type=int, default=16)
    p.add_argument("--ready-reps", type=int, help="create->READY repetitions per store [6, quick 3]")
    p.add_argument("--train-rounds", type=int, help="idle/training rounds per isolation [2, quick 1]")
    p.add_argument("--train-window", type=float, help="seconds measured idle and while training [8, quick 5]")
    p.add_argument("--train-concurrency", type=int, default=4)
    p.add_argument("--heads", type=int, help="zero-shot tasks created and loaded for memory per head "
                   "[1000, quick 200]")
    p.add_argument("--inputs", type=int, default=256, help="distinct sentences the load generators send")
    p.add_argument("--start-timeout", type=float, default=600, help="seconds for the servers to start")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="server setting for every server, as HEADSERVE_KEY=VALUE in its environment")
    p.add_argument("--results", type=pathlib.Path, default=HERE / "results")
    p.add_argument("--docs", action="store_true", help="rewrite the Replicas results in docs/benchmarks.md")
    p.add_argument("--report", type=pathlib.Path, metavar="JSON",
                   help="render the Markdown again from a results file (with --docs: into docs/benchmarks.md)")
    p.add_argument("--client", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = {"rounds": (4, 2), "duration": (4.0, 2.0), "warmup": (1.0, 0.5), "ready_reps": (6, 3),
                "train_rounds": (2, 1), "train_window": (8.0, 4.0), "heads": (1000, 200)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client:
        client_main(args.client)
        return 0
    if args.report:
        report = json.loads(args.report.read_text())
        report["deployment"] = deployment(report)  # (derived figures: recomputed with the current code)
        report["targets"] = check_targets(report)
        markdown = render_markdown(report)
        print(markdown)
        if args.docs:
            update_docs(markdown)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    args.results.mkdir(parents=True, exist_ok=True)
    from service.config import Settings

    t_start = time.perf_counter()
    load0 = os.getloadavg()
    overrides = {f"HEADSERVE_{k.upper()}": v for k, _, v in (kv.partition("=") for kv in args.set)}
    defaults = Settings(data_dir=pathlib.Path("unused"))
    report: dict = {"command": " ".join(["python bench/replicas.py", *(sys.argv[1:] if argv is None else argv)]),
                    "load_average_start": load0,
                    "environment": environment(args, defaults.sync_interval_seconds, defaults.head_cache_mb)}
    tmp = tempfile.TemporaryDirectory(prefix="headserve-bench-replicas-")
    workdir = pathlib.Path(tmp.name)
    servers: dict[str, Replica] = {}
    db = None
    try:
        with postgres_cluster() as cluster:
            url = cluster.create_database("replicas")
            done = subprocess.run([sys.executable, "-m", "service", "db", "upgrade", "--store-url", url], check=False,
                                  cwd=ROOT, capture_output=True, text=True, timeout=300)
            if done.returncode:
                raise RuntimeError(f"headserve db upgrade failed: {done.stderr[-2000:]}")
            db = Database(cluster, url)
            report["environment"]["postgresql"] = db.scalar("SHOW server_version").split()[0].join(
                ("PostgreSQL ", ""))
            plan = {
                "sqlite": {"HEADSERVE_TRAINING_ISOLATION": "thread"},
                "pg-1": {"HEADSERVE_STORE_URL": url, "HEADSERVE_TRAINING_ISOLATION": "thread"},
                "pg-2": {"HEADSERVE_STORE_URL": url, "HEADSERVE_TRAINING_WORKERS": "0"},
                "sqlite-p": {"HEADSERVE_TRAINING_ISOLATION": "process", "HEADSERVE_TRAINING_WORKERS": "1"},
            }
            for name, env in plan.items():  # started together: each loads its backbone on its own
                servers[name] = Replica(name, workdir, {**env, **overrides})
            for r in servers.values():
                r.wait_started(args.start_timeout)
            log.info("servers up: %s", ", ".join(f"{n} {r.address} in {r.started_s:.0f} s" for n, r in servers.items()))
            report["start_s"] = {n: r.started_s for n, r in servers.items()}
            sqlite, pg1, pg2, sqlite_p = (servers[n] for n in plan)
            for r in (sqlite, pg1, sqlite_p):
                channel, stub = stub_of(r)
                try:
                    create_task(stub, TASK, BACKBONE, topic_examples(), pb.LINEAR)
                finally:
                    channel.close()
            texts, source = load_texts(args.inputs)
            report["inputs"] = source
            requests = workdir / "requests.bin"
            write_requests(str(requests), [pb.PredictRequest(task_id=TASK, inputs=[pb.Input(text=t)]) for t in texts])
            load = Load(workdir)
            report["stores"] = part_stores(args, load, sqlite, pg1, db, requests)
            report["replicas"] = part_replicas(args, load, pg1, pg2, db, requests)
            report["training"] = part_training(args, load, [("thread", sqlite), ("process", sqlite_p)], requests)
            report["memory"] = part_memory(args, servers, pg1, pg2, db)
            report["pg_connections_idle"] = db.connections()
            report["job_log"] = {name: r.job_lines() for name, r in servers.items()}
    finally:
        for r in servers.values():  # all at once, then wait for each
            r.terminate()
        for r in servers.values():
            r.stop()
        if db is not None:
            with contextlib.suppress(Exception):
                db.close()
        tmp.cleanup()
    report["load_average_end"] = os.getloadavg()
    report["seconds"] = time.perf_counter() - t_start
    report["deployment"] = deployment(report)
    report["targets"] = check_targets(report)
    out_json = args.results / "replicas.json"
    out_json.write_text(json.dumps(report, indent=2, default=float))
    markdown = render_markdown(report)
    (args.results / "replicas.md").write_text(markdown)
    print(markdown)
    if args.docs:
        update_docs(markdown)
    log.info("wrote %s (%.0f s)", out_json, report["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
