"""The MLX KV cache holds only the stored form: quantized sealed blocks and the open block's
float16 rows, written as the shared format says and read back unchanged."""

from __future__ import annotations

import gc

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
from edge_infer.backends.mlx.kv_attention import attend  # noqa: E402
from edge_infer.backends.mlx.kv_cache import MLXCache  # noqa: E402
from edge_infer.cache_store.kv_format import QuantizedKV  # noqa: E402
from edge_infer.cache_store.rotation import rotate  # noqa: E402

LAYERS, N_KV, D, BLOCK = 2, 3, 64, 16


def _tokens(rng: np.random.Generator, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Small integers: exact in float16, and their Hadamard rotation exact in float32."""
    return tuple(rng.integers(-8, 9, (1, N_KV, t, D)).astype(np.float32) for _ in "kv")


def _fill(cache: MLXCache, n: int, seed: int = 0) -> list[np.ndarray]:
    """Store ``n`` tokens in chunks of 5 (never across a block); returns each layer's keys
    [N_KV, n, D]."""
    rng = np.random.default_rng(seed)
    keys: list[list[np.ndarray]] = [[] for _ in range(LAYERS)]
    while cache.length < n:
        t = min(5, n - cache.length, cache.max_tokens_in_one_call())
        for i in range(LAYERS):
            k, v = _tokens(rng, t)
            cache.update(i, mx.array(k), mx.array(v))
            keys[i].append(k[0])
        cache.advance(t)
    return [np.concatenate(k, axis=1) for k in keys]


def _stored_bytes(tokens: int, bits: int, group: int) -> int:
    per_row = D * bits // 8 + 2 * 2 * (D // group)  # packed, float16 scales and biases
    return LAYERS * 2 * N_KV * tokens * per_row


@pytest.mark.parametrize("bits,group", [(4, 64), (4, 32), (8, 64)])
def test_sealed_blocks_are_the_numpy_stored_form(bits, group):
    cache = MLXCache(LAYERS, N_KV, D, bits, group, block_size=BLOCK)
    keys = _fill(cache, 2 * BLOCK + 3)
    assert cache.length == 2 * BLOCK + 3 and cache.sealed_length == 2 * BLOCK
    blocks = cache.blocks()
    assert [(b.start, b.length, b.sealed) for b in blocks] == [
        (0, 16, True),
        (16, 16, True),
        (32, 3, False),
    ]
    for i in range(LAYERS):
        got = blocks[1].layers[i].keys
        want = QuantizedKV.quantize(rotate(keys[i][:, 16:32]), bits, group)
        assert isinstance(got, QuantizedKV)
        for name in ("packed", "scales", "biases"):
            assert np.array_equal(getattr(got, name), getattr(want, name)), name
        tail = blocks[2].layers[i].keys
        assert tail.dtype == np.float16 and np.array_equal(tail, keys[i][:, 32:])
        lo, hi = blocks[1].abstract[i]  # bounds of the keys as attention reads them
        readable = rotate(want.dequantize())
        assert (lo <= readable.min(axis=1) + 1e-6).all() and (
            hi >= readable.max(axis=1) - 1e-6
        ).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_holds_only_the_stored_form(bits):
    cache = MLXCache(LAYERS, N_KV, D, bits, 64, block_size=BLOCK)
    _fill(cache, 3 * BLOCK)
    # every block sealed: the float16 rows are gone, the quantized ones fill their buffers
    assert cache.nbytes == _stored_bytes(3 * BLOCK, bits, 64)
    assert cache.nbytes == sum(a.nbytes for a in cache.arrays())
    _fill(cache, 3 * BLOCK + 5, seed=1)
    tail = LAYERS * 2 * N_KV * BLOCK * D * 2  # one float16 block, at most
    assert cache.nbytes == _stored_bytes(3 * BLOCK, bits, 64) + tail


def test_reported_bytes_are_what_mlx_allocates():
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    cache = MLXCache(LAYERS, N_KV, D, 4, 64, block_size=BLOCK)
    _fill(cache, 8 * BLOCK)
    mx.eval(cache.arrays())
    gc.collect()
    held = mx.get_active_memory() - before
    assert cache.nbytes == _stored_bytes(8 * BLOCK, 4, 64) + _stored_bytes(BLOCK, 4, 64)
    assert abs(held - cache.nbytes) <= 0.05 * cache.nbytes + 64 * 1024, (held, cache.nbytes)


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_blocks_round_trip_and_attend_the_same(bits):
    cache = MLXCache(LAYERS, N_KV, D, bits, 64, block_size=BLOCK)
    _fill(cache, 2 * BLOCK + 7)
    blocks = cache.blocks()
    restored = MLXCache(LAYERS, N_KV, D, bits, 64, block_size=BLOCK)
    restored.append_blocks(blocks)
    assert (restored.length, restored.sealed_length) == (cache.length, cache.sealed_length)
    again = restored.blocks()
    for a, b in zip(blocks, again, strict=True):
        assert (a.start, a.length, a.sealed) == (b.start, b.length, b.sealed)
        for x, y in zip(a.layers, b.layers, strict=True):
            for u, w in ((x.keys, y.keys), (x.values, y.values)):
                if isinstance(u, QuantizedKV):
                    assert np.array_equal(u.packed, w.packed) and np.array_equal(u.scales, w.scales)
                else:
                    assert np.array_equal(u, w)
    rng = np.random.default_rng(5)
    k, v = (mx.array(x) for x in _tokens(rng, 2))
    q = mx.array(rng.standard_normal((1, 6, 2, D)).astype(np.float32))
    outs = []
    for c in (cache, restored):
        c.update(0, k, v)
        outs.append(np.array(attend(c, 0, q, 0.125)))
    assert np.array_equal(outs[0], outs[1])


def test_restoring_sealed_blocks_reserves_exactly_them():
    cache = MLXCache(LAYERS, N_KV, D, 4, 64, block_size=BLOCK)
    _fill(cache, 10 * BLOCK)
    restored = MLXCache(LAYERS, N_KV, D, 4, 64, block_size=BLOCK)
    restored.append_blocks(cache.blocks())
    assert restored.nbytes == _stored_bytes(10 * BLOCK, 4, 64)


def test_truncate_keeps_whole_sealed_blocks():
    cache = MLXCache(LAYERS, N_KV, D, 4, 64, block_size=BLOCK)
    _fill(cache, 2 * BLOCK + 6)
    assert cache.truncate(2 * BLOCK + 2) == 2 * BLOCK + 2  # inside the float16 tail: exact
    assert cache.truncate(BLOCK + 3) == BLOCK  # inside a sealed block: that block goes
    assert cache.sealed_length == BLOCK and cache.max_tokens_in_one_call() == BLOCK
    _fill(cache, 2 * BLOCK, seed=3)
    assert cache.sealed_length == 2 * BLOCK


def test_float16_cache_keeps_every_token_as_it_came():
    cache = MLXCache(LAYERS, N_KV, D, 16, 64, block_size=BLOCK)
    keys = _fill(cache, 2 * BLOCK + 1)
    assert cache.sealed_length == 2 * BLOCK and cache.max_tokens_in_one_call() > BLOCK
    blocks = cache.blocks()
    assert np.array_equal(blocks[1].layers[1].keys, keys[1][:, BLOCK : 2 * BLOCK])
    assert cache.truncate(BLOCK + 3) == BLOCK + 3  # float16 blocks cut anywhere


def test_refuses_blocks_it_cannot_hold():
    q4 = MLXCache(LAYERS, N_KV, D, 4, 64, block_size=BLOCK)
    _fill(q4, BLOCK + 2)
    q8 = MLXCache(LAYERS, N_KV, D, 8, 64, block_size=BLOCK)
    with pytest.raises(ValueError, match="8-bit group 64"):
        q8.append_blocks(q4.blocks())
    with pytest.raises(ValueError, match="does not follow"):
        q4.append_blocks(q4.blocks()[:1])
    with pytest.raises(ValueError, match="block boundary"):
        q4.update(0, *(mx.zeros((1, N_KV, BLOCK, D)) for _ in "kv"))
    with pytest.raises(ValueError, match="group size"):
        MLXCache(LAYERS, N_KV, 48, 4, 64)
