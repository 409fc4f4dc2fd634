"""Tests for GGML tensor decoding, checked against the `gguf` package's reference code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_infer.formats.affine import QuantizedWeight
from edge_infer.models.gguf.quants import (
    GGML_TYPES,
    UnsupportedTensorType,
    dequantize,
    tensor_nbytes,
    to_affine,
)

gguf = pytest.importorskip("gguf")

BLOCK_TYPES = [2, 3, 6, 7, 8, 12, 13, 14]  # Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K
# byte offsets of the float16 fields (d, dmin, m) inside each block
F16_FIELDS = {2: [0], 3: [0, 2], 6: [0], 7: [0, 2], 8: [0], 12: [0, 2], 13: [0, 2], 14: [208]}


def random_blocks(ggml_type: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random raw bytes for a tensor, with finite float16 scale fields in +-[1e-3, 1e-1]."""
    rng = np.random.default_rng(seed)
    t = GGML_TYPES[ggml_type]
    n_blocks = int(np.prod(shape)) // t.block_size
    raw = rng.integers(0, 256, size=(n_blocks, t.type_size), dtype=np.uint8)
    for off in F16_FIELDS.get(ggml_type, []):
        vals = rng.uniform(1e-3, 1e-1, n_blocks) * rng.choice([-1.0, 1.0], n_blocks)
        raw[:, off : off + 2] = vals.astype("<f2").view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(-1)


