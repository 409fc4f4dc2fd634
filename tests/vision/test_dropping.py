"""Visual-token dropping: HiRED's official formulas, the spatial default, baselines, order."""

from __future__ import annotations

import numpy as np
import pytest

from edge_infer.vision import dropping
from edge_infer.vision.dropping import Budget


def official_hired(first: np.ndarray, final: np.ndarray, rate: float, alpha: float) -> np.ndarray:
    """HiRED_token_selection + HiRED_sub_img_budgets of the authors' LLaVA-NeXT (LLaVA-1.5 for a
    single view), in numpy.

    ``first``/``final``: head-summed CLS rows [N_p, n] at the first and the final feature layer,
    base view first. Returns the boolean keep mask [N_p, n].
    """
    num_patch, n = final.shape
    mask = np.zeros((num_patch, n), dtype=bool)
    if num_patch == 1:  # the LLaVA-1.5 version: one top-k
        mask[0, np.argsort(-final[0])[: int(n * rate)]] = True
        return mask
    num_total_budget = int(num_patch * n * rate)
    full_img_budget = min(int(num_total_budget * alpha), n)
    total_sub_img_budget = min(num_total_budget - full_img_budget, (num_patch - 1) * n)
    mask[0, np.argsort(-final[0])[:full_img_budget]] = True
    if total_sub_img_budget > 0:
        spatial = np.zeros(n, dtype=bool)
        spatial[np.argsort(-first[0])[: int(n * (1 - alpha))]] = True
        # the grid is read as (width, height) but only its product shapes the flat reshape
        g = num_patch - 1
        sums = spatial.reshape(g, -1).sum(-1)
        ratio = sums.astype(np.float32) / np.float32(sums.sum())
        budgets = np.minimum((ratio * np.float32(total_sub_img_budget)).astype(np.int32), n)
        for i, k in enumerate(budgets):
            mask[i + 1, np.argsort(-final[i + 1])[:k]] = True
    return mask


def as_mask(kept: list[np.ndarray], n: int) -> np.ndarray:
    mask = np.zeros((len(kept), n), dtype=bool)
    for p, idx in enumerate(kept):
        mask[p, idx] = True
    return mask


TABLE = [
    (n_p, n, r, a)
    for n_p, n in [(1, 576), (3, 576), (4, 576), (5, 576), (7, 576), (5, 64), (2, 36)]
    for r in (0.05, 0.1, 0.2, 0.5, 1.0)
    for a in (0.0, 0.3, 0.5, 0.9)
]


@pytest.mark.parametrize(("n_p", "n", "rate", "alpha"), TABLE)
def test_reference_mode_equals_the_official_formulas(n_p, n, rate, alpha):
    rng = np.random.default_rng(n_p * 1000 + int(rate * 100) + int(alpha * 10))
    first = rng.random((n_p, n))
    final = rng.random((n_p, n))
    kept = dropping.hired(first[0], final, Budget(rate, alpha), mode="reference")
    assert np.array_equal(as_mask(kept, n), official_hired(first, final, rate, alpha))


def test_reference_mode_on_the_papers_worked_example():
    rng = np.random.default_rng(0)
    alloc = dropping.allocate_hired(rng.random(576), 4, Budget(0.2, 0.5), mode="reference")
    assert alloc.base == 288 and alloc.tiles.sum() <= 288


def planted(n_side: int, hot: tuple[slice, slice], rng) -> np.ndarray:
    scores = rng.random((n_side, n_side)) * 0.01
    scores[hot] += 1.0
    return scores.reshape(-1)


def test_spatial_mode_puts_the_budget_where_the_attention_is():
    rng = np.random.default_rng(1)
    # 2x2 tiles over a square image; all attention in the top-right quadrant of the base view
    first = planted(24, (slice(0, 12), slice(12, 24)), rng)
    tiles = dropping.anyres_tile_map((600, 600), (672, 672), 336, (24, 24))
    # alpha 0.75 marks the 144 hottest base tokens: exactly the quadrant
    alloc = dropping.allocate_hired(first, 4, Budget(0.2, 0.75), tile_of_token=tiles)
    assert alloc.base == 432 and alloc.tiles.tolist() == [0, 144, 0, 0]
    assert alloc.skip.tolist() == [True, False, True, True]
    # the official flat slices are base rows 0-5 and 6-11: half the mass each, wrong tiles
    ref = dropping.allocate_hired(first, 4, Budget(0.2, 0.75), mode="reference")
    assert ref.tiles.tolist() == [72, 72, 0, 0]


def test_spatial_mode_follows_a_wide_grid_and_padding():
    rng = np.random.default_rng(2)
    # a 2:1 image on a 336x672 canvas (1 row, 2 tiles): attention on its right half
    first = planted(24, (slice(0, 24), slice(12, 24)), rng)
    tiles = dropping.anyres_tile_map((300, 600), (336, 672), 336, (24, 24))
    assert set(tiles.tolist()) == {0, 1}
    alloc = dropping.allocate_hired(first, 2, Budget(0.2, 0.5), tile_of_token=tiles)
    assert alloc.tiles.tolist() == [0, int(3 * 576 * 0.2) - alloc.base]


