"""Every replica agrees on what is live: the store's change feed, applied to this replica's caches.

Writers record a change in the same transaction as the change itself (service/store.py `_changed`): a
task's new live version or its deletion, a revoked key, a tenant's new quotas or its deletion. Each replica
reads the feed every `sync_interval_seconds` (a cheap indexed read of the last seconds), and on PostgreSQL
also LISTENs on the feed's channel, so a change is applied within milliseconds of its commit; the poll is
the fallback when the listening connection drops. Applying a change twice is harmless (handlers re-read
the store), so the poll re-reads a window of a few seconds and skips what it has seen by sequence number.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from service.storage import ChangeLog
from service.store import CHANGES_CHANNEL

log = logging.getLogger(__name__)

WINDOW_MS = 5000  # the poll re-reads this far back: commits can land out of sequence order
KEEP_MS = 10 * 60 * 1000  # changes older than this are pruned (by any replica)
PRUNE_EVERY = 60.0

Handler = Callable[[str], None]  # called with the change's ref: a task key, a key id, a tenant id


class ChangeFeed:
    def __init__(self, store: ChangeLog, handlers: dict[str, Handler], interval: float = 0.5) -> None:
        self.store = store
        self.handlers = handlers
        self.interval = interval
        self.applied = 0  # changes applied so far (tests and metrics)
        self.listening = False  # whether a PostgreSQL LISTEN connection is up
        self._since = store.clock_ms()  # the times in the feed are the store's (the database's clock)
        self._seen: dict[int, int] = {}  # seq -> at_ms of the changes applied from the poll
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        self._threads.append(threading.Thread(target=self._poll_loop, daemon=True, name="changes-poll"))
        if self.store.dialect == "postgresql":
            self._threads.append(threading.Thread(target=self._listen_loop, daemon=True, name="changes-listen"))
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)

    def _first_time(self, seq: int, at_ms: int) -> bool:
        """Marks a change seen; false when it was already (by the poll, or by the notification)."""
        with self._lock:
            if seq in self._seen:
                return False
            self._seen[seq] = at_ms
            return True

    def _apply(self, kind: str, ref: str) -> None:
        handler = self.handlers.get(kind)
        if handler is None:
            return
        try:
            handler(ref)
        except Exception:
            log.exception("applying the change %s:%s failed", kind, ref[:80])
        with self._lock:
            self.applied += 1

    # --- the poll (both engines) --------------------------------------------------------------------------

    def poll(self) -> int:
        """Applies the changes not seen yet; returns how many."""
        rows = self.store.changes_since(self._since - WINDOW_MS)
        fresh = 0
        for seq, kind, ref, at_ms in rows:
            if self._first_time(seq, at_ms):
                fresh += 1
                self._apply(kind, ref)
        if rows:
            self._since = max(self._since, max(r[3] for r in rows))
        cutoff = self._since - 2 * WINDOW_MS
        with self._lock:
            if len(self._seen) > 1000:
                self._seen = {s: t for s, t in self._seen.items() if t >= cutoff}
        return fresh

    def _poll_loop(self) -> None:
        pruned = time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                self.poll()
                if time.monotonic() - pruned > PRUNE_EVERY:
                    pruned = time.monotonic()
                    self.store.prune_changes(self.store.clock_ms() - KEEP_MS)
            except Exception as exc:  # the store is down: the health check says so; keep trying
                log.debug("reading the change feed failed: %s", exc)

    # --- LISTEN/NOTIFY (PostgreSQL) ----------------------------------------------------------------------

    def _listen_loop(self) -> None:
        import psycopg

        dsn = self.store.notification_dsn()
        delay = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANGES_CHANNEL}")
                    self.listening, delay = True, 0.5
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            seq, at_ms, kind, ref = note.payload.split(":", 3)
                            if self._first_time(int(seq), int(at_ms)):
                                self._apply(kind, ref)
            except Exception as exc:
                self.listening = False
                if self._stop.is_set():
                    return
                log.warning("listening for changes failed (%s); the %.1fs poll covers until it is back",
                            type(exc).__name__, self.interval)
                self._stop.wait(delay)
                delay = min(10.0, delay * 2)
        self.listening = False
