"""The orthogonal rotation applied to keys and values before they are quantized.

Keys of small models carry outlier channels that ruin 4-bit groups; a normalized Hadamard
rotation along ``head_dim`` spreads them over the group first (QuaRot's observation), and is
its own inverse, so ``x == rotate(rotate(x))`` and ``q . k`` is unchanged when both sides are
rotated. Stored K/V are ``quantize(x @ H)``; attention reads ``dequantize(stored) @ H``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=8)
def hadamard(n: int) -> np.ndarray:
    """The normalized Sylvester-Hadamard matrix of size ``n`` (a power of two), float32."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two head_dim, got {n}")
    h = np.ones((1, 1), dtype=np.float64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    out = (h / np.sqrt(n)).astype(np.float32)
    out.setflags(write=False)
    return out


def rotate(x: np.ndarray) -> np.ndarray:
    """x [..., D] @ H (the rotation is symmetric and its own inverse)."""
    return np.asarray(x, dtype=np.float32) @ hadamard(x.shape[-1])
