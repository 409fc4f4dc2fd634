"""Prefix reuse: how much of a cached token sequence a new prompt shares, and its blocks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_infer.cache_store.blocks import KVBlock

_SHORT = 64  # below this a Python loop beats converting to arrays


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token-id sequences."""
    n = min(len(a), len(b))
    if n <= _SHORT:
        for i in range(n):
            if a[i] != b[i]:
                return i
        return n
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


def blocks_for_prefix(blocks: Sequence[KVBlock], n: int) -> list[KVBlock]:
    """The blocks holding tokens ``[0, n)`` of a contiguous run starting at 0.

    A block cut by ``n`` is truncated and becomes unsealed (its abstract dropped); asking
    for more tokens than the blocks hold returns them all.
    """
    out: list[KVBlock] = []
    for block in blocks:
        if block.end <= n:
            out.append(block)
            continue
        if block.start < n:
            out.append(block.truncate(n - block.start))
        break
    return out
