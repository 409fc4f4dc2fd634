"""When and how an engine offloads agents' KV: the shared host pool, the pages decoding reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edge_infer.offload.selection import SparsePolicy
from edge_infer.offload.tiers import HostPool, SequenceTiers

# Half the pages: at 8K tokens of the default model the Quest bound's 25% misses too much of
# the attention mass (benchmarks/offload.py); 50% keeps the top-1 token nearly always.
DEFAULT_POLICY = SparsePolicy(budget=0.5)


@dataclass(frozen=True)
class OffloadSettings:
    """``pool``: host memory for offloaded KV (its budget is ``kv_memory``); ``policy``: the
    pages an offloaded agent's decoding attends; ``spill_dir``: where KV that is on no disk
    yet goes when the pool is full (the system's temporary folder when None)."""

    pool: HostPool
    policy: SparsePolicy = field(default_factory=lambda: DEFAULT_POLICY)
    spill_dir: Path | None = None

    def wants(self, setting: bool | None, kv_bytes: int) -> bool:
        """Whether an agent whose KV would take ``kv_bytes`` is offloaded: as its own
        ``setting`` says, else when that is more than the budget."""
        if setting is not None:
            return setting
        return kv_bytes > self.pool.budget_bytes

    def tiers(self, windows: list[int], block_size: int) -> SequenceTiers:
        """New tiers for a sequence: the global layers past the policy's dense ones go."""
        layers = [i for i, w in enumerate(windows) if not w and i >= self.policy.dense_layers]
        return SequenceTiers(self.pool, layers, block_size, self.policy.page, self.spill_dir)
