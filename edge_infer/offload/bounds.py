"""Quest upper bounds of attention scores from page boxes, and the exact maxima they bound."""

from __future__ import annotations

import numpy as np


def quest_bounds(q: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Upper bound of each query head's score over each page:
    ``sum_d max(q_d*lo_d, q_d*hi_d) / sqrt(D)``.

    q ``[n_q, D]`` (rope applied, as attention scores it); lo/hi ``[n_kv, pages, D]`` in
    the same domain. Query head ``i`` reads KV head ``i // (n_q // n_kv)`` (grouped-query
    attention). Returns float32 ``[n_q, pages]``.
    """
    q = np.asarray(q, dtype=np.float32)
    n_q, d = q.shape
    n_kv = lo.shape[0]
    if n_q % n_kv or lo.shape != hi.shape or lo.shape[2] != d:
        raise ValueError(f"q {q.shape} does not fit page boxes {lo.shape}/{hi.shape}")
    qg = q.reshape(n_kv, n_q // n_kv, d)
    pos, neg = np.maximum(qg, 0), np.minimum(qg, 0)
    lo32, hi32 = lo.astype(np.float32, copy=False), hi.astype(np.float32, copy=False)
    # batched matrix products (BLAS), [n_kv, g, D] @ [n_kv, D, pages]
    out = pos @ hi32.transpose(0, 2, 1) + neg @ lo32.transpose(0, 2, 1)
    return (out / np.sqrt(d)).reshape(n_q, -1).astype(np.float32)


def group_max(per_query: np.ndarray, n_kv: int) -> np.ndarray:
    """``[n_q, pages]`` -> ``[n_kv, pages]``: the largest over each KV head's query group."""
    n_q, p = per_query.shape
    return per_query.reshape(n_kv, n_q // n_kv, p).max(axis=1)


def scores(q: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Exact scores ``q . k / sqrt(D)``: q ``[n_q, D]``, keys ``[n_kv, T, D]`` -> ``[n_q, T]``."""
    q = np.asarray(q, dtype=np.float32)
    n_q, d = q.shape
    n_kv = keys.shape[0]
    qg = q.reshape(n_kv, n_q // n_kv, d)
    s = np.einsum("hgd,htd->hgt", qg, np.asarray(keys, dtype=np.float32)) / np.sqrt(d)
    return s.reshape(n_q, -1)


def true_max_scores(q: np.ndarray, keys: np.ndarray, page: int) -> np.ndarray:
    """The largest exact score of each query head over each page of ``keys`` ``[n_kv, T, D]``:
    ``[n_q, pages]`` (what :func:`quest_bounds` must never be below)."""
    s = scores(q, keys)
    n_q, t = s.shape
    n = -(-t // page)
    pad = np.full((n_q, n * page - t), -np.inf, dtype=s.dtype)
    return np.concatenate([s, pad], axis=1).reshape(n_q, n, page).max(axis=2)
