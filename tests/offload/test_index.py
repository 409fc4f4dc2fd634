"""The page index on disk: a round trip, reuse of the blocks it shares with the agent's files,
and refusal (so a rebuild) of one that is corrupt, stale or made for other settings."""

from __future__ import annotations

import numpy as np
import pytest

from edge_infer.offload.index import PageIndex


def _index(n_layers: int = 3, blocks: int = 3, page: int = 32, seed: int = 0) -> PageIndex:
    rng = np.random.default_rng(seed)
    index = PageIndex(n_layers, page)
    for layer in range(1, n_layers):  # layer 0 attends densely: no pages
        index.extend(layer, rng.normal(size=(2, blocks * 256, 16)).astype(np.float32))
    return index


def _same(a: PageIndex, b: PageIndex, layers) -> bool:
    return all(
        np.array_equal(x, y) for i in layers for x, y in zip(a.bounds(i), b.bounds(i), strict=True)
    )


def test_round_trip_and_the_shared_prefix_of_blocks(tmp_path):
    index = _index()
    path = tmp_path / "pages.safetensors"
    files = ["b0-aa", "b256-bb", "b512-cc"]
    index.save(path, files)
    back = PageIndex.load(path, files, 3, 32, 256)
    assert back is not None and back.covered() == 768 and back.tokens(0) == 0
    assert _same(index, back, [1, 2])
    # the agent's second block changed since: only the first is reused
    cut = PageIndex.load(path, ["b0-aa", "b256-xx", "b512-cc"], 3, 32, 256)
    assert cut is not None and cut.covered() == 256
    assert np.array_equal(cut.bounds(1)[0], index.bounds(1)[0][:, :8])
    # the agent grew: the index covers what it covers, the rest is computed later
    grown = PageIndex.load(path, [*files, "b768-dd"], 3, 32, 256)
    assert grown is not None and grown.covered() == 768


@pytest.mark.parametrize(
    "damage", ["missing", "garbage", "truncated", "other page", "other layers", "no shared block"]
)
def test_an_index_that_cannot_be_used_is_refused(tmp_path, damage):
    path = tmp_path / "pages.safetensors"
    files = ["b0-aa", "b256-bb", "b512-cc"]
    _index().save(path, files)
    page, n_layers = 32, 3
    if damage == "missing":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
    elif damage == "other page":
        page = 64
    elif damage == "other layers":
        n_layers = 4
    else:
        files = ["b0-zz"]
    assert PageIndex.load(path, files, n_layers, page, 256) is None


def test_a_snapshot_does_not_follow_later_growth_or_cuts():
    index = _index(blocks=2)
    snap = index.snapshot()
    index.extend(1, np.zeros((2, 256, 16), np.float32))
    index.truncate(256)
    assert snap.covered() == 512 and index.covered() == 256
