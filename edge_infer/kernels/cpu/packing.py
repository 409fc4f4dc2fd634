"""Weights in MLX's affine layout repacked into the tiles the quantized-matmul kernel reads.

Rows are taken 16 at a time (a tile; the last one padded with zero rows). Within a tile, the
values of each block of 32 columns are laid out in 64-byte chunks that hold 4 consecutive
columns of all 16 rows (4 bytes per row), so one vector load gives every row's next four
weights in its own 32-bit lane:

* 4 bits: 4 chunks per block; byte ``i`` of row ``r`` in chunk ``m`` holds column
  ``4m + i`` in its low nibble and column ``16 + 4m + i`` in its high one.
* 8 bits: 8 chunks per block; byte ``i`` of row ``r`` in chunk ``m`` is column ``4m + i``.

Scales and biases (float16) become ``[tiles, groups, 16]``. The values are those of the
source: ``q * scale + bias``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_infer.formats.affine import QuantizedWeight

TILE = 16
BLOCK = 32


@dataclass(frozen=True)
class PackedWeight:
    """A weight in the kernel's tiles: ``qweight [tiles, K/32, chunk bytes]`` (uint8),
    ``scales``/``biases [tiles, K/group, 16]`` (float16)."""

    qweight: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    rows: int
    cols: int
    bits: int
    group_size: int


def packable(weight: QuantizedWeight) -> bool:
    """Whether the kernel takes this weight (whole blocks of 32 columns)."""
    return weight.bits in (4, 8) and weight.group_size % BLOCK == 0


def pack_weight(weight: QuantizedWeight) -> PackedWeight:
    """``weight`` in the kernel's tile layout (see the module docstring)."""
    if not packable(weight):
        raise ValueError(f"cannot pack {weight.bits}-bit weights in groups of {weight.group_size}")
    rows, cols = weight.shape
    tiles = -(-rows // TILE)
    pad = tiles * TILE - rows
    q = np.pad(weight.unpack(), ((0, pad), (0, 0)))  # [rows, cols] uint8
    blocks = cols // BLOCK
    if weight.bits == 4:
        q = q.reshape(tiles, TILE, blocks, 2, 4, 4)  # tile, row, block, half, chunk, byte
        chunks = q[:, :, :, 0] | (q[:, :, :, 1] << np.uint8(4))
        qweight = chunks.transpose(0, 2, 3, 1, 4).reshape(tiles, blocks, 4 * 64)
    else:
        q = q.reshape(tiles, TILE, blocks, 8, 4)
        qweight = q.transpose(0, 2, 3, 1, 4).reshape(tiles, blocks, 8 * 64)

    def params(a: np.ndarray) -> np.ndarray:
        a = np.pad(a.astype(np.float16), ((0, pad), (0, 0)))
        return np.ascontiguousarray(a.reshape(tiles, TILE, -1).transpose(0, 2, 1))

    return PackedWeight(
        qweight=np.ascontiguousarray(qweight),
        scales=params(weight.scales),
        biases=params(weight.biases),
        rows=rows,
        cols=cols,
        bits=weight.bits,
        group_size=weight.group_size,
    )
