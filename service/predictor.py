"""Predictions: the backbone's shared ONNX trunk, then the task's live ONNX head.

Heads load lazily from the store into an LRU of onnxruntime sessions; a new version is installed
by replacing the entry, so a request sees one version from start to end.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from adapters.errors import FailedPrecondition
from adapters.runtime import HeadRuntime
from service.registry import BackboneRegistry
from service.store import Store


@dataclasses.dataclass
class Scored:
    version: int
    labels: list[str]
    probabilities: np.ndarray  # [inputs, labels]

    def top(self, row: int, k: int) -> list[tuple[str, float]]:
        p = self.probabilities[row]
        order = np.argsort(-p, kind="stable")[: (k or len(p))]
        return [(self.labels[i], float(p[i])) for i in order]


class Predictor:
    def __init__(self, store: Store, registry: BackboneRegistry, max_heads: int = 1024) -> None:
        self.store = store
        self.registry = registry
        self.max_heads = max_heads
        self._heads: OrderedDict[str, HeadRuntime] = OrderedDict()
        self._lock = threading.Lock()

    def install(self, task_id: str, head: HeadRuntime) -> None:
        """Makes `head` the live version for the task (called after the store committed it)."""
        with self._lock:
            current = self._heads.get(task_id)
            if current is None or current.version <= head.version:
                self._heads[task_id] = head
                self._heads.move_to_end(task_id)
                self._evict()

    def forget(self, task_id: str) -> None:
        with self._lock:
            self._heads.pop(task_id, None)

    def _evict(self) -> None:
        while len(self._heads) > self.max_heads:
            self._heads.popitem(last=False)

    def head(self, task_id: str) -> HeadRuntime:
        with self._lock:
            head = self._heads.get(task_id)
            if head is not None:
                self._heads.move_to_end(task_id)
                return head
        task = self.store.get_task(task_id)
        if task.live_version == 0:
            raise FailedPrecondition(
                f"task {task_id!r} has no trained version yet (state {task.state}"
                + (f": {task.error}" if task.error else "")
                + "); wait for its training job to finish"
            )
        record = self.store.get_head(task_id, task.live_version)
        head = HeadRuntime(record.onnx, record.labels, record.version, task.backbone, str(self.registry.device))
        self.install(task_id, head)
        return head

    def predict(self, task_id: str, items: Sequence[str | bytes]) -> Scored:
        head = self.head(task_id)
        entry = self.registry.get(head.backbone)
        feeds = entry.trunk.outputs(entry.backbone.preprocess(items), head.inputs)
        return Scored(head.version, head.labels, head.run(feeds))
