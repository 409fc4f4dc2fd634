"""Runs generations on one worker thread, one token at a time, fairly across agents.

Each job is a generator that yields text pieces and returns its usage. Jobs with the same key
(an agent) run one after another; jobs with different keys take turns token by token, so a
long answer for one agent does not hold the others back until it ends.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

# What a job sends back to its request: ("text", str), ("done", usage) or ("error", exception).
Event = tuple[str, Any]


class ShuttingDown(RuntimeError):
    """The server is stopping and takes no more work."""


@dataclass(eq=False)
class Job:
    """One request's generation, and the queue its events go to."""

    key: str
    make: Callable[[], Generator[str, None, Any]]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    gen: Generator[str, None, Any] | None = None

    def cancel(self) -> None:
        """Stop the job at its next step (its generator is closed on the worker thread)."""
        self.cancelled.set()

    def _emit(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancelled.set()


class Scheduler:
    """Fair, token-interleaved execution of jobs on one thread."""

    def __init__(self, max_active: int = 4, start: bool = True) -> None:
        if max_active < 1:
            raise ValueError("max_active must be >= 1")
        self.max_active = max_active
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="edge-infer-scheduler", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        """Start the worker thread (once)."""
        if not self._thread.is_alive() and self._thread.ident is None:
            self._thread.start()

    def submit(self, job: Job) -> Job:
        """Queue ``job``; its events arrive on ``job.events``."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            self._waiting.append(job)
            self._cond.notify()
        return job

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"active": len(self._active), "waiting": len(self._waiting)}

    def stop(self, timeout: float | None = None) -> None:
        """Cancel all jobs (each generator is closed, so caches stay consistent) and wait."""
        with self._cond:
            self._stopping = True
            for job in [*self._active, *self._waiting]:
                job.cancel()
            self._cond.notify()
        if self._thread.ident is not None:
            self._thread.join(timeout)

    # -- worker ---------------------------------------------------------------------------
    def _admit(self) -> None:
        """Start waiting jobs, oldest first, skipping keys that already have a running job."""
        busy = {j.key for j in self._active}
        for job in list(self._waiting):
            if len(self._active) >= self.max_active:
                break
            if job.key in busy:
                continue
            self._waiting.remove(job)
            self._active.append(job)
            busy.add(job.key)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._admit()
                while not self._active:
                    if self._stopping and not self._waiting:
                        return
                    self._cond.wait()
                    self._admit()
                jobs = list(self._active)
            for job in jobs:
                if self._step(job):
                    with self._cond:
                        self._active.remove(job)

    def _step(self, job: Job) -> bool:
        """Advance ``job`` by one piece; True when it has finished."""
        try:
            if job.cancelled.is_set():
                if job.gen is not None:
                    job.gen.close()
                job._emit("error", ShuttingDown("cancelled"))
                return True
            if job.gen is None:
                job.gen = job.make()
            job._emit("text", next(job.gen))
            return False
        except StopIteration as stop:
            job._emit("done", stop.value)
            return True
        except Exception as exc:  # reported to the request, never kills the worker
            job._emit("error", exc)
            return True
