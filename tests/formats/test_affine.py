"""Tests for the MLX-layout affine quantization format."""

from __future__ import annotations

import numpy as np
import pytest

from edge_infer.formats.affine import QuantizedWeight, pack, quantize, unpack

try:
    import mlx.core as mx
except ImportError:  # MLX is optional outside Apple silicon; its comparisons are skipped
    mx = None
needs_mlx = pytest.mark.skipif(mx is None, reason="mlx is not installed")

CONFIGS = [(bits, g) for bits in (4, 8) for g in (32, 64, 128)]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip(bits: int) -> None:
    q = _rng().integers(0, 1 << bits, size=(5, 96), dtype=np.uint8)
    packed = pack(q, bits)
    assert packed.dtype == np.uint32 and packed.shape == (5, 96 * bits // 32)
    out = unpack(packed, bits)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, q)


def test_pack_bit_layout() -> None:
    assert pack(np.arange(8)[None], 4)[0, 0] == 0x76543210
    assert pack(np.array([[15, 0, 0, 0, 0, 0, 0, 1]]), 4)[0, 0] == 0x1000000F
    assert pack(np.array([[0x01, 0x02, 0x03, 0xFF]]), 8)[0, 0] == 0xFF030201
    np.testing.assert_array_equal(unpack(np.array([[0x76543210]], np.uint32), 4), [range(8)])


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="bits"):
        pack(np.zeros((1, 32), np.uint8), 3)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack(np.full((1, 8), 16), 4)
    with pytest.raises(ValueError, match="32-bit words"):
        pack(np.zeros((1, 6), np.uint8), 4)


def _mlx_dequantize(packed, scales, biases, g: int, bits: int) -> np.ndarray:
    out = mx.dequantize(
        mx.array(packed), mx.array(scales), mx.array(biases), group_size=g, bits=bits
    )
    return np.array(out)


@needs_mlx
@pytest.mark.parametrize("bits,g", CONFIGS)
def test_ours_matches_mlx_dequantize(bits: int, g: int) -> None:
    w = _rng(bits + g).standard_normal((48, 256)).astype(np.float32) * 2
    qw = quantize(w, bits=bits, group_size=g)
    ours = qw.dequantize()
    # float32 parameters: MLX computes q * scale + bias in float32, exactly like us.
    f32 = _mlx_dequantize(
        qw.packed, qw.scales.astype(np.float32), qw.biases.astype(np.float32), g, bits
    )
    np.testing.assert_array_equal(f32, ours)
    # float16 parameters: MLX computes in float16 (two roundings), so allow ~2 half ulps.
    f16 = _mlx_dequantize(qw.packed, qw.scales, qw.biases, g, bits)
    assert f16.dtype == np.float16
    q = qw.unpack().reshape(48, -1, g).astype(np.float32)
    mag = np.abs(q * qw.scales.astype(np.float32)[..., None]) + np.abs(qw.biases)[..., None]
    tol = 2.0**-10 * mag.reshape(48, 256) + 2.0**-24
    assert np.all(np.abs(f16.astype(np.float32) - ours) <= tol)


@needs_mlx
@pytest.mark.parametrize("bits,g", CONFIGS)
def test_mlx_quantize_output_is_our_format(bits: int, g: int) -> None:
    w = _rng(1).standard_normal((32, 512)).astype(np.float16)
    wq, s, b = mx.quantize(mx.array(w), group_size=g, bits=bits)
    qw = QuantizedWeight(np.array(wq), np.array(s), np.array(b), bits=bits, group_size=g)
    assert qw.shape == (32, 512)
    ref = _mlx_dequantize(np.array(wq), np.array(s, np.float32), np.array(b, np.float32), g, bits)
    np.testing.assert_array_equal(qw.dequantize(), ref)
    # the packed values themselves decode like MLX's: q * 1 + 0 gives q back
    ones, zeros = np.ones_like(qw.scales, np.float32), np.zeros_like(qw.biases, np.float32)
    np.testing.assert_array_equal(qw.unpack(), _mlx_dequantize(qw.packed, ones, zeros, g, bits))


def _group_max_err(approx: np.ndarray, w: np.ndarray, g: int) -> np.ndarray:
    return np.abs(approx - w).reshape(w.shape[0], -1, g).max(axis=-1)


