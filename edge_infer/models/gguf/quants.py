"""GGML tensor types: byte sizes, dequantization from raw GGUF bytes, lossless affine conversion.

A tensor of numpy shape ``(..., n)`` is stored row by row; each row of ``n`` elements is a
sequence of blocks of ``block_size`` elements taking ``type_size`` bytes.  All multi-byte
fields are little endian.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import prod

import numpy as np

from edge_infer.formats.affine import QuantizedWeight, pack


@dataclass(frozen=True)
class GGMLType:
    """A ggml tensor type: ``block_size`` elements are stored in ``type_size`` bytes."""

    id: int
    name: str
    block_size: int
    type_size: int


GGML_TYPES: dict[int, GGMLType] = {
    t.id: t
    for t in (
        GGMLType(0, "F32", 1, 4),
        GGMLType(1, "F16", 1, 2),
        GGMLType(30, "BF16", 1, 2),
        GGMLType(2, "Q4_0", 32, 18),
        GGMLType(3, "Q4_1", 32, 20),
        GGMLType(6, "Q5_0", 32, 22),
        GGMLType(7, "Q5_1", 32, 24),
        GGMLType(8, "Q8_0", 32, 34),
        GGMLType(12, "Q4_K", 256, 144),
        GGMLType(13, "Q5_K", 256, 176),
        GGMLType(14, "Q6_K", 256, 210),
    )
}

# Names of ggml type ids we do not decode, for error messages.
_OTHER_TYPE_NAMES = {
    4: "Q4_2",
    5: "Q4_3",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    31: "Q4_0_4_4",
    32: "Q4_0_4_8",
    33: "Q4_0_8_8",
    34: "TQ1_0",
    35: "TQ2_0",
    36: "IQ4_NL_4_4",
    37: "IQ4_NL_4_8",
    38: "IQ4_NL_8_8",
    39: "MXFP4",
    40: "NVFP4",
    41: "Q1_0",
}


class UnsupportedTensorType(ValueError):
    """A ggml tensor type this module cannot decode."""

    def __init__(self, ggml_type: int) -> None:
        name = _OTHER_TYPE_NAMES.get(ggml_type)
        what = f"{ggml_type} ({name})" if name else f"{ggml_type} (unknown)"
        supported = ", ".join(t.name for t in GGML_TYPES.values())
        super().__init__(f"unsupported ggml tensor type {what}; supported types: {supported}")
        self.ggml_type = ggml_type


def _type(ggml_type: int) -> GGMLType:
    t = GGML_TYPES.get(int(ggml_type))
    if t is None:
        raise UnsupportedTensorType(int(ggml_type))
    return t


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Bytes taken by a tensor of numpy ``shape`` (row length last) stored as ``ggml_type``."""
    t = _type(ggml_type)
    n = shape[-1] if shape else 1
    if n % t.block_size:
        raise ValueError(
            f"row length {n} of shape {tuple(shape)} is not a multiple of the "
            f"{t.name} block size {t.block_size}"
        )
    return prod(shape) // t.block_size * t.type_size


def _half(b: np.ndarray) -> np.ndarray:
    """Little-endian float16 fields (last axis of 2 bytes) -> float16 ``[n_blocks, 1]``."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float16, copy=False)


def _f16(b: np.ndarray) -> np.ndarray:
    """Like :func:`_half`, widened to float32."""
    return _half(b).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[..., k]`` bytes -> ``[..., 2k]``: the k low nibbles, then the k high nibbles."""
    return np.concatenate([qs & np.uint8(0xF), qs >> np.uint8(4)], axis=-1)


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte K-quant field into 8 six-bit scales and 8 six-bit mins (float32)."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 2:]).astype(np.int8) - np.int8(8)
    return q.astype(np.float32) * _f16(b[:, :2])


def _q4_1(b: np.ndarray) -> np.ndarray:
    return _nibbles(b[:, 4:]).astype(np.float32) * _f16(b[:, :2]) + _f16(b[:, 2:4])


def _q5_low_high(b: np.ndarray) -> np.ndarray:
    """The 32 five-bit values of a Q5_0/Q5_1 block: ``b`` holds qh (4 bytes) then qs (16)."""
    qh = b[:, :4].copy().view("<u4")  # [n, 1]: bit j is the 5th bit of element j
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    return _nibbles(b[:, 4:]) | (high << np.uint8(4))


def _q5_0(b: np.ndarray) -> np.ndarray:
    q = _q5_low_high(b[:, 2:]).astype(np.int8) - np.int8(16)
    return q.astype(np.float32) * _f16(b[:, :2])


def _q5_1(b: np.ndarray) -> np.ndarray:
    return _q5_low_high(b[:, 4:]).astype(np.float32) * _f16(b[:, :2]) + _f16(b[:, 2:4])


