"""In-memory pool of agents' KV blocks under a byte budget, evicting least recently used."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from edge_infer.cache_store.blocks import KVBlock

EvictCallback = Callable[[str, list[KVBlock]], None]
FALLBACK_BUDGET = 2 << 30


def available_memory_bytes() -> int | None:
    """Memory available to new allocations (``MemAvailable`` on Linux), if known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_budget_bytes(fraction: float = 0.25) -> int:
    """``fraction`` of available memory, or 2 GiB when that cannot be read."""
    avail = available_memory_bytes()
    return int(avail * fraction) if avail else FALLBACK_BUDGET


class BlockPool:
    """Agents' blocks kept in memory; a block shared by several agents is counted once.

    ``on_evict(agent, blocks)`` (if given) runs before an agent is dropped, under the pool's
    lock, so the caller can persist it; if it raises, the agent stays and the error propagates.
    """

    def __init__(self, budget_bytes: int, on_evict: EvictCallback | None = None) -> None:
        self.budget_bytes = int(budget_bytes)
        self.on_evict = on_evict
        self._lock = threading.RLock()
        self._agents: OrderedDict[str, list[KVBlock]] = OrderedDict()  # LRU first
        self._refs: dict[int, list] = {}  # id(block) -> [block, count]
        self._pinned: set[str] = set()
        self._bytes = 0

    def _ref(self, blocks: Sequence[KVBlock]) -> None:
        for b in blocks:
            slot = self._refs.get(id(b))
            if slot is None:
                self._refs[id(b)] = [b, 1]
                self._bytes += b.nbytes
            else:
                slot[1] += 1

    def _unref(self, blocks: Sequence[KVBlock]) -> None:
        for b in blocks:
            slot = self._refs[id(b)]
            slot[1] -= 1
            if slot[1] == 0:
                del self._refs[id(b)]
                self._bytes -= b.nbytes

    def put(self, agent: str, blocks: Sequence[KVBlock]) -> None:
        """Store (or replace) ``agent``'s blocks and mark it most recently used."""
        blocks = list(blocks)
        with self._lock:
            self._ref(blocks)
            old = self._agents.pop(agent, None)
            if old is not None:
                self._unref(old)
            self._agents[agent] = blocks

    def get(self, agent: str) -> list[KVBlock] | None:
        """``agent``'s blocks (marking it most recently used), or None."""
        with self._lock:
            blocks = self._agents.get(agent)
            if blocks is None:
                return None
            self._agents.move_to_end(agent)
            return list(blocks)

    def peek(self, agent: str) -> list[KVBlock] | None:
        """Like :meth:`get` without touching the LRU order."""
        with self._lock:
            blocks = self._agents.get(agent)
            return None if blocks is None else list(blocks)

    def remove(self, agent: str) -> list[KVBlock] | None:
        """Drop ``agent`` (pinned or not); returns its blocks, or None if absent."""
        with self._lock:
            blocks = self._agents.pop(agent, None)
            if blocks is not None:
                self._unref(blocks)
            return blocks

    def pin(self, agent: str) -> None:
        """Never evict ``agent`` (it need not be in the pool yet) until :meth:`unpin`."""
        with self._lock:
            self._pinned.add(agent)

    def unpin(self, agent: str) -> None:
        with self._lock:
            self._pinned.discard(agent)

    def is_pinned(self, agent: str) -> bool:
        with self._lock:
            return agent in self._pinned

    def evict_to_budget(
        self, budget_bytes: int | None = None, on_evict: EvictCallback | None = None
    ) -> list[str]:
        """Evict least recently used unpinned agents until within budget; their names.

        Pinned agents may keep the pool over budget.
        """
        budget = self.budget_bytes if budget_bytes is None else budget_bytes
        callback = on_evict or self.on_evict
        evicted: list[str] = []
        with self._lock:
            while self._bytes > budget:
                victim = next((a for a in self._agents if a not in self._pinned), None)
                if victim is None:
                    break
                if callback is not None:
                    callback(victim, list(self._agents[victim]))
                self.remove(victim)
                evicted.append(victim)
        return evicted

    @property
    def bytes_used(self) -> int:
        """Bytes of all distinct blocks held."""
        with self._lock:
            return self._bytes

    def agent_bytes(self, agent: str) -> int:
        """Bytes of ``agent``'s blocks (shared blocks counted in full)."""
        with self._lock:
            return sum(b.nbytes for b in self._agents.get(agent, ()))

    def agents(self) -> list[str]:
        """Agent names, least recently used first."""
        with self._lock:
            return list(self._agents)

    def __contains__(self, agent: object) -> bool:
        with self._lock:
            return agent in self._agents

    def __len__(self) -> int:
        with self._lock:
            return len(self._agents)
