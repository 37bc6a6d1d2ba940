"""Predictions: requests for any tasks on a backbone are batched into one pass of its shared ONNX trunk,
then each task's rows go through that task's ONNX head.

- Heads load lazily from the store into an LRU of onnxruntime sessions bounded by a memory budget
  (`HeadCache`); a cold task is loaded once however many requests ask for it at the same time.
- A request picks its heads (one per task it names) when it arrives, so all its inputs are scored by
  the same version even while a new one is being installed; installing replaces the cache entry.
- The RPC thread validates the request's inputs. Images are also decoded and resized there (per image,
  in parallel across RPC threads; PIL releases the GIL); text is tokenised by the backbone's batcher
  thread (service/batcher.py) for the whole batch in one tokenizer call. That thread then pads and stacks
  the batch, runs the trunk once, runs each head on its rows, and settles every request of the batch.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import heapq
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

from adapters.errors import Cancelled, DeadlineExceeded, FailedPrecondition, InvalidInput, NotFound
from adapters.runtime import HeadRuntime
from service.batcher import Batcher, Pending, log_context
from service.config import Settings
from service.registry import BackboneRegistry, Entry
from service.storage import HeadStore
from service.store import task_of, tenant_of

log = logging.getLogger(__name__)

_NO_SPAN = contextlib.nullcontext()  # where a span would be, with tracing off


@dataclasses.dataclass
class Scored:
    """One task's answer: probabilities over its labels for each input, from one head version."""

    version: int
    labels: list[str]
    probabilities: np.ndarray  # [inputs, labels]
    task_id: str = ""
    reject_threshold: float = 0.0  # a top probability below it is reported as rejected


# --- the LRU of loaded heads --------------------------------------------------------------------------


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    loads: int = 0
    evictions: int = 0
    heads: int = 0
    bytes: int = 0


