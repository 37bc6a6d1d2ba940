"""Who uses what: Predict requests and inputs per task (and so per tenant), summarised in the store.

Counting happens in memory on the Predict path (a dict update under a lock); a thread adds the counts to
the store every `interval` seconds, and at shutdown. So the store sees one write per few seconds, not one
per request, and per-task usage never becomes a metric label (service/metrics.py). Counts are per replica
and added up in the store, so several replicas' usage sums. A kill -9 loses at most the last interval.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from service.storage import TenantStore
from service.store import now_ms

log = logging.getLogger(__name__)


class UsageRecorder:
    def __init__(self, store: TenantStore, interval: float = 10.0) -> None:
        self.store = store
        self.interval = interval
        self._counts: dict[str, list[int]] = {}  # task key -> [requests, inputs, last used ms]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="usage", daemon=True)
        self._thread.start()

    def record(self, keys: Sequence[str], inputs: int) -> None:
        """One Predict request of `inputs` inputs, scored by each of the task keys."""
        stamp = now_ms()
        with self._lock:
            for key in keys:
                counts = self._counts.get(key)
                if counts is None:
                    self._counts[key] = [1, inputs, stamp]
                else:
                    counts[0] += 1
                    counts[1] += inputs
                    counts[2] = stamp

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
        if not counts:
            return
        try:
            self.store.add_usage({k: (v[0], v[1], v[2]) for k, v in counts.items()})
        except Exception:  # the store is failing (health says so): keep the counts for the next try
            log.warning("could not store usage counts; keeping them for the next flush", exc_info=True)
            with self._lock:
                for key, (requests, inputs, stamp) in counts.items():
                    mine = self._counts.setdefault(key, [0, 0, 0])
                    mine[0] += requests
                    mine[1] += inputs
                    mine[2] = max(mine[2], stamp)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.flush()
