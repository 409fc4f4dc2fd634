"""Sliding-window layers of the torch KV cache hold only their window in their buffers:
a tiny random Gemma 3 (16-token window, 32-token blocks) computes exactly what it computes
with every block kept, through prefill, decoding, batches, export, restore and truncation."""

from __future__ import annotations

import numpy as np
import pytest

from edge_infer.backends.torch.backend import TorchBackend
from edge_infer.backends.torch.kv_cache import TorchKVCache
from edge_infer.cache_store.kv_format import QuantizedKV
from edge_infer.models.loader import load_model
from tests.support.model_files import write_tiny_gemma3_gguf

pytest.importorskip("gguf")

BLOCK = 32


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    info = write_tiny_gemma3_gguf(tmp_path_factory.mktemp("gemma3") / "g.gguf", "Q8_0")
    backend = TorchBackend(load_model(info["path"]), device="cpu", kv_bits=4, kv_group_size=32)
    ids = np.random.default_rng(5).integers(3, info["vocab_size"], 600)
    return backend, ids


def new_cache(backend: TorchBackend, bounded: bool = True) -> TorchKVCache:
    cfg = backend.config
    return TorchKVCache(
        cfg.num_layers,
        cfg.num_kv_heads,
        cfg.head_dim,
        backend.torch_device,
        kv_bits=backend.kv_bits,
        group_size=backend.kv_group_size,
        block_size=BLOCK,
        windows=cfg.layer_windows(),
        bounded=bounded,
    )


def run(backend, cache, ids, chunk: int = 45) -> np.ndarray:
    """Logits of every position of ``ids`` after what ``cache`` holds: prefill in chunks."""
    out = []
    for a in range(0, len(ids), chunk):
        out.append(backend.forward(ids[a : a + chunk], cache, all_logits=True))
    return np.concatenate(out)


def decode(backend, cache, ids) -> np.ndarray:
    return np.concatenate([backend.forward(ids[t : t + 1], cache) for t in range(len(ids))])


def local_layers(cache: TorchKVCache) -> list[int]:
    return [i for i, w in enumerate(cache.windows) if w]


def test_window_layers_hold_a_bounded_number_of_rows(gemma):
    backend, ids = gemma
    cache, full = new_cache(backend), new_cache(backend, bounded=False)
    local = local_layers(cache)
    assert local and len(local) < cache.num_layers
    sizes = []
    for a in range(0, 600, 100):
        for c in (cache, full):
            backend.forward(ids[a : a + 100], c)
        sizes.append(cache.buffer_nbytes(local))
    assert sizes[-1] == sizes[2] < full.buffer_nbytes(local) / 4
    # the parts that left the buffers are kept until released, then the cache is bounded
    assert cache.hidden_nbytes() > 0
    freed = cache.release_hidden()
    assert freed > 0 and cache.hidden_nbytes() == 0
    assert cache.nbytes == cache.buffer_nbytes()


def test_logits_equal_the_unbounded_cache_bit_for_bit(gemma):
    backend, ids = gemma
    cache, full = new_cache(backend), new_cache(backend, bounded=False)
    np.testing.assert_array_equal(run(backend, cache, ids[:500]), run(backend, full, ids[:500]))
    cache.release_hidden()  # decoding needs nothing it released
    np.testing.assert_array_equal(
        decode(backend, cache, ids[500:560]), decode(backend, full, ids[500:560])
    )


