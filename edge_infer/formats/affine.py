"""Affine 4/8-bit group quantization in MLX's layout (``mx.quantize`` / ``mx.dequantize``).

A float matrix ``W[rows, cols]`` is split along ``cols`` into groups of ``group_size``.
Each element is stored as an unsigned integer ``q`` with ``W ~= q * scale + bias``, where
``scale`` and ``bias`` are float16 per (row, group).  ``32 // bits`` values are packed into
each little-endian uint32, element ``i`` of a word occupying bits ``i*bits .. i*bits+bits-1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import DTypeLike

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
_EPS = np.float32(1e-7)  # smallest scale, as in MLX: keeps constant groups finite
_F16_MAX = float(np.finfo(np.float16).max)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bits={bits!r} (supported: {SUPPORTED_BITS})")


def _check_group_size(group_size: int) -> None:
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"unsupported group_size={group_size!r} (supported: {SUPPORTED_GROUP_SIZES})"
        )


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit values ``[..., cols]`` into little-endian uint32 words."""
    _check_bits(bits)
    q = np.asarray(q)
    if q.ndim < 1 or (q.shape[-1] * bits) % 32:
        raise ValueError(f"last dimension of {q.shape} must hold a whole number of 32-bit words")
    if q.size and (q.min() < 0 or q.max() >= 1 << bits):
        raise ValueError(f"values must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    b = q.astype(np.uint8)
    if bits == 4:
        b = b[..., 0::2] | (b[..., 1::2] << np.uint8(4))
    words = np.ascontiguousarray(b).view("<u4")
    return words.astype(np.uint32, copy=False)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack`: uint32 words ``[..., n]`` -> uint8 values ``[..., n*32//bits]``."""
    _check_bits(bits)
    packed = np.asarray(packed)
    if packed.dtype != np.uint32 or packed.ndim < 1:
        raise ValueError(f"packed must be a uint32 array, got {packed.dtype} {packed.shape}")
    b = np.ascontiguousarray(packed.astype("<u4", copy=False)).view(np.uint8)
    if bits == 8:
        return b
    return np.stack([b & np.uint8(0xF), b >> np.uint8(4)], axis=-1).reshape(
        *b.shape[:-1], b.shape[-1] * 2
    )


@dataclass(frozen=True)
class QuantizedWeight:
    """A 2-D matrix quantized in MLX's affine layout (see the module docstring)."""

    packed: np.ndarray  # uint32 [rows, cols*bits//32]
    scales: np.ndarray  # float16 [rows, cols//group_size]
    biases: np.ndarray  # float16 [rows, cols//group_size]
    bits: int
    group_size: int

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        _check_group_size(self.group_size)
        if self.packed.dtype != np.uint32 or self.packed.ndim != 2:
            raise ValueError(
                f"packed must be a 2-D uint32 array, got {self.packed.dtype} {self.packed.shape}"
            )
        rows, cols = self.shape
        expected = (rows, cols // self.group_size)
        if cols % self.group_size:
            raise ValueError(f"cols={cols} is not a multiple of group_size={self.group_size}")
        for name in ("scales", "biases"):
            arr = getattr(self, name)
            if arr.dtype != np.float16 or arr.shape != expected:
                raise ValueError(f"{name} must be float16 {expected}, got {arr.dtype} {arr.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        """Logical (rows, cols) of the dequantized matrix."""
        return int(self.packed.shape[0]), int(self.packed.shape[1]) * 32 // self.bits

    @property
    def nbytes(self) -> int:
        """Bytes held by packed values, scales and biases."""
        return int(self.packed.nbytes + self.scales.nbytes + self.biases.nbytes)

    def unpack(self) -> np.ndarray:
        """The integer values q as uint8 ``[rows, cols]``."""
        return unpack(self.packed, self.bits)

    def dequantize(self, dtype: DTypeLike = np.float32) -> np.ndarray:
        """``q * scale + bias`` (computed in float32) as ``dtype`` ``[rows, cols]``."""
        rows, cols = self.shape
        q = self.unpack().reshape(rows, -1, self.group_size).astype(np.float32)
        w = (
            q * self.scales.astype(np.float32)[..., None]
            + self.biases.astype(np.float32)[..., None]
        )
        return w.reshape(rows, cols).astype(dtype, copy=False)

    def take_rows(self, index: np.ndarray) -> QuantizedWeight:
        """A new weight made of rows ``index`` (1-D integer array), losslessly."""
        index = np.asarray(index)
        if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
            raise ValueError(f"index must be a 1-D integer array, got {index.dtype} {index.shape}")
        return QuantizedWeight(
            packed=np.take(self.packed, index, axis=0),
            scales=np.take(self.scales, index, axis=0),
            biases=np.take(self.biases, index, axis=0),
            bits=self.bits,
            group_size=self.group_size,
        )


def quantize(w: np.ndarray, bits: int = 4, group_size: int = 64) -> QuantizedWeight:
    """Affine min/max quantization of a 2-D float matrix, per row and group of ``group_size``.

    As in MLX, the group edge of larger magnitude is the bias and is represented exactly
    (up to float16 rounding), and ``scale`` spans the group's range over ``2**bits - 1`` levels.
    Scales and biases are rounded to float16 *before* the values are quantized, so every ``q``
    is the nearest level for the stored parameters.
    """
    _check_bits(bits)
    _check_group_size(group_size)
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {w.shape}")
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"cols={cols} is not a multiple of group_size={group_size}")
    g = w.astype(np.float32).reshape(rows, cols // group_size, group_size)
    if not np.isfinite(g).all():
        raise ValueError("cannot quantize a matrix containing NaN or inf")
    n_levels = np.float32((1 << bits) - 1)
    w_max, w_min = g.max(axis=-1), g.min(axis=-1)
    min_edge = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / n_levels, _EPS)
    scale = np.where(min_edge, scale, -scale)
    edge = np.where(min_edge, w_min, w_max)
    q0 = np.round(edge / scale)
    # Snap the scale so that zero falls on a level; a group whose edge rounds to level 0
    # (tiny edge) keeps its scale and gets bias 0.
    scale = np.where(q0 != 0, edge / np.where(q0 != 0, q0, 1), scale)
    bias = np.where(q0 != 0, edge, np.float32(0))
    if max(np.abs(scale).max(initial=0), np.abs(bias).max(initial=0)) > _F16_MAX:
        raise ValueError("matrix values too large for float16 scales and biases")
    scales, biases = scale.astype(np.float16), bias.astype(np.float16)
    s32, b32 = scales.astype(np.float32)[..., None], biases.astype(np.float32)[..., None]
    q = np.clip(np.round((g - b32) / s32), 0, n_levels).astype(np.uint8)
    return QuantizedWeight(pack(q.reshape(rows, cols), bits), scales, biases, bits, group_size)
