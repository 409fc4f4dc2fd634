"""Tests for the cache store's in-memory KV format, blocks and block bytes."""

from __future__ import annotations

import ast

import numpy as np
import pytest

from edge_infer.cache_store import (
    CacheCorruptError,
    KVBlock,
    KVFormat,
    LayerKV,
    QuantizedKV,
    block_from_bytes,
    block_to_bytes,
    compute_abstract,
    extend_blocks,
    merge_blocks,
    split_into_blocks,
)
from edge_infer.cache_store.blocks import CHAIN_START, attention_keys, token_chain, token_chains
from edge_infer.cache_store.kv_format import kv_dequantize, layer_bits
from edge_infer.cache_store.rotation import rotate
from tests.support import REPO
from tests.support.cache_store_helpers import assert_blocks_equal, assert_kv_equal, random_layers

try:
    import mlx.core as mx
except ImportError:  # MLX is optional outside Apple silicon; its comparisons are skipped
    mx = None
needs_mlx = pytest.mark.skipif(mx is None, reason="mlx is not installed")

FORMATS = [
    KVFormat(4, 64, 16),
    KVFormat(4, 32, 16),
    KVFormat(8, 64, 16),
    KVFormat(16, 64, 16),
    KVFormat(4, 64, 16, layer_bits=(4, 8, 4)),
]
IDS = [f.describe() for f in FORMATS]


