"""Persist agents' caches off the generation path: one worker thread, latest state wins."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("edge_infer.cache")


class BackgroundSaver:
    """Runs save jobs keyed by agent name; a newer job for an agent replaces a pending one."""

    def __init__(self) -> None:
        self._pending: dict[str, Callable[[], None]] = {}
        self._cond = threading.Condition()
        self._busy = 0
        self._running: str | None = None
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    def submit(self, agent: str, job: Callable[[], None]) -> None:
        with self._cond:
            self._pending[agent] = job
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="edge-infer-saver", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._pending:
                    self._cond.wait(timeout=5.0)
                    if not self._pending:
                        return
                agent, job = next(iter(self._pending.items()))
                del self._pending[agent]
                self._busy += 1
                self._running = agent
            try:
                job()
            except Exception as exc:  # a failed save must not kill the saver; report it
                log.warning("saving agent %r failed: %s", agent, exc)
                self.errors.append(f"{agent}: {exc}")
            finally:
                with self._cond:
                    self._busy -= 1
                    self._running = None
                    self._cond.notify_all()

    def has_pending(self, agent: str) -> bool:
        """Whether a save of ``agent`` is queued or being written."""
        with self._cond:
            return agent in self._pending or self._running == agent

    def flush(self, agent: str | None = None) -> None:
        """Wait until pending saves (of ``agent``, or all) are written."""
        with self._cond:
            while (agent in self._pending if agent else self._pending) or self._busy:
                self._cond.wait(timeout=0.1)
