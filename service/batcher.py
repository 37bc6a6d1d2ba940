"""Dynamic batching: requests queue per backbone, one worker thread forms batches and runs them.

A request carries some rows (inputs), an optional deadline and a future. The worker takes requests in
arrival order while their rows fit in the batch size limit (a request is never split; a larger one runs
alone), and runs the batch with the function it was given, which settles every request's future.

The limit is `max_size`, or, when `adaptive`, the batch size (a power of two up to `max_size`) that has
cost the least time per row lately (`SizeTuner`): where a larger batch is cheaper per input (a GPU) it
grows to `max_size`; where it is not (padded text on a busy CPU, where a batch of 8 costs more per
input than a batch of 2), batches stay small, so the service keeps the model's best throughput.

When to run: at once if nothing else is on its way; then, if the batcher is idle, the request runs on
the thread that submitted it (no hand-off to the worker and back), so an idle server adds no queueing
to the model's latency. With `max_delay` > 0 a forming batch may wait, at most `max_delay` from the
moment the worker is free and a request is queued, for rows known or expected to arrive: requests being
*prepared* (validated, preprocessed) by RPC threads, and, right after a batch under steady load, the
rows of that batch (the callers it just answered are sending their next requests; waiting for them
keeps batches whole where taking whatever is queued makes them alternate large and small). A lone
request after a quiet spell never waits.

A request whose deadline passed while queued is answered with DeadlineExceeded and a cancelled one is
skipped; neither reaches the model. The queue is bounded in rows: past `max_queue`, submitting raises
ResourceExhausted (unless the queue is empty, so one large request always gets through).

Fairness: a request belongs to a group (its tenant). A batch takes requests round-robin across the groups
that have any queued, each group's requests in arrival order, starting with the group served least
recently (a group that has waited is first in the next batch, even if the flooding group's oldest request
is older and alone fills the batch), so one group flooding the queue delays another's request by at most
the batch already running. A group that holds less than its fair
share of the queue (`max_queue` / groups queued) is admitted even when the queue is full, so a flood
cannot turn another group's requests into ResourceExhausted either; the queue then holds at most twice
`max_queue` rows.

A fair lane (`fair_lane`): least-recently-served order still leaves another group's request waiting for the
batch already running, which on a CPU is many times its own time (a batch of 16 rows against one). So when a
request is queued while a batch runs and its group has nothing in that batch, it does not wait: a second
worker thread runs a batch of such groups' requests at once, beside the first (onnxruntime sessions run
concurrently). At most one fair-lane batch runs at a time, and a group in the running batch never uses it, so
one tenant alone (or a server without tenants) batches exactly as without it.

The module knows nothing of models; service/predictor.py gives it the function that runs a batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from adapters.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from service import errors

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Pending:
    """One queued request: what to run, how many rows it adds to a batch, and its future."""

    payload: Any
    rows: int
    deadline: float | None = None  # time.monotonic() value; None: no deadline
    group: str = ""  # whose request: batches are shared fairly between groups
    future: Future = dataclasses.field(default_factory=Future)
    queued_at: float = 0.0
    trace: Any = None  # the request's span context, when tracing is on (service/tracing.py)
    request_id: str = "-"  # for the log lines of its batch


@contextlib.contextmanager
def log_context(batch: list[Pending]) -> Iterator[None]:
    """Log lines written inside concern these requests: their request ids and tenants (groups), comma
    separated, stand in the records' request_id and tenant (service/errors.py)."""
    ids = errors.request_id.set(",".join(p.request_id for p in batch))
    tenants = errors.tenant.set(",".join(dict.fromkeys(p.group or "-" for p in batch)))
    try:
        yield
    finally:
        errors.tenant.reset(tenants)
        errors.request_id.reset(ids)