def _q8_0(b: np.ndarray) -> np.ndarray:
    return b[:, 2:].view(np.int8).astype(np.float32) * _f16(b[:, :2])


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sub-block multipliers ``d*sc`` and offsets ``dmin*m``, shape [n, 8, 1]."""
    sc, mn = _scale_min_k4(b[:, 4:16])
    return (_f16(b[:, :2]) * sc)[..., None], (_f16(b[:, 2:4]) * mn)[..., None]


def _q4_k(b: np.ndarray) -> np.ndarray:
    dl, ml = _k_scales(b)
    q = _nibbles(b[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    return (dl * q.astype(np.float32) - ml).reshape(-1, 256)


def _q5_k(b: np.ndarray) -> np.ndarray:
    dl, ml = _k_scales(b)
    qh = (b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]) & np.uint8(1)
    q = _nibbles(b[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32) | (qh << np.uint8(4))
    return (dl * q.astype(np.float32) - ml).reshape(-1, 256)


def _q6_k(b: np.ndarray) -> np.ndarray:
    ql = _nibbles(b[:, :128].reshape(-1, 2, 64))  # [n, 2 halves, 128]
    qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> np.arange(0, 8, 2, dtype=np.uint8)[:, None]
    q = (ql | ((qh & np.uint8(3)).reshape(-1, 2, 128) << np.uint8(4))).astype(np.int8) - 32
    scales = b[:, 192:208].view(np.int8).astype(np.float32)
    dl = (_f16(b[:, 208:210]) * scales)[..., None]  # one scale per 16 elements
    return (dl * q.reshape(-1, 16, 16).astype(np.float32)).reshape(-1, 256)


_BLOCK_DECODERS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: _q4_0,
    3: _q4_1,
    6: _q5_0,
    7: _q5_1,
    8: _q8_0,
    12: _q4_k,
    13: _q5_k,
    14: _q6_k,
}


def _blocks(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """Check the buffer size and view it as ``[n_blocks, type_size]`` uint8."""
    t = _type(ggml_type)
    expected = tensor_nbytes(t.id, shape)
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if data.size != expected:
        raise ValueError(
            f"{t.name} tensor of shape {tuple(shape)} needs {expected} bytes, got {data.size}"
        )
    return data.reshape(-1, t.type_size)


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """Decode a tensor's raw bytes (any contiguous array, e.g. a read-only memmap slice).

    Returns a new float32 array of numpy ``shape``.
    """
    shape = tuple(int(d) for d in shape)
    b = _blocks(raw, ggml_type, shape)
    if ggml_type == 0:
        out = b.view("<f4").astype(np.float32)
    elif ggml_type == 1:
        out = b.view("<f2").astype(np.float32)
    elif ggml_type == 30:
        out = (b.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)
    else:
        out = _BLOCK_DECODERS[ggml_type](b)
    return out.reshape(shape)


def to_affine(raw: np.ndarray, ggml_type: int, shape: tuple[int, int]) -> QuantizedWeight | None:
    """Convert a Q4_0/Q4_1/Q8_0 matrix losslessly, a Q4_K one up to float16 rounding of its
    sub-block scales (``d * scale``, ``dmin * min``), to :class:`QuantizedWeight` (group 32).

    Returns None for types without an affine equivalent (float and other K-quant types).
    """
    shape = tuple(int(d) for d in shape)
    b = _blocks(raw, ggml_type, shape)
    if ggml_type not in (2, 3, 8, 12):
        return None
    if len(shape) != 2:
        raise ValueError(f"to_affine needs a 2-D matrix, got shape {shape}")
    rows, cols = shape
    if ggml_type == 12:  # each sub-block of 32 is d*sc * q - dmin*m: affine already
        dl, ml = _k_scales(b)
        with np.errstate(over="ignore"):
            scales = dl.astype(np.float16).reshape(rows, cols // 32)
            biases = (-ml).astype(np.float16).reshape(rows, cols // 32)
        if not (np.isfinite(scales).all() and np.isfinite(biases).all()):
            return None
        q = _nibbles(b[:, 16:].reshape(-1, 4, 32)).reshape(rows, cols)
        return QuantizedWeight(pack(q, 4), scales, biases, 4, 32)
    d = _half(b[:, :2]).reshape(rows, cols // 32)
    if ggml_type == 3:
        q, bits, bias = _nibbles(b[:, 4:]), 4, _half(b[:, 2:4]).reshape(rows, cols // 32)
    else:
        with np.errstate(over="ignore"):
            if ggml_type == 2:
                q, bits, bias = _nibbles(b[:, 2:]), 4, d * np.float16(-8)
            else:
                q = (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
                bits, bias = 8, d * np.float16(-128)
        if not np.isfinite(bias[np.isfinite(d)]).all():  # -8d / -128d overflowed float16
            return None
    return QuantizedWeight(pack(q.reshape(rows, cols), bits), d, bias, bits, 32)