def test_spatial_budget_is_a_share_of_the_tokens_full_would_pass():
    rng = np.random.default_rng(4)
    n = 576
    first = rng.random(n)
    tiles = dropping.anyres_tile_map((480, 640), (672, 672), 336, (24, 24))
    # the lower half of the bottom tiles is padding: they hold 288 tokens each
    cap = np.array([576, 576, 288, 288])
    alloc = dropping.allocate_hired(first, 4, Budget(0.2), tile_of_token=tiles, capacity=cap)
    assert alloc.total == int((n + cap.sum()) * 0.2)
    assert (alloc.tiles <= cap).all()
    # a budget larger than a tile holds goes to the others, and rate 1 keeps exactly what is there
    full = dropping.allocate_hired(first, 4, Budget(1.0), tile_of_token=tiles, capacity=cap)
    assert full.base == n and full.tiles.tolist() == cap.tolist()
    # the reference mode keeps the official count over the padded grid
    ref = dropping.allocate_hired(first, 4, Budget(0.2), mode="reference", capacity=cap)
    assert ref.total <= dropping.total_budget(5, n, 0.2) and ref.base == 288
    with pytest.raises(ValueError, match="tile capacity"):
        dropping.allocate_hired(first, 4, Budget(0.2), tile_of_token=tiles, capacity=cap[:3])


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.5, 1.0])
def test_baselines_spend_the_budget_on_valid_tokens_only(rate):
    rng = np.random.default_rng(5)
    valid = np.ones((3, 64), dtype=bool)
    valid[1, 40:] = False
    valid[2, :] = False
    valid[2, ::7] = True
    final = rng.random((3, 64))
    for kept in (dropping.uniform(3, 64, rate, valid), dropping.cls_topk(final, rate, valid)):
        assert sum(len(k) for k in kept) == int(valid.sum() * rate)
        for p, idx in enumerate(kept):
            assert valid[p, idx].all() and np.all(np.diff(idx) > 0)
    # in proportion to what each partition holds
    sizes = [len(k) for k in dropping.uniform(3, 64, 0.5, valid)]
    assert sizes == [32, 20, 5]


def test_stretched_tiles_map_the_global_image_onto_the_grid():
    m = dropping.stretched_tile_map(2, 3, (8, 8)).reshape(8, 8)
    assert m[0, 0] == 0 and m[0, 7] == 2 and m[7, 0] == 3 and m[7, 7] == 5
    assert np.bincount(m.reshape(-1)).sum() == 64


@pytest.mark.parametrize("n_p", [1, 2, 5, 7])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_rate_one_keeps_everything(n_p, alpha):
    rng = np.random.default_rng(n_p)
    n = 64
    first, final = rng.random(n), rng.random((n_p, n))
    tiles = dropping.stretched_tile_map(1, n_p - 1, (8, 8)) if n_p > 1 else None
    kept = dropping.hired(first, final, Budget(1.0, alpha), tile_of_token=tiles)
    assert all(np.array_equal(k, np.arange(n)) for k in kept)
    assert all(np.array_equal(k, np.arange(n)) for k in dropping.full(n_p, n))
    assert all(len(k) == n for k in dropping.uniform(n_p, n, 1.0))
    assert all(len(k) == n for k in dropping.cls_topk(final, 1.0))


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.2, 0.5, 0.9])
def test_the_spatial_budget_is_spent_exactly_and_kept_tokens_keep_their_order(rate):
    rng = np.random.default_rng(3)
    n_p, n = 5, 576
    first, final = rng.random(n), rng.random((n_p, n))
    tiles = dropping.anyres_tile_map((480, 640), (672, 672), 336, (24, 24))
    for kept in (
        dropping.hired(first, final, Budget(rate), tile_of_token=tiles),
        dropping.hired(np.zeros(n), final, Budget(rate), tile_of_token=tiles),
        dropping.cls_topk(final, rate),
        dropping.uniform(n_p, n, rate),
    ):
        assert sum(len(k) for k in kept) == int(n_p * n * rate)
        for idx in kept:
            assert np.all(np.diff(idx) > 0) and (len(idx) == 0 or 0 <= idx[0] <= idx[-1] < n)


def test_selection_takes_the_top_final_scores():
    final = np.array([[0.1, 0.9, 0.2, 0.8], [0.5, 0.1, 0.7, 0.3]])
    assert [k.tolist() for k in dropping.cls_topk(final, 0.5)] == [[1, 3], [0, 2]]
    alloc = dropping.Allocation(1, np.array([0, 3]))
    kept = dropping.select_hired(final[0], [None, np.array([3.0, 2.0, 1.0, 0.0])], alloc)
    assert [k.tolist() for k in kept] == [[1], [], [0, 1, 2]]
    with pytest.raises(ValueError, match="non-zero budget"):
        dropping.select_hired(final[0], [np.ones(4), None], alloc)


def test_received_scores_sum_over_each_pixel_shuffle_group():
    scores = np.arange(16, dtype=float)  # a 4x4 patch grid, factor 2
    assert dropping.group_scores(scores, 4, 4, 2).tolist() == [
        0 + 1 + 4 + 5,
        2 + 3 + 6 + 7,
        8 + 9 + 12 + 13,
        10 + 11 + 14 + 15,
    ]
    with pytest.raises(ValueError, match="4x4 grid divisible by 3"):
        dropping.group_scores(scores, 4, 4, 3)


def test_share_caps_and_redistributes():
    assert dropping.share(10, np.array([5, 1, 0]), 4).tolist() == [4, 4, 2]
    assert dropping.share(7, np.array([1, 1, 1]), 10).tolist() == [3, 2, 2]
    assert dropping.share(0, np.array([1, 2]), 5).tolist() == [0, 0]


def test_budget_fields_are_checked():
    with pytest.raises(ValueError, match="rate"):
        Budget(rate=1.5)
    with pytest.raises(ValueError, match="alpha"):
        Budget(alpha=-0.1)