def _x(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("bits,g", [(4, 64), (4, 32), (8, 64), (8, 32)])
def test_quantize_shapes_and_error(bits: int, g: int) -> None:
    x = _x((3, 10, 128))
    q = QuantizedKV.quantize(x, bits, g)
    assert q.packed.dtype == np.uint32 and q.packed.shape == (3, 10, 128 * bits // 32)
    assert q.scales.dtype == np.float16 and q.scales.shape == (3, 10, 128 // g)
    assert q.biases.shape == q.scales.shape
    assert q.shape == (3, 10, 128) and q.length == 10
    assert q.nbytes == q.packed.nbytes + q.scales.nbytes + q.biases.nbytes
    out = q.dequantize()
    assert out.dtype == np.float32 and out.shape == x.shape
    groups = x.reshape(3, 10, -1, g)
    step = (groups.max(-1) - groups.min(-1)) / ((1 << bits) - 1)
    err = np.abs(out - x).reshape(3, 10, -1, g).max(-1)
    assert np.all(err <= step + 1e-3)


def test_quantize_matches_row_wise_affine_and_is_lossless_to_slice() -> None:
    from edge_infer.formats.affine import quantize

    x = _x((2, 7, 64), seed=3)
    q = QuantizedKV.quantize(x)
    ref = quantize(x.reshape(14, 64))
    np.testing.assert_array_equal(q.packed.reshape(14, -1), ref.packed)
    np.testing.assert_array_equal(q.dequantize().reshape(14, 64), ref.dequantize())
    # quantization is per token, so slicing then concatenating changes nothing
    parts = [q.slice(0, 3), q.slice(3, 3), q.slice(3, 7)]
    assert parts[1].length == 0
    assert_kv_equal(QuantizedKV.concat(parts), q)
    assert_kv_equal(QuantizedKV.quantize(x[:, 3:7]), q.slice(3, 7))


def test_quantized_kv_validates() -> None:
    q = QuantizedKV.quantize(_x((2, 4, 64)))
    with pytest.raises(ValueError, match="bits"):
        QuantizedKV(q.packed, q.scales, q.biases, bits=16)
    with pytest.raises(ValueError, match="scales"):
        QuantizedKV(q.packed, q.scales[:, :3], q.biases)
    with pytest.raises(ValueError, match="packed"):
        QuantizedKV(q.packed.astype(np.int32), q.scales, q.biases)
    with pytest.raises(ValueError, match="different layouts"):
        QuantizedKV.concat([q, QuantizedKV.quantize(_x((2, 4, 64)), bits=8)])
    with pytest.raises(ValueError, match="different"):
        LayerKV(q, q.slice(0, 2))
    with pytest.raises(ValueError, match="different formats"):
        LayerKV(q, _x((2, 4, 64)).astype(np.float16))


def test_kv_format_describe_and_encode() -> None:
    assert KVFormat().describe() == "q4g64"
    assert KVFormat(8, 32).describe() == "q8g32"
    assert KVFormat(16).describe() == "f16"
    assert KVFormat().block_size == 256
    f16 = KVFormat(16).encode(_x((2, 3, 64)))
    assert isinstance(f16, np.ndarray) and f16.dtype == np.float16
    assert KVFormat(16).accepts(f16) and not KVFormat(4).accepts(f16)
    assert KVFormat(4, 32).accepts(KVFormat(4, 32).encode(_x((1, 1, 64))))
    assert not KVFormat(4, 64).accepts(KVFormat(4, 32).encode(_x((1, 1, 64))))
    for bad in ({"bits": 3}, {"group_size": 48}, {"block_size": 0}):
        with pytest.raises(ValueError):
            KVFormat(**bad)


def test_layer_bits_raise_only_the_global_layers_of_a_windowed_model() -> None:
    windows = [512, 512, 0, 512, 0]
    assert layer_bits(4, windows) == (4, 4, 8, 4, 8)
    assert layer_bits(8, windows) == (8,) * 5
    assert layer_bits(16, windows) == (16,) * 5
    assert layer_bits(4, [0, 0, 0]) == (4, 4, 4)  # no window layers: nothing to single out
    assert layer_bits(4, [128, 128]) == (4, 4)


def test_kv_format_with_layers_in_other_bits() -> None:
    fmt = KVFormat(4, 64, 16, layer_bits=(4, 8, 4))
    assert fmt.describe() == "q4g64+8"
    assert [fmt.bits_of(i) for i in range(3)] == [4, 8, 4]
    assert fmt.fingerprint_tag() != KVFormat(4, 64, 16).fingerprint_tag()
    assert "layers484" in fmt.fingerprint_tag()
    q8 = fmt.encode(_x((1, 2, 64)), layer=1)
    assert isinstance(q8, QuantizedKV) and q8.bits == 8
    assert fmt.accepts(q8, layer=1) and not fmt.accepts(q8, layer=0)
    assert not fmt.accepts(fmt.encode(_x((1, 2, 64)), layer=0), layer=1)
    # uniform per-layer bits are the plain format: one spelling, one fingerprint
    assert KVFormat(4, 64, 16, layer_bits=(4, 4)) == KVFormat(4, 64, 16)
    assert KVFormat(4, layer_bits=[4, 8]).layer_bits == (4, 8)  # as a manifest's JSON gives it
    assert KVFormat(4, layer_bits=[4, 8]).to_json()["layer_bits"] == [4, 8]
    assert "layer_bits" not in KVFormat(4).to_json()
    for bad in ({"bits": 16, "layer_bits": (8, 16)}, {"layer_bits": (4, 3)}):
        with pytest.raises(ValueError, match="layer_bits"):
            KVFormat(**bad)


def test_blocks_with_layers_in_other_bits_round_trip_and_are_checked() -> None:
    fmt = KVFormat(4, 64, 16, layer_bits=(4, 8, 4))
    blocks = split_into_blocks(random_layers(fmt, 20, n_layers=3, seed=3), 0, 16)
    sealed, tail = (block_to_bytes(b, fmt) for b in blocks)
    back = block_from_bytes(sealed)
    assert [x.keys.bits for x in back.layers] == [4, 8, 4]
    assert_blocks_equal([back], blocks[:1])
    assert b'"layer_bits":"4,8,4"' in sealed
    assert_blocks_equal([block_from_bytes(tail)], blocks[1:])
    # a block whose layers are all 4-bit is not in this format, nor the other way round
    plain = KVFormat(4, 64, 16)
    with pytest.raises(ValueError, match="layer 1 of block"):
        block_to_bytes(split_into_blocks(random_layers(plain, 16, n_layers=3), 0, 16)[0], fmt)
    with pytest.raises(ValueError, match="layer 1 of block"):
        block_to_bytes(blocks[0], plain)
    n = int.from_bytes(sealed[:8], "little")
    # (each the same length as the original, so that only the metadata changes)
    for bad in (b'"layer_bits":"4,8"  ', b'"layer_bits":"4,2,4"', b'"layer_bits":"4,4,4"'):
        garbled = sealed[:8] + sealed[8 : 8 + n].replace(b'"layer_bits":"4,8,4"', bad)
        with pytest.raises(CacheCorruptError, match="layer_bits|inconsistent"):
            block_from_bytes(garbled + sealed[8 + n :])
    with pytest.raises(ValueError, match="has 2 layers; the KV format has 3"):
        block_to_bytes(split_into_blocks(random_layers(fmt, 16, n_layers=2), 0, 16)[0], fmt)
    assert not fmt.accepts(back.layers[0].keys, layer=3)


@needs_mlx
@pytest.mark.parametrize("bits,g", [(4, 64), (4, 32), (8, 64)])
def test_layout_equals_mlx(bits: int, g: int) -> None:
    x = _x((4, 9, 128), seed=bits + g)
    q = QuantizedKV.quantize(x, bits, g)
    # MLX reads our bytes as we do (float32 parameters: identical arithmetic)
    ref = mx.dequantize(
        mx.array(q.packed),
        mx.array(q.scales.astype(np.float32)),
        mx.array(q.biases.astype(np.float32)),
        group_size=g,
        bits=bits,
    )
    np.testing.assert_array_equal(np.array(ref), q.dequantize())
    # and we read MLX's own quantized KV (as an MLX KV cache holds it)
    wq, s, b = mx.quantize(mx.array(x.astype(np.float16)), group_size=g, bits=bits)
    theirs = QuantizedKV(np.array(wq), np.array(s), np.array(b), bits, g)
    ref = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=g, bits=bits)
    np.testing.assert_array_equal(theirs.dequantize(), np.array(ref))


def test_abstract_bounds_the_keys_as_attention_reads_them() -> None:
    fmt = KVFormat(4, 64, 16)
    layers = random_layers(fmt, 16, seed=5)
    abstract = compute_abstract(layers)
    for layer, (lo, hi) in zip(layers, abstract, strict=True):
        # stored keys are quantize(k @ H): attention reads dequantize(stored) @ H
        k = rotate(kv_dequantize(layer.keys))
        np.testing.assert_array_equal(attention_keys(layer), k)
        assert lo.dtype == np.float16 and lo.shape == (2, 64) and hi.shape == (2, 64)
        assert np.all(lo.astype(np.float32) <= k.min(axis=1))
        assert np.all(hi.astype(np.float32) >= k.max(axis=1))
        # within one float16 step of the exact values
        np.testing.assert_allclose(lo, k.min(axis=1), rtol=2e-3, atol=1e-6)
        np.testing.assert_allclose(hi, k.max(axis=1), rtol=2e-3, atol=1e-6)
    f16 = random_layers(KVFormat(16), 16, seed=5)  # float16 keys are stored unrotated
    lo, hi = compute_abstract(f16)[0]
    np.testing.assert_array_equal(lo, f16[0].keys.min(axis=1))
    np.testing.assert_array_equal(hi, f16[0].keys.max(axis=1))


def test_blocks_split_merge_and_seal() -> None:
    fmt = KVFormat(4, 64, 16)
    layers = random_layers(fmt, 40)
    blocks = split_into_blocks(layers, 0, 16)
    assert [(b.start, b.length, b.sealed) for b in blocks] == [
        (0, 16, True),
        (16, 16, True),
        (32, 8, False),
    ]
    assert blocks[0].abstract is not None and blocks[2].abstract is None
    assert blocks[0].nbytes > sum(layer.nbytes for layer in blocks[0].layers)
    merged = merge_blocks(blocks)
    for a, b in zip(merged, layers, strict=True):
        assert_kv_equal(a.keys, b.keys)
        assert_kv_equal(a.values, b.values)
    # boundaries fall on multiples of the block size wherever the run starts
    tail = split_into_blocks([layer.slice(0, 20) for layer in layers], 44, 16)
    assert [(b.start, b.length, b.sealed) for b in tail] == [(44, 4, False), (48, 16, True)]
    with pytest.raises(ValueError, match="contiguous"):
        merge_blocks([blocks[0], blocks[2]])
    # slicing and truncating
    part = blocks[1].slice(2, 10)
    assert (part.start, part.length, part.sealed, part.abstract) == (18, 8, False, None)
    assert blocks[1].truncate(16) is blocks[1]
    assert blocks[2].seal().sealed and blocks[2].seal().abstract is not None
    with pytest.raises(ValueError, match="outside"):
        blocks[0].slice(3, 17)
    with pytest.raises(ValueError, match="abstract"):
        KVBlock(0, 8, blocks[2].layers, sealed=False, abstract=blocks[0].abstract)


def test_extend_blocks_grows_and_seals_the_tail() -> None:
    fmt = KVFormat(8, 32, 16)
    layers = random_layers(fmt, 45, seed=2)
    blocks = split_into_blocks([x.slice(0, 10) for x in layers], 0, 16)
    for lo, hi in [(10, 12), (12, 33), (33, 45)]:
        blocks = extend_blocks(blocks, [x.slice(lo, hi) for x in layers], 16)
    assert_blocks_equal(blocks, split_into_blocks(layers, 0, 16))
    assert extend_blocks([], layers, 16)[0].sealed


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_block_bytes_round_trip_bit_exact(fmt: KVFormat) -> None:
    blocks = split_into_blocks(random_layers(fmt, 24, n_layers=3, seed=11), 0, 16)
    for block in blocks:
        data = block_to_bytes(block, fmt)
        assert data == block_to_bytes(block, fmt)  # deterministic: content-addressed names
        back = block_from_bytes(data)
        assert_blocks_equal([back], [block])


def test_block_bytes_are_safetensors_with_metadata() -> None:
    from safetensors.numpy import load

    fmt = KVFormat(4, 64, 16)
    block = split_into_blocks(random_layers(fmt, 16), 0, 16)[0]
    data = block_to_bytes(block, fmt)
    names = set(load(data))
    assert {"layers.0.keys.packed", "layers.1.values.biases", "layers.1.key_max"} <= names
    header = data[8 : 8 + int.from_bytes(data[:8], "little")].decode()
    for key in ("format_version", "start", "length", "bits", "group_size", "n_layers"):
        assert f'"{key}"' in header
    f16 = KVFormat(16, 64, 16)
    names = set(load(block_to_bytes(split_into_blocks(random_layers(f16, 3), 0, 16)[0], f16)))
    assert names == {f"layers.{i}.{kv}" for i in (0, 1) for kv in ("keys", "values")}
    with pytest.raises(ValueError, match="not in format"):
        block_to_bytes(block, KVFormat(8, 64, 16))


def test_corrupt_block_bytes_raise_clear_errors() -> None:
    fmt = KVFormat(4, 64, 16)
    data = block_to_bytes(split_into_blocks(random_layers(fmt, 16), 0, 16)[0], fmt)
    for bad in (b"", data[:5], data[:100], data[: len(data) // 2], b"\xff" * 64):
        with pytest.raises(CacheCorruptError):
            block_from_bytes(bad)
    n = int.from_bytes(data[:8], "little")
    garbled = data[:8] + data[8 : 8 + n].replace(b'"length":"16"', b'"length":"99"') + data[8 + n :]
    with pytest.raises(CacheCorruptError, match="inconsistent"):
        block_from_bytes(garbled)


def test_a_layout_seen_before_does_not_pass_a_changed_entry() -> None:
    """Blocks of one layout are checked once; a block whose entries differ in any way is
    checked again, entry by entry."""
    fmt = KVFormat(4, 64, 16)
    data = block_to_bytes(split_into_blocks(random_layers(fmt, 16), 0, 16)[0], fmt)
    block_from_bytes(data)  # its layout is now known
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n]
    entry = b'"layers.0.keys.scales":{"dtype":"F16","shape":[2,16,1]'
    assert entry in header
    grown = header.replace(entry, entry.replace(b"[2,16,1]", b"[2,16,2]"))
    with pytest.raises(CacheCorruptError, match="layers.0.keys.scales"):
        block_from_bytes(data[:8] + grown + data[8 + n :])
    assert_blocks_equal([block_from_bytes(data)], [block_from_bytes(bytearray(data))])


def test_cache_store_never_imports_a_backend() -> None:
    pkg = REPO / "edge_infer" / "cache_store"
    for path in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith(("torch", "mlx", "edge_infer.backends")), path


def test_token_chains_cover_every_id_before_a_block() -> None:
    ids = list(range(40))
    spans = [(0, 16), (16, 16), (32, 8)]
    chains = token_chains(ids, spans)
    assert len(set(chains)) == 3 and all(len(c) == 64 for c in chains)
    assert chains[0] == token_chain(CHAIN_START, ids[:16])
    assert chains[1] == token_chain(chains[0], ids[16:32])
    assert token_chains(np.asarray(ids, dtype=np.int32), spans) == chains  # any int dtype
    changed = list(ids)
    changed[3] = 99  # an id of the first block changes every later chain value
    assert all(a != b for a, b in zip(token_chains(changed, spans), chains, strict=True))
    changed = list(ids)
    changed[35] = 99  # one of the last block changes only its own
    assert token_chains(changed, spans)[:2] == chains[:2]
    with pytest.raises(ValueError):
        token_chains(ids, [(0, 16), (20, 4)])  # not contiguous
    with pytest.raises(ValueError):
        token_chains(ids[:20], spans)  # runs past the ids
