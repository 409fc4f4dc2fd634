"""In-memory pool of agents' KV blocks under a byte budget, evicting least recently used."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

from edge_infer.cache_store.blocks import KVBlock

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
    """Agents' blocks kept in memory; a block shared by several agents is counted once."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self._lock = threading.RLock()
        self._agents: OrderedDict[str, list[KVBlock]] = OrderedDict()  # LRU first
        self._refs: dict[int, list] = {}  # id(block) -> [block, count]
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

    def remove(self, agent: str) -> list[KVBlock] | None:
        """Drop ``agent``; returns its blocks, or None if absent."""
        with self._lock:
            blocks = self._agents.pop(agent, None)
            if blocks is not None:
                self._unref(blocks)
            return blocks

    def evict_to_budget(self, budget_bytes: int | None = None) -> list[str]:
        """Evict least recently used agents until within budget; their names."""
        budget = self.budget_bytes if budget_bytes is None else budget_bytes
        evicted: list[str] = []
        with self._lock:
            while self._bytes > budget and self._agents:
                victim = next(iter(self._agents))
                self.remove(victim)
                evicted.append(victim)
        return evicted

    @property
    def bytes_used(self) -> int:
        """Bytes of all distinct blocks held."""
        with self._lock:
            return self._bytes

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
