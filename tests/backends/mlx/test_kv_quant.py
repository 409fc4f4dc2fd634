"""The MLX K/V quantizer writes the same bytes as the numpy (and torch) one."""

from __future__ import annotations

import numpy as np
import pytest

from edge_infer.formats.affine import quantize

mx = pytest.importorskip("mlx.core")
kv_quant = pytest.importorskip("edge_infer.backends.mlx.kv_quant")


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 32), (8, 64)])
def test_bit_identical_to_numpy(bits, group):
    rng = np.random.default_rng(bits + group)
    x = (rng.standard_normal((3, 50, 64)) * rng.uniform(0.1, 9, (3, 50, 1))).astype(np.float32)
    x[0, 0] = 0.0  # a constant group
    x[1, 1, :group] = 3.0
    ref = quantize(x.reshape(-1, 64), bits, group)
    packed, scales, biases = kv_quant.quantize_kv(mx.array(x), bits, group)
    assert packed.dtype == mx.uint32 and scales.dtype == biases.dtype == mx.float16
    assert np.array_equal(np.array(packed).reshape(ref.packed.shape), ref.packed)
    assert np.array_equal(np.array(scales).reshape(ref.scales.shape), ref.scales)
    assert np.array_equal(np.array(biases).reshape(ref.biases.shape), ref.biases)
    deq = kv_quant.dequantize_kv(packed, scales, biases, bits, group)
    assert np.array_equal(np.array(deq).reshape(-1, 64), ref.dequantize())


def test_pack_places_element_i_at_bits_i_times_width():
    q = mx.array(np.arange(8, dtype=np.uint32)[None])
    assert int(kv_quant.pack(q, 4)[0, 0]) == 0x76543210
    q8 = mx.array(np.array([[1, 2, 3, 255]], dtype=np.uint32))
    assert int(kv_quant.pack(q8, 8)[0, 0]) == 0xFF030201
