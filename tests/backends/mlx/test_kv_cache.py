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
    # the active memory is the process's: arrays an earlier test left to a collector or a
    # thread may be freed meanwhile, so a measurement off by more than the tolerance is
    # taken again (a wrong count is off every time)
    expected = _stored_bytes(8 * BLOCK, 4, 64) + _stored_bytes(BLOCK, 4, 64)
    measured = []
    for _ in range(3):
        gc.collect()
        mx.clear_cache()
        before = mx.get_active_memory()
        cache = MLXCache(LAYERS, N_KV, D, 4, 64, block_size=BLOCK)
        _fill(cache, 8 * BLOCK)
        mx.eval(cache.arrays())
        gc.collect()
        held = mx.get_active_memory() - before
        assert cache.nbytes == expected
        measured.append(held)
        if abs(held - expected) <= 0.05 * expected + 64 * 1024:
            return
        del cache
    raise AssertionError(f"MLX holds {measured} bytes, the cache reports {expected}")


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


# -------------------------------------------------------------- sliding-window layers

WINDOWED = [7, 0]  # layer 0 sees its 7 latest tokens, layer 1 everything


def test_window_layer_holds_a_bounded_number_of_rows():
    bounded = MLXCache(LAYERS, N_KV, D, 4, 64, block_size=BLOCK, windows=WINDOWED)
    full = MLXCache(LAYERS, N_KV, D, 4, 64, block_size=BLOCK, windows=WINDOWED, bounded=False)
    for c in (bounded, full):
        _fill(c, 12 * BLOCK + 3)
    local_rows = (1 + 2) * BLOCK  # its window in whole blocks and two more
    tail = 2 * N_KV * BLOCK * D * 2  # the float16 tail: one block at most
    held = bounded.buffer_nbytes([0]) - tail
    assert held == _stored_bytes(local_rows, 4, 64) // LAYERS
    assert bounded.buffer_nbytes([1]) == full.buffer_nbytes([1])
    assert full.buffer_nbytes([0]) - tail >= _stored_bytes(12 * BLOCK, 4, 64) // LAYERS
    # the dropped blocks are held apart, and exported byte for byte as before
    assert bounded.hidden_nbytes() == _stored_bytes(11 * BLOCK, 4, 64) // LAYERS
    assert bounded.nbytes == bounded.buffer_nbytes() + bounded.hidden_nbytes()
    _assert_same_blocks(bounded.blocks(), full.blocks())
    assert bounded.held_from(0) == 11 * BLOCK and bounded.held_from(1) == 0


def test_released_blocks_are_gone():
    cache = MLXCache(LAYERS, N_KV, D, 4, 64, block_size=BLOCK, windows=WINDOWED)
    _fill(cache, 6 * BLOCK + 5)
    hidden = cache.hidden_nbytes()
    assert hidden > 0 and cache.release_hidden(2 * BLOCK) == _stored_bytes(2 * BLOCK, 4, 64) // 2
    assert cache.release_hidden() == hidden - _stored_bytes(2 * BLOCK, 4, 64) // 2
    assert cache.hidden_nbytes() == 0
    with pytest.raises(ValueError, match="no longer holds tokens 0..16"):
        cache.blocks()
    assert len(cache.blocks(cache.held_from(0))) == 7 - cache.held_from(0) // BLOCK
    assert cache.truncate(6 * BLOCK + 2) == 6 * BLOCK + 2  # its window is still held
    assert cache.truncate(6 * BLOCK - 1) == 0  # its window was released: nothing is kept
    assert cache.length == cache.sealed_length == cache.hidden_nbytes() == 0
    _fill(cache, 3 * BLOCK, seed=4)
    assert cache.sealed_length == 3 * BLOCK


def _assert_same_blocks(got, want) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert (a.start, a.length, a.sealed) == (b.start, b.length, b.sealed)
        for x, y in zip(a.layers, b.layers, strict=True):
            for u, w in ((x.keys, y.keys), (x.values, y.values)):
                if isinstance(u, QuantizedKV):
                    for name in ("packed", "scales", "biases"):
                        assert np.array_equal(getattr(u, name), getattr(w, name)), name
                else:
                    assert np.array_equal(u, w)
        if a.abstract is not None:
            for (lo, hi), (lo2, hi2) in zip(a.abstract, b.abstract, strict=True):
                assert np.array_equal(lo, lo2) and np.array_equal(hi, hi2)


# A tiny random Gemma 3: 10-token windows on layers 0-4 (layer 5 global), 8-token blocks,
# so 120 tokens cross twelve windows and fifteen blocks.
G_WINDOW, G_BLOCK, G_TOKENS = 10, 8, 120


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gguf")
    pytest.importorskip("mlx_lm")
    import tempfile

    from edge_infer.backends.mlx.backend import MLXBackend
    from edge_infer.models.loader import load_model
    from tests.support.model_files import write_tiny_gemma3_gguf

    with tempfile.TemporaryDirectory() as tmp:
        info = write_tiny_gemma3_gguf(f"{tmp}/g.gguf", "Q8_0", window=G_WINDOW)
        backend = MLXBackend(load_model(info["path"]), kv_bits=4)
        ids = np.random.default_rng(2).integers(3, info["vocab_size"], G_TOKENS + 20)
        yield backend, [int(i) for i in ids]


