"""Sliding-window layers' sealed blocks out of their attention buffers: which blocks a later
query can still see, and the parts of the others, held by block start until released."""

from __future__ import annotations

from collections.abc import Sequence

from edge_infer.cache_store.kv_format import QuantizedKV


def unseen_before(length: int, window: int, block_size: int) -> int:
    """Start of the first block a query at ``length`` or later may see through a ``window``
    (a query at p sees tokens p-window+1..p)."""
    return max(0, length - window + 1) // block_size * block_size


def cut_needs_released(
    length: int,
    sealed: int,
    windows: Sequence[int],
    firsts: Sequence[int],
    released: int,
    block_size: int,
) -> bool:
    """Whether a cache cut to ``length`` tokens (``sealed`` of them sealed) would need
    blocks already released: some bounded sliding-window layer (``windows[i]`` > 0, holding
    sealed tokens from ``firsts[i]`` in its buffers) would see again a block before
    ``released``. Then nothing can be kept."""
    for window, held in zip(windows, firsts, strict=True):
        if window:
            first = min(sealed, unseen_before(length, window, block_size))
            if first < min(held, sealed) and first < released:
                return True
    return False


class HiddenParts:
    """The (keys, values) of blocks that sliding-window layers no longer hold in their
    buffers, by block start and layer: host arrays shared with the blocks a cache exports.
    Blocks before ``released`` were freed by their owner and cannot come back."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.released = 0
        self._parts: dict[int, dict[int, tuple[QuantizedKV, QuantizedKV]]] = {}

    def put(self, start: int, layer: int, pair: tuple[QuantizedKV, QuantizedKV]) -> None:
        self._parts.setdefault(start, {})[layer] = pair

    def get(self, start: int, layer: int, which: int) -> QuantizedKV:
        """Keys (``which`` 0) or values (1) of layer ``layer``'s block at ``start``."""
        pair = self._parts.get(start, {}).get(layer)
        if pair is None:
            raise ValueError(
                f"layer {layer} no longer holds tokens {start}..{start + self.block_size} "
                f"(released: its window has passed them)"
            )
        return pair[which]

    def drop(self, start: int, layer: int) -> None:
        """Forget a part that moved back into its layer's buffers."""
        parts = self._parts[start]
        parts.pop(layer)
        if not parts:
            del self._parts[start]

    def cut(self, sealed: int) -> None:
        """Forget blocks from ``sealed`` on (a truncation)."""
        self._parts = {a: p for a, p in self._parts.items() if a < sealed}
        self.released = min(self.released, sealed)

    def release(self, end: int) -> int:
        """Free the parts of blocks before ``end``; returns the bytes freed."""
        freed = 0
        for a in [a for a in self._parts if a < end]:
            freed += sum(kv.nbytes for pair in self._parts.pop(a).values() for kv in pair)
        self.released = max(self.released, end)
        return freed

    @property
    def nbytes(self) -> int:
        return sum(kv.nbytes for p in self._parts.values() for pair in p.values() for kv in pair)