class HeadCache:
    """task_id -> its live HeadRuntime, least recently used first out once past `budget_bytes`.

    A head's size is `HeadRuntime.memory_bytes` (an estimate from measurements). The most recently
    used head always stays, even if it alone is over the budget.

    Tenants share the budget: a head goes out of the group (tenant, `group_of` its task id) holding the
    most bytes, that group's least recently used first. With one tenant that is plain LRU. With several,
    one tenant cycling through more heads than fit (tuned heads are 40 MB or more) evicts its own heads
    before anyone else's, and can push another tenant's heads out only while that tenant holds more than
    it does: each keeps at least an equal share of the budget, or what it uses if less.
    """

    def __init__(
        self, load: Callable[[str], HeadRuntime], budget_bytes: int, exists: Callable[[str], bool],
        group_of: Callable[[str], str] = lambda task_id: "",
    ) -> None:
        self._load = load
        self._exists = exists
        self._group_of = group_of
        self.budget_bytes = budget_bytes
        self._heads: OrderedDict[str, HeadRuntime] = OrderedDict()
        # group -> its task ids, least recently used first, and the bytes its heads hold
        self._groups: dict[str, OrderedDict[str, None]] = {}
        self._group_bytes: dict[str, int] = {}
        self._loading: dict[str, concurrent.futures.Future] = {}
        self._stale: set[concurrent.futures.Future] = set()  # loads a forget() overlapped: not cached
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def get(self, task_id: str) -> HeadRuntime:
        with self._lock:
            head = self._heads.get(task_id)
            if head is not None:
                self._heads.move_to_end(task_id)
                self._groups[self._group_of(task_id)].move_to_end(task_id)
                self.stats.hits += 1
                return head
            loading = self._loading.get(task_id)
            if loading is None:
                loading = self._loading[task_id] = concurrent.futures.Future()
                owner = True
            else:
                owner = False
        if not owner:
            return loading.result()  # the first caller's load (or its error)
        try:
            head = self._load(task_id)
        except BaseException as exc:
            with self._lock:
                self._loading.pop(task_id, None)
                self._stale.discard(loading)
            loading.set_exception(exc)
            raise
        with self._lock:
            if self._loading.get(task_id) is loading:
                del self._loading[task_id]
            self.stats.loads += 1
            if loading in self._stale:  # the task changed while it loaded: serve this call, keep nothing
                self._stale.discard(loading)
            else:
                head = self._put(task_id, head)
        loading.set_result(head)
        return head

    def install(self, task_id: str, head: HeadRuntime) -> None:
        """Makes `head` the task's live head, unless a newer version is already in, or the task is gone."""
        with self._lock:  # held across the check, so a concurrent forget() cannot be overtaken
            if self._exists(task_id):
                self._put(task_id, head)

    def _put(self, task_id: str, head: HeadRuntime) -> HeadRuntime:
        current = self._heads.get(task_id)
        if current is not None and current.version > head.version:
            self._heads.move_to_end(task_id)
            self._groups[self._group_of(task_id)].move_to_end(task_id)
            return current
        if current is not None:
            self._drop(task_id)
        self._heads[task_id] = head
        group = self._group_of(task_id)
        self._groups.setdefault(group, OrderedDict())[task_id] = None
        self._group_bytes[group] = self._group_bytes.get(group, 0) + head.memory_bytes
        self.stats.bytes += head.memory_bytes
        self._trim()
        return head

    def _drop(self, task_id: str) -> HeadRuntime | None:
        head = self._heads.pop(task_id, None)
        if head is not None:
            group = self._group_of(task_id)
            members = self._groups[group]
            del members[task_id]
            self._group_bytes[group] -= head.memory_bytes
            if not members:
                del self._groups[group], self._group_bytes[group]
            self.stats.bytes -= head.memory_bytes
        return head

    def set_budget(self, budget_bytes: int) -> None:
        """Changes the memory budget, unloading least recently used heads down to it."""
        with self._lock:
            self.budget_bytes = budget_bytes
            self._trim()

    def _trim(self) -> None:
        while self.stats.bytes > self.budget_bytes and len(self._heads) > 1:
            latest = next(reversed(self._heads))
            # The largest holder's least recently used head; never the latest, which may be its group's only
            # head (then the next largest holder's).
            victim = next(task_id for group in heapq.nlargest(2, self._groups, key=self._group_bytes.__getitem__)
                          for task_id in self._groups[group] if task_id != latest)
            self._drop(victim)
            self.stats.evictions += 1
        self.stats.heads = len(self._heads)

    def forget(self, task_id: str) -> None:
        """Drops the task's head; a load of it in flight is not cached, and the next get loads afresh."""
        with self._lock:
            loading = self._loading.pop(task_id, None)
            if loading is not None:
                self._stale.add(loading)
            self._drop(task_id)
            self.stats.heads = len(self._heads)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._heads

    def peek(self, task_id: str) -> HeadRuntime | None:
        """The loaded head, if any, without counting a use."""
        return self._heads.get(task_id)

    def holds(self, task_id: str) -> bool:
        """Whether the task's head is loaded or loading."""
        return task_id in self._heads or task_id in self._loading

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._heads)

    def __len__(self) -> int:
        return len(self._heads)


# --- batching -------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Work:
    """A request in a batch: its heads (one per task, fixed on arrival) and its inputs, preprocessed
    (`inputs`) or, where the batch preprocesses them together, raw (`items`)."""

    task_ids: list[str]
    heads: list[HeadRuntime]
    inputs: dict[str, np.ndarray] | None
    rows: int
    items: Sequence[str | bytes] = ()


class Ticket:
    """A submitted prediction. `result()` waits for one Scored per task; `cancel()` withdraws it if it
    has not reached the model yet."""

    def __init__(self, pending: Pending) -> None:
        self._pending = pending

    def cancel(self) -> bool:
        return self._pending.future.cancel()

    def done(self) -> bool:
        return self._pending.future.done()

    def result(self, timeout: float | None = None) -> list[Scored]:
        try:
            return self._pending.future.result(timeout)
        except concurrent.futures.TimeoutError:
            self.cancel()
            raise DeadlineExceeded("the deadline passed before the prediction was ready") from None
        except concurrent.futures.CancelledError:
            raise Cancelled("the prediction was cancelled") from None