def _cache(backend, bounded: bool = True) -> MLXCache:
    cfg = backend.config
    return MLXCache(
        cfg.num_layers,
        cfg.num_kv_heads,
        cfg.head_dim,
        backend.kv_bits,
        backend.kv_group_size,
        block_size=G_BLOCK,
        windows=cfg.layer_windows(),
        bounded=bounded,
    )


def _run(backend, cache: MLXCache, ids: list[int], chunks: list[int]) -> list[np.ndarray]:
    """Logits of every position of ``ids`` after the cache: ``chunks`` (sizes) prefilled,
    the rest decoded one at a time."""
    out, pos = [], 0
    for n in chunks:
        out += list(backend.forward(np.asarray(ids[pos : pos + n]), cache, all_logits=True))
        pos += n
    out += [backend.forward(np.asarray(ids[t : t + 1]), cache)[0] for t in range(pos, len(ids))]
    return out


def _assert_same_logits(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for t, (a, b) in enumerate(zip(got, want, strict=True)):
        assert np.array_equal(a, b), f"position {t}"


def test_gemma3_bounded_cache_gives_the_same_logits(gemma):
    backend, ids = gemma
    assert backend.config.layer_windows() == [G_WINDOW] * 5 + [0]
    assert backend.new_cache().windows == backend.config.layer_windows()
    ids = ids[:G_TOKENS]
    chunks = [3, 30, 47]  # inside the first window, across blocks, then decode to 120
    bounded, full = _cache(backend), _cache(backend, bounded=False)
    _assert_same_logits(_run(backend, bounded, ids, chunks), _run(backend, full, ids, chunks))
    local = list(range(5))
    rows = (-(-G_WINDOW // G_BLOCK) + 2) * G_BLOCK
    assert all(bounded.held_from(i) >= G_TOKENS - rows for i in local)
    assert bounded.buffer_nbytes(local) < full.buffer_nbytes(local) / 2
    assert bounded.buffer_nbytes([5]) == full.buffer_nbytes([5])
    _assert_same_blocks(bounded.blocks(), full.blocks())


def test_gemma3_bounded_caches_decode_the_same_in_a_batch(gemma):
    backend, ids = gemma
    lengths = (70, 101)
    pairs = []
    for bounded in (True, False):
        caches = [_cache(backend, bounded) for _ in lengths]
        for c, n in zip(caches, lengths, strict=True):
            backend.forward(np.asarray(ids[:n]), c)
        pairs.append(caches)
    for step in range(12):  # past a block boundary of both
        tokens = [ids[n + step] for n in lengths]
        got = backend.forward_batch(tokens, pairs[0])
        assert np.array_equal(got, backend.forward_batch(tokens, pairs[1])), step


@pytest.mark.parametrize("cut,kept", [(13, 8), (45, 40), (117, 112)])
def test_gemma3_truncated_into_dropped_blocks_continues_the_same(gemma, cut, kept):
    backend, ids = gemma
    bounded, full = _cache(backend), _cache(backend, bounded=False)
    for c in (bounded, full):
        _run(backend, c, ids[:G_TOKENS], [60, 60])
        assert c.truncate(cut) == kept
    go_on = ids[:kept] + ids[G_TOKENS : G_TOKENS + 20]
    got = _run(backend, bounded, go_on[kept:], [7])
    _assert_same_logits(got, _run(backend, full, go_on[kept:], [7]))
    # and the same as a cache that was never longer
    fresh = _cache(backend)
    _run(backend, fresh, ids[:kept], [kept] if kept else [])
    _assert_same_blocks(bounded.blocks(), full.blocks())
    _assert_same_logits(got, _run(backend, fresh, go_on[kept:], [7]))


def test_gemma3_exported_blocks_restore_the_same(gemma):
    backend, ids = gemma
    cache = _cache(backend)
    _run(backend, cache, ids[:101], [50, 51])
    blocks = cache.blocks()
    restored, into_full = _cache(backend), _cache(backend, bounded=False)
    for c in (restored, into_full):
        c.append_blocks(blocks)
        assert (c.length, c.sealed_length) == (101, 96)
    _assert_same_blocks(restored.blocks(), blocks)
    assert restored.buffer_nbytes() <= cache.buffer_nbytes()
    later = ids[101:125]
    want = _run(backend, cache, later, [])
    _assert_same_logits(_run(backend, restored, later, []), want)
    _assert_same_logits(_run(backend, into_full, later, []), want)
