"""One server per data directory: an exclusive lock on DATA_DIR/headserve.lock, held while serving.

SQLite itself would let two servers share the file, but each keeps its own job queue and head cache, so
they would run the same jobs twice and serve each other's deleted tasks. The lock file holds the owner's
pid and host, so that the refusal names the other process. The lock is `flock`, released by the kernel
when its holder exits however it exits (kill -9 included), so a stale file never blocks a restart.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import socket


class DataDirInUse(Exception):
    """Another process holds the data directory."""


class DataDirLock:
    def __init__(self, data_dir: pathlib.Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "headserve.lock"
        self._file = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            owner = self._file.read().strip() or "unknown process"
            self._file.close()
            raise DataDirInUse(
                f"data directory {data_dir} is in use by another headserve server ({owner}); stop it, or "
                "give this server another --data-dir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
