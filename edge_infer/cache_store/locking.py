"""Per-agent locks that serialize threads (an RLock) and processes (a file lock)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from edge_infer.cache_store.errors import CacheLockTimeout

_registry_lock = threading.Lock()
_locks: dict[str, tuple[threading.RLock, FileLock]] = {}


def _locks_for(path: Path) -> tuple[threading.RLock, FileLock]:
    key = str(path.absolute())
    with _registry_lock:
        pair = _locks.get(key)
        if pair is None:
            pair = (threading.RLock(), FileLock(key, mode=0o600, thread_local=False))
            _locks[key] = pair
        return pair


@contextmanager
def path_lock(path: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold the lock named by file ``path`` (its folder must exist); re-entrant per thread.

    ``timeout=None`` waits as long as it takes; otherwise CacheLockTimeout after ``timeout`` s.
    """
    rlock, flock = _locks_for(path)
    deadline = None if timeout is None else time.monotonic() + timeout
    if not rlock.acquire(timeout=-1 if timeout is None else timeout):
        raise CacheLockTimeout(f"timed out waiting for lock {path}")
    try:
        remaining = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            flock.acquire(timeout=remaining)
        except Timeout:
            raise CacheLockTimeout(f"timed out waiting for lock {path}") from None
        try:
            yield
        finally:
            flock.release()
    finally:
        rlock.release()
