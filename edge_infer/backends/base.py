"""The protocols every backend and its KV caches implement: all that callers may use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from edge_infer.cache_store.blocks import KVBlock
from edge_infer.models.spec import ModelConfig
from edge_infer.offload.index import SparseState
from edge_infer.offload.tiers import SequenceTiers


@runtime_checkable
class KVCache(Protocol):
    """A backend's per-sequence KV cache, in the store's block form at its boundary."""

    @property
    def length(self) -> int:
        """Tokens whose keys and values the cache holds."""
        ...

    @property
    def sealed_length(self) -> int:
        """Tokens held in sealed (full, immutable) blocks."""
        ...

    @property
    def max_tokens_in_one_call(self) -> int:
        """The most tokens one ``forward`` may append."""
        ...

    def truncate(self, n: int) -> int:
        """Keep at most the first ``n`` tokens; returns how many are kept (fewer than ``n``
        when ``n`` falls inside a sealed block that cannot be cut exactly)."""
        ...

    def blocks(self, start: int = 0) -> list[KVBlock]:
        """The cache as blocks, from the one holding token ``start`` on (the tail included)."""
        ...

    def append_blocks(self, blocks: list[KVBlock]) -> None:
        """Append blocks (as ``blocks`` gives them, starting at ``length``) to the cache."""
        ...

    @property
    def windows(self) -> list[int]:
        """Per layer, how many latest tokens a query sees (0: all, a global layer)."""
        ...

    @property
    def layer_bits(self) -> tuple[int, ...]:
        """Per layer, the bits its sealed K/V are stored in (16: float16; see
        :func:`edge_infer.cache_store.kv_format.layer_bits`)."""
        ...

    def offload(self, tiers: SequenceTiers, sparse: SparseState | None = None) -> None:
        """Keep the sealed blocks of ``tiers.layers`` in ``tiers`` (host memory under a
        budget, disk) instead of in memory, and decode attending the pages ``sparse``
        selects; ValueError where the backend cannot."""
        ...


@runtime_checkable
class Backend(Protocol):
    """Runs a decoder: ``forward`` appends to ``cache`` and returns logits."""

    name: str
    device: str
    config: ModelConfig
    kv_bits: int
    kv_group_size: int

    def new_cache(self) -> KVCache:
        """An empty KV cache for one sequence."""
        ...

    def forward(
        self, inputs: np.ndarray, cache: KVCache, *, all_logits: bool = False
    ) -> np.ndarray:
        """Run ``inputs`` (token ids [T] or embeddings [T, hidden]) after what ``cache`` holds.

        Returns float32 logits: [T, vocab] when ``all_logits`` else [1, vocab] (last position).
        """
        ...

    def forward_batch(self, tokens: Sequence[int], caches: Sequence[KVCache]) -> np.ndarray:
        """One token for each of several distinct caches in one pass: logits [len, vocab]."""
        ...


def check_batch(tokens: Sequence[int], caches: Sequence[KVCache]) -> None:
    """``forward_batch`` takes one token per cache, and each cache once."""
    if len(tokens) != len(caches):
        raise ValueError("forward_batch needs one token per cache")
    if len({id(c) for c in caches}) != len(caches):
        raise ValueError("forward_batch needs distinct caches")
