"""Repacking affine weights into the kernel's tiles keeps every value where the kernel reads it."""

from __future__ import annotations

import numpy as np
import pytest

from edge_infer.formats.affine import quantize
from edge_infer.kernels.cpu.packing import TILE, pack_weight


def unpack_tiles(p) -> np.ndarray:
    """The integer values back as [rows, cols], reading the layout the docstring describes."""
    tiles, blocks, _ = p.qweight.shape
    q = np.zeros((tiles * TILE, blocks * 32), np.uint8)
    for t in range(tiles):
        for b in range(blocks):
            for r in range(TILE):
                for m in range(p.qweight.shape[2] // 64):
                    for i in range(4):
                        byte = p.qweight[t, b, m * 64 + r * 4 + i]
                        if p.bits == 4:
                            q[t * TILE + r, b * 32 + 4 * m + i] = byte & 15
                            q[t * TILE + r, b * 32 + 16 + 4 * m + i] = byte >> 4
                        else:
                            q[t * TILE + r, b * 32 + 4 * m + i] = byte
    return q[: p.rows]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_layout_round_trips(bits, group):
    w = quantize(np.random.default_rng(0).standard_normal((21, 128)), bits, group)
    p = pack_weight(w)
    assert p.qweight.shape == (2, 4, (4 if bits == 4 else 8) * 64)
    assert np.array_equal(unpack_tiles(p), w.unpack())
    for packed, src in ((p.scales, w.scales), (p.biases, w.biases)):
        assert packed.shape == (2, 128 // group, TILE)
        flat = packed.transpose(0, 2, 1).reshape(-1, 128 // group)
        assert np.array_equal(flat[:21], src) and not flat[21:].any()


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_step_by_step_gives_the_same_tiles(bits: int) -> None:
    x = np.random.default_rng(bits).standard_normal((200, 64)).astype(np.float32)
    w = quantize(x, bits, 32)
    whole = pack_weight(w, rows_per_step=256)
    for step in (TILE, 3 * TILE, 192):
        p = pack_weight(w, rows_per_step=step)
        for part in ("qweight", "scales", "biases"):
            np.testing.assert_array_equal(getattr(p, part), getattr(whole, part))
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_weight(w, rows_per_step=20)
