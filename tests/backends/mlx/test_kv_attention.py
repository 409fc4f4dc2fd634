"""Attention over the stored MLX cache (packed sealed blocks, float16 tail) against the plain
computation over a dequantized copy."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
from edge_infer.backends.mlx.kv_attention import attend, attend_reference, readable  # noqa: E402
from edge_infer.backends.mlx.kv_cache import MLXCache  # noqa: E402
from edge_infer.cache_store.rotation import rotate  # noqa: E402

N_KV, N_Q, D, BLOCK = 2, 6, 64, 16
SCALE = D**-0.5


def _fill(cache: MLXCache, n: int, rng: np.random.Generator, chunk: int = 5) -> None:
    """Store ``n`` random tokens in every layer, calls never crossing a block."""
    while cache.length < n:
        t = min(chunk, n - cache.length, cache.max_tokens_in_one_call())
        for i in range(cache.num_layers):
            k, v = (mx.array(rng.standard_normal((1, N_KV, t, D)).astype(np.float32)) for _ in "kv")
            cache.update(i, k * 2.0, v)
        cache.advance(t)


def _query(rng: np.random.Generator, t: int) -> mx.array:
    return mx.array(rng.standard_normal((1, N_Q, t, D)).astype(np.float32) * 3.0)


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize(
    "held,t",
    [(0, 7), (0, 1), (9, 7), (16, 1), (16, 16), (37, 1), (37, 11), (48, 3)],
    ids=lambda x: str(x),
)
def test_matches_reference(bits, held, t):
    rng = np.random.default_rng(held * 100 + t + bits)
    cache = MLXCache(2, N_KV, D, bits, 32, block_size=BLOCK)
    _fill(cache, held, rng)
    assert t <= cache.max_tokens_in_one_call()
    for i in range(2):
        k, v = (mx.array(rng.standard_normal((1, N_KV, t, D)).astype(np.float32)) for _ in "kv")
        cache.update(i, k, v)
    for layer in range(2):
        q = _query(rng, t)
        got = attend(cache, layer, q, SCALE)
        want = attend_reference(cache, layer, q, SCALE)
        assert got.shape == (1, N_Q, t, D) and got.dtype == mx.float32
        np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-5, rtol=1e-4)


def test_sealed_rows_are_read_as_stored_and_the_open_block_in_float16():
    rng = np.random.default_rng(0)
    cache = MLXCache(1, N_KV, D, 4, 64, block_size=BLOCK)
    _fill(cache, 20, rng)
    keys, _ = readable(cache, 0, 20)
    sealed = cache.blocks()[0].layers[0].keys  # as stored: rotated, quantized
    np.testing.assert_allclose(np.array(keys[0, :, :16]), rotate(sealed.dequantize()), atol=1e-5)
    tail = cache.blocks()[1].layers[0].keys
    assert tail.dtype == np.float16
    assert np.array_equal(np.array(keys[0, :, 16:20]), tail.astype(np.float32))


def test_float16_queries_stay_close():
    """The Metal path runs float16 activations over the same stored cache."""
    rng = np.random.default_rng(1)
    cache = MLXCache(1, N_KV, D, 4, 64, block_size=BLOCK)
    _fill(cache, 40, rng)
    k = mx.array(rng.standard_normal((1, N_KV, 3, D)).astype(np.float32))
    cache.update(0, k, k)
    q = _query(rng, 3)
    got = attend(cache, 0, q.astype(mx.float16), SCALE)
    assert got.dtype == mx.float16
    want = np.array(attend_reference(cache, 0, q, SCALE))
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), want, atol=2e-2)


@pytest.mark.parametrize("bits", [4, 16])
@pytest.mark.parametrize(
    "held,t,window",
    [(0, 7, 4), (9, 7, 4), (37, 1, 5), (37, 11, 5), (40, 8, 20), (48, 1, 16), (48, 16, 3)],
    ids=lambda x: str(x),
)
def test_window_matches_reference(bits, held, t, window):
    """A sliding-window layer: each query sees only its ``window`` latest keys, in prefill
    chunks (windows starting inside and after sealed blocks) and in decode."""
    rng = np.random.default_rng(held * 100 + t + window + bits)
    cache = MLXCache(1, N_KV, D, bits, 32, block_size=BLOCK)
    _fill(cache, held, rng)
    k, v = (mx.array(rng.standard_normal((1, N_KV, t, D)).astype(np.float32)) for _ in "kv")
    cache.update(0, k, v)
    q = _query(rng, t)
    got = attend(cache, 0, q, SCALE, window=window)
    want = attend_reference(cache, 0, q, SCALE, window=window)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-5, rtol=1e-4)
    if held + t > window:  # the window changes the result
        full = np.array(attend_reference(cache, 0, q, SCALE))
        assert not np.allclose(np.array(got)[:, :, -1], full[:, :, -1], atol=1e-3)


def test_window_reference_is_the_plain_computation():
    """The windowed reference against softmax over the visible keys written out in numpy."""
    rng = np.random.default_rng(7)
    cache = MLXCache(1, N_KV, D, 16, 32, block_size=BLOCK)
    _fill(cache, 20, rng)
    k, v = (mx.array(rng.standard_normal((1, N_KV, 4, D)).astype(np.float32)) for _ in "kv")
    cache.update(0, k, v)
    q = _query(rng, 4)
    got = np.array(attend_reference(cache, 0, q, SCALE, window=6))
    keys, values = (np.array(x)[0].astype(np.float64) for x in readable(cache, 0, 24))
    qs = np.array(q)[0].astype(np.float64)
    group = N_Q // N_KV
    for h in range(N_Q):
        for r in range(4):
            pos = 20 + r
            lo = pos - 6 + 1
            s = keys[h // group, lo : pos + 1] @ qs[h, r] * SCALE
            p = np.exp(s - s.max())
            want = (p / p.sum()) @ values[h // group, lo : pos + 1]
            np.testing.assert_allclose(got[0, h, r], want, atol=1e-4)
