"""Attention over :class:`MLXCache` layers as they are stored, without a float copy of them.

The query is scored against the sealed blocks' packed keys with ``mx.quantized_matmul`` in
the stored (Hadamard-rotated) domain: ``q . (dequantize(k) @ H) == (q @ H) . dequantize(k)``
(H is symmetric), and the sealed values' weighted sum is rotated back once per query
(``(p @ dequantize(v)) @ H``); both rotations are fast Walsh-Hadamard transforms. The open
block's float16 rows are attended as they are, and one softmax runs over both parts. This is
the computation of the torch backend's CPU kernel, so both backends attend the same stored
bytes the same way. On a sliding-window layer only the rows some query's window reaches are
read (the cache holds little more of such a layer in its buffers). :func:`attend_reference`
is the plain computation over a dequantized copy that the fast path is tested against.
"""

from __future__ import annotations

import mlx.core as mx

from edge_infer.backends.mlx.kv_cache import MLXCache, hadamard_rotate
from edge_infer.backends.mlx.kv_quant import dequantize_kv


def _causal(scores: mx.array, start: int, first_key: int, window: int = 0) -> mx.array:
    """Scores [..., T, K] of queries at ``start..`` over keys at ``first_key..``: a query
    sees the keys up to its own position (and with a ``window`` only that many latest)."""
    t, k = scores.shape[-2:]
    rows = mx.arange(start, start + t)[:, None]
    cols = mx.arange(first_key, first_key + k)[None]
    seen = rows >= cols
    if window:
        seen = seen & (cols > rows - window)
    return mx.where(seen, scores, mx.finfo(scores.dtype).min)


def attend(cache: MLXCache, layer: int, q: mx.array, scale: float, window: int = 0) -> mx.array:
    """q [1, n_q, T, D] (rope applied) of the T tokens just stored after ``cache.length``
    (``cache.update``, not yet committed) -> attention output [1, n_q, T, D]; each token
    sees the tokens before it and itself, with a ``window`` only the ``window`` latest of
    them (itself included). Keys before every query's window are not read."""
    _, n_q, t, d = q.shape
    start = cache.length
    lo = max(0, start - window + 1) if window else 0  # the first key any query sees
    q = q.reshape(cache.n_kv, n_q // cache.n_kv, t, d)  # query heads grouped per KV head
    sealed = cache.sealed_rows(layer, lo)
    tail = cache.tail_rows(layer, start + t)
    skip = lo - cache.tail_start  # tail rows before the window
    if tail is not None and skip > 0:
        tail = (tail[0][:, :, skip:], tail[1][:, :, skip:])
    first_tail = max(lo, cache.tail_start)
    # with a window some query's first key may lie after lo: mask every part then
    wide = bool(window) and start + t - lo > window
    quant = {"group_size": cache.group_size, "bits": cache.layer_bits[layer]}
    scores = []
    if sealed is not None:  # in the stored domain: (q @ H) . dequantize(k)
        qr = hadamard_rotate(q, scale)
        scores.append(mx.quantized_matmul(qr, *sealed[0], transpose=True, **quant))
    if tail is not None:
        s = (q * scale) @ tail[0].astype(q.dtype).swapaxes(-1, -2)
        scores.append(_causal(s, start, first_tail) if t > 1 and not wide else s)
    joined = scores[0] if len(scores) == 1 else mx.concatenate(scores, axis=-1)
    if wide:
        joined = _causal(joined, start, lo, window)
    probs = mx.softmax(joined, axis=-1, precise=True)
    out = None
    n_sealed = 0
    if sealed is not None:  # the weighted sum of stored values, rotated back once
        n_sealed = sealed[1][0].shape[2]
        p = probs[..., :n_sealed] if tail is not None else probs
        out = hadamard_rotate(mx.quantized_matmul(p, *sealed[1], transpose=False, **quant))
    if tail is not None:
        part = probs[..., n_sealed:] @ tail[1].astype(q.dtype)
        out = part if out is None else out + part
    assert out is not None
    return out.reshape(1, n_q, t, d)


def readable(cache: MLXCache, layer: int, end: int) -> tuple[mx.array, mx.array]:
    """K and V of tokens ``0..end`` exactly as attention reads them, float32
    [1, n_kv, end, D]: sealed rows dequantized and rotated back, tail rows as stored;
    tokens a sliding-window layer no longer holds in its buffers read as zeros."""
    out = []
    first = cache.held_from(layer)
    sealed = cache.sealed_rows(layer, first)
    tail = cache.tail_rows(layer, end)
    for w in range(2):
        parts = [mx.zeros((cache.n_kv, 1, first, cache.head_dim))] if first else []
        if sealed is not None:
            bits = cache.layer_bits[layer]
            parts.append(hadamard_rotate(dequantize_kv(*sealed[w], bits, cache.group_size)))
        if tail is not None:
            parts.append(tail[w].astype(mx.float32))
        x = mx.concatenate(parts, axis=2) if len(parts) > 1 else parts[0]
        out.append(x.reshape(1, cache.n_kv, end, cache.head_dim))
    return out[0], out[1]


def attend_reference(
    cache: MLXCache, layer: int, q: mx.array, scale: float, window: int = 0
) -> mx.array:
    """What :func:`attend` computes, over a float32 copy of the layer's K and V
    (:func:`readable`) with MLX's fused attention: the reference of the fast path."""
    start, t = cache.length, q.shape[2]
    keys, values = readable(cache, layer, start + t)
    mask = None
    if t > 1 or window:
        rows = mx.arange(start, start + t)[:, None]
        cols = mx.arange(start + t)[None]
        mask = rows >= cols
        if window:
            mask = mask & (cols > rows - window)
    return mx.fast.scaled_dot_product_attention(
        q.astype(mx.float32), keys, values, scale=scale, mask=mask
    )
