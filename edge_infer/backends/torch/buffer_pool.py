"""Reuse of large CPU buffers between KV caches.

A restored or newly created cache writes its whole stored form at once; on fresh memory that
costs page faults, often more than the writing itself (new buffers of 2 MiB and more are on
huge pages, :mod:`~edge_infer.backends.torch.host_memory`, which cuts most of them). Buffers
of caches that were dropped are kept here (up to a byte budget, the most recently returned
first) and handed to the next cache that asks for the same shape. Only CPU tensors are
pooled: CUDA has its own caching allocator.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable

import torch

from edge_infer.backends.torch.host_memory import empty_host

DEFAULT_POOL_MB = 512


def pool_budget_bytes() -> int:
    """The pool's byte budget: ``EDGE_INFER_BUFFER_POOL_MB`` (0 disables it), default 512."""
    raw = os.environ.get("EDGE_INFER_BUFFER_POOL_MB", "")
    try:
        mb = int(raw) if raw else DEFAULT_POOL_MB
    except ValueError:
        raise ValueError(
            f"EDGE_INFER_BUFFER_POOL_MB must be a whole number (got {raw!r})"
        ) from None
    return max(mb, 0) * 2**20


class BufferPool:
    """Free tensors by (shape, dtype) within ``max_bytes``; the oldest are freed first.

    Returned tensors are queued without taking the lock (caches give theirs back from a
    finalizer, which the garbage collector may run at any allocation, also while this thread
    holds the lock) and are sorted into the pool at the next ``take``.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = pool_budget_bytes() if max_bytes is None else max_bytes
        self._free: OrderedDict[int, tuple[tuple, torch.Tensor]] = OrderedDict()
        self._returned: deque[list[torch.Tensor]] = deque()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            evicted = self._absorb()
            n = self._bytes
        del evicted  # freed outside the lock
        return n

    def give(self, tensors: Iterable[torch.Tensor | None]) -> None:
        """Offer ``tensors`` for reuse (safe from finalizers: takes no lock)."""
        self._returned.append(
            [t for t in tensors if t is not None and t.device.type == "cpu" and t.is_contiguous()]
        )

    def take(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """An uninitialised tensor: a pooled one of this shape if any, else a new one."""
        if device.type == "cpu":
            key = (tuple(shape), dtype)
            found = None
            with self._lock:
                evicted = self._absorb()
                for ident in reversed(self._free):
                    if self._free[ident][0] == key:
                        found = self._free.pop(ident)[1]
                        self._bytes -= _nbytes(found)
                        break
            del evicted
            if found is not None:
                return found
        # a normal tensor even inside inference mode: buffers are written in and out of it
        with torch.inference_mode(False):
            if device.type == "cpu":
                return empty_host(tuple(shape), dtype)
            return torch.empty(shape, dtype=dtype, device=device)

    def clear(self) -> None:
        with self._lock:
            self._returned.clear()
            self._free.clear()
            self._bytes = 0

    def _absorb(self) -> list[torch.Tensor]:
        """Move returned tensors into the pool (lock held); the evicted ones, to free later."""
        evicted: list[torch.Tensor] = []
        while self._returned:
            try:
                batch = self._returned.popleft()
            except IndexError:
                break
            for t in batch:
                if _nbytes(t) > self.max_bytes or id(t) in self._free:
                    evicted.append(t)
                    continue
                self._free[id(t)] = ((tuple(t.shape), t.dtype), t)
                self._bytes += _nbytes(t)
        while self._bytes > self.max_bytes:
            _, (_, old) = self._free.popitem(last=False)
            self._bytes -= _nbytes(old)
            evicted.append(old)
        return evicted


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


POOL = BufferPool()
