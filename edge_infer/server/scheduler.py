"""Continuous batching for the daemon: one worker thread decodes every running request at once.

Each request becomes a job whose task wraps a :class:`~edge_infer.generation.Generation`
(an agent's turn, or a stateless completion). Jobs with the same key (an agent) run one after
another; jobs with different keys share each decoding step, one batched forward pass for all
of them. A joining request is prefilled a chunk per step, so the others keep decoding.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge_infer.generation.batch import forward_step
from edge_infer.generation.runner import Runner
from edge_infer.generation.sequence import Generation, Piece

log = logging.getLogger("edge_infer.server")

# What a job sends back to its request: ("text", what its task's record() gave for a step),
# ("done", usage) or ("error", exception).
Event = tuple[str, Any]

# Prompt tokens a joining request prefills per step while others are decoding.
PREFILL_STEP = 256


class Task(Protocol):
    """A generation plus what to do with its output and when it ends."""

    generation: Generation

    def record(self, pieces: list[Piece]) -> list[Any]: ...

    def finish(self) -> Any: ...


class ShuttingDown(RuntimeError):
    """The server is stopping and takes no more work."""


class Cancelled(RuntimeError):
    """The request went away (or the server is stopping) before its answer was complete."""


@dataclass(eq=False)
class Job:
    """One request's generation, and the queue its events go to."""

    key: str
    make: Callable[[], Task]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    task: Task | None = None

    def cancel(self) -> None:
        """Stop the job at its next step (its task is finished on the worker thread)."""
        self.cancelled.set()

    def emit(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancelled.set()


class Scheduler:
    """Runs jobs on one thread: admission by arrival, per-key serial, batched decoding."""

    def __init__(
        self,
        runner: Runner,
        max_active: int = 8,
        prefill_step: int = PREFILL_STEP,
        start: bool = True,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        if max_active < 1:
            raise ValueError("max_active must be >= 1")
        self.runner = runner
        self.max_active = max_active
        self.prefill_step = prefill_step
        self.on_step = on_step  # told the batch size of every decoding step
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="edge-infer-scheduler", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        """Start the worker thread (once)."""
        if self._thread.ident is None:
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
        """Cancel all jobs (each task is finished, so caches stay consistent) and wait."""
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
            done = self._step(jobs)
            if done:
                with self._cond:
                    for job in done:
                        self._active.remove(job)

    def _end(self, job: Job, kind: str, value: Any, done: list[Job]) -> None:
        """Finish ``job``'s task (keeping its cache consistent) and send its last event."""
        if job.task is not None:
            try:
                usage = job.task.finish()
                value = usage if kind == "done" else value
            except Exception as exc:  # a failed save must still answer the request
                log.exception("finishing a request failed")
                kind, value = "error", exc
        job.emit(kind, value)
        done.append(job)

    def _step(self, jobs: list[Job]) -> list[Job]:
        """One scheduling step over ``jobs``; returns those that ended."""
        done: list[Job] = []
        decoding = [j for j in jobs if j.task is not None and not j.task.generation.prefilling]
        for job in jobs:
            if job.cancelled.is_set():
                self._end(job, "error", Cancelled("cancelled"), done)
                continue
            try:
                if job.task is None:
                    job.task = job.make()
                gen = job.task.generation
                if gen.prefilling:
                    gen.prefill(self.prefill_step if decoding else None)
                if not gen.prefilling:
                    for text in job.task.record(gen.sample()):
                        job.emit("text", text)
                    if gen.finished:
                        self._end(job, "done", None, done)
            except Exception as exc:  # reported to its request; the others go on
                self._end(job, "error", exc, done)
        live = [j for j in jobs if j not in done and j.task is not None]
        gens = [j.task.generation for j in live if j.task.generation.next_input is not None]
        if gens and self.on_step is not None:
            self.on_step(len(gens))
        try:
            forward_step(self.runner, gens)
        except Exception as exc:
            log.exception("batched forward pass failed")
            for job in live:
                self._end(job, "error", exc, done)
        return done