def reference(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    qtype = gguf.GGMLQuantizationType(ggml_type)
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return gguf.quants.dequantize(raw.reshape(byte_shape), qtype).reshape(shape)


def test_type_table_matches_gguf() -> None:
    for t in GGML_TYPES.values():
        qtype = gguf.GGMLQuantizationType(t.id)
        assert qtype.name == t.name
        assert gguf.GGML_QUANT_SIZES[qtype] == (t.block_size, t.type_size)


@pytest.mark.parametrize("ggml_type", BLOCK_TYPES)
@pytest.mark.parametrize("shape", [(256,), (3, 512), (2, 3, 256)])
def test_block_types_match_reference(ggml_type: int, shape: tuple[int, ...]) -> None:
    raw = random_blocks(ggml_type, shape, seed=ggml_type)
    ours = dequantize(raw, ggml_type, shape)
    assert ours.dtype == np.float32 and ours.shape == shape
    np.testing.assert_allclose(ours, reference(raw, ggml_type, shape), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ggml_type", BLOCK_TYPES)
def test_read_only_memmap_input(ggml_type: int, tmp_path: Path) -> None:
    shape = (4, 256)
    raw = random_blocks(ggml_type, shape, seed=1)
    path = tmp_path / "t.bin"
    path.write_bytes(b"\0" * 7 + raw.tobytes())
    mm = np.memmap(path, dtype=np.uint8, mode="r")[7:]  # odd offset: unaligned fields
    np.testing.assert_array_equal(
        dequantize(mm, ggml_type, shape), dequantize(raw, ggml_type, shape)
    )


@pytest.mark.parametrize("ggml_type,dtype", [(0, "<f4"), (1, "<f2")])
def test_float_types(ggml_type: int, dtype: str) -> None:
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(dtype)
    raw = x.view(np.uint8).reshape(-1)
    out = dequantize(raw, ggml_type, (3, 5))
    np.testing.assert_array_equal(out, x.astype(np.float32))
    np.testing.assert_array_equal(out, reference(raw, ggml_type, (3, 5)))


def test_bf16() -> None:
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    bits = (x.view(np.uint32) >> 16).astype("<u2")
    out = dequantize(bits.view(np.uint8).reshape(-1), 30, (4, 6))
    np.testing.assert_array_equal(out, (bits.astype(np.uint32) << 16).view(np.float32))
    np.testing.assert_allclose(out, x, rtol=2**-7)
    ref = gguf.quants.dequantize(bits.view(np.uint8), gguf.GGMLQuantizationType.BF16)
    np.testing.assert_array_equal(out, ref.reshape(4, 6))


@pytest.mark.parametrize("ggml_type,bits", [(2, 4), (3, 4), (8, 8)])
def test_to_affine_is_lossless(ggml_type: int, bits: int) -> None:
    shape = (5, 128)
    raw = random_blocks(ggml_type, shape, seed=3)
    qw = to_affine(raw, ggml_type, shape)
    assert isinstance(qw, QuantizedWeight)
    assert (qw.bits, qw.group_size, qw.shape) == (bits, 32, shape)
    np.testing.assert_array_equal(qw.dequantize(), dequantize(raw, ggml_type, shape))


@pytest.mark.parametrize("ggml_type", [0, 1, 30, 6, 7, 13, 14])
def test_to_affine_returns_none_for_other_types(ggml_type: int) -> None:
    shape = (2, 256)
    assert to_affine(random_blocks(ggml_type, shape), ggml_type, shape) is None


def test_q4_k_converts_up_to_float16_rounding_of_its_scales() -> None:
    shape = (3, 512)
    raw = random_blocks(12, shape, seed=4)
    qw = to_affine(raw, 12, shape)
    assert qw is not None and (qw.bits, qw.group_size) == (4, 32)
    ref = dequantize(raw, 12, shape)
    scale = np.abs(ref).reshape(3, -1, 32).max(-1, keepdims=True)
    err = np.abs(qw.dequantize() - ref).reshape(3, -1, 32)
    assert np.all(err <= 2.0**-9 * scale)


def test_to_affine_rejects_overflowing_bias() -> None:
    raw = random_blocks(2, (1, 32))
    raw[0:2] = np.array([10000.0], "<f2").view(np.uint8)  # -8 * d overflows float16
    assert to_affine(raw, 2, (1, 32)) is None


def test_tensor_nbytes() -> None:
    assert tensor_nbytes(0, (3, 5)) == 60
    assert tensor_nbytes(1, (7,)) == 14
    assert tensor_nbytes(30, ()) == 2
    assert tensor_nbytes(2, (4, 64)) == 4 * 2 * 18
    assert tensor_nbytes(8, (2, 3, 32)) == 6 * 34
    assert tensor_nbytes(14, (10, 512)) == 10 * 2 * 210
    with pytest.raises(ValueError, match="not a multiple of the Q4_K block size 256"):
        tensor_nbytes(12, (2, 128))


def test_wrong_buffer_size() -> None:
    with pytest.raises(ValueError, match="needs 68 bytes, got 35"):
        dequantize(np.zeros(35, np.uint8), 8, (64,))


@pytest.mark.parametrize("ggml_type,name", [(10, "Q2_K"), (23, "IQ4_XS"), (99, "unknown")])
def test_unsupported_type_message(ggml_type: int, name: str) -> None:
    for call in (
        lambda: dequantize(np.zeros(64, np.uint8), ggml_type, (64,)),
        lambda: tensor_nbytes(ggml_type, (64,)),
        lambda: to_affine(np.zeros(64, np.uint8), ggml_type, (1, 64)),
    ):
        with pytest.raises(UnsupportedTensorType) as info:
            call()
        msg = str(info.value)
        assert str(ggml_type) in msg and name in msg
        assert "Q4_0" in msg and "Q6_K" in msg and "BF16" in msg
        assert isinstance(info.value, ValueError)


def test_real_gguf_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    dense = rng.standard_normal((6, 128)).astype(np.float32)
    q8 = gguf.quants.quantize(dense, gguf.GGMLQuantizationType.Q8_0)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w.q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # q8: byte shape
    writer.add_tensor("w.f32", dense)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    t = tensors["w.q8"]
    shape = tuple(int(d) for d in reversed(t.shape))  # ggml order -> numpy order
    assert shape == (6, 128) and int(t.tensor_type) == 8
    raw = reader.data[t.data_offset : t.data_offset + t.n_bytes]  # read-only memmap bytes
    assert raw.size == tensor_nbytes(8, shape)
    ours = dequantize(raw, 8, shape)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0))
    np.testing.assert_allclose(ours, dense, atol=np.abs(dense).max() / 127)
    np.testing.assert_array_equal(to_affine(raw, 8, shape).dequantize(), ours)

    f = tensors["w.f32"]
    f_raw = reader.data[f.data_offset : f.data_offset + f.n_bytes]
    np.testing.assert_array_equal(dequantize(f_raw, 0, (6, 128)), dense)
