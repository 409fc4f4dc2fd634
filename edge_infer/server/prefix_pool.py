"""KV caches shared by stateless requests: a new request reuses the longest matching prefix."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_infer.cache_store import common_prefix_len


def keyed_ids(ids: Sequence[int], images: Sequence[tuple[int, int, str]]) -> list[int]:
    """``ids`` as a pool compares them: each position of an image span (start, end, key)
    carries a negative number drawn from the image's key and the offset in the span, so a
    cached prefix is reused across an image only for the same image (its placeholder ids are
    the same for every image) and never matches a real token id."""
    out = list(ids)
    for start, end, key in images:
        base = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 2
        for i in range(start, end):
            out[i] = -1 - ((base + i - start) % 2**62)
    return out


@dataclass(eq=False)
class Slot:
    """A live cache and the token ids it holds.

    Between requests ``cache.length == len(token_ids)`` always holds, and the cache holds
    exactly the KV of ``token_ids``: the next request reuses it only by matching those ids.
    """

    cache: Any
    token_ids: list[int] = field(default_factory=list)
    in_use: bool = False
    pooled: bool = True


class PrefixPool:
    """A few live caches; each request borrows the one sharing the longest prefix with it."""

    def __init__(self, new_cache: Callable[[], Any], max_slots: int = 2) -> None:
        self._new_cache = new_cache
        self.max_slots = max_slots
        self._slots: list[Slot] = []
        self._lock = threading.Lock()

    def acquire(self, ids: Sequence[int]) -> Slot:
        """A slot whose cache holds a prefix of ``ids`` (cut to it; at least one id left).

        Give it back with :meth:`release`, whatever way the request ends."""
        with self._lock:
            free = [s for s in self._slots if not s.in_use]
            best = max(free, key=lambda s: common_prefix_len(s.token_ids, ids), default=None)
            shared = common_prefix_len(best.token_ids, ids) if best else 0
            if (best is None or shared == 0) and len(self._slots) < self.max_slots:
                best = Slot(self._new_cache())
                self._slots.append(best)
            elif best is None:  # every pooled cache is busy: use a private one
                best = Slot(self._new_cache(), pooled=False)
            best.in_use = True
        # always cut: whatever the cache holds beyond the shared ids is another request's KV
        kept = best.cache.truncate(max(0, min(shared, len(ids) - 1)))
        best.token_ids = list(ids[:kept])
        return best

    def release(self, slot: Slot, token_ids: Sequence[int]) -> None:
        """Give ``slot`` back; its cache holds the KV of ``token_ids[:cache.length]``.

        KV the ids do not account for is cut off, so the slot never offers it again.
        """
        with self._lock:
            kept = slot.cache.truncate(min(len(token_ids), slot.cache.length))
            slot.token_ids = list(token_ids[:kept])
            slot.in_use = False

    def slots(self) -> list[Slot]:
        """The pooled slots (a copy of the list)."""
        with self._lock:
            return list(self._slots)

    def clear(self) -> None:
        with self._lock:
            self._slots = [s for s in self._slots if s.in_use]