@needs_mlx
@pytest.mark.parametrize("bits,g", CONFIGS)
def test_quantization_error_comparable_to_mlx(bits: int, g: int) -> None:
    rng = _rng(7)
    w = rng.standard_normal((64, 512)) * 0.05 + rng.uniform(-0.02, 0.02, (64, 1))
    w = w.astype(np.float16).astype(np.float32)  # both sides see the same values
    qw = quantize(w, bits=bits, group_size=g)
    ours = qw.dequantize()
    # MLX on float16 input also stores float16 scales and biases: same storage, per-group check.
    wq, s, b = mx.quantize(mx.array(w.astype(np.float16)), group_size=g, bits=bits)
    ref = _mlx_dequantize(np.array(wq), np.array(s, np.float32), np.array(b, np.float32), g, bits)
    e_ours, e_mlx = _group_max_err(ours, w, g), _group_max_err(ref, w, g)
    assert np.all(e_ours <= e_mlx * 1.05 + 1e-6)
    assert np.abs(ours - w).mean() <= np.abs(ref - w).mean() * 1.01 + 1e-7
    # MLX on float32 input keeps float32 scales; our float16 storage costs little on average.
    wq, s, b = mx.quantize(mx.array(w), group_size=g, bits=bits)
    ref32 = np.array(mx.dequantize(wq, s, b, group_size=g, bits=bits))
    assert np.abs(ours - w).mean() <= np.abs(ref32 - w).mean() * 1.02 + 1e-7
    # sanity: never worse than one quantization step (snapping zero onto a level can clip the
    # far edge by up to about one step) plus float16 rounding of the bias
    step = (w.reshape(64, -1, g).max(-1) - w.reshape(64, -1, g).min(-1)) / ((1 << bits) - 1)
    assert np.all(e_ours <= step + 1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_constant_and_zero_rows_are_safe(bits: int) -> None:
    w = np.zeros((6, 128), np.float32)
    w[1] = 0.5
    w[2] = -3.25
    w[3, :64] = 1e-9  # tiny group next to a zero group
    w[4, 64:] = 7.0
    w[5] = _rng().standard_normal(128)
    with np.errstate(divide="raise", over="raise", invalid="raise"):
        qw = quantize(w, bits=bits, group_size=64)
        out = qw.dequantize()
    for arr in (qw.scales, qw.biases, out):
        assert np.isfinite(arr).all()
    np.testing.assert_array_equal(out[0], 0)
    np.testing.assert_allclose(out[:5], w[:5], atol=4e-3)


def test_quantize_validates_arguments() -> None:
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        quantize(np.zeros((2, 96)), group_size=64)
    with pytest.raises(ValueError, match="bits"):
        quantize(np.zeros((2, 64)), bits=3)
    with pytest.raises(ValueError, match="group_size"):
        quantize(np.zeros((2, 64)), group_size=16)
    with pytest.raises(ValueError, match="2-D"):
        quantize(np.zeros(64))
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.full((1, 64), np.nan))
    with pytest.raises(ValueError, match="float16"):
        quantize(np.full((1, 64), 1e6))


def test_quantized_weight_properties_and_validation() -> None:
    qw = quantize(_rng().standard_normal((8, 256)), bits=4, group_size=32)
    assert qw.shape == (8, 256)
    assert qw.packed.shape == (8, 32) and qw.scales.shape == (8, 8)
    assert qw.scales.dtype == qw.biases.dtype == np.float16
    assert qw.nbytes == 8 * 32 * 4 + 2 * 8 * 8 * 2
    assert qw.dequantize(np.float16).dtype == np.float16
    with pytest.raises(ValueError, match="scales"):
        QuantizedWeight(qw.packed, qw.scales.astype(np.float32), qw.biases, 4, 32)
    with pytest.raises(ValueError, match="biases"):
        QuantizedWeight(qw.packed, qw.scales, qw.biases[:, :4], 4, 32)


def test_take_rows() -> None:
    qw = quantize(_rng(3).standard_normal((10, 128)), bits=8, group_size=64)
    full = qw.dequantize()
    perm = _rng(4).permutation(10)
    permuted = qw.take_rows(perm)
    np.testing.assert_array_equal(permuted.dequantize(), full[perm])
    np.testing.assert_array_equal(permuted.take_rows(np.argsort(perm)).packed, qw.packed)
    ids = np.array([3, 3, 0, 9])
    looked_up = qw.take_rows(ids)
    assert looked_up.shape == (4, 128)
    np.testing.assert_array_equal(looked_up.dequantize(), full[ids])
    with pytest.raises(ValueError, match="1-D integer"):
        qw.take_rows(np.array([[0]]))
