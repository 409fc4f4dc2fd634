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

from edge_infer.formats.affine import QuantizedWeight, unpack

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


def pack_weight(weight: QuantizedWeight, rows_per_step: int = 16 * 1024) -> PackedWeight:
    """``weight`` in the kernel's tile layout (see the module docstring), packed
    ``rows_per_step`` rows at a time (a multiple of the tile: a large head would otherwise
    take several full-size temporary copies)."""
    if not packable(weight):
        raise ValueError(f"cannot pack {weight.bits}-bit weights in groups of {weight.group_size}")
    if rows_per_step % TILE:
        raise ValueError(f"rows_per_step must be a multiple of {TILE}, got {rows_per_step}")
    rows, cols = weight.shape
    out: list[np.ndarray] = []
    for a in range(0, rows, rows_per_step):
        parts = _pack_rows(weight, a, min(a + rows_per_step, rows))
        if not out:  # every tile's place, filled step by step
            tiles = -(-rows // TILE)
            out = [np.empty((tiles, *p.shape[1:]), p.dtype) for p in parts]
        for dst, src in zip(out, parts, strict=True):
            dst[a // TILE : a // TILE + len(src)] = src
    qweight, scales, biases = out
    return PackedWeight(
        qweight=qweight,
        scales=scales,
        biases=biases,
        rows=rows,
        cols=cols,
        bits=weight.bits,
        group_size=weight.group_size,
    )


def _pack_rows(weight: QuantizedWeight, a: int, b: int) -> tuple[np.ndarray, ...]:
    """(qweight, scales, biases) tiles of rows a..b (a on a tile boundary)."""
    rows, cols = b - a, weight.shape[1]
    tiles = -(-rows // TILE)
    pad = tiles * TILE - rows
    q = np.pad(unpack(weight.packed[a:b], weight.bits), ((0, pad), (0, 0)))  # uint8
    blocks = cols // BLOCK
    if weight.bits == 4:
        q = q.reshape(tiles, TILE, blocks, 2, 4, 4)  # tile, row, block, half, chunk, byte
        chunks = q[:, :, :, 0] | (q[:, :, :, 1] << np.uint8(4))
        qweight = chunks.transpose(0, 2, 3, 1, 4).reshape(tiles, blocks, 4 * 64)
    else:
        q = q.reshape(tiles, TILE, blocks, 8, 4)
        qweight = q.transpose(0, 2, 3, 1, 4).reshape(tiles, blocks, 8 * 64)

    def params(x: np.ndarray) -> np.ndarray:
        x = np.pad(x[a:b].astype(np.float16), ((0, pad), (0, 0)))
        return np.ascontiguousarray(x.reshape(tiles, TILE, -1).transpose(0, 2, 1))

    return np.ascontiguousarray(qweight), params(weight.scales), params(weight.biases)
