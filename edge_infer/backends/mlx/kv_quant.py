"""Quantize K/V rows with MLX ops, bit-identical to the numpy affine quantizer.

``mx.quantize`` picks each element's level from the float32 scale and bias and only then
rounds them to float16 for storage, so what is stored dequantizes to slightly different
values than the levels were chosen for. The stored form's reference (the numpy quantizer in
:mod:`edge_infer.formats.affine`, and the torch backend's) chooses levels against the float16
scale and bias it stores; this module does the same, so both backends write the same bytes.
"""

from __future__ import annotations

import mlx.core as mx

_EPS = 1e-7
_F16_MAX = 65504.0


def quantize_kv(x: mx.array, bits: int, group_size: int) -> tuple[mx.array, mx.array, mx.array]:
    """x [..., D] -> (packed uint32 [..., D*bits/32], scales f16, biases f16 [..., D/g])."""
    *lead, d = x.shape
    g = x.astype(mx.float32).reshape(*lead, d // group_size, group_size)
    n_levels = float((1 << bits) - 1)
    w_max, w_min = g.max(axis=-1), g.min(axis=-1)
    min_edge = mx.abs(w_min) > mx.abs(w_max)
    scale = mx.maximum((w_max - w_min) / n_levels, _EPS)
    scale = mx.where(min_edge, scale, -scale)
    edge = mx.where(min_edge, w_min, w_max)
    q0 = mx.round(edge / scale)
    nonzero = q0 != 0
    scale = mx.where(nonzero, edge / mx.where(nonzero, q0, 1.0), scale)
    bias = mx.where(nonzero, edge, 0.0)
    scales = mx.clip(scale, -_F16_MAX, _F16_MAX).astype(mx.float16)
    biases = mx.clip(bias, -_F16_MAX, _F16_MAX).astype(mx.float16)
    q = mx.round((g - biases.astype(mx.float32)[..., None]) / scales.astype(mx.float32)[..., None])
    q = mx.clip(q, 0, n_levels).astype(mx.uint32).reshape(*lead, d)
    return pack(q, bits), scales, biases


def pack(q: mx.array, bits: int) -> mx.array:
    """Unsigned values [..., D] -> uint32 words [..., D*bits/32], element i at bits i*bits."""
    per_word = 32 // bits
    shifts = mx.arange(per_word, dtype=mx.uint32) * bits
    words = q.reshape(*q.shape[:-1], -1, per_word).astype(mx.uint32) << shifts
    return words.sum(axis=-1).astype(mx.uint32)  # the fields do not overlap: sum is OR


def dequantize_kv(
    packed: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int
) -> mx.array:
    """Inverse of :func:`quantize_kv` up to rounding: float32 [..., D]."""
    return mx.dequantize(
        packed,
        scales.astype(mx.float32),
        biases.astype(mx.float32),
        group_size=group_size,
        bits=bits,
    )
