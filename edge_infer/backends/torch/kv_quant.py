"""Quantize/dequantize K/V rows in torch, bit-identical to the numpy affine quantizer.

The layout is MLX's affine format along ``head_dim``: unsigned ``bits``-bit values packed
``32/bits`` per little-endian 32-bit word, float16 scales and biases per group.
"""

from __future__ import annotations

import torch

_EPS = 1e-7
_F16_MAX = 65504.0


def quantize_kv(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, ...]:
    """x float32 [..., D] -> (packed int32 [..., D*bits/32], scales f16, biases f16 [..., D/g])."""
    *lead, d = x.shape
    g = x.float().reshape(*lead, d // group_size, group_size)
    n_levels = float((1 << bits) - 1)
    w_max, w_min = g.amax(dim=-1), g.amin(dim=-1)
    min_edge = w_min.abs() > w_max.abs()
    scale = torch.clamp((w_max - w_min) / n_levels, min=_EPS)
    scale = torch.where(min_edge, scale, -scale)
    edge = torch.where(min_edge, w_min, w_max)
    q0 = torch.round(edge / scale)
    nonzero = q0 != 0
    scale = torch.where(nonzero, edge / torch.where(nonzero, q0, torch.ones_like(q0)), scale)
    bias = torch.where(nonzero, edge, torch.zeros_like(edge))
    scales = scale.clamp(-_F16_MAX, _F16_MAX).to(torch.float16)
    biases = bias.clamp(-_F16_MAX, _F16_MAX).to(torch.float16)
    q = torch.round((g - biases.float()[..., None]) / scales.float()[..., None])
    q = q.clamp_(0, n_levels).to(torch.int64).reshape(*lead, d)
    return pack(q, bits), scales, biases


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values [..., D] -> int32 words [..., D*bits/32], element i at bits i*bits."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=q.device, dtype=torch.int64) * bits
    words = (q.reshape(*q.shape[:-1], -1, per_word).to(torch.int64) << shifts).sum(dim=-1)
    return words.to(torch.int32)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words [..., W] -> int64 values [..., W*32/bits]."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int64) * bits
    vals = (packed.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)
    return vals.reshape(*packed.shape[:-1], -1)


def dequantize_kv(
    packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Inverse of :func:`quantize_kv` up to rounding: float32 [..., D]."""
    raw = packed.contiguous().view(torch.uint8)  # little-endian bytes of the words
    if bits == 4:  # byte j holds element 2j (low nibble) and 2j+1 (high nibble)
        q = torch.stack([raw & 0xF, raw >> 4], dim=-1).flatten(-2)
    else:
        q = raw
    *lead, d = q.shape
    g = q.reshape(*lead, d // group_size, group_size).float()
    out = torch.addcmul(biases.float()[..., None], g, scales.float()[..., None])
    return out.reshape(*lead, d)