class SizeTuner:
    """The batch size limit with the lowest measured cost: an exponentially weighted average of seconds
    per row for each size bucket (powers of two up to max_size), as in Clipper's adaptive batching.

    An untried larger size is tried when the best known one is its half (optimism), and every
    `explore_every` batches the next batch may be one size up or down (alternately) to refresh what is
    known as the load changes."""

    def __init__(self, max_size: int, alpha: float = 0.2, explore_every: int = 32) -> None:
        self.sizes = sorted({min(1 << k, max_size) for k in range(max_size.bit_length() + 1)})
        self.alpha = alpha
        self.explore_every = explore_every
        self.cost: dict[int, float] = {}  # size bucket -> seconds per row
        self.cap = max_size
        self._probe: int | None = None
        self._batches = 0

    def limit(self) -> int:
        return self._probe or self.cap

    def bucket(self, rows: int) -> int:
        return max(s for s in self.sizes if s <= rows) if rows >= 1 else 1

    def observe(self, rows: int, seconds: float) -> None:
        size = self.bucket(rows)
        per_row = seconds / max(rows, 1)
        old = self.cost.get(size)
        self.cost[size] = per_row if old is None else old + self.alpha * (per_row - old)
        best = min(self.cost, key=lambda s: (self.cost[s], -s))
        i = self.sizes.index(best)
        up = self.sizes[i + 1] if i + 1 < len(self.sizes) else None
        self.cap = up if up is not None and up not in self.cost else best
        self._batches += 1
        self._probe = None
        if self._batches % self.explore_every == 0:
            j = self.sizes.index(self.cap) + (1 if (self._batches // self.explore_every) % 2 else -1)
            if 0 <= j < len(self.sizes):
                self._probe = self.sizes[j]


class Arrival:
    """A request being prepared (see Batcher.arriving)."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher
        self.done = False

    def submit(
        self, payload: Any, rows: int, deadline: float | None = None, group: str = "", trace: Any = None
    ) -> Pending:
        """Queues the request; if the batcher is idle and nothing else is coming, runs it right here, on
        the caller's thread (no hand-off to the worker and back: the idle-server latency is the model's)."""
        self.done = True
        return self._batcher._submit(payload, rows, deadline, arrived=True, inline=True, group=group,
                                     trace=trace)


@dataclasses.dataclass
class BatchStats:
    """Counters since start (or the last `reset_stats`)."""

    batches: int = 0
    rows: int = 0
    requests: int = 0
    largest: int = 0
    expired: int = 0
    cancelled: int = 0
    rejected: int = 0
    failed: int = 0  # batches whose run raised (the model failed, not one request)
    inline: int = 0  # batches run on the caller's thread (an idle server's lone requests)
    fair: int = 0  # batches run in the fair lane, beside a running batch of other groups

    @property
    def mean_rows(self) -> float:
        return self.rows / self.batches if self.batches else 0.0


class Batcher:
    def __init__(
        self,
        name: str,
        run: Callable[[list[Pending]], None],
        max_size: int,
        max_delay: float,
        max_queue: int,
        adaptive: bool = False,
        observe: Callable[[int, float, list[float]], None] | None = None,
        fair_lane: bool = False,
    ) -> None:
        """run(batch) must settle every future of the batch (a result or an exception); whatever it
        leaves unsettled, or raises, fails the rest of the batch. One batch runs at a time, and with
        `fair_lane` one more of other groups beside it (then `run` is called from two threads at once).
        `observe`, when given, hears of every batch run: its rows, its seconds and each request's wait in
        the queue."""
        self.name = name
        self.max_size = max_size
        self.tuner = SizeTuner(max_size) if adaptive else None
        self.max_delay = max_delay
        self.max_queue = max_queue
        self._run = run
        self._observe = observe
        self._queue: deque[Pending] = deque()
        self._queued_rows = 0
        self._group_rows: dict[str, int] = {}  # queued rows per group (groups with none are absent)
        self._served: dict[str, int] = {}  # group -> turn it last had a request taken (queued groups only)
        self._turn = 0
        self._arriving = 0
        self._busy = False  # a batch is running (on the worker or inline on a caller's thread)
        self._running: set[str] = set()  # the groups in that batch
        self._fair_busy = False  # a fair-lane batch is running (on the fair lane's thread)
        self._closed = False
        self._last_rows = 0  # rows of the previous batch
        self._free_at = 0.0  # when it finished (time.monotonic())
        self._free_queued = 0  # rows that were queued then
        self._cond = threading.Condition(threading.Lock())
        self.stats = BatchStats()
        self._thread = threading.Thread(target=self._loop, name=f"batch-{name}", daemon=True)
        self._thread.start()
        self._fair_thread: threading.Thread | None = None
        if fair_lane:
            self._fair_thread = threading.Thread(target=self._fair_loop, name=f"fair-{name}", daemon=True)
            self._fair_thread.start()

    # --- the RPC threads' side ----------------------------------------------------------------------

    @contextlib.contextmanager
    def arriving(self) -> Iterator[Arrival]:
        """Wraps a request's preparation; a forming batch may wait for it. Submit through the Arrival
        it yields: that ends the arrival and queues the request in one step."""
        arrival = Arrival(self)
        with self._cond:
            self._arriving += 1
        try:
            yield arrival
        finally:
            if not arrival.done:
                with self._cond:
                    self._arriving -= 1
                    self._cond.notify()

    def check_room(self, rows: int, group: str = "") -> None:
        """Raises ResourceExhausted now if `rows` more would not fit (before any work is spent on them)."""
        if self._full(rows, group):
            self._reject(rows)

    def _full(self, rows: int, group: str) -> bool:
        """Whether `rows` more of `group` are refused: past max_queue, unless the group is under its share."""
        if not self._queued_rows or self._queued_rows + rows <= self.max_queue:
            return False
        held = self._group_rows.get(group, 0)
        share = self.max_queue // (len(self._group_rows) + (group not in self._group_rows))
        return held + rows > share

    def _reject(self, rows: int) -> None:
        self.stats.rejected += 1
        raise ResourceExhausted(
            f"the prediction queue of backbone {self.name!r} is full ({self._queued_rows} inputs waiting, "
            f"limit {self.max_queue}); retry after a short backoff"
        )

    def submit(
        self, payload: Any, rows: int, deadline: float | None = None, group: str = "", trace: Any = None
    ) -> Pending:
        """Queues a request for the worker. `trace`: the request's span context, for the batch's spans."""
        return self._submit(payload, rows, deadline, arrived=False, inline=False, group=group, trace=trace)

    def _submit(
        self, payload: Any, rows: int, deadline: float | None, arrived: bool, inline: bool, group: str = "",
        trace: Any = None,
    ) -> Pending:
        pending = Pending(payload, rows, deadline, group=group, trace=trace,
                          request_id=errors.request_id.get())
        with self._cond:
            if arrived:
                self._arriving -= 1
            if self._closed:
                self._cond.notify()
                raise Unavailable("the server is shutting down; retry on another replica")
            if self._full(rows, group):
                self._cond.notify()
                self._reject(rows)
            pending.queued_at = time.monotonic()
            self._queue.append(pending)
            self._queued_rows += rows
            self._group_rows[group] = self._group_rows.get(group, 0) + rows
            batch = self._take() if inline and self._may_run_now(pending) else None
            if batch:
                self.stats.inline += 1
            else:
                self._wake()
        if batch:
            self._execute(batch)  # on this thread: the worker was idle and nothing else is coming
        return pending

    def _wake(self) -> None:
        """(lock held) Something was queued: the worker, and the fair lane's thread, look again."""
        if self._fair_thread is None:
            self._cond.notify()
        else:
            self._cond.notify_all()

    def _may_run_now(self, pending: Pending) -> bool:
        """(lock held) Whether the caller may run its just-queued request at once, on its own thread:
        no batch is running, it is alone, and no other request is expected to join it."""
        if self._busy or self._arriving or len(self._queue) != 1:
            return False
        recent = pending.queued_at - self._free_at < self.max_delay
        return self.max_delay <= 0 or not recent or self._free_queued + self._last_rows <= pending.rows

    # --- the worker ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)

    def _fair_loop(self) -> None:
        while True:
            batch = self._next_fair_batch()
            if batch is None:
                return
            self._execute(batch, fair=True)

    def _next_fair_batch(self) -> list[Pending] | None:
        """Waits until a batch runs while a group with nothing in it has requests queued; takes those."""
        with self._cond:
            while True:
                if self._closed:
                    return None  # the worker drains the queue
                if self._busy and not self._fair_busy and any(g not in self._running for g in self._group_rows):
                    batch = self._take(fair=True)
                    if batch:
                        self.stats.fair += 1
                        return batch
                self._cond.wait()

    def _execute(self, batch: list[Pending], fair: bool = False) -> None:
        start = time.perf_counter()
        began = time.monotonic()
        try:
            self._run(batch)
        except BaseException as exc:  # the batch's callers get the error
            self.stats.failed += 1
            with log_context(batch):
                log.exception("batch of %d request(s) on %s failed (request ids %s)", len(batch), self.name,
                              ", ".join(p.request_id for p in batch))
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
        finally:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(
                        RuntimeError("the batch finished without an answer for this request")
                    )
            seconds = time.perf_counter() - start
            if self._observe is not None:
                self._observe(sum(p.rows for p in batch), seconds, [began - p.queued_at for p in batch])
            with self._cond:
                if fair:  # (its cost, shared with the batch beside it, says nothing of the best size)
                    self._fair_busy = False
                else:
                    if self.tuner is not None:
                        self.tuner.observe(sum(p.rows for p in batch), seconds)
                    self._busy = False
                    self._running = set()
                    self._free_at = time.monotonic()
                    self._free_queued = self._queued_rows
                self._cond.notify_all()

    def _next_batch(self) -> list[Pending] | None:
        with self._cond:
            while True:
                while (not self._queue or self._busy) and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return None  # closed and drained
                if self._busy:  # closing while an inline batch runs: let it finish first
                    self._cond.wait(0.01)
                    continue
                if self.max_delay > 0:
                    self._wait_for_more()
                batch = self._take()
                if batch:
                    if self._fair_thread is not None:
                        self._cond.notify_all()  # groups outside this batch may now run beside it
                    return batch

    def _wait_for_more(self) -> None:
        """Lets the forming batch fill (lock held): see the module's docstring for when, and how long."""
        start = max(self._free_at, self._queue[0].queued_at)
        until = start + self.max_delay
        # Steady load (the queue was not empty when the last batch ended, or refilled right after): expect
        # what was queued then plus the rows of that batch, whose callers are coming back.
        steady = self._free_queued > 0 or start - self._free_at < self.max_delay
        expected = self._free_queued + self._last_rows if steady else 0
        limit = self.limit
        while not self._closed and self._queue and self._queued_rows < limit:
            if not self._arriving and self._queued_rows >= min(expected, limit):
                return
            left = until - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _take(self, fair: bool = False) -> list[Pending]:
        """(lock held) Pops the next batch: round-robin across groups, each group's requests in arrival
        order, until the next request of every group would not fit; drops expired and cancelled requests
        on the way. A non-empty batch marks the batcher busy until `_execute` ends. `fair`: a fair-lane
        batch, of groups that have nothing in the running batch."""
        batch: list[Pending] = []
        rows = 0
        now = time.monotonic()
        stats = self.stats
        limit = self.limit
        arrived: dict[str, deque[Pending]] = {}
        for p in self._queue:
            if not (fair and p.group in self._running):
                arrived.setdefault(p.group, deque()).append(p)
        # Least recently served group first (never served: first of all), then by oldest request.
        order = sorted(arrived, key=lambda g: self._served.get(g, -1))
        lanes = {g: arrived[g] for g in order}
        taken: set[int] = set()
        while lanes:
            for group in list(lanes):
                lane = lanes[group]
                while lane:
                    p = lane[0]
                    if batch and rows + p.rows > limit:
                        lane.clear()  # this group's next request waits for the next batch
                        break
                    lane.popleft()
                    taken.add(id(p))
                    if self._live(p, now):
                        batch.append(p)
                        rows += p.rows
                        self._turn += 1
                        self._served[group] = self._turn
                        break  # one request per group per round
                if not lane:
                    del lanes[group]
        if taken:
            kept: deque[Pending] = deque()
            for p in self._queue:
                if id(p) in taken:
                    self._queued_rows -= p.rows
                    left = self._group_rows[p.group] - p.rows
                    if left:
                        self._group_rows[p.group] = left
                    else:
                        del self._group_rows[p.group]
                        self._served.pop(p.group, None)  # a group that comes back later is new again
                else:
                    kept.append(p)
            self._queue = kept
        if batch and fair:
            self._fair_busy = True
        elif batch:
            self._busy = True
            self._running = {p.group for p in batch}
            self._last_rows = rows
            stats.batches += 1
            stats.requests += len(batch)
            stats.rows += rows
            stats.largest = max(stats.largest, rows)
        return batch

    def _live(self, p: Pending, now: float) -> bool:
        """(lock held) Whether a request taken from the queue goes into the batch: a cancelled one is
        skipped, and one whose deadline passed is answered DeadlineExceeded."""
        if not p.future.set_running_or_notify_cancel():
            self.stats.cancelled += 1
            return False
        if p.deadline is not None and now >= p.deadline:
            self.stats.expired += 1
            p.future.set_exception(
                DeadlineExceeded(
                    f"the deadline passed after {now - p.queued_at:.3f}s in the queue, before the model ran; "
                    "allow more time or send fewer requests at once"
                )
            )
            return False
        return True

    @property
    def limit(self) -> int:
        """Rows the next batch may hold."""
        return self.tuner.limit() if self.tuner is not None else self.max_size

    @property
    def queued_rows(self) -> int:
        """Inputs waiting for a batch (cancelled ones count until the worker skips them)."""
        return self._queued_rows

    # --- life cycle ---------------------------------------------------------------------------------

    def reset_stats(self) -> BatchStats:
        """Returns the counters so far and starts new ones."""
        with self._cond:
            stats, self.stats = self.stats, BatchStats()
        return stats

    def close(self, timeout: float = 5.0) -> None:
        """Runs what is queued, then stops the worker; later submits are Unavailable."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._fair_thread is not None:
            self._fair_thread.join(timeout)