def test_a_batch_row_computes_what_it_computes_alone(gemma):
    """Batched decoding of bounded caches equals that of caches keeping every block bit for
    bit, and each row equals the row decoded alone (to float tolerance: the matrix
    products of a batch of one and of two may round differently)."""
    backend, ids = gemma
    lengths = (300, 451)
    caches = [new_cache(backend) for _ in lengths]
    full = [new_cache(backend, bounded=False) for _ in lengths]
    alone = [new_cache(backend) for _ in lengths]
    for group in (caches, full, alone):
        for c, n in zip(group, lengths, strict=True):
            run(backend, c, ids[:n])
    for step in range(3):
        tokens = [int(ids[n + step]) for n in lengths]
        batch = backend.forward_batch(tokens, caches)
        np.testing.assert_array_equal(batch, backend.forward_batch(tokens, full))
        for row, (a, t) in enumerate(zip(alone, tokens, strict=True)):
            one = backend.forward(np.array([t]), a)[0]
            np.testing.assert_allclose(batch[row], one, rtol=1e-4, atol=1e-4)


def test_exported_blocks_hold_every_layer_and_restore_token_identically(gemma):
    backend, ids = gemma
    cache = new_cache(backend)
    run(backend, cache, ids[:470])
    blocks = cache.blocks()
    assert [b.start for b in blocks] == list(range(0, 470, BLOCK))
    for b in blocks[:-1]:
        assert all(isinstance(x.keys, QuantizedKV) for x in b.layers)
        # the global layers keep 8 bits (their keys carry long-range retrieval), the rest 4
        bits = [8 if w == 0 else 4 for w in cache.windows]
        assert [(x.keys.bits, x.values.bits) for x in b.layers] == [(n, n) for n in bits]
    assert 4 in cache.layer_bits and 8 in cache.layer_bits
    twin = new_cache(backend)
    twin.append_blocks(blocks)
    assert twin.length == cache.length
    assert twin.buffer_nbytes() == cache.buffer_nbytes()
    np.testing.assert_array_equal(
        decode(backend, twin, ids[470:490]), decode(backend, cache, ids[470:490])
    )
    # the same blocks on a cache keeping every block continue the same way
    full, again = new_cache(backend, bounded=False), new_cache(backend)
    full.append_blocks(blocks)
    again.append_blocks(blocks)
    np.testing.assert_array_equal(
        decode(backend, full, ids[470:490]), decode(backend, again, ids[470:490])
    )


@pytest.mark.parametrize("keep", [0, 31, 64, 100, 300, 449])
def test_truncating_to_an_earlier_token_continues_as_a_fresh_prefill(gemma, keep):
    backend, ids = gemma
    cache = new_cache(backend)
    run(backend, cache, ids[:450])
    kept = cache.truncate(keep)
    assert kept == keep // BLOCK * BLOCK if keep < 448 else kept == keep
    want = run(backend, new_cache(backend), ids[: kept + 60])[kept:]
    np.testing.assert_array_equal(run(backend, cache, ids[kept : kept + 60]), want)


def test_truncating_into_released_tokens_keeps_nothing(gemma):
    backend, ids = gemma
    cache = new_cache(backend)
    run(backend, cache, ids[:450])
    cache.release_hidden(256)
    assert cache.truncate(448) == 448
    assert cache.truncate(300) == 288  # the window of token 288 starts after 256
    assert cache.truncate(200) == 0
    np.testing.assert_array_equal(
        run(backend, cache, ids[:100]), run(backend, new_cache(backend), ids[:100])
    )
    run(backend, cache, ids[100:450])
    cache.release_hidden(256)
    with pytest.raises(ValueError, match="no longer holds"):
        cache.blocks()
    assert len(cache.blocks(256)) == 7  # the blocks from 256 on are whole


def test_blocks_of_another_kv_format_are_refused_naming_both(gemma, tmp_path):
    backend, ids = gemma
    model = load_model(write_tiny_gemma3_gguf(tmp_path / "g.gguf", "Q8_0")["path"])
    wide = TorchBackend(model, device="cpu", kv_bits=8, kv_group_size=32)
    source = new_cache(wide)
    run(wide, source, ids[:70])
    blocks = [b for b in source.blocks() if b.sealed]
    expected = "not 4-bit group 32 K/V in layer 0 \\(got 8-bit group 32\\)"
    with pytest.raises(ValueError, match=expected):
        new_cache(backend).append_blocks(blocks)