class _Lane:
    """A backbone's batcher, with what its worker thread reuses from batch to batch."""

    def __init__(self, entry: Entry, settings: Settings, observe=None, tracer=None) -> None:
        self.entry = entry
        self.tracer = tracer  # service.tracing.Tracer, or None: tracing off
        # Text is validated per request (cheap) and tokenised per batch (one call: the fast tokenizer's
        # batch path, far cheaper than a call per request); images are preprocessed per request.
        self.deferred = entry.backbone.preprocess.modality == "text"
        tokenizer = getattr(entry.backbone.preprocess, "tokenizer", None)
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        self.pad_values = {"input_ids": pad_id}  # everything else pads with 0 (attention_mask: masked out)
        self.buffers: dict[str, np.ndarray] = {}
        self._buffers_free = threading.Lock()  # batches may run on two threads at once (the fair lane)
        self.batcher = Batcher(
            entry.spec.name,
            self.run,
            max_size=settings.batch_max_size,
            max_delay=settings.batch_max_delay_us / 1e6,
            max_queue=settings.batch_queue_inputs,
            adaptive=settings.batch_adaptive,
            observe=observe,
            fair_lane=settings.batch_fair_lane,
        )

    def collate(self, parts: list[dict[str, np.ndarray]], buffers: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Stacks the requests' inputs along the batch axis, padding ragged axes (text length) as the
        tokenizer pads a batch; into `buffers`, reused from batch to batch (see `run`)."""
        if len(parts) == 1:
            return parts[0]
        out = {}
        for name in self.entry.trunk.input_names:
            arrays = [p[name] for p in parts]
            rows = sum(len(a) for a in arrays)
            tail = tuple(max(a.shape[d] for a in arrays) for d in range(1, arrays[0].ndim))
            size = rows * int(np.prod(tail, dtype=np.int64))
            buf = buffers.get(name)
            if buf is None or buf.size < size or buf.dtype != arrays[0].dtype:
                buf = buffers[name] = np.empty(
                    max(size, 2 * (buf.size if buf is not None else 0)), arrays[0].dtype
                )
            batch = buf[:size].reshape((rows, *tail))
            if any(a.shape[1:] != tail for a in arrays):
                batch.fill(self.pad_values.get(name, 0))
            row = 0
            for a in arrays:
                batch[(slice(row, row + len(a)), *(slice(0, n) for n in a.shape[1:]))] = a
                row += len(a)
            out[name] = batch
        return out

    def by_length(self, inputs: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """The trunk's outputs for a tokenised (right-padded) text batch, computed in passes of inputs of
        similar length (length_passes), each padded only to its own longest, and put back in the batch's
        order; outputs with a sequence axis are zero past each input's length (masked, as padding is)."""
        mask = inputs["attention_mask"]
        lengths = mask.sum(axis=1)
        passes = length_passes(lengths, TOKENS_PER_PASS)
        trunk = self.entry.trunk
        if len(passes) == 1:
            return trunk.outputs(inputs, names)
        out: dict[str, np.ndarray] = {}
        for rows in passes:
            width = int(lengths[rows].max())
            part = trunk.outputs({k: v[rows, :width] for k, v in inputs.items()}, names)
            for name, value in part.items():
                full = out.get(name)
                if full is None:  # axis 1 is the sequence for trunk inputs and per-token outputs
                    tail = (mask.shape[1], *value.shape[2:]) if name in inputs or value.ndim > 2 else value.shape[1:]
                    full = out[name] = np.zeros((len(mask), *tail), value.dtype)
                full[(rows, *(slice(0, n) for n in value.shape[1:]))] = value
        return out

    def run(self, batch: list[Pending]) -> None:
        # The collation buffers belong to one batch at a time: a batch beside it (the fair lane) gets new arrays.
        held = self._buffers_free.acquire(blocking=False)
        try:
            self._traced(batch, self.buffers if held else {})
        finally:
            if held:
                self._buffers_free.release()

    def _traced(self, batch: list[Pending], buffers: dict[str, np.ndarray]) -> None:
        tracer = self.tracer
        if tracer is None or all(p.trace is None for p in batch):  # tracing off, or no request sampled
            return self._run(batch, None, buffers)
        began = time.monotonic()
        name = self.entry.spec.name
        tracer.queue_waits(((p.trace, p.queued_at) for p in batch), began, {"headserve.backbone": name})
        attributes = {"headserve.backbone": name, "headserve.requests": len(batch),
                      "headserve.inputs": sum(p.rows for p in batch)}
        with tracer.batch([p.trace for p in batch], attributes) as span:
            return self._run(batch, span, buffers)

    def _run(self, batch: list[Pending], span, buffers: dict[str, np.ndarray]) -> None:
        """Runs the batch; `span` (service.tracing.Span), when the batch is traced, gets children for the
        trunk pass and each head."""
        works: list[_Work] = [p.payload for p in batch]
        names: dict[str, None] = {}
        for w in works:
            for head in w.heads:
                names.update(dict.fromkeys(head.inputs))
        if self.deferred:
            start = time.perf_counter()
            inputs = self.entry.backbone.preprocess([x for w in works for x in w.items])
            if span is not None:
                span.set("headserve.tokenize_ms", (time.perf_counter() - start) * 1e3)
            with _NO_SPAN if span is None else span.child("trunk pass"):
                outputs = self.by_length(inputs, list(names))
        else:
            inputs = self.collate([w.inputs for w in works], buffers)
            with _NO_SPAN if span is None else span.child("trunk pass"):
                outputs = self.entry.trunk.outputs(inputs, list(names))

        # Rows of each head: (request, task index, first row, end row) in batch order.
        groups: dict[int, tuple[HeadRuntime, list[tuple[int, int, int, int]]]] = {}
        start = 0
        for i, w in enumerate(works):
            for j, head in enumerate(w.heads):
                groups.setdefault(id(head), (head, []))[1].append((i, j, start, start + w.rows))
            start += w.rows

        results: list[list[Scored | None]] = [[None] * len(w.heads) for w in works]
        failed: dict[int, BaseException] = {}
        for head, parts in groups.values():
            try:
                with _NO_SPAN if span is None else span.child("head", {
                    "headserve.task": task_of(works[parts[0][0]].task_ids[parts[0][1]]),
                    "headserve.version": head.version,
                    "headserve.inputs": sum(end - first for _, _, first, end in parts)}):
                    probabilities = head.run(_rows(outputs, head.inputs, parts))
            except Exception as exc:  # only this head's requests fail
                with log_context([batch[i] for i in dict.fromkeys(i for i, *_ in parts)]):
                    log.exception(
                        "head of task %s (version %d) failed",
                        task_of(works[parts[0][0]].task_ids[parts[0][1]]),
                        head.version,
                    )
                for i, *_ in parts:
                    failed[i] = exc
                continue
            offset = 0
            for i, j, first, end in parts:
                n = end - first
                results[i][j] = Scored(
                    head.version, head.labels, probabilities[offset : offset + n], task_of(works[i].task_ids[j]),
                    head.reject_threshold,
                )
                offset += n
        for i, p in enumerate(batch):
            if i in failed:
                p.future.set_exception(failed[i])
            else:
                p.future.set_result(results[i])


# Tokens one trunk pass of a text batch may hold (inputs x the pass's longest): the batch's inputs are sorted
# by length and cut into passes of about this size, so short inputs are not padded to a long one's length
# and a pass stays in the size where the trunk costs least per token (docs/design.md, "length-aware
# batching": MiniLM-L6 on 2 cores is cheapest per token at 4-16 sentences, 100-500 tokens).
TOKENS_PER_PASS = 512


def length_passes(lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Row indices of each trunk pass: rows sorted by length, cut where another row would take the pass
    over `budget` tokens (rows x longest), or would be more than twice as long as the pass's shortest
    (padding it would add to every row); a row longer than the budget runs alone. Rows keep their batch
    order within a pass of equal lengths (a stable sort)."""
    order = np.argsort(lengths, kind="stable")
    passes: list[np.ndarray] = []
    first = 0
    for i in range(1, len(order) + 1):
        if i == len(order) or (i - first + 1) * int(lengths[order[i]]) > budget \
                or lengths[order[i]] > 2 * lengths[order[first]]:
            passes.append(order[first:i])
            first = i
    return passes


def _rows(
    outputs: dict[str, np.ndarray], names: Sequence[str], parts: list[tuple[int, int, int, int]]
) -> dict[str, np.ndarray]:
    """The rows `parts` of each named trunk output: a view when they are contiguous, else a gather."""
    first, end = parts[0][2], parts[-1][3]
    if all(parts[k][3] == parts[k + 1][2] for k in range(len(parts) - 1)):
        return {n: outputs[n][first:end] for n in names}
    index = np.concatenate([np.arange(a, b) for _, _, a, b in parts])
    return {n: outputs[n][index] for n in names}


class Predictor:
    def __init__(
        self, store: HeadStore, registry: BackboneRegistry, settings: Settings | None = None, metrics=None,
        tracer=None,
    ) -> None:
        """`metrics` (service.metrics.Metrics), when given, hears of every batch and head load; `tracer`
        (service.tracing.Tracer), when given, makes spans of preprocessing, queue waits, batches and heads."""
        self.store = store
        self.registry = registry
        self.settings = settings or Settings()
        self.metrics = metrics
        self.tracer = tracer
        self.heads = HeadCache(self._load, self.settings.head_cache_mb << 20, self._task_exists, tenant_of)
        self._lanes: dict[str, _Lane] = {}
        self._lanes_lock = threading.Lock()

    # --- heads ------------------------------------------------------------------------------------------

    def _load(self, key: str) -> HeadRuntime:
        if self.metrics is None:
            return self._load_head(key)
        with self.metrics.head_load_seconds.time():
            return self._load_head(key)

    def _load_head(self, key: str) -> HeadRuntime:
        task = self.store.get_task(key)
        if task.live_version == 0:
            raise FailedPrecondition(
                f"task {task.task_id!r} has no trained version yet (state {task.state}"
                + (f": {task.error}" if task.error else "")
                + "); wait for its training job to finish"
            )
        record = self.store.get_head(key, task.live_version)
        return HeadRuntime(
            record.onnx, record.labels, record.version, task.backbone, str(self.registry.device),
            self.registry.head_threads,
        )

    def _task_exists(self, task_id: str) -> bool:
        try:
            self.store.get_task(task_id)
        except NotFound:
            return False
        return True

    def install(self, task_id: str, head: HeadRuntime) -> None:
        """Makes `head` the live version for the task (called after the store committed it)."""
        self.heads.install(task_id, head)

    def forget(self, task_id: str) -> None:
        self.heads.forget(task_id)

    def head(self, task_id: str) -> HeadRuntime:
        return self.heads.get(task_id)

    def refresh(self, key: str) -> None:
        """Another replica (or a worker process) changed the task: if this replica holds an older head,
        or the task is gone, drop it; a head that was loaded is loaded again at once (one load, however
        many requests wait for it). Requests already holding the old head finish on it."""
        if not self.heads.holds(key):
            return  # nothing of it here: the next request loads what is live (no store read now)
        current = self.heads.peek(key)
        try:
            task = self.store.get_task(key)
        except NotFound:
            self.heads.forget(key)
            return
        if current is not None and current.version == task.live_version:
            return
        self.heads.forget(key)  # (also keeps a load started before the change out of the cache)
        if current is not None and task.live_version:
            try:
                self.heads.get(key)
            except Exception as exc:
                log.warning("reloading task %s after a change failed: %s", key, exc)

    def forget_tenant(self, tenant_id: str) -> None:
        for key in self.heads.keys():
            if tenant_of(key) == tenant_id:
                self.heads.forget(key)

    # --- predictions --------------------------------------------------------------------------------------

    def lane(self, backbone: str) -> _Lane:
        lane = self._lanes.get(backbone)
        if lane is None:
            entry = self.registry.get(backbone)
            with self._lanes_lock:
                lane = self._lanes.get(backbone)
                if lane is None:
                    observe = None
                    if self.metrics is not None:
                        batch = self.metrics.batch

                        def observe(rows, seconds, waits, name=backbone):
                            batch(name, rows, seconds, waits)
                    lane = self._lanes[backbone] = _Lane(entry, self.settings, observe, self.tracer)
        return lane

    def submit(
        self, task_ids: Sequence[str], items: Sequence[str | bytes], deadline: float | None = None
    ) -> Ticket:
        """Queues `items` for the tasks' heads (`task_ids` are the store's task keys) (all on one backbone); `deadline` is a time.monotonic() value.

        Raises here (not in the ticket) for unknown or untrained tasks, bad inputs and a full queue."""
        heads = [self.heads.get(t) for t in task_ids]
        backbone = heads[0].backbone
        for task_id, head in zip(task_ids, heads):
            if head.backbone != backbone:
                raise InvalidInput(
                    f"tasks {task_of(task_ids[0])!r} and {task_of(task_id)!r} are on different backbones "
                    f"({backbone}, {head.backbone}); "
                    "one request serves one backbone: send one request per backbone"
                )
        lane = self.lane(backbone)
        precision = lane.entry.precision
        for task_id, head in zip(task_ids, heads):
            if head.precision != precision:
                raise FailedPrecondition(
                    f"task {task_of(task_id)!r} was trained on {head.precision} features of {backbone}, and this "
                    f"server runs {backbone} at {precision} (setting precision); train the task again "
                    "(TrainTask) to serve it at this precision"
                )
        tenant = tenant_of(task_ids[0])  # batches are shared fairly between tenants
        lane.batcher.check_room(len(items), tenant)
        pre = lane.entry.backbone.preprocess
        # The request's span context, when tracing is on and the request is sampled.
        traced = None if self.tracer is None else self.tracer.current()
        with lane.batcher.arriving() as arrival:
            with _NO_SPAN if traced is None else self.tracer.span("preprocess",
                                                                  {"headserve.inputs": len(items)}):
                if lane.deferred:
                    pre.check(items)
                    work = _Work(list(task_ids), heads, None, len(items), items)
                else:
                    work = _Work(list(task_ids), heads, pre(items), len(items))
            # On an idle server, this runs the request here and now.
            pending = arrival.submit(work, len(items), deadline, tenant, traced)
        return Ticket(pending)

    def predict(
        self, task_ids: Sequence[str], items: Sequence[str | bytes], timeout: float | None = None
    ) -> list[Scored]:
        """submit() and wait: one Scored per task, in order."""
        return self.submit(task_ids, items).result(timeout)

    @property
    def lanes(self) -> dict[str, _Lane]:
        """The backbones' batchers started so far (by backbone name)."""
        return self._lanes

    def batch_failures(self) -> dict[str, int]:
        """Batches that failed so far, per backbone in use."""
        return {name: lane.batcher.stats.failed for name, lane in list(self._lanes.items())}

    def batch_stats(self) -> dict[str, dict]:
        return {name: dataclasses.asdict(lane.batcher.stats) for name, lane in self._lanes.items()}

    def close(self) -> None:
        for lane in list(self._lanes.values()):
            lane.batcher.close()
