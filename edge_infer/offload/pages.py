"""Page abstracts: channel-wise key min/max over fixed runs of tokens inside a block."""

from __future__ import annotations

import numpy as np

from edge_infer.cache_store.blocks import KVBlock, attention_keys, key_bounds


def page_count(length: int, page: int) -> int:
    """Pages of ``page`` tokens covering ``length`` tokens (the last one may be short)."""
    if page < 1:
        raise ValueError(f"page size must be positive, got {page}")
    return -(-length // page)


def page_bounds(keys: np.ndarray, page: int) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) per page of keys ``[n_kv, T, D]`` (as attention reads them): float16
    ``[n_kv, pages, D]``, rounded outward so that they always bound the keys."""
    n_kv, t, d = keys.shape
    if t == 0:
        raise ValueError("cannot bound an empty run of keys")
    n = page_count(t, page)
    pad = n * page - t
    if pad:  # repeat the last key: a copy inside the page does not widen its box
        keys = np.concatenate([keys, np.repeat(keys[:, -1:], pad, axis=1)], axis=1)
    lo, hi = key_bounds(keys.reshape(n_kv * n, page, d))
    return lo.reshape(n_kv, n, d), hi.reshape(n_kv, n, d)


def block_page_bounds(block: KVBlock, page: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, :func:`page_bounds` of a block's keys as attention reads them."""
    return [page_bounds(attention_keys(layer), page) for layer in block.layers]
